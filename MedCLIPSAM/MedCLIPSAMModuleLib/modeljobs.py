"""`medclipsam models verify|download NAME` for several models, one process after another, polled from
the panel's timer: the GUI never waits for a checksum or a download (verify reads gigabytes)."""

import re
import signal

from .i18n import tr as _
from .paths import useShippedLibrary
from .setupprocess import BackgroundProcess


class ModelsJob:
    """Runs `commandFor(name)` for each name in turn. poll() returns True while running; `results` maps
    each name to (ok, message); progressCallback(name, percent or None, line) sees the output."""

    def __init__(self, names, commandFor, env=None, progressCallback=None, completedCallback=None):
        self.names = list(names)
        self.commandFor = commandFor
        self.env = env
        self.progressCallback = progressCallback
        self.completedCallback = completedCallback
        self.results = {}
        self.process = None
        self._index = -1
        self._lines = []
        self._cancelled = False

    @property
    def isRunning(self):
        return len(self.results) < len(self.names) and not (self._cancelled and self.process is None)

    def start(self):
        self._next()
        return self

    def _next(self):
        self._index += 1
        self._lines = []
        self.process = None
        if self._index < len(self.names) and not self._cancelled:
            self.process = BackgroundProcess(self.commandFor(self.names[self._index]), env=self.env)
            self.process.start()

    def cancel(self):
        self._cancelled = True
        if self.process is not None:
            self.process.cancel()

    def poll(self):
        while self.process is not None:
            name = self.names[self._index]
            for _stream, line in self.process.lines():
                self._lines.append(line)
                if self.progressCallback:
                    percent = re.search(r"(\d{1,3})%\|", line)  # tqdm's bar
                    self.progressCallback(name, int(percent.group(1)) if percent else None, line)
            if not self.process.isFinished() or self.process.hasPendingLines():
                return True
            if not self._cancelled:  # a cancelled check says nothing about the model
                self.results[name] = self._result(name, self.process.returnCode)
            self._next()
        if self.completedCallback:
            callback, self.completedCallback = self.completedCallback, None
            callback(self.results)
        return False

    def _result(self, name, returnCode):
        if returnCode == 0:
            return True, "\n".join(self._lines).strip()
        prefix = f"{name}: FAILED: "  # `models verify` says which file goes where
        for line in self._lines:
            if line.startswith(prefix):
                return False, line[len(prefix):]
        return False, errorMessageFromOutput(self._lines, returnCode)


def requiredModels(models=""):
    """Registry names a run with `--models MODELS` loads, to check before running (random test models
    need none)."""
    text = (models or "").strip()
    if text.startswith("tiny-random") or text.startswith("random-"):
        return []
    useShippedLibrary()
    from MedCLIPSAMLib.models import REGISTRY, resolve_model_set

    return [n for n in resolve_model_set(text or "default") if n in REGISTRY]


def errorMessageFromOutput(lines, returnCode):
    """The sentence to show when a models command failed: the CLI's 'medclipsam: error: ...' line if any."""
    for line in reversed(lines):
        if line.startswith("medclipsam: error:"):
            return line[len("medclipsam: error:"):].strip()
    if returnCode is not None and returnCode < 0:
        if -returnCode == getattr(signal, "SIGKILL", 9):
            return _("the process was killed (often: the computer ran out of memory)")
        return _("the process was stopped by signal {signal}").format(signal=-returnCode)
    lastLines = [line for line in lines if line.strip()]
    if lastLines:
        return _("the process failed: {last}").format(last=lastLines[-1].strip())
    return _("the process stopped with exit code {code}").format(code=returnCode)


def command(cli, action, name=None, *extra):
    """`medclipsam models ACTION [NAME] [flags]` (verify, download; verify --adopt)."""
    return list(cli) + ["models", action] + ([name] if name else []) + list(extra)
