"""Jobs: a background process plus what its run means for the scene. SegmentationJob imports the
result; WeakSupervisionJob mirrors training metrics into a table and chart and registers the model.
poll() must run on the thread that owns the scene (the panel's QTimer, or wait() in scripts and tests).
"""

import collections
import logging
import os
import shutil
import time

from . import results
from .i18n import tr as _
from .progress import errorMessageFromOutput, parseProgressLine, readMetricsFile


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


class BackgroundJob:
    """What a segmentation run and a weak-supervision run share: read the process's lines (JSON progress
    lines go to _progress, the others to the log), wait, cancel, and finish once on the scene's thread.

    poll() must be called from the thread that owns the scene (the GUI's QTimer, or wait()).
    """

    def __init__(self, process, tempDir, progressCallback=None, logCallback=None, completedCallback=None):
        self.process = process
        self.tempDir = tempDir
        self.progressCallback = progressCallback
        self.logCallback = logCallback
        self.completedCallback = completedCallback
        self.lastProgress = None
        self.stderrTail = collections.deque(maxlen=200)
        self.result = None
        self.startTime = time.monotonic()

    @property
    def isRunning(self):
        return self.result is None

    def cancel(self):
        self.process.cancel()

    def poll(self):
        """Handle new output; finish the job once the process has ended. Returns True while running."""
        if self.result is not None:
            return False
        for step, stream, line in self.process.taggedLines():
            if stream == "stdout":
                progress = parseProgressLine(line)
                if progress is not None:
                    self._progress(step, progress)
                    continue
            else:
                self.stderrTail.append(line)
            logging.info(f"medclipsam: {line}")
            if self.logCallback:
                self.logCallback(line)
        self._whileRunning()
        if not self.process.isFinished() or self.process.hasPendingLines():
            return True  # (lines that arrived just before the exit are handled on the next poll)
        self._finish()
        return False

    def wait(self, timeout=None, pollInterval=0.05):
        return waitForJob(self, timeout, pollInterval)

    def _progress(self, step, progress):
        raise NotImplementedError

    def _whileRunning(self):
        """Called on every poll (after the new lines)."""

    def _finish(self):
        raise NotImplementedError


class SegmentationJob(BackgroundJob):
    """One run of `medclipsam segment` (or of a trained model's predict command) for a volume; imports the
    result into the scene when it succeeds.

    poll() must be called from the thread that owns the scene (the GUI's QTimer, or wait()): it reports
    progress and, at the end, changes the scene. A cancelled or failed run leaves the scene as it was and
    removes its temporary folder. `process` may be a ProcessChain (MedCLIPSeg: one command per prompt);
    then outputPath and uncertaintyPath are lists, one file per command, merged at import.
    saliencyPath / reportPath: what the command was given as --saliency-output / --report-output.
    """

    def __init__(self, logic, process, tempDir, inputVolume, prompts, segmentationNode, outputPath,
                 uncertaintyPath=None, show3D=False, progressCallback=None, logCallback=None,
                 completedCallback=None, saliencyPath=None, reportPath=None):
        super().__init__(process, tempDir, progressCallback, logCallback, completedCallback)
        self.logic = logic
        self.inputVolume = inputVolume
        self.prompts = list(prompts)
        self.segmentationNode = segmentationNode
        self.outputPath = outputPath
        self.outputPaths = [outputPath] if isinstance(outputPath, (str, os.PathLike)) else list(outputPath)
        self.uncertaintyPath = uncertaintyPath
        self.show3D = show3D
        self.saliencyPath = saliencyPath
        self.reportPath = reportPath

    def _progress(self, step, progress):
        self.lastProgress = progress
        if self.progressCallback:
            self.progressCallback(self._overall(step, progress))

    def _overall(self, step, progress):
        """A chain's steps share the bar: step k of n covers [k/n, (k+1)/n]."""
        steps = getattr(self.process, "stepCount", 1)
        if steps <= 1 or progress["fraction"] is None:
            return progress
        fraction = (step + progress["fraction"]) / steps
        return dict(progress, fraction=fraction, message=f"{step + 1}/{steps}: {progress['message']}")

    def _finish(self):
        endJob(self, self._outcome)

    def _outcome(self):
        returnCode = self.process.returnCode
        elapsed = time.monotonic() - self.startTime
        if self.process.cancelRequested or returnCode == 130:
            return SegmentationResult("cancelled", _("cancelled; the scene was not changed"), returnCode,
                                      elapsedSeconds=elapsed)
        if returnCode == 0 and all(os.path.isfile(p) for p in self.outputPaths):
            return self._importResult(returnCode, elapsed)
        if returnCode == 0:
            return SegmentationResult("failed", _("the segmentation process ended without writing its result"),
                                      returnCode, elapsedSeconds=elapsed)
        message = errorMessageFromOutput(list(self.stderrTail), returnCode, self.lastProgress)
        return SegmentationResult("failed", message, returnCode, elapsedSeconds=elapsed)

    def _importResult(self, returnCode, elapsed):
        message = self.lastProgress["message"] if self.lastProgress else ""
        return importRun(self.logic, self.inputVolume, self.segmentationNode, self.outputPath, self.uncertaintyPath,
                         self.show3D, returnCode, elapsed, message, saliencyPaths=self.saliencyPath,
                         reportPath=self.reportPath)


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


class WeakSupervisionResult:
    """How a weak-supervision run ended. status: 'succeeded', 'failed' or 'cancelled'; on success
    `model` is the registry entry of the trained model."""

    def __init__(self, status, message="", returnCode=None, modelDir=None, model=None, tableNode=None,
                 chartNode=None, elapsedSeconds=0.0):
        self.status = status
        self.message = message
        self.returnCode = returnCode
        self.modelDir = modelDir
        self.model = model
        self.tableNode = tableNode
        self.chartNode = chartNode
        self.elapsedSeconds = elapsedSeconds

    @property
    def succeeded(self):
        return self.status == "succeeded"

    def __repr__(self):
        return f"WeakSupervisionResult({self.status!r}, {self.message!r}, returnCode={self.returnCode})"


class WeakSupervisionJob(BackgroundJob):
    """`medclipsam pseudo-label` then `medclipsam train-weak` (a ProcessChain), with one progress fraction
    over both steps, the training metrics mirrored into a table node with a loss / validation-Dice chart,
    and the model registered when training succeeds.

    poll() must run on the scene's thread. Cancel stops the process tree, removes the table and chart
    nodes this job made (the scene is left as it was; only the log remains) and registers nothing.
    """

    STEPS = ("pseudo-label", "train-weak")
    MAIN_STAGES = ("pseudo-label", "train")  # the stage of each step whose done/total moves the bar
    WEIGHTS = (0.4, 0.6)                     # share of the bar per step

    def __init__(self, logic, process, tempDir, modelDir, modelName, progressCallback=None, logCallback=None,
                 metricsCallback=None, completedCallback=None):
        super().__init__(process, tempDir, progressCallback, logCallback, completedCallback)
        self.logic = logic
        self.modelDir = os.fspath(modelDir)
        self.modelName = modelName
        self.metricsCallback = metricsCallback
        self.metricsPath = os.path.join(self.modelDir, "metrics.jsonl")
        # an older run's metrics in the same folder must not be shown as this run's
        self._metricsStamp = self._stamp()
        self.tableNode = None
        self.chartNode = None
        self.seriesNodes = []
        self.fraction = 0.0
        self._stepFractions = [0.0] * len(self.STEPS)

    def _whileRunning(self):
        if self.process.step >= 1:  # training has started: mirror its metrics
            self._updateMetrics()

    # ------------------------------------------------------------------------------ progress
    def _progress(self, step, progress):
        """Map a step's own progress onto the whole run; the fraction never goes back."""
        self.lastProgress = dict(progress, step=self.STEPS[step])
        if progress["stage"] == self.MAIN_STAGES[step] and progress["fraction"] is not None:
            self._stepFractions[step] = max(self._stepFractions[step], progress["fraction"])
        elif progress["stage"] == "finished":
            self._stepFractions[step] = 1.0
        overall = sum(self.WEIGHTS[:step]) + self.WEIGHTS[step] * self._stepFractions[step]
        self.fraction = max(self.fraction, min(1.0, overall))
        if self.progressCallback:
            self.progressCallback(dict(self.lastProgress, fraction=self.fraction))

    # ------------------------------------------------------------------------------- metrics
    def _stamp(self):
        try:
            info = os.stat(self.metricsPath)
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_size)

    def _updateMetrics(self):
        stamp = self._stamp()
        if stamp is None or stamp == self._metricsStamp:
            return
        self._metricsStamp = stamp
        records = readMetricsFile(self.metricsPath)
        if not records:
            return
        from . import weak  # here: weak imports this file

        if self.tableNode is None:
            self.tableNode, self.seriesNodes, self.chartNode = weak.createMetricsPlot(self.logic.scene, self.modelName)
        weak.updateMetricsTable(self.tableNode, records)
        if self.metricsCallback:
            self.metricsCallback(self.tableNode, self.chartNode)

    def sceneClosed(self):
        """The scene is closing: the run goes on (weak.start copied the volumes into its own folder, a
        folder of images is read by the process), the table and chart go with the scene and are made
        again, with every epoch so far, at the next metrics update."""
        self.tableNode, self.chartNode, self.seriesNodes = None, None, []
        self._metricsStamp = None

    def _removePlotNodes(self):
        scene = self.logic.scene
        for node in [self.chartNode, *self.seriesNodes, self.tableNode]:
            if node is not None and scene.IsNodePresent(node):
                scene.RemoveNode(node)
        self.tableNode, self.chartNode, self.seriesNodes = None, None, []

    # --------------------------------------------------------------------------------- finish
    def _finish(self):
        endJob(self, self._outcome, "MedCLIP-SAM weak supervision")

    def _outcome(self):
        returnCode = self.process.returnCode
        elapsed = time.monotonic() - self.startTime
        step = self.STEPS[self.process.step]
        if self.process.cancelRequested or returnCode == 130:
            self._removePlotNodes()
            return WeakSupervisionResult("cancelled", _("cancelled; no model was registered"), returnCode,
                                         self.modelDir, elapsedSeconds=elapsed)
        if returnCode == 0:
            self._updateMetrics()  # the last epoch and the ensemble line
            return self._register(returnCode, elapsed)
        message = errorMessageFromOutput(list(self.stderrTail), returnCode, self.lastProgress)
        if self.lastProgress and self.lastProgress.get("stage") == "finished":
            message = self.lastProgress["message"]  # pseudo-label: "N labelled, M failed, ..."
        return WeakSupervisionResult("failed", f"{step}: {message}", returnCode, self.modelDir,
                                     tableNode=self.tableNode, chartNode=self.chartNode, elapsedSeconds=elapsed)

    def _register(self, returnCode, elapsed):
        try:
            entry = self.logic.registerTrainedModel(self.modelDir, self.modelName)
        except ValueError as exc:
            return WeakSupervisionResult("failed", str(exc), returnCode, self.modelDir, tableNode=self.tableNode,
                                         chartNode=self.chartNode, elapsedSeconds=elapsed)
        message = self.lastProgress["message"] if self.lastProgress else ""
        return WeakSupervisionResult("succeeded", message, returnCode, self.modelDir, entry, self.tableNode,
                                     self.chartNode, elapsed)
