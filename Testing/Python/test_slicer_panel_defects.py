"""Issue 32, the panel's side (items 5-12): closing the scene, dialogs, the install, the service refine
uses, shortcuts, place mode, worker threads under a main thread that holds the Python lock, and re-runs
into a segmentation. MRML parts are slicer-core's; where the fact is about Qt, PythonQt or Slicer's
Python helpers, the test re-creates that behaviour from the source it cites (Slicer v5.10.0) and runs the
module's real code against it.
"""

import json
import os
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from test_slicer_module import load_module_file  # noqa: E402

from MedCLIPSAMModuleLib.weakpanel import WeakSupervisionSection  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mod():
    return load_module_file()


# ------------------------------------------------------------- 7. closing the scene keeps training going
STAND_IN_TRAINING = textwrap.dedent('''
    import json, os, sys, time
    args = sys.argv[1:]
    flag = os.environ["FAKE_FLAG"]
    if args[0] == "pseudo-label":
        out = args[args.index("--output-dir") + 1]
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "labels.txt"), "w").write("x\\n")
        sys.exit(0)
    out = args[args.index("--output") + 1]
    os.makedirs(out, exist_ok=True)
    metrics = os.path.join(out, "metrics.jsonl")
    with open(metrics, "a") as f:
        f.write(json.dumps({"epoch": 1, "loss": 0.9, "val_dice": 0.1, "lr": 0.001}) + "\\n")
    while not os.path.exists(flag):
        time.sleep(0.02)
    with open(metrics, "a") as f:
        f.write(json.dumps({"epoch": 2, "loss": 0.5, "val_dice": 0.3, "lr": 0.001}) + "\\n")
    json.dump({"format": "medclipsam-weak-v1", "label_names": ["tumor"],
               "snapshots": [{"file": "snapshot-1.pt", "epoch": 2}]}, open(os.path.join(out, "config.json"), "w"))
    open(os.path.join(out, "snapshot-1.pt"), "wb").write(b"weights")
''')


def test_7_closing_the_scene_does_not_cancel_training(mod, tmp_path, monkeypatch):
    """Training from scene volumes (copied when it started): File > Close Scene leaves it running; it
    registers its model, and its chart comes back in the new scene with every epoch."""
    from MedCLIPSAMLib import mrml, phantoms

    monkeypatch.setenv("MEDCLIPSAM_HOME", str(tmp_path / "home"))
    script = tmp_path / "cli.py"
    script.write_text(STAND_IN_TRAINING)
    scene = slicer.vtkMRMLScene()
    logic = mod.MedCLIPSAMLogic(scene=scene)
    logic.cliPrefix = [sys.executable, str(script)]
    logic.extraEnvironment = {"FAKE_FLAG": str(tmp_path / "go")}
    volume = mrml.volume_node_from_sitk(scene, phantoms.make_volume("mr", shape=(4, 16, 16), seed=0).image, "v")
    panel = types.SimpleNamespace(job=None, evidenceSection=types.SimpleNamespace(clear=lambda: None),
                                  setParameterNode=lambda node: None)
    panel.weakSection = WeakSupervisionSection(panel)
    closing = mod.MedCLIPSAMWidget.onSceneStartClose
    tag = scene.AddObserver(scene.StartCloseEvent, lambda caller, event: closing(panel, caller, event))
    job = panel.weakSection.job = logic.startWeakSupervision([volume], ["tumor"], "net", str(tmp_path / "models"),
                                                             epochs=2)
    deadline = time.monotonic() + 60
    while job.tableNode is None:
        assert job.poll() and time.monotonic() < deadline
        time.sleep(0.02)
    table = job.tableNode
    scene.Clear(0)                                            # File > Close Scene
    scene.RemoveObserver(tag)
    assert not scene.IsNodePresent(table) and job.isRunning and not job.process.cancelRequested
    (tmp_path / "go").write_text("")
    result = job.wait(60)
    assert result.status == "succeeded", result.message
    assert result.model["name"] == "net"
    assert scene.IsNodePresent(result.tableNode) and result.tableNode.GetNumberOfRows() == 2


# ------------------------------------------- 9. refine before the first Apply uses the configured service
def test_9_refine_uses_the_configured_service_or_says_why_not(mod, monkeypatch):
    """Before any Apply: "remote" refines on the remote service, "local" on the local service Apply will
    use (the panel's models and device), "off" gets one sentence; nothing starts a service behind the
    settings' back."""
    from MedCLIPSAMModuleLib import servicebackend
    from MedCLIPSAMModuleLib.refinepanel import RefineSection
    from MedCLIPSAMModuleLib.service import LocalService, RemoteService

    monkeypatch.setattr(servicebackend, "serviceCanRun", lambda: True)
    logic = mod.MedCLIPSAMLogic(scene=slicer.vtkMRMLScene())
    panel = types.SimpleNamespace(logic=logic, _parameterNode=types.SimpleNamespace(models="tiny-random",
                                                                                    device="cpu"))
    section = RefineSection(panel)
    try:
        logic.serviceBackend.configure("remote", "https://gpu.example:8443", "secret")
        remote = section._service()
        assert isinstance(remote, RemoteService) and remote.client.url == "https://gpu.example:8443"
        assert remote.client.token == "secret"
        logic.serviceBackend.configure("local")
        local = section._service()
        assert isinstance(local, LocalService) and local.process is None          # started by the worker
        assert local.extra_args[:4] == ["--models", "tiny-random", "--device", "cpu"]
        assert servicebackend._localServices[("local", "tiny-random", "cpu")] is local   # Apply's own
        logic.serviceBackend.configure("off")
        with pytest.raises(ValueError) as err:
            section._service()
        assert str(err.value) == ("Click refinement needs the segmentation service: choose a local or remote "
                                  "service in 'Setup and advanced'.")
    finally:
        logic.serviceBackend.stop()


# ------------------------------------------------------------------------ 8. one error, one dialog
def recreated_try_with_error_display(shown):
    """slicer.util.tryWithErrorDisplay as Base/Python/slicer/util.py:3368-3409 (v5.10.0) has it: on an
    exception it shows errorDisplay(message + error) and re-raises."""
    import contextlib

    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as e:
            if show:
                shown.append(f"{message}\n\n{e}" if message is not None else str(e))
            raise

    return tryWithErrorDisplay


def test_8_a_start_up_error_inside_apply_shows_one_dialog(mod, monkeypatch):
    """Apply -> setup (nothing to install or verify: it goes on at once) -> startSegmentation, which fails:
    one dialog, not one per nested tryWithErrorDisplay."""
    from MedCLIPSAMModuleLib.modeljobs import requiredModels
    from MedCLIPSAMModuleLib.setupflow import SetupFlow

    shown = []
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", recreated_try_with_error_display(shown), raising=False)
    logic = mod.MedCLIPSAMLogic(scene=slicer.vtkMRMLScene())
    logic.verifiedModels.update(requiredModels(""))
    panel = mod.MedCLIPSAMWidget.__new__(mod.MedCLIPSAMWidget)
    label = types.SimpleNamespace(text="")
    panel.logic, panel.job = logic, None
    panel._parameterNode = types.SimpleNamespace(
        trainedModel="", models="", inputVolume=None, prompts="tumor", outputSegmentation=None, preset="fast",
        axis="axial", device="cpu", computeUncertainty=False, show3D=False, absentIf="")
    panel.ui = types.SimpleNamespace(progressBar=types.SimpleNamespace(hide=lambda: None, setFormat=lambda t: None,
                                                                       show=lambda: None, value=0),
                                     statusLabel=label)
    panel.saveSettings = lambda: None
    panel.setupFlow = SetupFlow(logic, panel, missingPackages=lambda packages: [])
    try:
        panel.onApplyButton()
    except ValueError:
        pass        # (in Slicer the slot prints it; the dialogs are what the user sees)
    assert shown == ["MedCLIP-SAM could not start.\n\nSelect an input volume that has image data."]
    assert label.text == ""


# ------------------------------------------------------------------- 10. the install cannot start twice
class SetupPanel:
    """SetupFlow's view of the panel: dialogs recorded, and updateButtons as the panel's (Apply enabled
    unless the setup runs)."""

    def __init__(self):
        self.flow, self.seen, self.applyEnabled = None, [], True

    def confirm(self, text):
        self.seen.append("confirm")
        return True

    def status(self, text):
        self.seen.append(text)

    def updateButtons(self):
        self.applyEnabled = not self.flow.isRunning


def test_10_apply_pressed_while_pip_runs_does_not_start_a_second_install(mod):
    """slicer.util.pip_install calls processEvents for each line pip prints (util.py:3944, v5.10.0): a
    click on Apply is handled while the first install still runs. Re-created: the stand-in install lets
    that click through (calls ensure again, as the event loop would) between its 'lines'."""
    from MedCLIPSAMModuleLib.setupflow import SetupFlow

    logic = mod.MedCLIPSAMLogic(scene=slicer.vtkMRMLScene())
    panel = SetupPanel()
    installs, done, started = [], [], []
    missing = [("fastapi", "fastapi", "0.110", None)]

    def pip_install_pumping_events(packages):
        installs.append(packages)
        if len(installs) == 1:
            for _line in range(3):                    # each line of pip's output: processEvents()
                if panel.applyEnabled:                # the user presses Apply meanwhile
                    flow.ensure(lambda: started.append(1), zeroShotModels=False)
        done.append(packages)

    flow = panel.flow = SetupFlow(logic, panel, missingPackages=lambda packages: [] if done else missing,
                                  install=pip_install_pumping_events)
    flow.ensure(lambda: started.append(1), zeroShotModels=False)
    assert len(installs) == 1 and panel.seen.count("confirm") == 1
    assert started == [1] and panel.applyEnabled and not flow.isRunning
