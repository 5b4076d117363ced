"""The ten defects issue 17 found by reading the Slicer module against Slicer's own source, one regression
test (or group) each. Where the fact is about Slicer's parameter node wrapper, the Qt widgets or CTK's
launcher, the test re-creates that behaviour from the source it cites (Slicer v5.10.0) and runs the
module's real code against it; processes are real processes, the MRML scene is slicer-core's.
"""

import ast
import os
import re
import signal
import sys
import textwrap
import time
import typing
import xml.etree.ElementTree as ET

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from test_slicer_module import MODULE_FILE, REPO, UI_FILE, load_module_file  # noqa: E402

from MedCLIPSAMModuleLib import dependencies, devices, modeljobs, panelstate  # noqa: E402
from MedCLIPSAMModuleLib.setupprocess import BackgroundProcess  # noqa: E402
from MedCLIPSAMModuleLib.setupflow import SetupFlow  # noqa: E402

POSIX = pytest.mark.skipif(os.name == "nt", reason="process groups and signals are POSIX")


@pytest.fixture(scope="module")
def mod():
    return load_module_file()


def ui_bindings():
    """{parameter name: (widget name, widget class, widget element)} as connectGui finds them (by the
    dynamic property SlicerParameterName: Base/Python/slicer/parameterNodeWrapper/wrapper.py)."""
    found = {}
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                found[prop.findtext("string")] = (widget.get("name"), widget.get("class"), widget)
    return found


# ------------------------------------------------------------------- 1. typed prompts come out reversed
class TextEdit:
    """A QTextEdit as far as this matters: typing inserts at the cursor; setPlainText puts the cursor at
    the start (Qt: QTextEdit::setPlainText resets the document, the cursor goes to position 0) and
    emits textChanged, as typing does."""

    def __init__(self):
        self.text, self.cursor, self.listeners = "", 0, []

    def toPlainText(self):
        return self.text

    def setPlainText(self, text):
        self.text, self.cursor = text, 0
        self._changed()

    def type(self, char):
        self.text = self.text[:self.cursor] + char + self.text[self.cursor:]
        self.cursor += 1
        self._changed()

    def _changed(self):
        for listener in list(self.listeners):
            listener()


class SlicerTextEditConnector:
    """guiConnectors.py (v5.10.0, unchanged on main) QTextEditPlainTextToStrConnector: read() is
    toPlainText(), write(value) is setPlainText(value), unconditionally."""

    def __init__(self, widget):
        self.widget = widget

    def read(self):
        return self.widget.toPlainText()

    def write(self, value):
        self.widget.setPlainText(value)


class Parameters:
    """The parameter node: setting a value that differs notifies (ModifiedEvent), and the wrapper then
    writes every connected widget (wrapper.py: _onParameterNodeModified -> connector.write)."""

    def __init__(self):
        self.values, self.observers = {"prompts": "", "weakPrompts": ""}, []

    def set(self, name, value):
        if self.values[name] != value:
            self.values[name] = value
            for observer in list(self.observers):
                observer()


def type_into_panel(text, widgetName, parameter):
    """Type `text` into the panel's text box as the .ui and the module wire it; returns what the box shows."""
    params, edits = Parameters(), {"promptsTextEdit": TextEdit(), "weakPromptsTextEdit": TextEdit()}
    bound = {p: w for p, (w, cls, _e) in ui_bindings().items() if cls == "QTextEdit"}
    for name, widget in bound.items():  # what connectGui does for a QTextEdit with SlicerParameterName
        connector = SlicerTextEditConnector(edits[widget])
        widget_edit = edits[widget]
        widget_edit.listeners.append(lambda n=name, c=connector: params.set(n, c.read()))
        params.observers.append(lambda n=name, c=connector: c.write(params.values[n]))
    # the module's own sync for the boxes it does not bind: onPromptsEdited / onParameterNodeModified
    own = {"prompts": "promptsTextEdit", "weakPrompts": "weakPromptsTextEdit"}
    for name, widget in own.items():
        if name not in bound:
            edits[widget].listeners.append(lambda n=name, w=widget: params.set(n, edits[w].toPlainText()))
            params.observers.append(lambda n=name, w=widget: panelstate.setPlainTextIfChanged(edits[w],
                                                                                               params.values[n]))
    for char in text:
        edits[widgetName].type(char)
    assert params.values[parameter] == edits[widgetName].toPlainText()
    return edits[widgetName].toPlainText()


@pytest.mark.parametrize("widget, parameter", [("promptsTextEdit", "prompts"), ("weakPromptsTextEdit", "weakPrompts")])
def test_1_typed_prompts_keep_their_order(widget, parameter):
    assert type_into_panel("brain tumor", widget, parameter) == "brain tumor"


def test_1_the_recreated_connector_reverses_text_when_bound():
    """The re-creation reproduces the reported symptom, so the test above can see the defect."""
    edit, params = TextEdit(), Parameters()
    connector = SlicerTextEditConnector(edit)
    edit.listeners.append(lambda: params.set("prompts", connector.read()))
    params.observers.append(lambda: connector.write(params.values["prompts"]))
    for char in "brain tumor":
        edit.type(char)
    assert edit.toPlainText() == "romut niarb"


# --------------------------------------------------------------------- 2. Cancel leaves python-real alive
# CTK's launcher (PythonSlicer): starts the real interpreter as a child with QProcess, waits for it and
# installs no signal handler that forwards anything (ctkAppLauncher.cpp). A SIGTERM kills it at once
# ("dies"), or in the stricter variant it ignores signals ("ignores"); its child keeps running either way.
LAUNCHER = textwrap.dedent('''
    import signal, subprocess, sys
    if sys.argv[1] == "ignores":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(subprocess.call(sys.argv[2:]))  # no forwarding
''')
REAL = textwrap.dedent('''
    import json, os, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # python-real busy in native code: SIGTERM not handled
    with open(os.environ["RECORD_PID"], "w") as f:
        f.write(str(os.getpid()))
    print(json.dumps({"stage": "load", "done": 0, "total": 2, "message": "loading"}), flush=True)
    time.sleep(300)
''')


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@POSIX
@pytest.mark.parametrize("launcher", ["dies", "ignores"])
def test_2_cancel_through_a_launcher_leaves_no_process(tmp_path, launcher):
    """The setup's model checks run through PythonSlicer (the panel's only processes since the service
    took every run): Cancel must reach python-real behind the launcher."""
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "real.py").write_text(REAL)
    process = BackgroundProcess([sys.executable, str(tmp_path / "launcher.py"), launcher, sys.executable,
                                 str(tmp_path / "real.py")], env=dict(os.environ, RECORD_PID=str(tmp_path / "real.pid")))
    # the real grace periods: the defect was the pipe grace (2 s) ending before the kill deadline (3 s)
    assert process.PIPE_GRACE_SECONDS < process.KILL_GRACE_SECONDS
    process.start()
    while not any(line.startswith("{") for _s, line in process.lines()):
        time.sleep(0.02)
    real = int((tmp_path / "real.pid").read_text())
    assert _alive(real) and real != process.proc.pid
    process.cancel()
    deadline = time.monotonic() + 60
    while not process.isFinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    # finished only once the real interpreter is gone, not when the launcher exited
    assert process.isFinished() and not _alive(real), "python-real outlived Cancel"
    assert process.aliveMembers() == []


# ------------------------------------------------------------------ 3. cancel() re-armed its kill deadline
@POSIX
def test_3_repeated_cancel_does_not_postpone_the_kill(tmp_path):
    """verifyModel/downloadModel called cancel() on every loop turn; each call moved the SIGKILL deadline."""
    script = tmp_path / "stubborn.py"
    script.write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\n"
                      "time.sleep(300)\n")
    process = BackgroundProcess([sys.executable, str(script)])
    process.KILL_GRACE_SECONDS = 0.5
    process.start()
    while not any(line == "up" for _s, line in process.lines()):
        time.sleep(0.02)
    first = time.monotonic()
    process.cancel()
    deadline = process._killDeadline
    guard = time.monotonic() + 60  # only so that the old behaviour fails instead of hanging
    while not process.isFinished() and time.monotonic() < guard:
        process.cancel()
        time.sleep(0.05)
    assert process.isFinished() and process.returnCode == -signal.SIGKILL
    assert deadline <= first + process.KILL_GRACE_SECONDS + 0.001


# ----------------------------------------------------------------------- 4. Slicer older than 5.10
def test_4_older_slicer_is_told_in_one_sentence():
    old = dependencies.unsupportedSlicerMessage((5, 8), (3, 9))
    assert old and "5.10" in old and old.count(". ") == 0 and old.endswith(".")
    assert dependencies.unsupportedSlicerMessage((5, 6), (3, 9))
    assert dependencies.unsupportedSlicerMessage((5, 10), (3, 12)) is None
    assert dependencies.unsupportedSlicerMessage((5, 11), (3, 12)) is None
    assert "unsupportedSlicerMessage" in MODULE_FILE.read_text()  # the panel shows it


def test_4_module_files_parse_as_python_39_so_the_message_can_show():
    """Slicer 5.6 / 5.8 run Python 3.9: a newer syntax would stop the module loading before it can say why."""
    for path in [MODULE_FILE, *sorted((MODULE_FILE.parent / "MedCLIPSAMModuleLib").glob("*.py"))]:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))


def test_4_supported_versions_are_stated():
    s4ext = (REPO / "MedCLIPSAM.s4ext").read_text()
    assert "5.10" in re.search(r"^description (.*)$", s4ext, re.M).group(1)
    from test_slicer_module import _cmake_variable

    assert "5.10" in _cmake_variable("EXTENSION_DESCRIPTION")
    readme = (REPO / "README.md").read_text()
    assert "Slicer 5.10" in readme and "5.6 or later" not in readme


# --------------------------------------------------------------------- 5. colour volumes could not be chosen
def slicer_node_types(annotation):
    """parameterNodeWrapper/util.py getNodeTypes (v5.10.0): the class names of a node type or a Union."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else (annotation,)
    return tuple(a().GetClassName() for a in args if isinstance(a, type) and issubclass(a, slicer.vtkMRMLNode))


def combo_lists(node, nodeTypes, showChildNodeTypes):
    """qMRMLSortFilterProxyModel::filterAcceptsRow (v5.10.0): IsA one of nodeTypes, and with
    showChildNodeTypes false the class name must equal it."""
    return any(node.IsA(t) and (showChildNodeTypes or node.GetClassName() == t) for t in nodeTypes)


def test_5_input_selector_lists_grey_and_colour_volumes_not_labelmaps(mod):
    parameter, (widget, cls, element) = "inputVolume", ui_bindings()["inputVolume"]
    assert cls == "qMRMLNodeComboBox"
    show = {p.get("name"): p for p in element.findall("property")}
    showChild = show["showChildNodeTypes"].findtext("bool") == "true" if "showChildNodeTypes" in show else True
    # the connector overwrites the .ui's nodeTypes with the annotation's classes
    annotation = mod.MedCLIPSAMParameterNode.__annotations__[parameter]
    # a Union of nodes must include None, or the wrapper cannot store "no volume" (util.py, v5.10.0)
    assert typing.get_origin(annotation) is not typing.Union or type(None) in typing.get_args(annotation)
    nodeTypes = slicer_node_types(annotation)
    listed = {name: combo_lists(node, nodeTypes, showChild) for name, node in (
        ("grey", slicer.vtkMRMLScalarVolumeNode()), ("colour", slicer.vtkMRMLVectorVolumeNode()),
        ("labelmap", slicer.vtkMRMLLabelMapVolumeNode()), ("dti", slicer.vtkMRMLDiffusionTensorVolumeNode()))}
    assert listed == {"grey": True, "colour": True, "labelmap": False, "dti": False}


def test_5_active_volume_skips_labelmaps():
    import vtk

    scene = slicer.vtkMRMLScene()
    image = vtk.vtkImageData()
    image.SetDimensions(2, 2, 2)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "label")
    label.SetAndObserveImageData(image)
    colour = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour")
    colour.SetAndObserveImageData(image)
    selection = slicer.vtkMRMLSelectionNode()
    selection.SetActiveVolumeID(label.GetID())
    assert panelstate.activeVolume(scene, selection) is colour  # not the labelmap shown in the views
    selection.SetActiveVolumeID(colour.GetID())
    assert panelstate.activeVolume(scene, selection) is colour
    assert panelstate.activeVolume(slicer.vtkMRMLScene(), None) is None


# ------------------------------------------------------------------------- 6. Epochs lost its 1-10000 range
def slicer_int_range(annotation):
    """guiConnectors.py QSliderOrSpinBoxToIntConnector.__init__ (v5.10.0): WithinRange sets the range;
    otherwise Minimum/Maximum, and whatever is missing becomes -2**31 / 2**31 - 1."""
    metadata = getattr(annotation, "__metadata__", ())
    within = next((m for m in metadata if type(m).__name__ == "WithinRange"), None)
    return (within.minimum, within.maximum) if within else (-(2 ** 31), 2 ** 31 - 1)


def test_6_epochs_spin_box_keeps_its_range(mod):
    _widget, cls, element = ui_bindings()["weakEpochs"]
    assert cls == "QSpinBox"
    props = {p.get("name"): int(p.findtext("number")) for p in element.findall("property") if p.find("number") is not None}
    assert slicer_int_range(mod.MedCLIPSAMParameterNode.__annotations__["weakEpochs"]) == (1, 10000)
    assert (props["minimum"], props["maximum"]) == (1, 10000)
    for parameter, (_w, cls, _e) in ui_bindings().items():  # no other spin box is left unbounded
        if cls in ("QSpinBox", "QSlider"):
            assert slicer_int_range(mod.MedCLIPSAMParameterNode.__annotations__[parameter])[0] > -(2 ** 31), parameter


# ------------------------------------------------------------------------- 7. screenshot that does not exist
def test_7_no_reference_to_a_missing_file():
    """ExtensionsIndex's checks download every screenshot and icon URL; one into this repository must exist."""
    texts = [(REPO / n).read_text() for n in ("CMakeLists.txt", "MedCLIPSAM.s4ext", "MedCLIPSAM.json", "README.md")]
    urls = set()
    for text in texts:
        urls |= set(re.findall(r"https://raw\.githubusercontent\.com/medclipsam/SlicerMedCLIPSAM/main/([^\s\"')]+)", text))
    assert urls, "the icon URL at least"
    for relative in urls:
        assert (REPO / relative).is_file(), relative
    for match in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", texts[3]):  # README images
        assert match.startswith("http") or (REPO / match).is_file(), match


# ----------------------------------------------------------------------------- 8. the GUI froze
BLOCKING = {"sleep", "run", "call", "check_output", "communicate", "wait", "processEvents", "queryGpus",
            "verifyModel"}


def test_8_the_widget_never_waits():
    """No call in MedCLIPSAMWidget (nor the weak-supervision section) that blocks or spins the event loop;
    cleanup() is the one exception (Slicer is closing: the process tree must be gone first)."""
    files = [MODULE_FILE, MODULE_FILE.parent / "MedCLIPSAMModuleLib" / "panels" / "trainingpanel.py",
             MODULE_FILE.parent / "MedCLIPSAMModuleLib" / "setupflow.py"]
    found = []
    for path in files:
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            if cls.name not in ("MedCLIPSAMWidget", "WeakSupervisionSection", "SetupFlow"):
                continue
            for method in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name != "cleanup"):
                for call in (n for n in ast.walk(method) if isinstance(n, ast.Call)):
                    name = getattr(call.func, "attr", getattr(call.func, "id", ""))
                    if name in BLOCKING:
                        found.append(f"{path.name}:{cls.name}.{method.name} calls {name}()")
    assert found == []


def test_8_model_checks_run_in_the_background(tmp_path):
    """A ModelsJob returns from start() and poll() while its process still runs (the process can only end
    after the test has written the flag file, so poll() cannot have waited for it)."""
    flag = tmp_path / "go"
    script = tmp_path / "models.py"
    script.write_text(textwrap.dedent(f'''
        import os, sys, time
        name = sys.argv[-1]
        print(f"checking {{name}}", flush=True)
        while not os.path.exists({str(flag)!r}):
            time.sleep(0.02)
        if name == "bad":
            print(f"bad: FAILED: put model.pt in /cache/bad", flush=True)
            sys.exit(1)
    '''))
    seen, done = [], []
    job = modeljobs.ModelsJob(["good", "bad"], lambda name: [sys.executable, str(script), name],
                              progressCallback=lambda name, percent, line: seen.append(line),
                              completedCallback=done.append).start()
    assert job.poll() is True and job.isRunning and not done
    flag.write_text("")
    while job.poll():
        time.sleep(0.02)
    assert done == [{"good": (True, "checking good"), "bad": (False, "put model.pt in /cache/bad")}]
    assert "checking good" in seen and not job.isRunning


@POSIX
def test_8_gpu_query_does_not_block(tmp_path, monkeypatch):
    flag = tmp_path / "go"
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nwhile [ ! -e '{flag}' ]; do sleep 0.02; done\necho 'Tesla T4, 2000, 15360'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    query = devices.GpuQuery(timeout=60).start()
    assert query.result() is None  # asked, not waited for
    flag.write_text("")
    query._thread.join(60)
    assert query.result() == [{"name": "Tesla T4", "freeMiB": 2000, "totalMiB": 15360}]


# ------------------------------------------------------------- 9. versions not checked; wrong package named
class PyTorchUtilsLogic:
    """SlicerPyTorch's PyTorchUtils.PyTorchUtilsLogic.installTorch as used here (fepegar/SlicerPyTorch,
    PyTorchUtils/PyTorchUtils.py): installs 'torch<req>' and 'torchvision<req>' together with
    light-the-torch; returns None when the user declines. `provides` is what the install leaves installed."""

    def __init__(self, installed, provides):
        self.installed, self.provides, self.calls = installed, provides, []

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                     torchvisionVersionRequirement=None):
        self.calls.append((askConfirmation, forceComputationBackend, torchVersionRequirement,
                           torchvisionVersionRequirement))
        self.installed.update(self.provides)
        return object()


def fake_environment(installed):
    packages = [dependencies.TORCH, dependencies.TORCHVISION, ("numpy", "numpy", "1.24")]
    return packages, installed.get


def test_9_torch_too_old_is_upgraded_through_pytorchutils():
    installed = {"torch": "2.1.0+cu118", "torchvision": "0.16.0", "numpy": "2.0.1"}
    packages, version = fake_environment(installed)
    missing = dependencies.missingPackages(packages, version)
    assert [m[0] for m in missing] == ["torch", "torchvision"]
    assert "2.1.0+cu118 installed" in dependencies.describeMissing(missing)
    torch = PyTorchUtilsLogic(installed, {"torch": "2.5.1+cu121", "torchvision": "0.20.1"})
    pipped = []
    dependencies.installPackages(missing, pipped.append, torch, askTorchConfirmation=False, version=version)
    assert torch.calls == [(False, None, ">=2.5", ">=0.20")] and pipped == []


def test_9_only_what_is_still_missing_is_named():
    installed = {"torch": "2.6.0", "numpy": "1.20.0"}
    packages, version = fake_environment(installed)
    missing = dependencies.missingPackages(packages, version)
    assert [(m[0], m[3]) for m in missing] == [("torchvision", None), ("numpy", "1.20.0")]
    torch = PyTorchUtilsLogic(installed, {})  # an install that leaves torchvision out

    def pip(requirements):
        installed["numpy"] = "2.0.0"

    with pytest.raises(RuntimeError) as error:
        dependencies.installPackages(missing, pip, torch, version=version)
    assert str(error.value).endswith(": torchvision")  # not torch, not numpy
    assert torch.calls == [(True, None, ">=2.5", ">=0.20")]


def test_9_without_the_pytorch_extension_the_message_says_so():
    packages, version = fake_environment({"numpy": "2.0"})
    with pytest.raises(RuntimeError, match="'PyTorch' extension"):
        dependencies.installPackages(dependencies.missingPackages(packages, version), lambda r: None, None,
                                     version=version)


def test_9_version_comparison():
    assert dependencies.isNewEnough("2.5.1+cu121", "2.5") and dependencies.isNewEnough("2.10.0", "2.5")
    assert not dependencies.isNewEnough("2.4.9", "2.5") and not dependencies.isNewEnough("0.9", "0.20")
    assert dependencies.isNewEnough("1.1.0", "1.1.0") and dependencies.isNewEnough("2.0.0rc1", "2.0")


# --------------------------------------------------------- 10. settings on every keystroke; hidden observers
class Recorder:
    def __init__(self, stored=None):
        self.stored, self.writes = dict(stored or {}), []

    def read(self, key, default, kind):
        return kind(self.stored[key]) if key in self.stored else default

    def write(self, key, value):
        self.writes.append(key)
        self.stored[key] = value


def test_10_settings_written_only_when_changed_and_not_on_parameter_changes(mod):
    class Params:
        pass

    params = Params()
    for name, kind in mod.REMEMBERED_SETTINGS.items():
        setattr(params, name, kind())
    store = Recorder({"MedCLIPSAM/preset": "v1"})
    settings = panelstate.RememberedSettings(mod.REMEMBERED_SETTINGS, "MedCLIPSAM")
    settings.load(store.read, params)
    assert params.preset == "v1" and settings.save(store.write, params) == []
    for k in range(11):  # typing: the parameter changes on every key
        params.prompts = "brain tumor"[:k]
    assert settings.save(store.write, params) == ["prompts"] and store.writes == ["MedCLIPSAM/prompts"]
    # the module saves on Apply / Start / leaving the module, never from the parameter-node observer
    tree = ast.parse(MODULE_FILE.read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedCLIPSAMWidget")
    savers = {m.name for m in widget.body if isinstance(m, ast.FunctionDef)
              for c in ast.walk(m) if isinstance(c, ast.Call) and getattr(c.func, "attr", "") == "saveSettings"}
    assert savers == {"onApplyButton", "exit"}


def test_10_scene_is_watched_only_while_shown_and_only_for_volumes():
    scene, calls = slicer.vtkMRMLScene(), []
    watcher = panelstate.SceneVolumeWatcher(lambda: calls.append(1))
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")  # hidden module: no work
    assert calls == []
    watcher.attach(scene)
    scene.AddNewNodeByClass("vtkMRMLTableNode")
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert calls == []
    volume = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode")
    scene.RemoveNode(volume)
    assert len(calls) == 2
    watcher.detach()
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    assert len(calls) == 2 and not watcher.attached
    text = MODULE_FILE.read_text()
    assert "NodeAddedEvent" not in text  # the widget itself adds no scene-wide node observer


class PanelRecorder:
    """SetupFlow's view of the panel (dialogs, labels), recording what the user would see."""

    def __init__(self, answer):
        self.answer, self.seen, self.jobs = answer, [], []

    def confirm(self, text):
        self.seen.append(("confirm", text))
        return self.answer

    def inform(self, text):
        self.seen.append(("inform", text))

    def status(self, text):
        self.seen.append(("status", text))

    def progress(self, percent, text):
        self.seen.append(("progress", text))

    def jobStarted(self, job):
        self.jobs.append(job)

    def jobEnded(self):
        self.seen.append(("ended", ""))


def test_8_setup_verifies_models_in_the_background_then_runs(mod, tmp_path):
    script = tmp_path / "cli.py"
    script.write_text(textwrap.dedent('''
        import os, sys
        action, name = sys.argv[2], sys.argv[3]
        if name in os.environ.get("MISSING", "").split(","):
            print(f"{name}: FAILED: put the weights in /cache/{name}", flush=True)
            sys.exit(1)
        print(f"{name}: OK", flush=True)
    '''))
    logic = mod.MedCLIPSAMLogic(scene=slicer.vtkMRMLScene())
    logic.cliPrefix = [sys.executable, str(script)]
    names = modeljobs.requiredModels("")
    assert len(names) == 2

    def drive(flow, panel):  # the panel's timer
        ran = []
        flow.ensure(lambda: ran.append(True), "")
        while flow.job is not None and flow.job.poll():
            time.sleep(0.02)
        return ran

    logic.extraEnvironment = {"MISSING": names[1]}
    panel = PanelRecorder(answer=False)  # the user declines the download
    flow = SetupFlow(logic, panel, missingPackages=lambda packages: [])
    assert drive(flow, panel) == [] and len(panel.jobs) == 1
    kinds = [kind for kind, _text in panel.seen]
    assert "confirm" in kinds and kinds[-1] == "inform"
    assert f"/cache/{names[1]}" in panel.seen[-1][1] and logic.verifiedModels == {names[0]}

    logic.extraEnvironment = {}
    panel = PanelRecorder(answer=True)
    assert drive(SetupFlow(logic, panel, missingPackages=lambda packages: []), panel) == [True]
    assert logic.verifiedModels == set(names)
    again = PanelRecorder(answer=True)  # verified once: no process the second time
    assert drive(SetupFlow(logic, again, missingPackages=lambda packages: []), again) == [True]
    assert again.jobs == []
