"""MedCLIP-SAM for 3D Slicer: segment structures in a volume from text prompts.

The panel is thin. The segmentation itself runs in a background process (`python -m MedCLIPSAMLib segment
... --progress json`, with Slicer's own Python) so Slicer stays responsive and Cancel really stops it.
The same holds for the weak-supervision section (`pseudo-label` then `train-weak`, a ProcessChain) and for
segmenting with a registered trained model (`predict`, or `medclipseg predict` once per prompt); the
registry of trained models is MedCLIPSAMLib.trained_models.
Everything that does not need Qt lives in MedCLIPSAMLogic (command line, progress lines, process control)
and in MedCLIPSAMLib.mrml (scene import and export), so the pytest suite runs it with slicer-core.

Loading this file needs only `slicer`'s names (ScriptedLoadableModule, i18n, parameterNodeWrapper, node
classes) and the standard library: qt, ctk, numpy, SimpleITK and MedCLIPSAMLib are imported inside the
functions that use them, and torch is never imported in Slicer's process.
"""

import codecs
import collections
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Annotated

import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

PRESETS = ("v1", "v2", "fast")
AXES = ("axial", "coronal", "sagittal")
DEVICES = ("auto", "cuda", "mps", "cpu")
IMAGE_SOURCES = ("scene", "folder")  # weak supervision: the loaded volumes, or a folder of images
DIMS = (2, 3)
SETTINGS_GROUP = "MedCLIPSAM"
# Below this much free GPU memory a run may fail with out-of-memory (BiomedCLIP + SAM2 in half precision).
MIN_GPU_FREE_MIB = 4096

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------------- paths
def _candidateRoots():
    """Where the extension's files are: beside this file when installed (the build copies Resources/ and
    MedCLIPSAMLib/ next to the module), one folder up in a source checkout."""
    return [_MODULE_DIR, os.path.dirname(_MODULE_DIR)]


def resourcePath(relativePath):
    """Absolute path of a file in Resources/, installed or in a source checkout."""
    for root in _candidateRoots():
        path = os.path.join(root, "Resources", relativePath)
        if os.path.exists(path):
            return path
    return os.path.join(_MODULE_DIR, "Resources", relativePath)


def libraryParentDir():
    """The folder that holds the MedCLIPSAMLib package shipped with the module (None if not shipped)."""
    for root in _candidateRoots():
        if os.path.isfile(os.path.join(root, "MedCLIPSAMLib", "__init__.py")):
            return root
    return None


def _useShippedLibrary():
    """Make `import MedCLIPSAMLib` find the package shipped with the module (a source checkout has it one
    folder up, which Slicer does not put on sys.path)."""
    parent = libraryParentDir()
    if parent and parent not in sys.path:
        sys.path.insert(0, parent)


def _mrml():
    """MedCLIPSAMLib.mrml (light: numpy and, when used, SimpleITK; never torch)."""
    _useShippedLibrary()
    from MedCLIPSAMLib import mrml

    return mrml


#
# MedCLIPSAM
#


class MedCLIPSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedCLIP-SAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedCLIP-SAM for 3D Slicer contributors"]
        self.parent.helpText = _("""
Segment structures in a volume by describing them in words ("brain tumor", "left kidney"), with the
MedCLIP-SAM methods: BiomedCLIP finds where the text matches the image, SAM2 turns that into a mask.
The result is an ordinary segmentation, ready for the Segment Editor.
See the <a href="https://github.com/medclipsam/SlicerMedCLIPSAM">extension documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Implements MedCLIP-SAM (Koleilat, Asgariandehkordi, Rivaz and Xiao, MICCAI 2024), MedCLIP-SAMv2 and
MedCLIPSeg, on top of BiomedCLIP (Microsoft) and SAM 2 (Meta). Please cite the papers when you use the results.
""")
        # In a source checkout Resources/ sits beside the module folder, where Slicer does not look.
        iconPath = resourcePath("Icons/MedCLIPSAM.png")
        if os.path.isfile(iconPath):
            import qt

            self.parent.icon = qt.QIcon(iconPath)


#
# MedCLIPSAMParameterNode
#


@parameterNodeWrapper
class MedCLIPSAMParameterNode:
    """Everything the panel remembers with the scene (and, except the nodes, between sessions).

    inputVolume - the volume to segment.
    prompts - targets, one per line.
    preset / axis / device / models - passed to `medclipsam segment`.
    absentIf - what a slice without the target looks like ('|' between sentences): a target no slice
        matches better gives an empty segment (`--absent-if`; empty: off).
    computeUncertainty - also load a per-voxel uncertainty volume.
    show3D - build closed surfaces so the result shows in 3D.
    outputSegmentation - segmentation to add segments to (None: a new one is created).
    trainedModel - a registered trained model to segment with instead of the preset ("" : the preset).
    weak* - the weak-supervision section: image source (scene volumes or a folder), prompts, epochs,
        2D/3D, device, model name and output folder (empty: the cache's 'trained' folder).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    prompts: str = ""
    preset: Annotated[str, Choice(PRESETS)] = "v2"
    axis: Annotated[str, Choice(AXES)] = "axial"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    models: str = ""
    absentIf: str = ""
    computeUncertainty: bool = False
    show3D: bool = True
    outputSegmentation: vtkMRMLSegmentationNode
    trainedModel: str = ""
    weakImageSource: Annotated[str, Choice(IMAGE_SOURCES)] = "scene"
    weakImagesFolder: str = ""
    weakPrompts: str = ""
    weakEpochs: int = 50
    weakDims: Annotated[int, Choice(DIMS)] = 2
    weakDevice: Annotated[str, Choice(DEVICES)] = "auto"
    weakModelName: str = "weak-model"
    weakOutputFolder: str = ""


# Settings kept between sessions (qt.QSettings), with their types.
REMEMBERED_SETTINGS = {"prompts": str, "preset": str, "axis": str, "device": str, "models": str, "absentIf": str,
                       "computeUncertainty": bool, "show3D": bool, "trainedModel": str,
                       "weakImageSource": str, "weakImagesFolder": str, "weakEpochs": int, "weakDims": int,
                       "weakDevice": str, "weakModelName": str, "weakOutputFolder": str}


#
# Helpers without Qt (used by the logic and tested with pytest)
#


def cleanPrompts(text):
    """Prompts from the text box: one per line, trimmed, blank lines and repeats (any case) dropped."""
    lines = text.splitlines() if isinstance(text, str) else list(text)
    prompts, seen = [], set()
    for line in lines:
        prompt = " ".join(line.split())
        if prompt and prompt.lower() not in seen:
            seen.add(prompt.lower())
            prompts.append(prompt)
    return prompts


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


class LineSplitter:
    """Turns chunks of bytes from a pipe into complete lines (UTF-8 safe across chunk borders).

    Lines end at '\\n' or '\\r' (tqdm redraws its bar with '\\r'); blank lines are dropped. flush() returns
    the unterminated rest at end of stream.
    """

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, chunk):
        text = self._pending + self._decoder.decode(chunk)
        parts = re.split(r"\r\n|\r|\n", text)
        self._pending = parts.pop()
        return [p for p in parts if p.strip()]

    def flush(self):
        rest = (self._pending + self._decoder.decode(b"", final=True)).strip()
        self._pending = ""
        return [rest] if rest else []


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


def parseNvidiaSmi(text):
    """GPUs from `nvidia-smi --query-gpu=name,memory.free,memory.total --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            gpus.append({"name": parts[0], "freeMiB": int(float(parts[1])), "totalMiB": int(float(parts[2]))})
        except ValueError:
            continue
    return gpus


def describeDevice(device, gpus, appleSilicon=False):
    """(text, warning) for the device choice: which hardware runs, and whether it looks too small."""
    if device in ("auto", "cuda") and gpus:
        gpu = max(gpus, key=lambda g: g["freeMiB"])
        text = _("{name}: {free:.1f} GiB free of {total:.1f} GiB").format(
            name=gpu["name"], free=gpu["freeMiB"] / 1024, total=gpu["totalMiB"] / 1024)
        if gpu["freeMiB"] < MIN_GPU_FREE_MIB:
            return text + " - " + _("less than {need} GiB free: the run may fail for lack of memory; close "
                                    "other GPU programs or choose cpu").format(need=MIN_GPU_FREE_MIB // 1024), True
        return text, False
    if device == "cuda":
        return _("no NVIDIA GPU found (nvidia-smi did not answer): choose auto or cpu"), True
    if device in ("auto", "mps") and appleSilicon:
        return _("Apple GPU (memory shared with the system)"), False
    if device == "mps":
        return _("Apple MPS is only available on Apple silicon Macs: choose auto or cpu"), True
    return _("CPU: works everywhere but is slow; the 'fast' preset is recommended"), device == "auto"


#
# Background process (no Qt: the widget polls it from a QTimer, scripts and tests call wait())
#


class BackgroundProcess:
    """A child process in its own process group whose stdout/stderr lines are collected by threads.

    Cancel sends SIGTERM to the whole group (the CLI stops cleanly and writes nothing), then SIGKILL after
    a grace period; on Windows the tree is ended with taskkill /T.
    """

    KILL_GRACE_SECONDS = 3.0
    PIPE_GRACE_SECONDS = 2.0  # after exit, wait this long for grandchildren holding the pipes

    def __init__(self, command, env=None, cwd=None):
        self.command = list(command)
        self.env = env
        self.cwd = cwd
        self.proc = None
        self.cancelRequested = False
        self._killDeadline = None
        self._exitTime = None
        self._queue = queue.Queue()
        self._threads = []

    def start(self):
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own process group: Cancel reaches every child
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=self.env, cwd=self.cwd, bufsize=0, **kwargs)
        for name, pipe in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            thread = threading.Thread(target=self._read, args=(name, pipe), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _read(self, name, pipe):
        splitter = LineSplitter()
        try:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                for line in splitter.feed(chunk):
                    self._queue.put((name, line))
        except (OSError, ValueError):
            pass
        for line in splitter.flush():
            self._queue.put((name, line))
        pipe.close()

    def taggedLines(self):
        """(step, stream, line) like ProcessChain's: a single process is step 0."""
        return [(0, stream, line) for stream, line in self.lines()]

    def lines(self):
        """(stream, line) pairs received since the last call."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def hasPendingLines(self):
        return not self._queue.empty()

    @property
    def returnCode(self):
        return None if self.proc is None else self.proc.poll()

    def isFinished(self):
        """True once the process has exited and its output has been read (or the pipe grace has passed)."""
        if self.proc is None:
            return False
        self._escalateIfDue()
        if self.proc.poll() is None:
            return False
        if self._exitTime is None:
            self._exitTime = time.monotonic()
        readersDone = not any(t.is_alive() for t in self._threads)
        return readersDone or time.monotonic() - self._exitTime > self.PIPE_GRACE_SECONDS

    def cancel(self):
        """Ask the process tree to stop; it is killed if still running after KILL_GRACE_SECONDS."""
        self.cancelRequested = True
        if self.proc is None or self.proc.poll() is not None:
            return
        if os.name == "nt":
            self._killTree()
            return
        self._signalGroup(signal.SIGTERM)
        self._killDeadline = time.monotonic() + self.KILL_GRACE_SECONDS

    def _escalateIfDue(self):
        if self._killDeadline is not None and time.monotonic() >= self._killDeadline:
            self._killDeadline = None
            self._killTree()

    def _signalGroup(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _killTree(self):
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.proc.pid)], capture_output=True, check=False)
        else:
            # The group outlives its leader: kill it even when the leader has already exited.
            self._signalGroup(signal.SIGKILL)


class ProcessChain:
    """Several commands run one after another as BackgroundProcesses, with BackgroundProcess's interface.

    The next command starts only when the previous one exited with 0 and no cancel was asked for, so a
    failure or Cancel ends the chain; returnCode is the last started command's. taggedLines() also says
    which step (0-based) printed each line, for progress that spans the steps.
    """

    def __init__(self, commands, env=None, cwd=None):
        self.commands = [list(c) for c in commands]
        if not self.commands:
            raise ValueError("no command to run")
        self.env = env
        self.cwd = cwd
        self.step = -1
        self.current = None
        self._buffered = []

    @property
    def stepCount(self):
        return len(self.commands)

    @property
    def proc(self):
        return None if self.current is None else self.current.proc

    @property
    def cancelRequested(self):
        return self.current is not None and self.current.cancelRequested

    @property
    def returnCode(self):
        return None if self.current is None else self.current.returnCode

    def start(self):
        self._startNext()

    def _startNext(self):
        self.step += 1
        self.current = BackgroundProcess(self.commands[self.step], env=self.env, cwd=self.cwd)
        self.current.start()

    def taggedLines(self):
        """(step, stream, line) triples received since the last call."""
        out = self._buffered + [(self.step, stream, line) for stream, line in self.current.lines()]
        self._buffered = []
        return out

    def hasPendingLines(self):
        return bool(self._buffered) or self.current.hasPendingLines()

    def isFinished(self):
        if not self.current.isFinished():
            return False
        if self.current.returnCode == 0 and not self.current.cancelRequested and self.step + 1 < self.stepCount:
            # keep the finished step's last lines, tagged with its own step, before moving on
            self._buffered += [(self.step, stream, line) for stream, line in self.current.lines()]
            self._startNext()
            return False
        return True

    def cancel(self):
        self.current.cancel()


class SegmentationResult:
    """What a run ended with. status: 'succeeded', 'failed' or 'cancelled'."""

    def __init__(self, status, message="", returnCode=None, segmentationNode=None, segmentIds=(),
                 uncertaintyVolumeNode=None, elapsedSeconds=0.0):
        self.status = status
        self.message = message
        self.returnCode = returnCode
        self.segmentationNode = segmentationNode
        self.segmentIds = list(segmentIds)
        self.uncertaintyVolumeNode = uncertaintyVolumeNode
        self.elapsedSeconds = elapsedSeconds

    @property
    def succeeded(self):
        return self.status == "succeeded"

    def __repr__(self):
        return f"SegmentationResult({self.status!r}, {self.message!r}, returnCode={self.returnCode})"


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
        """Block until the job ends (for scripts and tests); cancels it if `timeout` seconds pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
            time.sleep(pollInterval)
        return self.result

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
    """

    def __init__(self, logic, process, tempDir, inputVolume, prompts, segmentationNode, outputPath,
                 uncertaintyPath=None, show3D=False, progressCallback=None, logCallback=None,
                 completedCallback=None):
        super().__init__(process, tempDir, progressCallback, logCallback, completedCallback)
        self.logic = logic
        self.inputVolume = inputVolume
        self.prompts = list(prompts)
        self.segmentationNode = segmentationNode
        self.outputPath = outputPath
        self.outputPaths = [outputPath] if isinstance(outputPath, (str, os.PathLike)) else list(outputPath)
        self.uncertaintyPath = uncertaintyPath
        self.show3D = show3D

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
        returnCode = self.process.returnCode
        elapsed = time.monotonic() - self.startTime
        try:
            if self.process.cancelRequested or returnCode == 130:
                self.result = SegmentationResult("cancelled", _("cancelled; the scene was not changed"),
                                                 returnCode, elapsedSeconds=elapsed)
            elif returnCode == 0 and all(os.path.isfile(p) for p in self.outputPaths):
                self.result = self._importResult(returnCode, elapsed)
            elif returnCode == 0:
                self.result = SegmentationResult("failed", _("the segmentation process ended without writing its "
                                                             "result"), returnCode, elapsedSeconds=elapsed)
            else:
                message = errorMessageFromOutput(list(self.stderrTail), returnCode, self.lastProgress)
                self.result = SegmentationResult("failed", message, returnCode, elapsedSeconds=elapsed)
        finally:
            shutil.rmtree(self.tempDir, ignore_errors=True)
        if self.result.status != "succeeded":
            logging.warning(f"MedCLIP-SAM: {self.result.status}: {self.result.message}")
        if self.completedCallback:
            self.completedCallback(self.result)

    def _importResult(self, returnCode, elapsed):
        scene = self.logic.scene
        if not scene.IsNodePresent(self.inputVolume):
            return SegmentationResult("failed", _("the input volume was removed from the scene during the run"),
                                      returnCode, elapsedSeconds=elapsed)
        target = self.segmentationNode
        if target is not None and not scene.IsNodePresent(target):
            target = None  # deleted during the run: make a new one rather than fail
        try:
            node, segmentIds, uncertainty = self.logic.importResult(
                self.outputPath, self.inputVolume, target, self.uncertaintyPath, self.show3D)
        except Exception as exc:  # a result the scene cannot take must not look like success
            logging.exception("MedCLIP-SAM: importing the result failed")
            return SegmentationResult("failed", _("could not load the result: {error}").format(error=exc),
                                      returnCode, elapsedSeconds=elapsed)
        message = self.lastProgress["message"] if self.lastProgress else ""
        return SegmentationResult("succeeded", message, returnCode, node, segmentIds, uncertainty, elapsed)


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
        if self.tableNode is None:
            self.tableNode, self.seriesNodes, self.chartNode = self.logic.createMetricsPlot(self.modelName)
        self.logic.updateMetricsTable(self.tableNode, records)
        if self.metricsCallback:
            self.metricsCallback(self.tableNode, self.chartNode)

    def _removePlotNodes(self):
        scene = self.logic.scene
        for node in [self.chartNode, *self.seriesNodes, self.tableNode]:
            if node is not None and scene.IsNodePresent(node):
                scene.RemoveNode(node)
        self.tableNode, self.chartNode, self.seriesNodes = None, None, []

    # --------------------------------------------------------------------------------- finish
    def _finish(self):
        returnCode = self.process.returnCode
        elapsed = time.monotonic() - self.startTime
        step = self.STEPS[self.process.step]
        try:
            if self.process.cancelRequested or returnCode == 130:
                self._removePlotNodes()
                self.result = WeakSupervisionResult("cancelled", _("cancelled; no model was registered"),
                                                    returnCode, self.modelDir, elapsedSeconds=elapsed)
            elif returnCode == 0:
                self._updateMetrics()  # the last epoch and the ensemble line
                self.result = self._register(returnCode, elapsed)
            else:
                message = errorMessageFromOutput(list(self.stderrTail), returnCode, self.lastProgress)
                if self.lastProgress and self.lastProgress.get("stage") == "finished":
                    message = self.lastProgress["message"]  # pseudo-label: "N labelled, M failed, ..."
                self.result = WeakSupervisionResult("failed", f"{step}: {message}", returnCode, self.modelDir,
                                                    tableNode=self.tableNode, chartNode=self.chartNode,
                                                    elapsedSeconds=elapsed)
        finally:
            shutil.rmtree(self.tempDir, ignore_errors=True)
        if self.result.status != "succeeded":
            logging.warning(f"MedCLIP-SAM weak supervision: {self.result.status}: {self.result.message}")
        if self.completedCallback:
            self.completedCallback(self.result)

    def _register(self, returnCode, elapsed):
        try:
            entry = self.logic.registerTrainedModel(self.modelDir, self.modelName)
        except ValueError as exc:
            return WeakSupervisionResult("failed", str(exc), returnCode, self.modelDir, tableNode=self.tableNode,
                                         chartNode=self.chartNode, elapsedSeconds=elapsed)
        message = self.lastProgress["message"] if self.lastProgress else ""
        return WeakSupervisionResult("succeeded", message, returnCode, self.modelDir, entry, self.tableNode,
                                     self.chartNode, elapsed)


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


def safeName(text, fallback="case"):
    """A file/folder name from a node or model name (letters, digits, - _ . only)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text or "").strip("._")
    return name or fallback


#
# MedCLIPSAMLogic
#


class MedCLIPSAMLogic(ScriptedLoadableModuleLogic):
    """Runs `medclipsam segment` in the background and brings its result into the scene. Usable without
    the GUI:

        logic = MedCLIPSAMLogic()
        result = logic.process(volumeNode, ["brain tumor"], preset="v2")   # waits
        job = logic.startSegmentation(volumeNode, ["liver"], progressCallback=print)  # returns at once
    """

    # (import name, pip requirement); torch and torchvision come through the PyTorch extension.
    # Keep in step with pyproject.toml's dependencies (a test checks it).
    PYTHON_PACKAGES = [
        ("torch", None),
        ("torchvision", None),
        ("open_clip", "open_clip_torch>=3.0"),
        ("transformers", "transformers>=4.40"),
        ("huggingface_hub", "huggingface_hub>=0.23"),
        ("safetensors", "safetensors>=0.4"),
        ("pydensecrf", "pydensecrf2>=1.1"),
        ("numpy", "numpy>=1.24"),
        ("scipy", "scipy>=1.10"),
        ("skimage", "scikit-image>=0.22"),
        ("sklearn", "scikit-learn>=1.3"),
        ("SimpleITK", "SimpleITK>=2.3"),
        ("vtk", "vtk>=9.2"),
        ("PIL", "pillow>=10"),
        ("tqdm", "tqdm>=4.66"),
        ("matplotlib", "matplotlib>=3.7"),
        ("slicerio", "slicerio>=1.1"),  # writes the .seg.nrrd
        ("nrrd", "pynrrd>=1.0"),
        ("sam2", "sam2"),  # an sdist built against the installed torch (see installPythonPackages)
    ]
    MINIMUM_TORCH = ">=2.5"
    # train-weak's network (pyproject's optional "train" dependencies)
    TRAINING_PACKAGES = [("monai", "monai>=1.3")]

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        # Test hooks: a different interpreter, or a whole command replacing `python -m MedCLIPSAMLib`.
        self.pythonExecutable = None
        self.cliPrefix = None
        self.extraEnvironment = {}
        self.verifiedModels = set()

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def getParameterNode(self):
        return MedCLIPSAMParameterNode(super().getParameterNode())

    # -------------------------------------------------------------------------------- command line
    def python(self):
        """Slicer's Python launcher inside Slicer (as slicer.util.pip_install uses), else this interpreter."""
        if self.pythonExecutable:
            return self.pythonExecutable
        if hasattr(slicer, "app"):
            found = shutil.which("PythonSlicer")
            if found:
                return found
        return sys.executable

    def cliCommand(self):
        return list(self.cliPrefix) if self.cliPrefix else [self.python(), "-m", "MedCLIPSAMLib"]

    def environment(self):
        """The child's environment: this one, with the shipped MedCLIPSAMLib first on the Python path."""
        env = dict(os.environ)
        parent = libraryParentDir()
        if parent:
            env["PYTHONPATH"] = os.pathsep.join([parent] + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        env.update(self.extraEnvironment)
        return env

    def buildSegmentCommand(self, inputPath, outputPath, prompts, preset="v2", axis="axial", device="auto",
                            models="", uncertaintyPath=None, absentIf=""):
        """The `medclipsam segment` command line (a list: no shell, prompts are passed verbatim)."""
        prompts = cleanPrompts(prompts)
        if not prompts:
            raise ValueError(_("Enter at least one prompt (one target per line)."))
        if preset not in PRESETS or axis not in AXES or device not in DEVICES:
            raise ValueError(_("Unknown preset, axis or device: {values}").format(values=(preset, axis, device)))
        command = self.cliCommand() + ["segment", os.fspath(inputPath)]
        for prompt in prompts:
            command += ["--prompt", prompt]
        command += ["--output", os.fspath(outputPath), "--preset", preset, "--axis", axis, "--device", device,
                    "--progress", "json"]
        if models and models.strip():
            command += ["--models", models.strip()]
        if uncertaintyPath:
            command += ["--uncertainty-output", os.fspath(uncertaintyPath)]
        if absentIf and absentIf.strip():
            command += ["--absent-if", absentIf.strip()]
        return command

    def buildPredictCommand(self, modelDir, inputPath, outputPath, device="auto", uncertaintyPath=None):
        """`medclipsam predict MODEL_DIR VOLUME` for a train-weak model (segments named by its labels)."""
        if device not in DEVICES:
            raise ValueError(_("Unknown device: {value}").format(value=device))
        command = self.cliCommand() + ["predict", os.fspath(modelDir), os.fspath(inputPath), "--output",
                                       os.fspath(outputPath), "--device", device, "--progress", "json"]
        if uncertaintyPath:
            command += ["--uncertainty-output", os.fspath(uncertaintyPath)]
        return command

    def buildMedCLIPSegPredictCommand(self, modelDir, inputPath, prompt, outputPath, device="auto",
                                      uncertaintyPath=None, samples=None):
        """`medclipsam medclipseg predict MODEL_DIR VOLUME --prompt P` (the CLI takes one prompt a run)."""
        prompts = cleanPrompts([prompt])
        if len(prompts) != 1:
            raise ValueError(_("Enter at least one prompt (one target per line)."))
        if device not in DEVICES:
            raise ValueError(_("Unknown device: {value}").format(value=device))
        command = self.cliCommand() + ["medclipseg", "predict", os.fspath(modelDir), os.fspath(inputPath),
                                       "--prompt", prompts[0], "--output", os.fspath(outputPath), "--device",
                                       device, "--progress", "json"]
        if uncertaintyPath:
            command += ["--uncertainty-output", os.fspath(uncertaintyPath)]
        if samples is not None:
            command += ["--samples", str(int(samples))]
        return command

    def buildPseudoLabelCommand(self, dataPaths, outputDir, prompts, preset="v2", axis="axial", device="auto",
                                models="", extraArgs=()):
        """`medclipsam pseudo-label DATA... --prompt P... --output-dir DIR` (zero-shot masks as labels)."""
        prompts = cleanPrompts(prompts)
        if not prompts:
            raise ValueError(_("Enter at least one prompt for weak supervision (one target per line)."))
        if preset not in PRESETS or axis not in AXES or device not in DEVICES:
            raise ValueError(_("Unknown preset, axis or device: {values}").format(values=(preset, axis, device)))
        command = self.cliCommand() + ["pseudo-label"] + [os.fspath(d) for d in dataPaths]
        for prompt in prompts:
            command += ["--prompt", prompt]
        command += ["--output-dir", os.fspath(outputDir), "--preset", preset, "--axis", axis, "--device", device,
                    "--progress", "json"]
        if models and models.strip():
            command += ["--models", models.strip()]
        return command + [str(a) for a in extraArgs]

    def buildTrainWeakCommand(self, images, labels, modelDir, labelNames, epochs=50, dims=2, axis="axial",
                              device="auto", snapshots=None, batchSize=None, baseFilters=None,
                              samplesPerEpoch=None, patchSize=None, extraArgs=()):
        """`medclipsam train-weak --images ... --labels ... --output MODEL_DIR` (labels named by the prompts)."""
        epochs, dims = int(epochs), int(dims)
        if epochs < 1:
            raise ValueError(_("Train for at least one epoch."))
        if dims not in DIMS or axis not in AXES or device not in DEVICES:
            raise ValueError(_("Unknown dimensions, axis or device: {values}").format(values=(dims, axis, device)))
        # the CLI's default of 5 snapshots needs at least 5 epochs
        snapshots = min(5, epochs) if snapshots is None else int(snapshots)
        command = self.cliCommand() + ["train-weak", "--images", os.fspath(images), "--labels", os.fspath(labels),
                                       "--output", os.fspath(modelDir), "--epochs", str(epochs), "--dims", str(dims),
                                       "--axis", axis, "--device", device, "--snapshots", str(snapshots),
                                       "--progress", "json"]
        for name in cleanPrompts(labelNames):
            command += ["--label-name", name]
        for flag, value in (("--batch-size", batchSize), ("--base-filters", baseFilters),
                            ("--samples-per-epoch", samplesPerEpoch)):
            if value is not None:
                command += [flag, str(int(value))]
        if patchSize:
            command += ["--patch-size"] + [str(int(v)) for v in patchSize]
        return command + [str(a) for a in extraArgs]

    # ------------------------------------------------------------------------------------- running
    def _temporaryDirectory(self):
        base = None
        if hasattr(slicer, "app"):
            base = slicer.app.temporaryPath
        return tempfile.mkdtemp(prefix="MedCLIPSAM-", dir=base if base and os.path.isdir(base) else None)

    def startSegmentation(self, inputVolume, prompts, segmentationNode=None, preset="v2", axis="axial",
                          device="auto", models="", computeUncertainty=False, show3D=False,
                          progressCallback=None, logCallback=None, completedCallback=None, trainedModel=None,
                          samples=None, absentIf=""):
        """Write the input, start the process and return a SegmentationJob (call its poll() or wait()).

        trainedModel: the name of a registered trained model to use instead of the zero-shot preset. A
        weak-supervision model segments what it was trained on (its label names; prompts are not needed);
        a MedCLIPSeg model runs once per prompt (its first training prompt when none is given), the
        results merged into one segmentation. samples: MedCLIPSeg's stochastic passes (CLI default 30).
        absentIf: sentences ('|' between) that describe a slice without the target (zero-shot only).
        """
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError(_("Select an input volume that has image data."))
        prompts = cleanPrompts(prompts)
        entry = self.trainedModel(trainedModel) if trainedModel else None
        if entry is not None and entry["kind"] == "weak":
            prompts = list(entry["labels"])
        elif entry is not None and not prompts:
            prompts = list(entry["labels"][:1])
        tempDir = self._temporaryDirectory()
        try:
            inputPath = os.path.join(tempDir, "input.nrrd")
            commands, outputs, uncertainties = self._segmentationCommands(
                entry, inputPath, tempDir, prompts, preset, axis, device, models, computeUncertainty, samples,
                absentIf)
            _mrml().write_volume_node(inputVolume, inputPath)
            for command in commands:
                logging.info("MedCLIP-SAM: running " + " ".join(command))
            if len(commands) == 1:
                process = BackgroundProcess(commands[0], env=self.environment(), cwd=tempDir)
                outputs = outputs[0]
                uncertainties = uncertainties[0] if uncertainties else None
            else:
                process = ProcessChain(commands, env=self.environment(), cwd=tempDir)
            process.start()
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        return SegmentationJob(self, process, tempDir, inputVolume, prompts, segmentationNode, outputs,
                               uncertainties, show3D, progressCallback, logCallback, completedCallback)

    def _segmentationCommands(self, entry, inputPath, tempDir, prompts, preset, axis, device, models,
                              computeUncertainty, samples, absentIf=""):
        """(commands, output paths, uncertainty paths) for the zero-shot pipeline or a trained model."""
        def paths(k):
            output = os.path.join(tempDir, f"output-{k}.seg.nrrd")
            return output, (os.path.join(tempDir, f"uncertainty-{k}.nrrd") if computeUncertainty else None)

        if entry is None:
            output, uncertainty = paths(0)
            command = self.buildSegmentCommand(inputPath, output, prompts, preset, axis, device, models, uncertainty,
                                               absentIf)
            return [command], [output], [uncertainty] if uncertainty else []
        if entry["kind"] == "weak":
            output, uncertainty = paths(0)
            command = self.buildPredictCommand(entry["folder"], inputPath, output, device, uncertainty)
            return [command], [output], [uncertainty] if uncertainty else []
        if not prompts:
            raise ValueError(_("Enter at least one prompt (one target per line)."))
        commands, outputs, uncertainties = [], [], []
        for k, prompt in enumerate(prompts):
            output, uncertainty = paths(k)
            commands.append(self.buildMedCLIPSegPredictCommand(entry["folder"], inputPath, prompt, output, device,
                                                               uncertainty, samples))
            outputs.append(output)
            uncertainties += [uncertainty] if uncertainty else []
        return commands, outputs, uncertainties

    def process(self, inputVolume, prompts, segmentationNode=None, timeout=None, **kwargs):
        """Run and wait; returns a SegmentationResult (check .status)."""
        return self.startSegmentation(inputVolume, prompts, segmentationNode, **kwargs).wait(timeout)

    def importResult(self, segmentationPath, inputVolume, segmentationNode=None, uncertaintyPath=None,
                     show3D=False):
        """Bring a finished run's files into the scene: (segmentation node, segment IDs, uncertainty node).

        segmentationPath / uncertaintyPath may be lists (one MedCLIPSeg run per prompt): the segments go
        into one node, and the uncertainty maps are merged (voxel-wise maximum) into one volume."""
        mrml = _mrml()
        paths = [segmentationPath] if isinstance(segmentationPath, (str, os.PathLike)) else list(segmentationPath)
        node, segmentIds = segmentationNode, []
        for path in paths:
            imported = mrml.import_segmentation_file(self.scene, path, inputVolume, node, replace_existing=True,
                                                     terminologies_logic=self.terminologiesLogic())
            node = imported["node"]
            segmentIds += imported["segment_ids"]
        if show3D:
            node.CreateClosedSurfaceRepresentation()
        uncertainty = None
        uncertaintyPath = self._mergedUncertainty(uncertaintyPath)
        if uncertaintyPath and os.path.isfile(uncertaintyPath):
            uncertainty = mrml.load_uncertainty_volume(self.scene, uncertaintyPath, node)
        return node, segmentIds, uncertainty

    @staticmethod
    def _mergedUncertainty(paths):
        """One uncertainty file: the path itself, or the voxel-wise maximum of several (same grid)."""
        if not paths or isinstance(paths, (str, os.PathLike)):
            return paths
        paths = [p for p in paths if os.path.isfile(p)]
        if len(paths) <= 1:
            return paths[0] if paths else None
        import SimpleITK as sitk

        merged = sitk.ReadImage(os.fspath(paths[0]), sitk.sitkFloat32)
        for path in paths[1:]:
            merged = sitk.Maximum(merged, sitk.ReadImage(os.fspath(path), sitk.sitkFloat32))
        target = os.path.join(os.path.dirname(paths[0]), "uncertainty-max.nrrd")
        sitk.WriteImage(merged, target)
        return target

    # --------------------------------------------------------------------------- trained models
    @staticmethod
    def _trainedModels():
        _useShippedLibrary()
        from MedCLIPSAMLib import trained_models

        return trained_models

    def _registry(self, action, *args):
        """Call MedCLIPSAMLib.trained_models.<action>; its one-sentence errors become ValueError."""
        registry = self._trainedModels()  # puts the shipped library on the path first
        from MedCLIPSAMLib.errors import MedCLIPSAMError

        try:
            return getattr(registry, action)(*args)
        except MedCLIPSAMError as exc:
            raise ValueError(str(exc)) from None

    def trainedModels(self, presentOnly=True):
        """The registered trained models (dicts: name, kind, folder, labels, date, present)."""
        models = self._registry("list_models")
        return [m for m in models if m["present"] or not presentOnly]

    def trainedModel(self, name):
        """The registry entry of a usable trained model; ValueError (one sentence) otherwise."""
        entry = self._registry("get", name)
        if not entry["present"]:
            raise ValueError(_("The trained model '{name}' is no longer complete in '{folder}'.").format(
                name=name, folder=entry["folder"]))
        return entry

    def registerTrainedModel(self, folder, name=None):
        """Add a model folder (train-weak or medclipseg train) to the registry; ValueError if it is not one."""
        return self._registry("add", folder, name)

    def removeTrainedModel(self, name):
        self._registry("remove", name)

    @staticmethod
    def trainedModelLabel(entry):
        """The method-combo text of a trained model."""
        if entry["kind"] == "medclipseg":
            return _("MedCLIPSeg (trained): {name}").format(name=entry["name"])
        return _("Trained: {name} (weak supervision)").format(name=entry["name"])

    # --------------------------------------------------------------------------- weak supervision
    def defaultTrainingFolder(self):
        return os.fspath(self._trainedModels().default_output_dir())

    def startWeakSupervision(self, images, prompts, modelName="weak-model", outputFolder="", epochs=50, dims=2,
                             device="auto", axis="axial", preset="v2", models="", snapshots=None, batchSize=None,
                             baseFilters=None, samplesPerEpoch=None, patchSize=None, pseudoLabelArgs=(),
                             trainArgs=(), progressCallback=None, logCallback=None, metricsCallback=None,
                             completedCallback=None):
        """Pseudo-label the images with the zero-shot pipeline, train a network on the labels, register it.

        images: a folder of images/volumes, or a list of volume nodes (written to a temporary folder as
        .nrrd). The model goes to outputFolder/modelName (outputFolder empty: the cache's 'trained'
        folder); the pseudo-labels live in a temporary folder removed at the end. Returns a
        WeakSupervisionJob (call poll() or wait()).
        """
        prompts = cleanPrompts(prompts)
        name = " ".join((modelName or "").split())
        if not name:
            raise ValueError(_("Enter a name for the trained model."))
        modelDir = os.path.join(os.path.expanduser(outputFolder or self.defaultTrainingFolder()), safeName(name, "model"))
        tempDir = self._temporaryDirectory()
        try:
            data = self._trainingImages(images, tempDir)
            pseudoDir = os.path.join(tempDir, "pseudo-labels")
            commands = [
                self.buildPseudoLabelCommand([data], pseudoDir, prompts, preset, axis, device, models, pseudoLabelArgs),
                self.buildTrainWeakCommand(data, os.path.join(pseudoDir, "labels.txt"), modelDir, prompts, epochs, dims,
                                           axis, device, snapshots, batchSize, baseFilters, samplesPerEpoch, patchSize,
                                           trainArgs),
            ]
            # train-weak makes the model folder but wants its parent (the default one may not exist yet)
            os.makedirs(os.path.dirname(modelDir), exist_ok=True)
            for command in commands:
                logging.info("MedCLIP-SAM: running " + " ".join(command))
            process = ProcessChain(commands, env=self.environment(), cwd=tempDir)
            process.start()
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        return WeakSupervisionJob(self, process, tempDir, modelDir, name, progressCallback, logCallback,
                                  metricsCallback, completedCallback)

    def _trainingImages(self, images, tempDir):
        """The folder the CLI reads: the user's folder as is, or the volume nodes written as <name>.nrrd."""
        if isinstance(images, (str, os.PathLike)):
            folder = os.path.expanduser(os.fspath(images))
            if not os.path.isdir(folder):
                raise ValueError(_("The training image folder '{folder}' does not exist.").format(folder=folder))
            return folder
        nodes = [n for n in images or [] if n is not None]
        if not nodes:
            raise ValueError(_("Load at least one volume, or choose a folder of training images."))
        folder = os.path.join(tempDir, "images")
        os.makedirs(folder)
        used = set()
        for node in nodes:
            if node.GetImageData() is None:
                raise ValueError(_("Volume '{name}' has no image data.").format(name=node.GetName()))
            base = name = safeName(node.GetName(), "volume")
            k = 2
            while name.lower() in used:  # case names must differ (labels are matched by name)
                name, k = f"{base}_{k}", k + 1
            used.add(name.lower())
            _mrml().write_volume_node(node, os.path.join(folder, name + ".nrrd"))
        return folder

    def trainingVolumes(self):
        """The scalar volumes in the scene (labelmaps excluded): the 'loaded volumes' image source."""
        nodes = []
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            node = self.scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
            if not node.IsA("vtkMRMLLabelMapVolumeNode") and node.GetImageData() is not None:
                nodes.append(node)
        return nodes

    METRICS_COLUMNS = ("epoch", "loss", "val_dice", "lr")

    def createMetricsPlot(self, modelName):
        """A table node for the training metrics, loss and validation-Dice series, and a chart of both."""
        import vtk

        scene = self.scene
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{modelName} training metrics")
        for column in self.METRICS_COLUMNS:
            array = vtk.vtkDoubleArray()
            array.SetName(column)
            table.AddColumn(array)
        series = []
        for column, title, color in (("loss", _("training loss"), (0.12, 0.47, 0.71)),
                                     ("val_dice", _("validation Dice"), (0.84, 0.15, 0.16))):
            node = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{modelName} {title}")
            node.SetAndObserveTableNodeID(table.GetID())
            node.SetXColumnName("epoch")
            node.SetYColumnName(column)
            node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            node.SetColor(*color)
            series.append(node)
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{modelName} training")
        for node in series:
            chart.AddAndObservePlotSeriesNodeID(node.GetID())
        chart.SetTitle(_("Training of '{name}'").format(name=modelName))
        chart.SetXAxisTitle(_("epoch"))
        chart.SetYAxisTitle(_("loss / Dice"))
        return table, series, chart

    def updateMetricsTable(self, tableNode, records):
        """One row per epoch record (val_dice null -> NaN, a gap in the plot)."""
        table = tableNode.GetTable()
        for column in self.METRICS_COLUMNS:
            array = table.GetColumnByName(column)
            array.SetNumberOfTuples(len(records))
            for row, record in enumerate(records):
                value = record.get(column)
                array.SetValue(row, float(value) if isinstance(value, (int, float)) else float("nan"))
            array.Modified()
        table.Modified()
        tableNode.Modified()

    @staticmethod
    def terminologiesLogic():
        """Slicer's terminologies logic (with its standard terminologies loaded), None outside Slicer."""
        modules = getattr(slicer, "modules", None)
        terminologies = getattr(modules, "terminologies", None) if modules is not None else None
        return terminologies.logic() if terminologies is not None else None

    def exportToLabelmap(self, segmentationNode, referenceVolume=None):
        """Export all segments onto the input volume's grid as a labelmap volume node (reused on re-export)."""
        if referenceVolume is None:
            referenceVolume = segmentationNode.GetNodeReference(
                segmentationNode.GetReferenceImageGeometryReferenceRole())
        return _mrml().export_segments_to_labelmap(self.scene, segmentationNode, referenceVolume)

    # ------------------------------------------------------------------------------------ phantom
    def createPhantomVolume(self, name="MedCLIP-SAM phantom", seed=0, shape=(6, 40, 32)):
        """A small synthetic head MR (oblique, anisotropic grid) with a tumour, to try the module offline.

        Returns (volume node, MedCLIPSAMLib.phantoms.Phantom with the ground truth)."""
        _useShippedLibrary()
        from MedCLIPSAMLib import phantoms

        phantom = phantoms.make_volume("mr", shape=shape, spacing=(1.2, 1.0, 3.0), direction="oblique",
                                       origin=(-20.0, 15.0, 40.0), seed=seed, lesion={"size": "large"})
        return _mrml().volume_node_from_sitk(self.scene, phantom.image, name), phantom

    # --------------------------------------------------------------------------------- prompts
    @staticmethod
    def promptEnsembleFiles():
        """The shipped prompt ensembles: Resources/Prompts/*.json and MedCLIPSAMLib/resources/*prompt*.json."""
        files = []
        for root in _candidateRoots():
            folder = os.path.join(root, "Resources", "Prompts")
            if os.path.isdir(folder):
                files += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".json")]
            folder = os.path.join(root, "MedCLIPSAMLib", "resources")
            if os.path.isdir(folder):
                files += [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                          if f.endswith(".json") and "prompt" in f.lower()]
        return files

    @staticmethod
    def promptSuggestions(files=None):
        """Target names of the shipped prompt ensembles (read when asked; missing or odd files are skipped).

        Accepts {"targets": {name: ...}}, {name: [sentences] | {...}} and [{"name"|"target": ...}, ...].
        """
        names = []
        for path in MedCLIPSAMLogic.promptEnsembleFiles() if files is None else files:
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError) as exc:
                logging.warning(f"MedCLIP-SAM: prompt ensembles '{path}' skipped: {exc}")
                continue
            if isinstance(data, dict) and isinstance(data.get("targets"), (dict, list)):
                data = data["targets"]
            if isinstance(data, dict):
                found = [k for k, v in data.items() if isinstance(v, (list, dict)) and not k.startswith("$")]
            elif isinstance(data, list):
                found = [d.get("name") or d.get("target") for d in data if isinstance(d, dict)]
            else:
                found = []
            for name in found:
                if isinstance(name, str) and name.strip() and name.strip() not in names:
                    names.append(name.strip())
        return names

    # ----------------------------------------------------------------------------- devices
    @staticmethod
    def queryGpus(timeout=5.0):
        """NVIDIA GPUs with free memory, from nvidia-smi (cheap; no torch in Slicer's process)."""
        exe = shutil.which("nvidia-smi")
        if not exe:
            return []
        try:
            done = subprocess.run([exe, "--query-gpu=name,memory.free,memory.total", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.SubprocessError):
            return []
        return parseNvidiaSmi(done.stdout) if done.returncode == 0 else []

    @staticmethod
    def isAppleSilicon():
        import platform

        return sys.platform == "darwin" and platform.machine() == "arm64"

    # ------------------------------------------------------------------------ setup: packages
    def missingPythonPackages(self, packages=None):
        """[(import name, pip requirement)] of the packages the CLI needs that Slicer's Python lacks."""
        import importlib.util

        missing = []
        for module, requirement in self.PYTHON_PACKAGES if packages is None else packages:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.append((module, requirement))
        return missing

    def installPythonPackages(self, missing=None, askTorchConfirmation=True):
        """Install what is missing with Slicer's pip; PyTorch through the PyTorch extension (right CUDA build)."""
        missing = self.missingPythonPackages() if missing is None else missing
        names = {module for module, _requirement in missing}
        if names & {"torch", "torchvision"}:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("MedCLIP-SAM needs PyTorch: install the 'PyTorch' extension from the "
                                     "Extensions Manager, restart Slicer, and try again.")) from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                if torchLogic.installTorch(askConfirmation=askTorchConfirmation,
                                           torchVersionRequirement=self.MINIMUM_TORCH) is None:
                    raise RuntimeError(_("PyTorch was not installed; MedCLIP-SAM cannot run without it."))
        plain = [req for module, req in missing if req and module != "sam2"]
        if plain:
            slicer.util.pip_install(plain)
        if "sam2" in names:
            # sam2's setup imports torch: build it against the installed torch, without its optional CUDA
            # extension (it needs a compiler and is not needed for inference).
            os.environ["SAM2_BUILD_CUDA"] = "0"
            slicer.util.pip_install(["--no-build-isolation", "sam2"])
        still = self.missingPythonPackages(self.PYTHON_PACKAGES + [m for m in missing if m not in self.PYTHON_PACKAGES])
        if still:
            raise RuntimeError(_("These Python packages are still missing: {names}").format(
                names=", ".join(m for m, _r in still)))

    # -------------------------------------------------------------------------- setup: models
    @staticmethod
    def requiredModels(models=""):
        """Registry names the run will load, to check before running (random test models need none)."""
        text = (models or "").strip()
        if text.startswith("tiny-random") or text.startswith("random-"):
            return []
        _useShippedLibrary()
        from MedCLIPSAMLib.models import REGISTRY, resolve_model_set

        names = resolve_model_set(text or "default")
        return [n for n in names if n in REGISTRY]

    def modelCommand(self, action, name=None, *extra):
        command = self.cliCommand() + ["models", action]
        return command + ([name] if name else []) + list(extra)

    def startModelProcess(self, action, name=None, *extra):
        """`medclipsam models ACTION [NAME]` as a BackgroundProcess (download shows tqdm lines on stderr)."""
        process = BackgroundProcess(self.modelCommand(action, name, *extra), env=self.environment())
        process.start()
        return process

    def verifyModel(self, name, timeout=600):
        """(ok, message) from `medclipsam models verify NAME` (its message says which files go where)."""
        process = self.startModelProcess("verify", name)
        deadline = time.monotonic() + timeout
        lines = []
        while not process.isFinished():
            lines += [line for _stream, line in process.lines()]
            if time.monotonic() > deadline:
                process.cancel()
            time.sleep(0.05)
        lines += [line for _stream, line in process.lines()]
        ok = process.returnCode == 0
        if ok:
            self.verifiedModels.add(name)
        message = "\n".join(lines).strip()
        prefix = f"{name}: FAILED: "
        for line in lines:
            if line.startswith(prefix):
                message = line[len(prefix):]
        return ok, message


#
# MedCLIPSAMWidget
#


class MedCLIPSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Qt is imported inside the methods: loading the module file needs no GUI."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self.weakJob = None
        self._weakTimer = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingCombos = False
        self._gpus = []
        self._timer = None

    def setup(self):
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resourcePath("UI/MedCLIPSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedCLIPSAMLogic()

        # Combo boxes show translated labels and keep the CLI's value as item data.
        devices = [("auto", _("auto (CUDA, then Apple MPS, then CPU)")), ("cuda", _("cuda (NVIDIA GPU)")),
                   ("mps", _("mps (Apple GPU)")), ("cpu", _("cpu"))]
        for combo, items in (
            (self.ui.axisComboBox, [("axial", _("axial")), ("coronal", _("coronal")), ("sagittal", _("sagittal"))]),
            (self.ui.deviceComboBox, devices),
            (self.ui.weakSourceComboBox, [("scene", _("the volumes loaded in the scene")),
                                          ("folder", _("a folder of images or volumes"))]),
            (self.ui.weakDimsComboBox, [(2, _("2D (slices, as the MedCLIP-SAMv2 paper)")), (3, _("3D (patches)"))]),
            (self.ui.weakDeviceComboBox, devices),
        ):
            combo.clear()
            for value, label in items:
                combo.addItem(label, value)
        self.populateMethodCombo()
        for combo in (self.ui.presetComboBox, self.ui.axisComboBox, self.ui.deviceComboBox,
                      self.ui.weakSourceComboBox, self.ui.weakDimsComboBox, self.ui.weakDeviceComboBox):
            combo.connect("currentIndexChanged(int)", self.onComboChanged)

        self.ui.promptSuggestionsComboBox.clear()
        self.ui.promptSuggestionsComboBox.addItem(_("Add a suggested target..."))
        for name in self.logic.promptSuggestions():
            self.ui.promptSuggestionsComboBox.addItem(name)
        self.ui.promptSuggestionsComboBox.enabled = self.ui.promptSuggestionsComboBox.count > 1
        self.ui.promptSuggestionsComboBox.connect("activated(int)", self.onSuggestionActivated)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.deviceRefreshButton.connect("clicked(bool)", self.refreshDeviceInfo)
        self.ui.openSegmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.ui.exportLabelmapButton.connect("clicked(bool)", self.onExportLabelmap)
        self.ui.exportFileButton.connect("clicked(bool)", self.onExportFile)
        self.ui.setupCheckButton.connect("clicked(bool)", self.onSetupCheck)
        self.ui.downloadModelsButton.connect("clicked(bool)", self.onDownloadModels)
        self.ui.registerModelsButton.connect("clicked(bool)", self.onRegisterModels)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.registerTrainedModelButton.connect("clicked(bool)", self.onRegisterTrainedModel)
        self.ui.removeTrainedModelButton.connect("clicked(bool)", self.onRemoveTrainedModel)
        self.ui.weakFolderBrowseButton.connect("clicked(bool)", self.onBrowseWeakFolder)
        self.ui.weakOutputBrowseButton.connect("clicked(bool)", self.onBrowseWeakOutput)
        self.ui.weakStartButton.connect("clicked(bool)", self.onWeakStart)
        self.ui.weakCancelButton.connect("clicked(bool)", self.onWeakCancel)
        self.ui.weakOutputFolderLineEdit.placeholderText = self.logic.defaultTrainingFolder()
        self.ui.weakLogTextEdit.setMaximumBlockCount(5000)
        self.ui.weakProgressBar.setRange(0, 100)
        self.ui.weakProgressBar.hide()
        self.ui.weakCancelButton.hide()

        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onTimer)
        self._weakTimer = qt.QTimer()
        self._weakTimer.setInterval(500)
        self._weakTimer.connect("timeout()", self.onWeakTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # the 'loaded volumes' count of the weak-supervision section
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onSceneNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onSceneNodesChanged)
        self.initializeParameterNode()
        self.refreshDeviceInfo()

    def cleanup(self):
        if self.job is not None and self.job.isRunning:
            # Slicer is closing or the module reloads: stop the process tree and remove its files.
            self.job.completedCallback = None
            self.job.cancel()
            self.job.wait(timeout=10)
        if self.weakJob is not None and self.weakJob.isRunning:
            self.weakJob.completedCallback = None
            self.weakJob.cancel()
            self.weakJob.wait(timeout=10)
        for timer in (self._timer, self._weakTimer):
            if timer is not None:
                timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        for job in (self.job, self.weakJob):
            if job is not None and job.isRunning:
                job.cancel()  # its result (or its plot) would land in a closed scene
        self.setParameterNode(None)

    def onSceneNodesChanged(self, caller, event):
        if self._parameterNode and self._parameterNode.weakImageSource == "scene":
            self.updateWeakButtons()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------------- parameter node
    def initializeParameterNode(self):
        parameterNode = self.logic.getParameterNode()
        marker = "MedCLIPSAM.settingsLoaded"
        if not parameterNode.parameterNode.GetParameter(marker):
            self.loadRememberedSettings(parameterNode)
            parameterNode.parameterNode.SetParameter(marker, "1")
        if not parameterNode.inputVolume:
            parameterNode.inputVolume = self.activeVolume()
        self.setParameterNode(parameterNode)
        self.populateMethodCombo()  # the registry may have changed (another Slicer, the command line)

    @staticmethod
    def activeVolume():
        """The volume shown in the views (selection node), else the first scalar volume."""
        selection = slicer.app.applicationLogic().GetSelectionNode()
        node = slicer.mrmlScene.GetNodeByID(selection.GetActiveVolumeID()) if selection else None
        if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        return node

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui file are connected here; the combo
            # boxes (translated labels) are kept in step by onComboChanged / onParameterNodeModified.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        if not self._parameterNode:
            return
        self._updatingCombos = True
        try:
            node = self._parameterNode
            method = "trained:" + node.trainedModel if node.trainedModel else node.preset
            if self.ui.presetComboBox.findData(method) < 0:
                method = node.preset  # the trained model was removed from the registry
            for combo, value in ((self.ui.presetComboBox, method), (self.ui.axisComboBox, node.axis),
                                 (self.ui.deviceComboBox, node.device),
                                 (self.ui.weakSourceComboBox, node.weakImageSource),
                                 (self.ui.weakDimsComboBox, node.weakDims),
                                 (self.ui.weakDeviceComboBox, node.weakDevice)):
                index = combo.findData(value)
                if index >= 0 and combo.currentIndex != index:
                    combo.currentIndex = index
        finally:
            self._updatingCombos = False
        self.saveRememberedSettings()
        self.updateDeviceLabel()
        self.updateButtons()

    def onComboChanged(self, index=None):
        if self._updatingCombos or not self._parameterNode:
            return
        def data(combo):
            return combo.itemData(combo.currentIndex)

        node = self._parameterNode
        with slicer.util.NodeModify(node.parameterNode):
            method = data(self.ui.presetComboBox) or node.preset
            if method.startswith("trained:"):  # a registered model: the preset stays for later
                node.trainedModel = method[len("trained:"):]
            else:
                node.preset, node.trainedModel = method, ""
            node.axis = data(self.ui.axisComboBox)
            node.device = data(self.ui.deviceComboBox)
            node.weakImageSource = data(self.ui.weakSourceComboBox)
            node.weakDims = int(data(self.ui.weakDimsComboBox))
            node.weakDevice = data(self.ui.weakDeviceComboBox)

    def populateMethodCombo(self):
        """The zero-shot presets, then one entry per usable registered trained model (data 'trained:NAME')."""
        combo = self.ui.presetComboBox
        wasUpdating, self._updatingCombos = self._updatingCombos, True
        try:
            combo.clear()
            for value, label in (("v1", _("v1: gScoreCAM + CRF + SAM (MedCLIP-SAM)")),
                                 ("v2", _("v2: M2IB + KMeans + SAM (MedCLIP-SAMv2)")),
                                 ("fast", _("fast: GradCAM + SAM (quick look)"))):
                combo.addItem(label, value)
            try:
                models = self.logic.trainedModels()
            except Exception as exc:  # an unreadable registry must not break the panel
                logging.warning(f"MedCLIP-SAM: trained models not listed: {exc}")
                models = []
            for entry in models:
                combo.addItem(self.logic.trainedModelLabel(entry), "trained:" + entry["name"])
                combo.setItemData(combo.count - 1, entry["folder"], 3)  # 3 = Qt.ToolTipRole
        finally:
            self._updatingCombos = wasUpdating
        node = self._parameterNode
        if node and node.trainedModel and combo.findData("trained:" + node.trainedModel) < 0:
            node.trainedModel = ""  # removed, or its folder is gone: back to the preset
        elif node:
            self.onParameterNodeModified()

    def loadRememberedSettings(self, parameterNode):
        for name, kind in REMEMBERED_SETTINGS.items():
            default = getattr(parameterNode, name)
            value = slicer.util.settingsValue(f"{SETTINGS_GROUP}/{name}", default,
                                              converter=slicer.util.toBool if kind is bool else kind)
            try:
                setattr(parameterNode, name, value)
            except (ValueError, TypeError):  # a remembered value that is no longer a valid choice
                pass

    def saveRememberedSettings(self):
        import qt

        settings = qt.QSettings()
        for name in REMEMBERED_SETTINGS:
            settings.setValue(f"{SETTINGS_GROUP}/{name}", getattr(self._parameterNode, name))

    # ---------------------------------------------------------------------------------- inputs
    def onSuggestionActivated(self, index):
        if index <= 0 or not self._parameterNode:
            return
        name = self.ui.promptSuggestionsComboBox.itemText(index)
        prompts = cleanPrompts(self._parameterNode.prompts)
        if name.lower() not in (p.lower() for p in prompts):
            self._parameterNode.prompts = "\n".join(prompts + [name])
        self.ui.promptSuggestionsComboBox.currentIndex = 0

    def refreshDeviceInfo(self):
        self._gpus = self.logic.queryGpus()
        self.updateDeviceLabel()

    def updateDeviceLabel(self):
        if not self._parameterNode:
            return
        text, warning = describeDevice(self._parameterNode.device, self._gpus, self.logic.isAppleSilicon())
        self.ui.deviceInfoLabel.text = text
        self.ui.deviceInfoLabel.setStyleSheet("color: #c05000" if warning else "")

    def updateButtons(self, caller=None, event=None):
        running = self.job is not None and self.job.isRunning
        node = self._parameterNode
        problems = []
        if node and not node.inputVolume:
            problems.append(_("Select an input volume."))
        # a trained model segments its own targets when no prompt is given
        if node and not cleanPrompts(node.prompts) and not node.trainedModel:
            problems.append(_("Enter at least one prompt (one target per line)."))
        self.ui.applyButton.enabled = bool(node) and not problems and not running
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else _("Segment the prompts in the background")
        self.ui.cancelButton.visible = running
        self.ui.cancelButton.enabled = running and not self.job.process.cancelRequested
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        hasSegments = segmentation is not None and segmentation.GetSegmentation().GetNumberOfSegments() > 0
        for button in (self.ui.openSegmentEditorButton, self.ui.exportLabelmapButton, self.ui.exportFileButton):
            button.enabled = hasSegments and not running
        self.ui.removeTrainedModelButton.enabled = bool(node and node.trainedModel)
        self.updateWeakButtons()

    def updateWeakButtons(self):
        node = self._parameterNode
        running = self.weakJob is not None and self.weakJob.isRunning
        problems = []
        if node and node.weakImageSource == "scene":
            count = len(self.logic.trainingVolumes())
            self.ui.weakSourceInfoLabel.text = _("{count} volume(s) loaded").format(count=count)
            if not count:
                problems.append(_("Load the training volumes, or choose a folder."))
        elif node:
            self.ui.weakSourceInfoLabel.text = ""
            if not os.path.isdir(os.path.expanduser(node.weakImagesFolder or "")):
                problems.append(_("Choose an existing folder of training images."))
        self.ui.weakFolderLineEdit.enabled = bool(node) and node.weakImageSource == "folder"
        self.ui.weakFolderBrowseButton.enabled = self.ui.weakFolderLineEdit.enabled
        if node and not cleanPrompts(node.weakPrompts):
            problems.append(_("Enter at least one prompt for the pseudo-labels."))
        if node and not node.weakModelName.strip():
            problems.append(_("Enter a name for the trained model."))
        self.ui.weakStartButton.enabled = bool(node) and not problems and not running
        self.ui.weakStartButton.toolTip = "\n".join(problems) if problems else _(
            "Pseudo-label the images with the zero-shot method above, then train a network on them")
        self.ui.weakCancelButton.visible = running
        self.ui.weakCancelButton.enabled = running and not self.weakJob.process.cancelRequested

    # ----------------------------------------------------------------------------------- run
    def onApplyButton(self):
        with slicer.util.tryWithErrorDisplay(_("MedCLIP-SAM could not start."), waitCursor=True):
            trained = self.logic.trainedModel(self._parameterNode.trainedModel) if self._parameterNode.trainedModel \
                else None
            if not self.ensureSetup(training=bool(trained and trained["kind"] == "weak"), zeroShotModels=not trained):
                return
            node = self._parameterNode
            self.ui.statusLabel.text = _("Starting...")
            self.ui.progressBar.value = 0
            self.ui.progressBar.setFormat(_("Starting..."))
            self.ui.progressBar.show()
            try:
                self.job = self.logic.startSegmentation(
                    node.inputVolume, node.prompts, node.outputSegmentation, preset=node.preset, axis=node.axis,
                    device=node.device, models=node.models, computeUncertainty=node.computeUncertainty,
                    show3D=node.show3D, progressCallback=self.onProgress, logCallback=self.onLog,
                    completedCallback=self.onCompleted, trainedModel=node.trainedModel or None,
                    absentIf=node.absentIf)
            except Exception:
                self.ui.progressBar.hide()
                self.ui.statusLabel.text = ""
                raise
            self._timer.start()
            self.updateButtons()

    def onCancelButton(self):
        if self.job is not None and self.job.isRunning:
            self.job.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            self.updateButtons()

    def onTimer(self):
        if self.job is None or not self.job.poll():
            self._timer.stop()

    def onProgress(self, progress):
        text = progress["message"] or progress["stage"]
        if progress["total"] > 1:
            text += f" ({progress['done']}/{progress['total']})"
        self.ui.statusLabel.text = text
        if progress["fraction"] is not None:
            self.ui.progressBar.value = int(round(100 * progress["fraction"]))
        self.ui.progressBar.setFormat(progress["stage"] + " %p%")

    def onLog(self, line):
        self.ui.statusLabel.toolTip = line  # the latest log line, without flooding the panel

    def onCompleted(self, result):
        import qt

        self.ui.progressBar.hide()
        self.updateButtons()
        if result.status == "succeeded":
            self._parameterNode.outputSegmentation = result.segmentationNode
            self.ui.statusLabel.text = _("Done in {seconds:.0f} s. {message}").format(
                seconds=result.elapsedSeconds, message=result.message)
            slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume, fit=False)
            if result.uncertaintyVolumeNode is not None:
                slicer.util.setSliceViewerLayers(foreground=result.uncertaintyVolumeNode, foregroundOpacity=0.4)
        elif result.status == "cancelled":
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
        else:
            self.ui.statusLabel.text = _("Failed: {message}").format(message=result.message)
            slicer.util.errorDisplay(_("Segmentation failed:\n{message}").format(message=result.message),
                                     windowTitle=_("MedCLIP-SAM"))
        qt.QTimer.singleShot(0, self.updateButtons)

    # ------------------------------------------------------------------------ trained models
    def onRegisterTrainedModel(self):
        """Add a model folder made on the command line (train-weak or medclipseg train) to the method list."""
        import qt

        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Trained model folder"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("This folder cannot be used as a trained model."), waitCursor=True):
            entry = self.logic.registerTrainedModel(folder)
            self.populateMethodCombo()
            self._parameterNode.trainedModel = entry["name"]
            self.ui.setupStatusLabel.text = _("Registered '{name}' ({kind}).").format(name=entry["name"],
                                                                                   kind=entry["kind"])

    def onRemoveTrainedModel(self):
        name = self._parameterNode.trainedModel if self._parameterNode else ""
        if not name or not slicer.util.confirmOkCancelDisplay(
                _("Remove '{name}' from the list of trained models? Its folder is kept.").format(name=name),
                windowTitle=_("MedCLIP-SAM")):
            return
        with slicer.util.tryWithErrorDisplay(_("Removing the trained model failed."), waitCursor=True):
            self.logic.removeTrainedModel(name)
            self._parameterNode.trainedModel = ""
            self.populateMethodCombo()

    # ----------------------------------------------------------------------- weak supervision
    def _browseFolder(self, title, current):
        import qt

        return qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), title, current or "")

    def onBrowseWeakFolder(self):
        folder = self._browseFolder(_("Training images"), self._parameterNode.weakImagesFolder)
        if folder:
            self._parameterNode.weakImagesFolder = folder

    def onBrowseWeakOutput(self):
        folder = self._browseFolder(_("Folder for trained models"), self._parameterNode.weakOutputFolder)
        if folder:
            self._parameterNode.weakOutputFolder = folder

    def onWeakStart(self):
        with slicer.util.tryWithErrorDisplay(_("Weak supervision could not start."), waitCursor=True):
            if not self.ensureSetup(training=True):
                return
            node = self._parameterNode
            images = node.weakImagesFolder if node.weakImageSource == "folder" else self.logic.trainingVolumes()
            self.ui.weakLogTextEdit.clear()
            self.ui.weakStatusLabel.text = _("Starting...")
            self.ui.weakProgressBar.value = 0
            self.ui.weakProgressBar.setFormat(_("Starting..."))
            self.ui.weakProgressBar.show()
            try:
                self.weakJob = self.logic.startWeakSupervision(
                    images, node.weakPrompts, node.weakModelName, node.weakOutputFolder, node.weakEpochs,
                    node.weakDims, node.weakDevice, axis=node.axis, preset=node.preset, models=node.models,
                    progressCallback=self.onWeakProgress, logCallback=self.onWeakLog,
                    metricsCallback=self.onWeakMetrics, completedCallback=self.onWeakCompleted)
            except Exception:
                self.ui.weakProgressBar.hide()
                self.ui.weakStatusLabel.text = ""
                raise
            self._weakTimer.start()
            self.updateWeakButtons()

    def onWeakCancel(self):
        if self.weakJob is not None and self.weakJob.isRunning:
            self.weakJob.cancel()
            self.ui.weakStatusLabel.text = _("Cancelling...")
            self.updateWeakButtons()

    def onWeakTimer(self):
        if self.weakJob is None or not self.weakJob.poll():
            self._weakTimer.stop()

    def onWeakProgress(self, progress):
        self.ui.weakStatusLabel.text = f"{progress['step']}: {progress['message'] or progress['stage']}"
        self.ui.weakProgressBar.value = int(round(100 * progress["fraction"]))
        self.ui.weakProgressBar.setFormat(f"{progress['step']} %p%")
        self.ui.weakLogTextEdit.appendPlainText(self.ui.weakStatusLabel.text)

    def onWeakLog(self, line):
        self.ui.weakLogTextEdit.appendPlainText(line)

    def onWeakMetrics(self, tableNode, chartNode):
        if getattr(self, "_shownChart", None) is chartNode:
            return
        self._shownChart = chartNode
        plots = getattr(slicer.modules, "plots", None)
        if plots is not None:  # the plot view of the current layout (switches to a layout that has one)
            plots.logic().ShowChartInLayout(chartNode)

    def onWeakCompleted(self, result):
        import qt

        self.ui.weakProgressBar.hide()
        if result.status == "succeeded":
            self.populateMethodCombo()
            self.ui.weakStatusLabel.text = _("Trained '{name}' in {seconds:.0f} s; it is now a method above. "
                                             "{message}").format(name=result.model["name"],
                                                                 seconds=result.elapsedSeconds, message=result.message)
        elif result.status == "cancelled":
            self.ui.weakStatusLabel.text = _("Cancelled; no model was registered.")
        else:
            self.ui.weakStatusLabel.text = _("Failed: {message}").format(message=result.message)
            slicer.util.errorDisplay(_("Weak supervision failed:\n{message}").format(message=result.message),
                                     windowTitle=_("MedCLIP-SAM"))
        self.ui.weakLogTextEdit.appendPlainText(self.ui.weakStatusLabel.text)
        qt.QTimer.singleShot(0, self.updateWeakButtons)

    # --------------------------------------------------------------------------------- results
    def onOpenSegmentEditor(self):
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        if volume is not None:
            # setSourceVolumeNode since Slicer 5.4 (setMasterVolumeNode before)
            (getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode)(volume)

    def onExportLabelmap(self):
        with slicer.util.tryWithErrorDisplay(_("Export to a labelmap failed."), waitCursor=True):
            segmentation = self.ui.outputSegmentationSelector.currentNode()
            reference = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
            labelmap = self.logic.exportToLabelmap(segmentation, reference or self._parameterNode.inputVolume)
            self.ui.statusLabel.text = _("Exported to labelmap volume '{name}'.").format(name=labelmap.GetName())
            return labelmap

    def onExportFile(self):
        labelmap = self.onExportLabelmap()
        if labelmap is None:
            return
        # Slicer's own export dialog (file name, format, compression), as in the Data module's context menu;
        # Slicer versions without it get the Save Data dialog.
        try:
            saved = slicer.app.ioManager().openDialog("GenericNodeExport", slicer.qSlicerFileDialog.Write,
                                                      {"selectedNodeID": labelmap.GetID()})
        except (AttributeError, ValueError, TypeError):
            saved = slicer.util.openSaveDataDialog()
        if not saved:
            self.ui.statusLabel.text = _("Labelmap '{name}' was not saved to a file.").format(name=labelmap.GetName())

    # ----------------------------------------------------------------------------------- setup
    def ensureSetup(self, training=False, zeroShotModels=True):
        """Before the first run: Python packages (with MONAI for training), then the zero-shot models
        (not needed to segment with a trained model); True when ready."""
        missing = self.logic.missingPythonPackages(
            self.logic.PYTHON_PACKAGES + (self.logic.TRAINING_PACKAGES if training else []))
        if missing and not self.installPackages(missing):
            return False
        node = self._parameterNode
        for name in self.logic.requiredModels(node.models) if zeroShotModels else []:
            if name in self.logic.verifiedModels:
                continue
            self.ui.statusLabel.text = _("Checking model '{name}'...").format(name=name)
            slicer.app.processEvents()
            ok, message = self.logic.verifyModel(name)
            if not ok and not self.offerModelDownload(name, message):
                return False
        return True

    def installPackages(self, missing):
        names = ", ".join(m for m, _r in missing)
        if not slicer.util.confirmOkCancelDisplay(
                _("MedCLIP-SAM needs these Python packages, which are not installed yet:\n{names}\n\n"
                  "Install them now? This downloads about 3 GB (PyTorch included) and may take several "
                  "minutes.").format(names=names), windowTitle=_("MedCLIP-SAM setup")):
            self.ui.setupStatusLabel.text = _("Missing Python packages: {names}").format(names=names)
            return False
        with slicer.util.WaitCursor():
            self.ui.setupStatusLabel.text = _("Installing {names}...").format(names=names)
            slicer.app.processEvents()
            self.logic.installPythonPackages(missing)
        self.ui.setupStatusLabel.text = _("Python packages installed.")
        return True

    def offerModelDownload(self, name, message):
        if slicer.util.confirmOkCancelDisplay(
                _("The model '{name}' is not in the model cache yet:\n{message}\n\nDownload it now? "
                  "This needs internet access.").format(name=name, message=message),
                windowTitle=_("MedCLIP-SAM setup")):
            if self.downloadModel(name):
                return True
            message = self.logic.verifyModel(name)[1]
        slicer.util.infoDisplay(
            _("Without internet access, copy the model files by hand:\n\n{message}\n\nThen press 'Register "
              "models placed by hand' in the Setup section (it runs the 'verify --adopt' step for you).").format(
                message=message), windowTitle=_("MedCLIP-SAM: models offline"))
        return False

    def downloadModel(self, name):
        """`medclipsam models download NAME` with a progress dialog; True when the model verifies."""
        import qt

        dialog = slicer.util.createProgressDialog(labelText=_("Downloading '{name}'...").format(name=name),
                                                  windowTitle=_("MedCLIP-SAM models"), maximum=100)
        process = self.logic.startModelProcess("download", name)
        lastLines = collections.deque(maxlen=20)
        while not process.isFinished():
            for _stream, line in process.lines():
                lastLines.append(line)
                percent = re.search(r"(\d{1,3})%\|", line)  # tqdm's bar
                if percent:
                    dialog.value = int(percent.group(1))
                dialog.labelText = line[-120:]
            if dialog.wasCanceled:
                process.cancel()
            qt.QApplication.processEvents()
            time.sleep(0.05)
        lastLines.extend(line for _stream, line in process.lines())
        dialog.close()
        if process.returnCode == 0:
            self.logic.verifiedModels.add(name)
            self.ui.setupStatusLabel.text = _("Model '{name}' downloaded.").format(name=name)
            return True
        self.ui.setupStatusLabel.text = errorMessageFromOutput(list(lastLines), process.returnCode)
        return False

    def onSetupCheck(self):
        with slicer.util.tryWithErrorDisplay(_("Setup check failed."), waitCursor=True):
            missing = self.logic.missingPythonPackages()
            if missing:
                self.installPackages(missing)
                return
            problems = []
            for name in self.logic.requiredModels(self._parameterNode.models):
                ok, message = self.logic.verifyModel(name)
                if not ok:
                    problems.append(f"{name}: {message}")
            self.ui.setupStatusLabel.text = ("\n".join(problems) if problems
                                             else _("Python packages and models are ready."))

    def onDownloadModels(self):
        with slicer.util.tryWithErrorDisplay(_("Model download failed."), waitCursor=False):
            for name in self.logic.requiredModels(self._parameterNode.models):
                if not self.downloadModel(name):
                    self.offerModelDownload(name, self.logic.verifyModel(name)[1])
                    return

    def onRegisterModels(self):
        """Record checksums of model files the user copied into the cache by hand (offline install)."""
        with slicer.util.tryWithErrorDisplay(_("Registering the models failed."), waitCursor=True):
            problems = []
            for name in self.logic.requiredModels(self._parameterNode.models):
                process = self.logic.startModelProcess("verify", name, "--adopt")
                while not process.isFinished():
                    time.sleep(0.05)
                lines = [line for _stream, line in process.lines()]
                if process.returnCode == 0:
                    self.logic.verifiedModels.add(name)
                else:
                    problems.append("\n".join(lines))
            self.ui.setupStatusLabel.text = "\n".join(problems) if problems else _("Models registered.")


#
# MedCLIPSAMTest
#


class MedCLIPSAMTest(ScriptedLoadableModuleTest):
    """Self-test: the real `medclipsam segment` with random test models on a small phantom (offline).

    Random weights make the masks meaningless; the test checks the plumbing: segment names, the reference
    volume, the exported labelmap's grid, re-running into the same node, and Cancel.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        missing = MedCLIPSAMLogic().missingPythonPackages()
        if missing:  # e.g. on an extension build machine: nothing to run the CLI with
            self.delayDisplay("MedCLIPSAM self-test skipped: missing Python packages " +
                              ", ".join(m for m, _r in missing))
            return
        self.setUp()
        self.test_SegmentPhantom()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()
        if MedCLIPSAMLogic().missingPythonPackages(MedCLIPSAMLogic.TRAINING_PACKAGES):
            self.delayDisplay("Weak-supervision self-test skipped: MONAI is not installed")
            return
        self.setUp()
        self.test_WeakSupervisionPhantom()

    def _run(self, logic, volume, prompts, segmentation=None):
        result = logic.process(volume, prompts, segmentation, models="tiny-random", preset="fast", device="cpu",
                               timeout=900)
        self.assertEqual(result.status, "succeeded", result.message)
        return result

    def test_SegmentPhantom(self):
        import numpy as np

        self.delayDisplay("Segmenting a phantom with random test models")
        logic = MedCLIPSAMLogic()
        volume, _phantom = logic.createPhantomVolume()
        result = self._run(logic, volume, ["tumor"])
        segmentation = result.segmentationNode
        mrml = _mrml()
        self.assertEqual(mrml.segment_names(segmentation), ["tumor"])
        self.assertEqual(segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()), volume)

        labelmap = logic.exportToLabelmap(segmentation)
        self.assertEqual(labelmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        np.testing.assert_allclose(mrml.ijk_to_ras_from_node(labelmap), mrml.ijk_to_ras_from_node(volume), atol=1e-6)

        self.delayDisplay("Running again into the same segmentation")
        tumorId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("tumor")
        nodeCount = slicer.mrmlScene.GetNumberOfNodes()
        result = self._run(logic, volume, ["tumor", "brain"], segmentation)
        self.assertIs(result.segmentationNode, segmentation)
        self.assertEqual(mrml.segment_names(segmentation), ["tumor", "brain"])
        self.assertEqual(segmentation.GetSegmentation().GetSegmentIdBySegmentName("tumor"), tumorId)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)
        self.delayDisplay("Test passed")

    def test_CancelLeavesSceneUnchanged(self):
        logic = MedCLIPSAMLogic()
        volume, _phantom = logic.createPhantomVolume()
        nodeCount = slicer.mrmlScene.GetNumberOfNodes()
        events = []
        job = logic.startSegmentation(volume, ["tumor"], models="tiny-random", preset="fast", device="cpu",
                                      progressCallback=events.append)
        deadline = time.monotonic() + 300
        while job.poll() and not events and time.monotonic() < deadline:
            time.sleep(0.05)
        job.cancel()
        result = job.wait(timeout=60)
        self.assertEqual(result.status, "cancelled", result.message)
        self.assertIsNotNone(job.process.returnCode)
        self.assertFalse(os.path.exists(job.tempDir))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)
        self.delayDisplay("Cancel test passed")

    def test_WeakSupervisionPhantom(self):
        """Pseudo-label two phantoms with the random test models, train a 4-filter network for 2 epochs,
        check the metrics chart and the registration, segment with the model, then forget it again."""
        self.delayDisplay("Weak supervision on two phantoms with random test models")
        logic = MedCLIPSAMLogic()
        volumes = [logic.createPhantomVolume(f"phantom {seed}", seed=seed)[0] for seed in (0, 1)]
        outputFolder = tempfile.mkdtemp(prefix="MedCLIPSAM-selftest-")
        name = f"self-test {os.getpid()}"
        try:
            job = logic.startWeakSupervision(
                volumes, ["tumor"], name, outputFolder=outputFolder, epochs=2, dims=2, device="cpu",
                preset="fast", models="tiny-random", snapshots=2, batchSize=4, baseFilters=4, samplesPerEpoch=8,
                pseudoLabelArgs=["--sam", "none"])
            result = job.wait(timeout=900)
            self.assertEqual(result.status, "succeeded", result.message)
            self.assertEqual(result.tableNode.GetNumberOfRows(), 2)
            self.assertEqual(result.chartNode.GetNumberOfPlotSeriesNodes(), 2)
            self.assertEqual(logic.trainedModel(name)["kind"], "weak")

            self.delayDisplay("Segmenting with the trained model")
            seg = logic.process(volumes[0], [], trainedModel=name, device="cpu", computeUncertainty=True,
                                timeout=600)
            self.assertEqual(seg.status, "succeeded", seg.message)
            self.assertEqual(_mrml().segment_names(seg.segmentationNode), ["tumor"])
            self.assertIsNotNone(seg.uncertaintyVolumeNode)
        finally:
            try:
                logic.removeTrainedModel(name)
            except ValueError:
                pass  # training failed before registration
            shutil.rmtree(outputFolder, ignore_errors=True)
        self.delayDisplay("Weak-supervision test passed")
