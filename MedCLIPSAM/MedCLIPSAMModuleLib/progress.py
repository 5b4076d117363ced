"""The CLI's output as the panel reads it: `--progress json` records, the error sentence of a failed run,
and the metrics file training writes."""

import json
import signal

from .i18n import tr as _


def parseProgressLine(line):
    """One line of `--progress json` output as a dict, or None if it is not a progress record.

    Returns {"stage", "done", "total", "message", "fraction"} (fraction in 0..1, None when total is 0).
    Anything else - log text, a partial line, JSON of another shape - gives None, never an exception.
    """
    text = line.strip() if isinstance(line, str) else ""
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("stage"), str):
        return None
    done, total = record.get("done", 0), record.get("total", 0)
    for value in (done, total):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            return None
    message = record.get("message", "")
    fraction = min(1.0, done / total) if total > 0 else None
    return {"stage": record["stage"], "done": done, "total": total,
            "message": message if isinstance(message, str) else str(message), "fraction": fraction}


def errorMessageFromOutput(stderrLines, returnCode, lastProgress=None):
    """The sentence to show when the process failed: the CLI's 'medclipsam: error: ...' line if any."""
    for line in reversed(stderrLines):
        if line.startswith("medclipsam: error:"):
            return line[len("medclipsam: error:"):].strip()
    if lastProgress and lastProgress.get("stage") == "error" and lastProgress.get("message"):
        return lastProgress["message"]
    if returnCode is not None and returnCode < 0:
        if -returnCode == getattr(signal, "SIGKILL", 9):
            return _("the segmentation process was killed (often: the computer ran out of memory)")
        return _("the segmentation process was stopped by signal {signal}").format(signal=-returnCode)
    lastLines = [line for line in stderrLines if line.strip()]
    if lastLines:
        return _("the segmentation process failed: {last}").format(last=lastLines[-1].strip())
    return _("the segmentation process stopped with exit code {code}").format(code=returnCode)


def readMetricsFile(path):
    """The per-epoch records of a train-weak / medclipseg metrics.jsonl (lines with a loss), in order.
    Lines that are not JSON objects are skipped: the file may be read while it grows."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("loss"), (int, float)) and "epoch" in record:
            records.append(record)
    return records
