"""How a job ends for the scene, whatever it ran: SegmentationResult, waitForJob (scripts and tests),
endJob (the temporary folder goes, completedCallback), importRun (a run's files into the scene)."""

import logging
import shutil
import time

from . import results
from .i18n import tr as _


class SegmentationResult:
    """What a run ended with. status: 'succeeded', 'failed' or 'cancelled'. The evidence of a succeeded
    zero-shot run: `report` (the parsed report JSON, or None), `summaries` ({prompt: one line}, from the
    report) and `saliencyVolumeNodes` ({prompt: volume node}, not shown until asked for)."""

    def __init__(self, status, message="", returnCode=None, segmentationNode=None, segmentIds=(),
                 uncertaintyVolumeNode=None, elapsedSeconds=0.0, report=None, summaries=None,
                 saliencyVolumeNodes=None):
        self.status = status
        self.message = message
        self.returnCode = returnCode
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
        return f"SegmentationResult({self.status!r}, {self.message!r}, returnCode={self.returnCode})"


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


def importRun(logic, inputVolume, segmentationNode, outputPath, uncertaintyPath=None, show3D=False, returnCode=0,
              elapsed=0.0, message="", saliencyPaths=None, reportPath=None):
    """A finished run's files (written by a local process or downloaded from a service) into the scene:
    the SegmentationResult every backend returns. saliencyPaths / reportPath: the run's evidence files
    (`segment --saliency-output / --report-output`), None when the run did not write them. saliencyPaths:
    the --saliency-output path as given (S.nrrd; S_<prompt>.nrrd are found from the report's prompts), a
    list in the report's prompt order, or {prompt: path}. The evidence replaces the previous run's on the
    same segmentation node (results.importEvidence); evidence that cannot be read is logged and left out,
    the segmentation still counts."""
    scene = logic.scene
    if not scene.IsNodePresent(inputVolume):
        return SegmentationResult("failed", _("the input volume was removed from the scene during the run"),
                                  returnCode, elapsedSeconds=elapsed)
    target = segmentationNode
    if target is not None and not scene.IsNodePresent(target):
        target = None  # deleted during the run: make a new one rather than fail
    try:
        node, segmentIds, uncertainty = logic.importResult(outputPath, inputVolume, target, uncertaintyPath, show3D)
    except Exception as exc:  # a result the scene cannot take must not look like success
        logging.exception("MedCLIP-SAM: importing the result failed")
        return SegmentationResult("failed", _("could not load the result: {error}").format(error=exc),
                                  returnCode, elapsedSeconds=elapsed)
    try:
        report, summaries, saliency = results.importEvidence(scene, node, uncertainty, saliencyPaths, reportPath)
    except Exception:  # the segmentation is in: evidence that cannot be shown must not turn it into a failure
        logging.exception("MedCLIP-SAM: importing the run's evidence failed")
        report, summaries, saliency = None, {}, {}
    return SegmentationResult("succeeded", message, returnCode, node, segmentIds, uncertainty, elapsed, report,
                              summaries, saliency)
