"""Issue 32, the panel's side (items 5-12): closing the scene, dialogs, the install, the service refine
uses, shortcuts, place mode, worker threads under a main thread that holds the Python lock, and re-runs
into a segmentation. MRML parts are slicer-core's; where the fact is about Qt, PythonQt or Slicer's
Python helpers, the test re-creates that behaviour from the source it cites (Slicer v5.10.0) and runs the
module's real code against it.
"""

import sys
import textwrap
import time
import types

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from test_slicer_module import load_module_file  # noqa: E402


@pytest.fixture(scope="module")
def mod():
    return load_module_file()


# 7. closing the scene keeps training going: with a real training at the local service, in
#    test_slicer_training.py::test_the_logic_trains_at_the_service_lists_predicts_and_cancels.


# ------------------------------------------- 9. refine before the first Apply uses the configured service
def test_9_refine_uses_the_configured_service_or_says_why_not(mod, monkeypatch):
    """Before any Apply: "remote" refines on the remote service, "local" on the local service Apply will
    use (the panel's models and device), a saved "off" (the process per run that is gone) the local one too;
    nothing starts a service behind the settings' back."""
    from MedCLIPSAMModuleLib import servicebackend
    from MedCLIPSAMModuleLib.panels.refinepanel import RefineSection
    from MedCLIPSAMModuleLib.serviceclient import LocalService, RemoteService

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
        assert section._service() is local
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


# ------------------------------------------------------------ 5. shortcuts: the module's, only while shown
class ShortcutWindow:
    """Qt's shortcut map for one main window, as far as it matters here: shortcuts made on the window with
    the default context (Qt::WindowShortcut) fire wherever the focus is in it; a key held by two enabled
    shortcuts is ambiguous and neither fires (QShortcut::activatedAmbiguously, Qt 5 QShortcutMap)."""

    def __init__(self):
        self.shortcuts = []

    def press(self, key):
        matches = [s for s in self.shortcuts if s.enabled and s.key == key]
        if len(matches) == 1:
            for slot in matches[0].slots:
                slot()
        return len(matches)


class QShortcut:
    def __init__(self, key, parent, name=None):
        self.key, self.enabled, self.slots, self.name = key.text, True, [], name
        parent.shortcuts.append(self)

    def setEnabled(self, on):
        self.enabled = bool(on)

    def connect(self, signal, slot):
        self.slots.append(slot)


RECREATED_QT = types.SimpleNamespace(QShortcut=QShortcut, QKeySequence=lambda text: types.SimpleNamespace(text=text))
# Slicer v5.10.0's own main-window shortcuts with Ctrl+Shift (git grep over the tag): the Markups toolbar
# (qMRMLMarkupsToolBar.cxx:84-86, on while the toolbar exists), the Sequences player
# (qMRMLSequenceBrowserPlayWidget.cxx:41-43); the Segment Editor's undo / redo while it is shown
# (qMRMLSegmentEditorWidget.cxx:2340-2352; QKeySequence::Redo is Ctrl+Shift+Z on X11, Ctrl+Y on Windows)
SLICER_ALWAYS = ["Ctrl+Shift+A", "Ctrl+Shift+T", "Ctrl+Shift+Space", "Ctrl+Shift+Down", "Ctrl+Shift+Left",
                 "Ctrl+Shift+Right"]
SEGMENT_EDITOR = ["Z", "Ctrl+Z", "Y", "Ctrl+Shift+Z", "Ctrl+Y"]
# Qt 5's standard keys with Ctrl+Shift+letter (qplatformtheme.cpp keyBindings: Deselect, Redo, SaveAs,
# AddTab (KDE), FindPrevious, FullScreen (KDE)); Ctrl+Shift+U starts Unicode input under IBus / GTK
TAKEN_ELSEWHERE = {"Ctrl+Shift+A", "Ctrl+Shift+Z", "Ctrl+Shift+S", "Ctrl+Shift+N", "Ctrl+Shift+G", "Ctrl+Shift+F",
                   "Ctrl+Shift+U"}


def test_5_refine_shortcuts_work_only_while_the_module_is_shown_and_clash_with_nothing(mod, monkeypatch):
    from MedCLIPSAMModuleLib.panels.refinepanel import SHORTCUTS, RefineSection

    window = ShortcutWindow()
    fired = []
    for key in SLICER_ALWAYS:
        QShortcut(RECREATED_QT.QKeySequence(key), window).connect("activated()", lambda key=key: fired.append(key))
    editor = [QShortcut(RECREATED_QT.QKeySequence(key), window) for key in SEGMENT_EDITOR]
    for s in editor:
        s.setEnabled(False)                              # the Segment Editor is not shown
        s.connect("activated()", lambda key=s.key: fired.append("editor " + key))
    panel = types.SimpleNamespace(logic=None, _parameterNode=None, initializeParameterNode=lambda: None,
                                  _volumeWatcher=types.SimpleNamespace(attach=lambda scene: None,
                                                                       detach=lambda: None),
                                  saveSettings=lambda: None)
    section = panel.refineSection = RefineSection(panel)
    section.toggle = lambda kind: fired.append(kind)
    section.onUndo = lambda: fired.append("undo")
    section.makeShortcuts(RECREATED_QT, window)
    ours = {SHORTCUTS[k]: k for k in ("positive", "negative", "box", "undo")}
    assert not set(ours) & (set(SLICER_ALWAYS) | set(SEGMENT_EDITOR) | TAKEN_ELSEWHERE)

    for key in ours:                                     # the module not shown yet: nothing
        window.press(key)
    assert fired == []
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    mod.MedCLIPSAMWidget.enter(panel)                    # Slicer shows the module
    for key, kind in ours.items():
        assert window.press(key) == 1                    # one owner: it fires
    assert fired == ["positive", "negative", "box", "undo"]
    assert window.press("Ctrl+Shift+A") == 1 and fired[-1] == "Ctrl+Shift+A"    # the Markups toolbar's still
    fired.clear()
    mod.MedCLIPSAMWidget.exit(panel)                     # another module, say the Segment Editor
    for s in editor:
        s.setEnabled(True)
    for key in ours:
        window.press(key)
    assert window.press("Ctrl+Shift+Z") == 1
    assert fired == ["editor Ctrl+Shift+Z"]              # its Redo works; none of ours fired


# ---------------------------------------------------- 6. place mode persistence is put back as found
def interaction_nodes(scene):
    interaction = slicer.vtkMRMLInteractionNode()
    interaction.SetSingletonTag("Singleton")
    scene.AddNode(interaction)
    selection = slicer.vtkMRMLSelectionNode()
    selection.SetSingletonTag("Singleton")
    scene.AddNode(selection)
    return interaction, selection


class Button:
    def __init__(self, section, kind):
        self.section, self.kind, self._checked, self.blocked = section, kind, False, False

    def blockSignals(self, on):
        self.blocked = on

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, on):
        changed, self._checked = self._checked != on, on
        if changed and not self.blocked:          # toggled(bool), as QAbstractButton emits it
            self.section.onPlaceToggled(self.kind, on)


def test_6_place_mode_is_put_back_and_the_box_button_unchecks_after_its_one_placement(monkeypatch):
    from MedCLIPSAMModuleLib.panels.refinepanel import RefineSection

    scene = slicer.vtkMRMLScene()
    interaction, selection = interaction_nodes(scene)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    logic = types.SimpleNamespace(GetInteractionNode=lambda: interaction, GetSelectionNode=lambda: selection)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(applicationLogic=lambda: logic), raising=False)
    section = RefineSection(types.SimpleNamespace(logic=None, _parameterNode=None))
    section.buttons = {kind: Button(section, kind) for kind in ("positive", "negative", "box")}
    interaction.SetPlaceModePersistence(0)               # the user's setting (Slicer's default)

    section.buttons["positive"].checked = True          # + Point: persistent place mode for the point list
    assert interaction.GetCurrentInteractionMode() == interaction.Place and interaction.GetPlaceModePersistence()
    section.buttons["negative"].checked = True          # - Point takes over; + Point unchecks
    assert not section.buttons["positive"].checked
    assert selection.GetActivePlaceNodeID() == section.nodes["negative"].GetID()
    interaction.SetCurrentInteractionMode(interaction.ViewTransform)       # Escape / the mouse-mode toolbar
    assert not section.buttons["negative"].checked and interaction.GetPlaceModePersistence() == 0

    section.buttons["box"].checked = True               # Box: one placement
    assert interaction.GetPlaceModePersistence() == 0 and interaction.GetCurrentInteractionMode() == interaction.Place
    interaction.SetCurrentInteractionMode(interaction.ViewTransform)       # vtkSlicerMarkupsWidget.cxx:1198
    assert not section.buttons["box"].checked          # the next box is one click, not two

    interaction.SetPlaceModePersistence(1)               # the user's setting now: persistent
    section.buttons["positive"].checked = True
    another = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "someone else's")
    selection.SetActivePlaceNodeID(another.GetID())       # the Markups module places its own node
    assert not section.buttons["positive"].checked and interaction.GetPlaceModePersistence() == 1
    section.buttons["box"].checked = True
    section.exit()                                      # the module is left while placing
    assert not section.buttons["box"].checked and interaction.GetPlaceModePersistence() == 1
    assert interaction.GetCurrentInteractionMode() == interaction.ViewTransform


# ---------------------------------------- 11. workers under a main thread that holds the Python lock
class GilHoldingMainThread:
    """Slicer's main thread as PythonQt leaves it (thread support off: PythonQtThreadSupport.cpp:45): it keeps
    the Python lock while Qt's event loop idles, and runs Python only in timer callbacks. Re-created: the
    main thread sleeps 50-200 ms inside a ctypes.PyDLL call (which keeps the lock) between ticks; a tick
    runs the callbacks of the timers that are active. A worker thread left without an active timer would
    move only when some other Python happens to run: that is a failure here, not a wait."""

    def __init__(self, seed=0):
        import ctypes
        import ctypes.util
        import random

        self.libc = ctypes.PyDLL(ctypes.util.find_library("c"))
        self.rng = random.Random(seed)
        self.ticks = 0

    def run(self, done, timers, workersAlive, limit=1500):
        """Tick until done(); timers: [(isActive(), callback)]. Returns the number of ticks."""
        while not done():
            assert self.ticks < limit, "the workers did not finish in bounded time"
            self.libc.usleep(self.rng.randint(50, 200) * 1000)      # Qt idles, holding the lock
            active = [callback for isActive, callback in timers if isActive()]
            assert active or not workersAlive(), "a worker thread runs with no timer to move it"
            for callback in active:
                callback()
            self.ticks += 1
        return self.ticks


needs_libc = pytest.mark.skipif(sys.platform != "linux", reason="re-creates the held lock with libc's usleep")


@needs_libc
def test_11_process_readers_lose_no_line_while_the_main_thread_holds_the_lock(tmp_path):
    """A process (here `models verify`'s place) prints 20,000 lines, more than a pipe holds, and exits: its
    reader threads move one read per tick, the panel's 200 ms timer polls the job; every line arrives,
    the child is never stuck on a full pipe for good, and the job ends."""
    from MedCLIPSAMModuleLib.modeljobs import ModelsJob

    script = tmp_path / "chatty.py"
    script.write_text("for k in range(20000):\n    print(f'line {k}', flush=k % 500 == 0)\n")
    seen, done = [], []
    job = ModelsJob(["m"], lambda name: [sys.executable, str(script)],
                    progressCallback=lambda name, percent, line: seen.append(line), completedCallback=done.append)
    job.start()
    GilHoldingMainThread().run(lambda: bool(done), [(lambda: job.isRunning, job.poll)],
                               lambda: any(t.is_alive() for t in job.process._threads) if job.process else False)
    assert seen == [f"line {k}" for k in range(20000)]
    assert done[0]["m"][0] is True


# --------------------------------------------- 12. plot clicks after a layout change; re-runs keep segments
class Signal:
    def __init__(self):
        self.slots = []

    def emit(self, *args):
        for slot in list(self.slots):
            slot(*args)


class PlotView:
    """qMRMLPlotView as far as it matters: dataSelected(vtkStringArray*, vtkCollection*) to connected slots."""

    def __init__(self):
        self.dataSelected = Signal()

    def connect(self, signal, slot):
        self.dataSelected.slots.append(slot)

    def disconnect(self, signal, slot):
        self.dataSelected.slots.remove(slot)


class LayoutManager:
    """qMRMLLayoutManager as far as it matters: plot widgets of the current layout (a layout with another
    plot view brings a widget that did not exist before), and layoutChanged(int) after a switch
    (Libs/MRML/Widgets/qMRMLLayoutManager.h:148,158,274 in v5.10.0)."""

    def __init__(self):
        self.views, self.layoutChanged = [PlotView()], Signal()

    @property
    def plotViewCount(self):
        return len(self.views)

    def plotWidget(self, i):
        return types.SimpleNamespace(plotView=lambda: self.views[i])

    def connect(self, signal, slot):
        assert signal == "layoutChanged(int)"
        self.layoutChanged.slots.append(slot)

    def disconnect(self, signal, slot):
        self.layoutChanged.slots.remove(slot)

    def switch(self, layout):
        self.views = [PlotView(), PlotView()]           # e.g. a layout with two plot views
        self.layoutChanged.emit(layout)


def test_12_plot_clicks_still_move_the_slices_after_a_layout_change(monkeypatch):
    import vtk

    from MedCLIPSAMModuleLib.panels.evidencepanel import EvidenceSection

    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    layout = LayoutManager()
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(layoutManager=lambda: layout), raising=False)
    section = EvidenceSection(types.SimpleNamespace())
    jumps = []
    section.view.jumpToSelection = lambda ids, points: jumps.append((ids, points))
    section._chartShown = True                           # onShowChart after ShowChartInLayout
    section._connectPlotViews()
    ids, selection, points = vtk.vtkStringArray(), vtk.vtkCollection(), vtk.vtkIdTypeArray()
    ids.InsertNextValue("vtkMRMLPlotSeriesNode1")
    points.InsertNextValue(3)
    selection.AddItem(points)
    layout.views[0].dataSelected.emit(ids, selection)
    layout.switch(36)
    layout.views[1].dataSelected.emit(ids, selection)   # a click in the new layout's plot view
    assert jumps == [(["vtkMRMLPlotSeriesNode1"], [[3]])] * 2
    section.cleanup()
    assert layout.layoutChanged.slots == []


def test_12_a_re_run_keeps_the_segment_its_display_and_the_editor_selection(tmp_path):
    """Re-running a prompt into the same segmentation replaces the segment's voxels in place: its ID,
    visibility and opacity (display node, keyed by segment ID) and the Segment Editor's selected segment
    stay (removing and adding the segment reset them)."""
    import numpy as np

    from MedCLIPSAMLib import io, mrml, phantoms

    ph = phantoms.make_volume("mr", shape=(4, 24, 20), seed=0)
    scene = slicer.vtkMRMLScene()
    slicer.vtkSlicerSegmentationsModuleLogic().SetMRMLScene(scene)
    volume = mrml.volume_node_from_sitk(scene, ph.image, "v")
    first, second = np.zeros((4, 24, 20), np.uint8), np.zeros((4, 24, 20), np.uint8)
    first[1, 5:10, 5:10], second[2, 8:16, 6:12] = 1, 1
    other = np.zeros_like(first)
    other[0, :3, :3] = 1
    io.write_segmentation(str(tmp_path / "a.seg.nrrd"), [{"name": "tumor", "mask": first},
                                                          {"name": "other", "mask": other}], ph.image)
    io.write_segmentation(str(tmp_path / "b.seg.nrrd"), [{"name": "tumor", "mask": second}], ph.image)
    node = mrml.import_segmentation_file(scene, str(tmp_path / "a.seg.nrrd"), volume)["node"]
    tumor = node.GetSegmentation().GetSegmentIdBySegmentName("tumor")
    display = node.GetDisplayNode()
    display.SetSegmentVisibility(tumor, False)
    display.SetSegmentOpacity2DFill(tumor, 0.25)
    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetAndObserveSegmentationNode(node)
    editor.SetSelectedSegmentID(tumor)

    result = mrml.import_segmentation_file(scene, str(tmp_path / "b.seg.nrrd"), volume, node)
    assert result["replaced"] == [tumor] and node.GetSegmentation().GetSegmentIdBySegmentName("tumor") == tumor
    assert not display.GetSegmentVisibility(tumor)
    assert display.GetSegmentOpacity2DFill(tumor) == pytest.approx(0.25)
    assert editor.GetSelectedSegmentID() == tumor
    labelmap = mrml.export_segments_to_labelmap(scene, node, volume, segment_ids=[tumor])
    from vtk.util import numpy_support

    voxels = numpy_support.vtk_to_numpy(labelmap.GetImageData().GetPointData().GetScalars()).reshape(4, 24, 20)
    assert np.array_equal(voxels != 0, second.astype(bool))
    assert mrml.segment_names(node) == ["tumor", "other"]


class HeldService:
    """A stand-in service on 127.0.0.1 that holds the upload until `release` is set (a slow link to a
    remote service); it records every request it gets."""

    def __init__(self):
        import http.server
        import json
        import threading

        self.release, self.uploading, self.paths = threading.Event(), threading.Event(), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                outer.paths.append("GET " + self.path)
                self._answer({"state": "cancelled", "job_id": "j1"})

            def do_POST(self):
                outer.paths.append("POST " + self.path)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/volumes":
                    outer.uploading.set()
                    outer.release.wait(60)
                    self._answer({"volume_id": "v1", "size": 1})
                else:
                    self._answer({"job_id": "j1", "state": "queued"})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_12_a_worker_left_blocked_by_cleanup_ends_as_cancelled_without_submitting_or_touching_the_scene(mod):
    """Slicer closes (Widget.cleanup: cancel, 10 s join) while the service job's worker is blocked in a long
    upload to a remote service: the join gives up, the worker is a daemon (it cannot keep Slicer from
    exiting), and when the upload ends it submits nothing, calls nothing and leaves the scene alone."""
    held = HeldService()
    try:
        scene = slicer.vtkMRMLScene()
        logic = mod.MedCLIPSAMLogic(scene=scene)
        logic.serviceBackend.configure("remote", held.url, "token")
        volume, _ph = logic.createPhantomVolume("v", shape=(4, 16, 16))
        called = []
        job = logic.startSegmentation(volume, ["tumor"], preset="fast", device="cpu",
                                      completedCallback=called.append)
        deadline = time.monotonic() + 60
        while not held.uploading.is_set():                  # the panel's timer writes the volume file
            assert job.poll() and time.monotonic() < deadline
            time.sleep(0.02)
        nodes = scene.GetNumberOfNodes()
        job.completedCallback = None                        # MedCLIPSAMWidget.cleanup
        job.cancel()
        assert job.process.wait(timeout=0.5) is False and job.process.thread.daemon
        held.release.set()                                  # the upload ends after Slicer's cleanup
        job.process.thread.join(60)
        assert not job.process.thread.is_alive()
        assert [p for p in held.paths if p.startswith("POST /jobs")] == []
        assert called == [] and scene.GetNumberOfNodes() == nodes
    finally:
        held.close()


def test_9_a_local_service_refine_replaced_is_stopped_by_a_worker_or_at_cleanup(mod, monkeypatch):
    """Other models or device for a refine: the service they replace is stopped by the refine worker
    (stopRetired, never on the GUI thread), or by the backend's stop() at cleanup."""
    from MedCLIPSAMModuleLib import servicebackend

    monkeypatch.setattr(servicebackend, "serviceCanRun", lambda: True)
    stopped = []
    logic = mod.MedCLIPSAMLogic(scene=slicer.vtkMRMLScene())
    backend = logic.serviceBackend
    first = backend.refineService("tiny-random", "cpu")
    first.stop = lambda: stopped.append("first")
    second = backend.refineService("tiny-random", "auto")
    assert second is not first and stopped == []            # nothing stopped on the calling thread
    backend.stopRetired()                                   # the refine worker, before ensure()
    assert stopped == ["first"]
    second.stop = lambda: stopped.append("second")
    third = backend.refineService("", "cpu")
    third.stop = lambda: stopped.append("third")
    backend.stop()                                          # Widget.cleanup
    assert stopped == ["first", "third", "second"]
    servicebackend.stopLocalServices()
