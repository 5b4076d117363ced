"""MedCLIP-SAM for 3D Slicer: segment structures in a volume from text prompts.

The panel is thin. The segmentation itself runs in a background process (`python -m MedCLIPSAMLib segment
... --progress json`, with Slicer's own Python) so Slicer stays responsive and Cancel really stops it.
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
    computeUncertainty - also load a per-voxel uncertainty volume.
    show3D - build closed surfaces so the result shows in 3D.
    outputSegmentation - segmentation to add segments to (None: a new one is created).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    prompts: str = ""
    preset: Annotated[str, Choice(PRESETS)] = "v2"
    axis: Annotated[str, Choice(AXES)] = "axial"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    models: str = ""
    computeUncertainty: bool = False
    show3D: bool = True
    outputSegmentation: vtkMRMLSegmentationNode


# Settings kept between sessions (qt.QSettings), with their types.
REMEMBERED_SETTINGS = {"prompts": str, "preset": str, "axis": str, "device": str, "models": str,
                       "computeUncertainty": bool, "show3D": bool}


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


class SegmentationJob:
    """One run of `medclipsam segment` for a volume; imports the result into the scene when it succeeds.

    poll() must be called from the thread that owns the scene (the GUI's QTimer, or wait()): it reports
    progress and, at the end, changes the scene. A cancelled or failed run leaves the scene as it was and
    removes its temporary folder.
    """

    def __init__(self, logic, process, tempDir, inputVolume, prompts, segmentationNode, outputPath,
                 uncertaintyPath=None, show3D=False, progressCallback=None, logCallback=None,
                 completedCallback=None):
        self.logic = logic
        self.process = process
        self.tempDir = tempDir
        self.inputVolume = inputVolume
        self.prompts = list(prompts)
        self.segmentationNode = segmentationNode
        self.outputPath = outputPath
        self.uncertaintyPath = uncertaintyPath
        self.show3D = show3D
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
        for stream, line in self.process.lines():
            if stream == "stdout":
                progress = parseProgressLine(line)
                if progress is not None:
                    self.lastProgress = progress
                    if self.progressCallback:
                        self.progressCallback(progress)
                    continue
            else:
                self.stderrTail.append(line)
            logging.info(f"medclipsam: {line}")
            if self.logCallback:
                self.logCallback(line)
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

    def _finish(self):
        returnCode = self.process.returnCode
        elapsed = time.monotonic() - self.startTime
        try:
            if self.process.cancelRequested or returnCode == 130:
                self.result = SegmentationResult("cancelled", _("cancelled; the scene was not changed"),
                                                 returnCode, elapsedSeconds=elapsed)
            elif returnCode == 0 and os.path.isfile(self.outputPath):
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
                            models="", uncertaintyPath=None):
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
        return command

    # ------------------------------------------------------------------------------------- running
    def _temporaryDirectory(self):
        base = None
        if hasattr(slicer, "app"):
            base = slicer.app.temporaryPath
        return tempfile.mkdtemp(prefix="MedCLIPSAM-", dir=base if base and os.path.isdir(base) else None)

    def startSegmentation(self, inputVolume, prompts, segmentationNode=None, preset="v2", axis="axial",
                          device="auto", models="", computeUncertainty=False, show3D=False,
                          progressCallback=None, logCallback=None, completedCallback=None):
        """Write the input, start the process and return a SegmentationJob (call its poll() or wait())."""
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError(_("Select an input volume that has image data."))
        prompts = cleanPrompts(prompts)
        tempDir = self._temporaryDirectory()
        try:
            inputPath = os.path.join(tempDir, "input.nrrd")
            outputPath = os.path.join(tempDir, "output.seg.nrrd")
            uncertaintyPath = os.path.join(tempDir, "uncertainty.nrrd") if computeUncertainty else None
            command = self.buildSegmentCommand(inputPath, outputPath, prompts, preset, axis, device, models,
                                               uncertaintyPath)
            _mrml().write_volume_node(inputVolume, inputPath)
            logging.info("MedCLIP-SAM: running " + " ".join(command))
            process = BackgroundProcess(command, env=self.environment(), cwd=tempDir)
            process.start()
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        return SegmentationJob(self, process, tempDir, inputVolume, prompts, segmentationNode, outputPath,
                               uncertaintyPath, show3D, progressCallback, logCallback, completedCallback)

    def process(self, inputVolume, prompts, segmentationNode=None, timeout=None, **kwargs):
        """Run and wait; returns a SegmentationResult (check .status)."""
        return self.startSegmentation(inputVolume, prompts, segmentationNode, **kwargs).wait(timeout)

    def importResult(self, segmentationPath, inputVolume, segmentationNode=None, uncertaintyPath=None,
                     show3D=False):
        """Bring a finished run's files into the scene: (segmentation node, segment IDs, uncertainty node)."""
        mrml = _mrml()
        imported = mrml.import_segmentation_file(self.scene, segmentationPath, inputVolume, segmentationNode,
                                                 replace_existing=True,
                                                 terminologies_logic=self.terminologiesLogic())
        node = imported["node"]
        if show3D:
            node.CreateClosedSurfaceRepresentation()
        uncertainty = None
        if uncertaintyPath and os.path.isfile(uncertaintyPath):
            uncertainty = mrml.load_uncertainty_volume(self.scene, uncertaintyPath, node)
        return node, imported["segment_ids"], uncertainty

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
    def missingPythonPackages(self):
        """[(import name, pip requirement)] of the packages the CLI needs that Slicer's Python lacks."""
        import importlib.util

        missing = []
        for module, requirement in self.PYTHON_PACKAGES:
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
        still = self.missingPythonPackages()
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
        for combo, items in (
            (self.ui.presetComboBox, [("v1", _("v1: gScoreCAM + CRF + SAM (MedCLIP-SAM)")),
                                      ("v2", _("v2: M2IB + KMeans + SAM (MedCLIP-SAMv2)")),
                                      ("fast", _("fast: GradCAM + SAM (quick look)"))]),
            (self.ui.axisComboBox, [("axial", _("axial")), ("coronal", _("coronal")), ("sagittal", _("sagittal"))]),
            (self.ui.deviceComboBox, [("auto", _("auto (CUDA, then Apple MPS, then CPU)")),
                                      ("cuda", _("cuda (NVIDIA GPU)")), ("mps", _("mps (Apple GPU)")),
                                      ("cpu", _("cpu"))]),
        ):
            combo.clear()
            for value, label in items:
                combo.addItem(label, value)
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

        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.refreshDeviceInfo()

    def cleanup(self):
        if self.job is not None and self.job.isRunning:
            # Slicer is closing or the module reloads: stop the process tree and remove its files.
            self.job.completedCallback = None
            self.job.cancel()
            self.job.wait(timeout=10)
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        if self.job is not None and self.job.isRunning:
            self.job.cancel()  # its result would land in a closed scene
        self.setParameterNode(None)

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
            for combo, value in ((self.ui.presetComboBox, self._parameterNode.preset),
                                 (self.ui.axisComboBox, self._parameterNode.axis),
                                 (self.ui.deviceComboBox, self._parameterNode.device)):
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
        with slicer.util.NodeModify(self._parameterNode.parameterNode):
            self._parameterNode.preset = self.ui.presetComboBox.itemData(self.ui.presetComboBox.currentIndex)
            self._parameterNode.axis = self.ui.axisComboBox.itemData(self.ui.axisComboBox.currentIndex)
            self._parameterNode.device = self.ui.deviceComboBox.itemData(self.ui.deviceComboBox.currentIndex)

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
        if node and not cleanPrompts(node.prompts):
            problems.append(_("Enter at least one prompt (one target per line)."))
        self.ui.applyButton.enabled = bool(node) and not problems and not running
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else _("Segment the prompts in the background")
        self.ui.cancelButton.visible = running
        self.ui.cancelButton.enabled = running and not self.job.process.cancelRequested
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        hasSegments = segmentation is not None and segmentation.GetSegmentation().GetNumberOfSegments() > 0
        for button in (self.ui.openSegmentEditorButton, self.ui.exportLabelmapButton, self.ui.exportFileButton):
            button.enabled = hasSegments and not running

    # ----------------------------------------------------------------------------------- run
    def onApplyButton(self):
        with slicer.util.tryWithErrorDisplay(_("MedCLIP-SAM could not start."), waitCursor=True):
            if not self.ensureSetup():
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
                    completedCallback=self.onCompleted)
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
    def ensureSetup(self):
        """Before the first run: Python packages, then models; True when ready."""
        missing = self.logic.missingPythonPackages()
        if missing and not self.installPackages(missing):
            return False
        node = self._parameterNode
        for name in self.logic.requiredModels(node.models):
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
