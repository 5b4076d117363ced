"""Issue 32: clicks leave the scene as they were, and edits land in the right place (MRML facts, in a
slicer-core scene, against a real `medclipsam serve` with tiny-random models).

1. a click sequence (refine x5, undo x2, new box) leaves the scene's node count unchanged (no
   "<segmentation>_ColorTable" per read: vtkSlicerSegmentationsModuleLogic.cxx:1235 in v5.10.0);
2. writing slices leaks no volume-sized image (RSS over repeated writes);
3. under a 12 mm translation (of the volume, of the segmentation, of both) the clicked slice lands where
   the click was, nothing else moves on the segmentation's own grid, and undo restores it bit for bit;
4. a segmentation oversampled 2x in-plane keeps its grid: only the voxels of the changed slices change,
   and undo puts the fine voxels back exactly; a non-linear transform between them gets one sentence;
11. a refine request, a service job, Test connection and forgetting an upload finish while the main thread
   holds the Python lock between 50-200 ms ticks (GilHoldingMainThread, test_slicer_panel_defects.py).
"""

import base64
import os
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
pytest.importorskip("fastapi")
pytest.importorskip("sam2")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedCLIPSAM"))
from MedCLIPSAMModuleLib.clickrefine import RefineError, RefineLogic  # noqa: E402

from MedCLIPSAMLib import mrml  # noqa: E402
from conftest import phantom_segmentation_scene  # noqa: E402

LABELMAP = "Binary labelmap"


@pytest.fixture(scope="module")
def service(local_service):
    return local_service   # conftest.py: a real `medclipsam serve` with tiny-random models


def make_scene(tmp_path, service, oversample=1):
    scene, volume, seg, ph = phantom_segmentation_scene()
    seg.CreateDefaultDisplayNodes()
    if oversample > 1:     # as the Segment Editor's "Specify geometry" oversampling does: finer in-plane
        geometry = finer_geometry(volume, oversample)
        seg.GetSegmentation().SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry))
    logic = RefineLogic(scene, service, temporaryDirectory=str(tmp_path))
    tumour = (ph.labels["tumor"] > 0).astype(np.uint8)
    seg.GetSegmentation().AddEmptySegment("tumor", "brain tumor")
    seg.GetSegmentation().AddEmptySegment("corner", "corner")
    if oversample > 1:
        rng = np.random.default_rng(3)
        fine = np.kron(tumour, np.ones((1, oversample, oversample), np.uint8))
        fine &= (rng.random(fine.shape) > 0.3).astype(np.uint8)      # detail only the fine grid holds
        set_own(seg, "tumor", geometry, fine)
    else:
        logic.writeSlices(seg, "tumor", volume, tumour, 0, list(range(tumour.shape[0])))
    corner = np.zeros_like(tumour)
    corner[:, :4, :4] = 1
    logic.writeSlices(seg, "corner", volume, corner, 0, list(range(corner.shape[0])))
    return scene, logic, volume, seg, ph


def finer_geometry(volume, factor):
    import vtk

    image = slicer.vtkOrientedImageData()
    m = mrml.ijk_to_ras_from_node(volume)
    m[:3, :2] /= factor
    m[:3, 3] -= (m[:3, 0] + m[:3, 1]) * (factor - 1) / 2     # fine voxel centres around the coarse ones
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, m[r, c])
    image.SetGeometryFromImageToWorldMatrix(matrix)
    dims = volume.GetImageData().GetDimensions()
    image.SetExtent(0, dims[0] * factor - 1, 0, dims[1] * factor - 1, 0, dims[2] - 1)
    return image


def set_own(seg, segment_id, geometry, array):
    """Write `array` ((k, j, i) on `geometry`'s lattice) as the segment, without resampling."""
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.DeepCopy(geometry)
    image.AllocateScalars(3, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True, array_type=3))
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, seg, segment_id, 0)


def own(seg, segment_id):
    """The segment's labelmap on its own grid, in the segmentation's own frame: ((k, j, i) bool array, the
    lattice's IJK->local matrix, extent start (i, j, k))."""
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg, segment_id, image,
                                                                                             False)
    import vtk

    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    e = image.GetExtent()
    label = seg.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    if e[0] > e[1]:
        return np.zeros((0, 0, 0), bool), m, (0, 0, 0)
    dims = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims) == label
    return array, m, (e[0], e[2], e[4])


def voxels(seg, segment_id):
    """The segment's voxels on its own grid as a set of absolute lattice indices (k, j, i)."""
    array, _m, (i0, j0, k0) = own(seg, segment_id)
    return {(k + k0, j + j0, i + i0) for k, j, i in zip(*np.nonzero(array))}


def ras(volume, ijk):
    m = mrml.ijk_to_ras_from_node(volume)
    return list((m @ np.r_[np.asarray(ijk, float), 1.0])[:3])


def planes(reply):
    out = {}
    for s in reply["slices"]:
        out[s["index"]] = np.unpackbits(np.frombuffer(base64.b64decode(s["bits"]), np.uint8),
                                        count=int(np.prod(s["shape"]))).reshape(s["shape"])
    return out


def translation(scene, mm):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    import vtk

    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, mm)
    node.SetMatrixTransformToParent(matrix)
    return node


# ---------------------------------------------------------------------------- 1. node count after clicks
def test_1_a_click_sequence_leaves_the_node_count_unchanged(tmp_path, service):
    scene, logic, volume, seg, ph = make_scene(tmp_path, service)
    positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
    negative = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "negative")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    a, b = np.array(ras(volume, (8, 8, 1))), np.array(ras(volume, (26, 30, 1)))
    roi.SetCenter(*((a + b) / 2))
    roi.SetSize(*np.abs(b - a))
    count = scene.GetNumberOfNodes()
    for n, (i, j, k) in enumerate([(18, 20, 3), (20, 22, 3), (17, 21, 2), (5, 5, 4), (19, 19, 1)]):
        (negative if n == 3 else positive).AddControlPoint(*ras(volume, (i, j, k)))
        logic.refine(seg, "tumor", volume, positive, negative, propagate=False,
                     latestPoint=ras(volume, (i, j, k)))
    logic.undo(seg, "tumor", volume)
    logic.undo(seg, "tumor", volume)
    logic.newSegmentFromBox(seg, volume, roi, propagate=False)
    assert scene.GetNumberOfNodes() == count
    tables = scene.GetNodesByClass("vtkMRMLColorTableNode")
    assert [tables.GetItemAsObject(i).GetName() for i in range(tables.GetNumberOfItems())
            if "_ColorTable" in tables.GetItemAsObject(i).GetName()] == []


# ------------------------------------------------------------------------------- 2. no leaked image
def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc")
def test_2_writing_slices_leaks_no_volume_sized_image(tmp_path):
    """A 192x192x160 int16 volume: one leaked uint8 copy per write is 5.6 MiB; 8 writes leak 45 MiB. Freed
    memory of this size goes back to the system (mmap'd blocks), so the resident size shows a leak."""
    import SimpleITK as sitk

    scene = slicer.vtkMRMLScene()
    slicer.vtkSlicerSegmentationsModuleLogic().SetMRMLScene(scene)
    image = sitk.Image([192, 192, 160], sitk.sitkInt16)
    volume = mrml.volume_node_from_sitk(scene, image, "big")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "big segmentation")
    seg.SetSourceRepresentationToBinaryLabelmap()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    seg.GetSegmentation().AddEmptySegment("s", "s")
    logic = RefineLogic(scene, service=None)
    array = np.zeros((160, 192, 192), np.uint8)
    array[80, 50:150, 50:150] = 1
    logic.writeSlices(seg, "s", volume, array, 0, [80])     # warm up: the segment's own image exists
    array[80, 60:70, 60:70] = 0
    logic.writeSlices(seg, "s", volume, array, 0, [80])
    before = _rss()
    for n in range(8):
        array[80, 60 + n, 100] = 1
        logic.writeSlices(seg, "s", volume, array, 0, [80])
    grown = _rss() - before
    assert grown < 20 * 2**20, f"resident size grew {grown / 2**20:.1f} MiB over 8 writes"


# --------------------------------------------------------------------------------- 3. transforms
@pytest.mark.parametrize("moved", ["volume", "segmentation", "both"])
def test_3_under_a_translation_the_click_lands_where_it_was_and_undo_is_exact(tmp_path, service, moved):
    scene, logic, volume, seg, ph = make_scene(tmp_path, service)
    shift = translation(scene, 12.0)
    for node in {"volume": [volume], "segmentation": [seg], "both": [volume, seg]}[moved]:
        node.SetAndObserveTransformNodeID(shift.GetID())
    before_volume_grid = logic.segmentArray(seg, "tumor", volume)
    before_own, corner_own = voxels(seg, "tumor"), voxels(seg, "corner")
    # the click: a world position inside the tumour on slice k of the volume as it is shown (transformed)
    k = int(np.argmax(before_volume_grid.reshape(before_volume_grid.shape[0], -1).sum(1)))
    rows, cols = np.nonzero(before_volume_grid[k])
    local = np.asarray(ras(volume, (cols[len(cols) // 2], rows[len(rows) // 2], k)))
    world = local + (12.0 if moved in ("volume", "both") else 0.0) * np.array([1.0, 0.0, 0.0])
    positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
    positive.AddControlPoint(*world)
    changed = logic.refine(seg, "tumor", volume, positive, propagate=moved == "volume")   # (test time)
    reply = logic.lastReply
    assert reply["clicked_slice"] == k and k in changed
    after = logic.segmentArray(seg, "tumor", volume)
    for index, plane in planes(reply).items():
        assert np.array_equal(after[index], plane), index            # on the volume, where the click was
    untouched = [j for j in range(after.shape[0]) if j not in changed]
    assert np.array_equal(after[untouched], before_volume_grid[untouched])
    # the segmentation's own grid: only voxels whose centre lies in a changed slice of the volume changed
    # (segmentation -> volume voxel indices: a translation d, as the reference grid is the volume's)
    sign = {"volume": -1.0, "segmentation": 1.0, "both": 0.0}[moved]
    d = np.linalg.solve(mrml.ijk_to_ras_from_node(volume)[:3, :3], [12.0 * sign, 0.0, 0.0])
    moved_voxels = before_own ^ voxels(seg, "tumor")
    assert moved_voxels and all(int(np.floor(v[0] + d[2] + 0.5)) in changed for v in moved_voxels)
    assert voxels(seg, "corner") == corner_own
    restored = logic.undo(seg, "tumor", volume)
    assert restored == changed
    assert np.array_equal(logic.segmentArray(seg, "tumor", volume), before_volume_grid)
    assert voxels(seg, "tumor") == before_own                                    # bit for bit


# ---------------------------------------------------------------------------- 4. oversampled segmentation
def test_4_an_oversampled_segmentation_keeps_its_grid_and_only_the_changed_slices_change(tmp_path, service):
    scene, logic, volume, seg, ph = make_scene(tmp_path, service, oversample=2)
    before, corner = voxels(seg, "tumor"), voxels(seg, "corner")
    _a, lattice_before, _e = own(seg, "tumor")
    coarse = logic.segmentArray(seg, "tumor", volume)
    k = int(np.argmax(coarse.reshape(coarse.shape[0], -1).sum(1)))
    rows, cols = np.nonzero(coarse[k])
    positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
    positive.AddControlPoint(*ras(volume, (cols[0], rows[0], k)))
    changed = logic.refine(seg, "tumor", volume, positive, propagate=False)
    assert changed == [k]
    after = voxels(seg, "tumor")
    _a, lattice_after, _e = own(seg, "tumor")
    np.testing.assert_allclose(lattice_after, lattice_before, atol=1e-9)       # still the fine grid
    assert {v for v in after if v[0] != k} == {v for v in before if v[0] != k}   # off the slice: as it was
    plane = planes(logic.lastReply)[k]
    assert {v for v in after if v[0] == k} == {(k, j, i) for j, i in zip(*np.nonzero(np.kron(plane, np.ones((2, 2)))))}
    assert voxels(seg, "corner") == corner
    assert logic.undo(seg, "tumor", volume) == [k]
    assert voxels(seg, "tumor") == before            # the fine grid's detail on slice k is back, exactly


def test_4_a_non_linear_transform_between_them_is_refused_in_one_sentence(tmp_path, service):
    scene, logic, volume, seg, ph = make_scene(tmp_path, service)
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    import vtk

    displacement = slicer.vtkOrientedGridTransform()
    field = vtk.vtkImageData()
    field.SetDimensions(4, 4, 4)
    field.SetSpacing(50, 50, 50)
    field.SetOrigin(-100, -100, -100)
    field.AllocateScalars(vtk.VTK_DOUBLE, 3)
    from vtk.util import numpy_support

    numpy_support.vtk_to_numpy(field.GetPointData().GetScalars())[:] = 1.5
    displacement.SetDisplacementGridData(field)
    grid.SetAndObserveTransformToParent(displacement)
    seg.SetAndObserveTransformNodeID(grid.GetID())
    before = voxels(seg, "tumor")
    positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
    positive.AddControlPoint(*ras(volume, (18, 20, 3)))
    with pytest.raises(RefineError) as err:
        logic.refine(seg, "tumor", volume, positive, propagate=False)
    assert str(err.value) == ("The segmentation is under a non-linear transform relative to the input volume; "
                              "harden the transform before refining.")
    assert voxels(seg, "tumor") == before


# ---------------------------------------- 11. workers under a main thread that holds the Python lock
from test_slicer_panel_defects import GilHoldingMainThread, needs_libc  # noqa: E402


@needs_libc
def test_11_a_refine_request_with_its_upload_finishes_while_the_main_thread_holds_the_lock(tmp_path, service):
    """The panel's path: prepare here, RefineRunner's thread uploads and refines, the section's 50 ms timer
    polls (active while busy) and writes the result (RefineSection._poll)."""
    from MedCLIPSAMModuleLib.clickrefine import RefineRunner

    scene, logic, volume, seg, ph = make_scene(tmp_path, service)
    runner = RefineRunner(logic)
    positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
    positive.AddControlPoint(*ras(volume, (18, 20, 3)))
    request = logic.prepareRefine(seg, "tumor", volume, positive, propagate=False)
    assert request.image is not None                       # the volume goes up with this request
    finished = []

    def poll():                                            # RefineSection._poll
        done = runner.poll()
        if done is not None:
            finished.append(logic.finish(done))

    runner.start(request)
    GilHoldingMainThread().run(lambda: bool(finished), [(lambda: runner.busy, poll)],
                               lambda: runner._thread.is_alive())
    assert finished == [[3]] and logic.lastReply["clicked_slice"] == 3


@needs_libc
def test_11_a_service_job_and_test_connection_and_forgetting_finish_while_the_main_thread_holds_the_lock(
        tmp_path, service, monkeypatch):
    """Apply through the service (upload, job following, downloads: ServiceJob's worker) polled by the
    panel's 200 ms timer (MedCLIPSAMWidget.onTimer); "Test connection" (ServicePanel's thread and timer);
    then the volume removed: the forget thread wakes the panel's timer, which ticks until it is done."""
    from test_slicer_module import load_module_file

    mod = load_module_file()
    logic = mod.MedCLIPSAMLogic(scene=slicer.vtkMRMLScene())
    logic.serviceBackend.configure("remote", service.client.url, service.client.token)   # the running service
    volume, _ph = logic.createPhantomVolume("head", seed=0, shape=(4, 32, 28))
    timer = types.SimpleNamespace(active=False)
    timer.start = lambda: setattr(timer, "active", True)
    timer.stop = lambda: setattr(timer, "active", False)
    panel = types.SimpleNamespace(logic=logic, job=None, weakSection=types.SimpleNamespace(job=None),
                                  setupFlow=types.SimpleNamespace(job=None), _gpuQuery=None, _timer=timer)
    logic.serviceBackend.wake = timer.start                  # as MedCLIPSAMWidget.setup wires it
    main = GilHoldingMainThread()
    panel.job = logic.startSegmentation(volume, ["tumor"], models="tiny-random", device="cpu", preset="fast")
    timer.start()                                            # startSegmentation's panel starts it
    main.run(lambda: not panel.job.isRunning, [(lambda: timer.active, lambda: mod.MedCLIPSAMWidget.onTimer(panel))],
             lambda: panel.job.process.thread.is_alive())
    assert panel.job.result.status == "succeeded", panel.job.result.message
    assert panel.job.uploaded and service.ensure().info()["volumes"] >= 1

    answer = []                                              # ServicePanel._inBackground + _collect
    thread = threading.Thread(target=lambda: answer.append(logic.serviceBackend.testConnection()))
    thread.start()
    main.run(lambda: not thread.is_alive(), [(lambda: True, lambda: None)], thread.is_alive)
    assert answer[0][0] and answer[0][1].startswith("Connected: medclipsam ")

    volumes = service.ensure().info()["volumes"]
    logic.scene.RemoveNode(volume)                           # its upload is forgotten at the service
    assert timer.active
    # the timer ticks until the forget thread is done, then stops itself (nothing left to poll)
    main.run(lambda: not timer.active, [(lambda: timer.active, lambda: mod.MedCLIPSAMWidget.onTimer(panel))],
             lambda: logic.serviceBackend.busy)
    assert not logic.serviceBackend.busy and service.ensure().info()["volumes"] == volumes - 1
