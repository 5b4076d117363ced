"""How a job meets the scene, whatever it ran: WorkerJob (a worker thread's messages handled on the scene's
thread), a finished run's files into the scene (segments into one segmentation node on the input volume's
grid, the uncertainty map, the evidence), SegmentationResult, endJob (the temporary folder goes,
completedCallback), waitForJob (scripts and tests)."""

import logging
import os
import queue
import shutil
import threading
import time

from .i18n import tr as _
from .paths import mrml


def importResult(scene, segmentationPath, inputVolume, segmentationNode=None, uncertaintyPath=None, show3D=False,
                 terminologiesLogic=None):
    """(segmentation node, segment IDs, uncertainty node)."""
    lib = mrml()
    imported = lib.import_segmentation_file(scene, segmentationPath, inputVolume, segmentationNode,
                                            replace_existing=True, terminologies_logic=terminologiesLogic)
    node, segmentIds = imported["node"], list(imported["segment_ids"])
    if show3D:
        node.CreateClosedSurfaceRepresentation()
    uncertainty = None
    if uncertaintyPath and os.path.isfile(uncertaintyPath):
        uncertainty = lib.load_uncertainty_volume(scene, uncertaintyPath, node)
    return node, segmentIds, uncertainty


def _evidenceLib():
    from .paths import useShippedLibrary

    useShippedLibrary()
    from MedCLIPSAMLib import evidence, evidence_mrml

    return evidence, evidence_mrml


def saliencyFiles(saliencyPaths, prompts):
    """{prompt: file} from what a run was given or returned: the --saliency-output path itself (S.nrrd for
    one prompt, S_<prompt>.nrrd each for several, as the CLI names them), a list in prompt order, or a
    dict. Files that do not exist are left out."""
    evidence, _ = _evidenceLib()
    if not saliencyPaths:
        return {}
    if isinstance(saliencyPaths, dict):
        files = dict(saliencyPaths)
    elif isinstance(saliencyPaths, (str, os.PathLike)):
        files = dict(zip(prompts, evidence.saliency_paths(saliencyPaths, list(prompts)))) if prompts else {}
    elif len(saliencyPaths) == len(prompts):
        files = dict(zip(prompts, saliencyPaths))
    elif len(saliencyPaths) == 1:  # the base path in a list
        return saliencyFiles(saliencyPaths[0], prompts)
    else:
        files = {}
    return {p: os.fspath(f) for p, f in files.items() if f and os.path.isfile(f)}


def importEvidence(scene, segmentationNode, uncertaintyNode=None, saliencyPaths=None, reportPath=None):
    """A run's evidence onto its segmentation node: (report dict or None, {prompt: summary line},
    {prompt: saliency volume node}).

    The nodes replace the previous run's on the same segmentation node: a prompt's saliency volume and
    chart are refilled, those of prompts this run did not have are removed (charts are made when first
    shown; an existing one is updated). The uncertainty volume is styled as the same heat map (entropy in
    bits: 0..1). Volumes are loaded but not shown. A report or file that cannot be read is logged and
    skipped: the old evidence goes, so nothing shown describes another run."""
    import logging

    evidence, evidence_mrml = _evidenceLib()
    if uncertaintyNode is not None:
        evidence_mrml.style_heat_map(scene, uncertaintyNode)
    report, summaries = None, {}
    if reportPath and os.path.isfile(reportPath):
        try:
            report = evidence.read_report(reportPath)
            summaries = {e["prompt"]: e.get("summary") or evidence.summary_line(e) for e in report["prompts"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logging.warning(f"MedCLIP-SAM: the run's report '{reportPath}' cannot be read: {exc}")
            report, summaries = None, {}
    entries = report["prompts"] if report else []
    prompts = [e["prompt"] for e in entries]
    if not prompts and isinstance(saliencyPaths, dict):
        prompts = list(saliencyPaths)

    files = saliencyFiles(saliencyPaths, prompts)
    saliency = {}
    for prompt, path in files.items():
        try:
            saliency[prompt] = evidence_mrml.load_evidence_volume(scene, path, segmentationNode, prompt)
        except Exception as exc:  # an unreadable file: no overlay for this prompt
            logging.warning(f"MedCLIP-SAM: the saliency file '{path}' cannot be loaded: {exc}")
    # what is left of an earlier run: prompts this run did not have, saliency this run did not bring, and
    # charts without this run's numbers
    for node in evidence_mrml.evidence_nodes(segmentationNode):
        if not scene.IsNodePresent(node):
            continue
        prompt = node.GetAttribute(evidence_mrml.PROMPT_ATTRIBUTE)
        kind = node.GetAttribute(evidence_mrml.KIND_ATTRIBUTE)
        if (kind == "saliency" and prompt not in saliency) or (kind != "saliency" and prompt not in summaries):
            evidence_mrml.remove_evidence(scene, segmentationNode, prompt, kind)
    # a chart already made (shown after an earlier run) follows this run's numbers
    for entry in entries:
        if evidence_mrml.evidence_nodes(segmentationNode, entry["prompt"], "chart"):
            try:
                evidence_mrml.update_evidence_chart(scene, segmentationNode, entry)
            except (KeyError, TypeError, ValueError) as exc:  # a report without the chart's numbers
                logging.warning(f"MedCLIP-SAM: no chart for '{entry['prompt']}': {exc}")
                evidence_mrml.remove_evidence(scene, segmentationNode, entry["prompt"], "chart")
    return report, summaries, saliency


class SegmentationResult:
    """What a run ended with. status: 'succeeded', 'failed' or 'cancelled'. The evidence of a succeeded
    zero-shot run: `report` (the parsed report JSON, or None), `summaries` ({prompt: one line}, from the
    report) and `saliencyVolumeNodes` ({prompt: volume node}, not shown until asked for)."""

    def __init__(self, status, message="", segmentationNode=None, segmentIds=(),
                 uncertaintyVolumeNode=None, elapsedSeconds=0.0, report=None, summaries=None,
                 saliencyVolumeNodes=None):
        self.status = status
        self.message = message
        self.segmentationNode = segmentationNode
        self.segmentIds = list(segmentIds)
        self.uncertaintyVolumeNode = uncertaintyVolumeNode
        self.elapsedSeconds = elapsedSeconds
        self.report = report
        self.summaries = dict(summaries or {})
        self.saliencyVolumeNodes = dict(saliencyVolumeNodes or {})

    @property
    def succeeded(self):
        return self.status == "succeeded"

    def __repr__(self):
        return f"SegmentationResult({self.status!r}, {self.message!r})"


def waitForJob(job, timeout=None, pollInterval=0.05):
    """Poll `job` until it ends (scripts and tests; the panel polls from its QTimer instead); cancel it if
    `timeout` seconds pass, then keep polling until the cancel has taken effect. Returns job.result."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while job.poll():
        if deadline is not None and time.monotonic() > deadline:
            job.cancel()
            deadline = None
        time.sleep(pollInterval)
    return job.result


def endJob(job, outcome, label="MedCLIP-SAM"):
    """How every job ends, on the scene's thread: job.result = outcome() (which may import into the scene);
    the temporary folder goes whatever happens; a run that did not succeed is logged; completedCallback."""
    try:
        job.result = outcome()
    finally:
        shutil.rmtree(job.tempDir, ignore_errors=True)
    if job.result.status != "succeeded":
        logging.warning(f"{label}: {job.result.status}: {job.result.message}")
    if job.completedCallback:
        job.completedCallback(job.result)


def importRun(logic, inputVolume, segmentationNode, outputPath, uncertaintyPath=None, show3D=False,
              elapsed=0.0, message="", saliencyPaths=None, reportPath=None):
    """A finished run's files (downloaded from the service) into the scene:
    the SegmentationResult every backend returns. saliencyPaths / reportPath: the run's evidence files
    (`segment --saliency-output / --report-output`), None when the run did not write them. saliencyPaths:
    the --saliency-output path as given (S.nrrd; S_<prompt>.nrrd are found from the report's prompts), a
    list in the report's prompt order, or {prompt: path}. The evidence replaces the previous run's on the
    same segmentation node (results.importEvidence); evidence that cannot be read is logged and left out,
    the segmentation still counts."""
    scene = logic.scene
    if not scene.IsNodePresent(inputVolume):
        return SegmentationResult("failed", _("the input volume was removed from the scene during the run"),
                                  elapsedSeconds=elapsed)
    target = segmentationNode
    if target is not None and not scene.IsNodePresent(target):
        target = None  # deleted during the run: make a new one rather than fail
    try:
        node, segmentIds, uncertainty = logic.importResult(outputPath, inputVolume, target, uncertaintyPath, show3D)
    except Exception as exc:  # a result the scene cannot take must not look like success
        logging.exception("MedCLIP-SAM: importing the result failed")
        return SegmentationResult("failed", _("could not load the result: {error}").format(error=exc),
                                  elapsedSeconds=elapsed)
    try:
        report, summaries, saliency = importEvidence(scene, node, uncertainty, saliencyPaths, reportPath)
    except Exception:  # the segmentation is in: evidence that cannot be shown must not turn it into a failure
        logging.exception("MedCLIP-SAM: importing the run's evidence failed")
        report, summaries, saliency = None, {}, {}
    return SegmentationResult("succeeded", message, node, segmentIds, uncertainty, elapsed, report,
                              summaries, saliency)


class Worker:
    """What Widget.cleanup and the self-test use of a job's `process`: wait, the members still alive."""

    def __init__(self, thread):
        self.thread = thread
        self.cancelRequested = False

    def wait(self, timeout=None):
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def aliveMembers(self):
        return [self.thread] if self.thread.is_alive() else []


class WorkerJob:
    """A job whose network waits run on a worker thread (ServiceJob, TrainingJob): the worker posts
    (kind, payload) messages; poll(), on the scene's thread (the panel's QTimer, or wait()), reports
    "progress" and hands the others to _handle(), which returns False once the job has ended."""

    def __init__(self, target, name, progressCallback=None, logCallback=None, completedCallback=None):
        self.progressCallback, self.logCallback, self.completedCallback = \
            progressCallback, logCallback, completedCallback
        self.result = None
        self.lastProgress = None
        self.startTime = time.monotonic()
        self._messages = queue.Queue()
        self._cancel = threading.Event()
        self.process = Worker(threading.Thread(target=target, name=name, daemon=True))

    @property
    def isRunning(self):
        return self.result is None

    def cancel(self):
        self.process.cancelRequested = True
        self._cancel.set()

    def wait(self, timeout=None, pollInterval=0.05):
        return waitForJob(self, timeout, pollInterval)

    def poll(self):
        """Handle what the worker sent; finish once it is done. Returns True while running."""
        if self.result is not None:
            return False
        while True:
            try:
                kind, payload = self._messages.get_nowait()
            except queue.Empty:
                return True
            if kind == "progress":
                self.lastProgress = payload
                if self.progressCallback:
                    self.progressCallback(payload)
            elif not self._handle(kind, payload):
                return False

    def _post(self, kind, payload=None):
        self._messages.put((kind, payload))
