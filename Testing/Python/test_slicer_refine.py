"""The module's RefineLogic (MedCLIPSAM/MedCLIPSAMModuleLib/clickrefine.py) in a slicer-core scene with real
Markups nodes (point lists, ROI), against a real `medclipsam serve` on 127.0.0.1 with tiny-random models.

Random weights say nothing about a click's quality; checked: only the slices the service returns are
written (all others bit for bit), the segment keeps its name, colour and terminology and the other
segments stay, undo restores bit for bit, a new segment comes from an ROI box alone, a point outside the
volume gets one sentence and changes nothing."""

import base64
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
pytest.importorskip("fastapi")
pytest.importorskip("sam2")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedCLIPSAM"))
from MedCLIPSAMModuleLib.clickrefine import RefineError, RefineLogic, RefineRunner  # noqa: E402

from MedCLIPSAMLib import mrml  # noqa: E402
from conftest import phantom_segmentation_scene  # noqa: E402

TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^Morphologically "
               "Altered Structure~SCT^108369006^Neoplasm~^^~Anatomic codes - DICOM master list~^^~^^")
COLOR = (0.2, 0.4, 0.9)


@pytest.fixture(scope="module")
def service(local_service):
    return local_service   # conftest.py: a real `medclipsam serve` with tiny-random models


@pytest.fixture
def scene_parts(service, tmp_path):
    scene, volume, seg, ph = phantom_segmentation_scene()
    seg.SetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole(), volume.GetID())
    logic = RefineLogic(scene, service, temporaryDirectory=str(tmp_path))
    segmentation = seg.GetSegmentation()
    tumour = (ph.labels["tumor"] > 0).astype(np.uint8)
    other = np.zeros_like(tumour)
    other[:, :4, :4] = 1
    for sid, name, mask in (("tumor", "brain tumor", tumour), ("corner", "corner", other)):
        segmentation.AddEmptySegment(sid, name)
        logic.writeSlices(seg, sid, volume, mask, 0, list(range(mask.shape[0])))
    s = segmentation.GetSegment("tumor")
    s.SetColor(*COLOR)
    s.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), TERMINOLOGY)
    return scene, logic, volume, seg, ph


def ras(volume, ijk):
    m = mrml.ijk_to_ras_from_node(volume)
    return list((m @ np.r_[np.asarray(ijk, float), 1.0])[:3])


def point_list(scene, name, *positions):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for p in positions:
        node.AddControlPoint(*p)
    return node


def metadata(seg, sid):
    s = seg.GetSegmentation().GetSegment(sid)
    return s.GetName(), tuple(round(c, 6) for c in s.GetColor()), mrml.terminology_of(s)


def test_segment_round_trips_through_the_written_slices(scene_parts):
    scene, logic, volume, seg, ph = scene_parts
    assert np.array_equal(logic.segmentArray(seg, "tumor", volume), (ph.labels["tumor"] > 0).astype(np.uint8))


def test_a_positive_point_writes_only_the_returned_slices_and_undo_restores_them(scene_parts):
    scene, logic, volume, seg, ph = scene_parts
    before = logic.segmentArray(seg, "tumor", volume)
    corner = logic.segmentArray(seg, "corner", volume)
    meta = metadata(seg, "tumor")
    k = int(np.argmax(before.reshape(before.shape[0], -1).sum(1)))
    rows, cols = np.nonzero(before[k])
    positive = point_list(scene, "positive", ras(volume, (cols[0], rows[0], k)))
    negative = point_list(scene, "negative", ras(volume, (1, 1, k)), ras(volume, (1, 1, (k + 2) % 6)))
    changed = logic.refine(seg, "tumor", volume, positive, negative, propagate=True)
    reply = logic.lastReply
    assert reply["axis"] == logic.slicingAxis(volume, "axial") == 0 and reply["clicked_slice"] == k
    assert changed == [s["index"] for s in reply["slices"]]
    after = logic.segmentArray(seg, "tumor", volume)
    untouched = [j for j in range(before.shape[0]) if j not in changed]
    assert np.array_equal(after[untouched], before[untouched])            # bit for bit
    for s in reply["slices"]:
        plane = np.unpackbits(np.frombuffer(base64.b64decode(s["bits"]), np.uint8),
                              count=int(np.prod(s["shape"]))).reshape(s["shape"])
        assert np.array_equal(after[s["index"]], plane)
    assert metadata(seg, "tumor") == meta
    assert np.array_equal(logic.segmentArray(seg, "corner", volume), corner)
    restored = logic.undo(seg, "tumor", volume)
    assert restored == changed
    assert np.array_equal(logic.segmentArray(seg, "tumor", volume), before)
    assert metadata(seg, "tumor") == meta


def test_an_edit_made_meanwhile_is_the_starting_mask(scene_parts):
    scene, logic, volume, seg, ph = scene_parts
    positive = point_list(scene, "positive", ras(volume, (18, 20, 3)))
    logic.refine(seg, "tumor", volume, positive, propagate=False)
    edited = logic.segmentArray(seg, "tumor", volume)
    edited[5, 30:, 30:] = 1                   # as the Segment Editor would, on another slice
    logic.writeSlices(seg, "tumor", volume, edited, 0, [5])
    changed = logic.refine(seg, "tumor", volume, positive, propagate=False)
    after = logic.segmentArray(seg, "tumor", volume)
    assert 5 not in changed and np.array_equal(after[5], edited[5])


def test_new_segment_from_an_roi_box(scene_parts):
    scene, logic, volume, seg, ph = scene_parts
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    a, b = np.array(ras(volume, (8, 8, 2))), np.array(ras(volume, (26, 30, 2)))
    roi.SetCenter(*((a + b) / 2))
    roi.SetSize(*np.abs(b - a))
    count = seg.GetSegmentation().GetNumberOfSegments()
    sid = logic.newSegmentFromBox(seg, volume, roi, name="no words", propagate=False)
    assert seg.GetSegmentation().GetNumberOfSegments() == count + 1
    assert seg.GetSegmentation().GetSegment(sid).GetName() == "no words"
    assert logic.lastReply["clicked_slice"] == 2
    array = logic.segmentArray(seg, sid, volume)
    assert not array[[j for j in range(array.shape[0]) if j != 2]].any()     # this slice only


def test_a_point_outside_the_volume_gets_one_sentence_and_changes_nothing(scene_parts):
    scene, logic, volume, seg, ph = scene_parts
    before = logic.segmentArray(seg, "tumor", volume)
    meta = metadata(seg, "tumor")
    outside = point_list(scene, "positive", ras(volume, (18, 20, 40)))
    with pytest.raises(RefineError, match="outside the volume") as err:
        logic.refine(seg, "tumor", volume, outside)
    text = str(err.value)
    assert text.endswith(".") and "\n" not in text
    assert np.array_equal(logic.segmentArray(seg, "tumor", volume), before) and metadata(seg, "tumor") == meta
    with pytest.raises(RefineError, match="Place a positive or negative point"):
        logic.refine(seg, "tumor", volume)


def test_a_volume_the_service_forgot_is_uploaded_again(scene_parts, service):
    scene, logic, volume, seg, ph = scene_parts
    before = logic.segmentArray(seg, "tumor", volume)
    first = logic.volumeId(volume)
    service.ensure().forget(first)
    positive = point_list(scene, "positive", ras(volume, (18, 20, 3)))
    changed = logic.refine(seg, "tumor", volume, positive, propagate=False)
    assert logic.volumeId(volume) != first
    logic.rememberUpload(volume, first)            # an id uploaded elsewhere is used as it is
    assert logic.volumeId(volume) == first
    after = logic.segmentArray(seg, "tumor", volume)
    untouched = [j for j in range(before.shape[0]) if j not in changed]
    assert np.array_equal(after[untouched], before[untouched])


def test_placing_a_point_fires_the_event_the_panel_applies_on():
    """refinepanel.py applies each placement on vtkMRMLMarkupsNode.PointPositionDefinedEvent: a point given a
    position fires it once."""
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
    fired = []
    node.AddObserver(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, lambda caller, event: fired.append(1))
    node.AddControlPoint(1.0, 2.0, 3.0)
    assert len(fired) == 1
    node.AddControlPoint(4.0, 5.0, 6.0)
    assert len(fired) == 2 and len(RefineLogic.controlPoints(node)) == 2


def test_an_upload_made_by_apply_is_used_instead_of_a_second_one(scene_parts, service):
    """knownVolume: the panel hands RefineLogic the id Apply's service backend uploaded the node under."""
    scene, logic, volume, seg, ph = scene_parts
    uploaded = logic.volumeId(volume)
    asked = []
    other = RefineLogic(scene, service, knownVolume=lambda nodeId, stamp, client: asked.append(nodeId) or uploaded)
    assert other.volumeId(volume) == uploaded and asked == [volume.GetID()]
    positive = point_list(scene, "positive", ras(volume, (18, 20, 2)))
    other.refine(seg, "tumor", volume, positive, propagate=False)
    assert other.volumeId(volume) == uploaded and len(asked) == 1


class GatedService:
    """The real service, reached only after the test opens the gate; records the threads that reach it."""

    def __init__(self, service):
        self.service, self.gate, self.threads = service, threading.Event(), []

    def ensure(self):
        self.threads.append(threading.get_ident())
        assert self.gate.wait(60)
        return self.service.ensure()


def test_the_runner_calls_the_service_off_the_gui_thread_and_keeps_edits_made_meanwhile(scene_parts, service):
    """The panel's path: prepare (scene, this thread) -> RefineRunner (service, its thread) -> finish (scene,
    this thread). Nothing in the scene changes until finish, and a Segment Editor edit made on another slice
    while the request runs stays."""
    scene, _logic, volume, seg, ph = scene_parts
    gated = GatedService(service)
    logic = RefineLogic(scene, gated)
    runner = RefineRunner(logic)
    before = logic.segmentArray(seg, "tumor", volume)
    positive = point_list(scene, "positive", ras(volume, (18, 20, 3)))
    runner.start(logic.prepareRefine(seg, "tumor", volume, positive, propagate=False))
    assert runner.busy and runner.poll() is None          # waiting on the service; this thread is free
    edited = before.copy()
    edited[0, 30:, 30:] = 1                                # an edit on slice 0 while the request runs
    logic.writeSlices(seg, "tumor", volume, edited, 0, [0])
    gated.gate.set()
    runner.wait(120)
    request = runner.poll()
    assert request is not None and request.error is None and not runner.busy
    assert gated.threads and threading.get_ident() not in gated.threads
    assert np.array_equal(logic.segmentArray(seg, "tumor", volume), edited)     # scene untouched until finish
    changed = logic.finish(request)
    assert changed == [3]
    after = logic.segmentArray(seg, "tumor", volume)
    plane = np.unpackbits(np.frombuffer(base64.b64decode(request.reply["slices"][0]["bits"]), np.uint8),
                          count=int(np.prod(request.reply["slices"][0]["shape"])))
    assert np.array_equal(after[3].ravel(), plane)
    keep = [j for j in range(after.shape[0]) if j != 3]
    assert np.array_equal(after[keep], edited[keep])       # slice 0's edit kept, the rest bit for bit


def test_a_forgotten_upload_is_read_again_on_the_gui_thread_and_resent(scene_parts, service):
    """A click on a volume whose upload the service forgot: the worker asks for the volume (it never reads
    the scene), withVolume() snapshots it here, and the second send uploads it and refines."""
    scene, logic, volume, seg, ph = scene_parts
    first = logic.volumeId(volume)
    service.ensure().forget(first)
    positive = point_list(scene, "positive", ras(volume, (18, 20, 3)))
    request = logic.prepareRefine(seg, "tumor", volume, positive, propagate=False)
    assert request.volumeId == first and request.image is None     # held upload: no snapshot made
    logic.send(request)
    assert request.needsUpload and request.reply is None
    logic.send(logic.withVolume(request))
    assert request.reply is not None and request.volumeId != first
    assert logic.finish(request) == [3] and logic.volumeId(volume) == request.volumeId


def test_a_failed_new_segment_request_leaves_no_segment(scene_parts):
    """New segment from box on the runner: the empty segment is added when the request is made, and
    abandon() removes it when the service refuses (here: a box on a slice outside the volume)."""
    scene, logic, volume, seg, ph = scene_parts
    runner = RefineRunner(logic)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    a, b = np.array(ras(volume, (8, 8, 9))), np.array(ras(volume, (26, 30, 9)))
    roi.SetCenter(*((a + b) / 2))
    roi.SetSize(*np.abs(b - a))
    count = seg.GetSegmentation().GetNumberOfSegments()
    request = logic.prepareNewSegmentFromBox(seg, volume, roi, propagate=False)
    assert seg.GetSegmentation().GetNumberOfSegments() == count + 1
    runner.start(request)
    runner.wait(120)
    done = runner.poll()
    assert isinstance(done.error, RefineError) and "\n" not in str(done.error)
    with pytest.raises(RefineError):
        logic.finish(done)
    logic.abandon(done)
    assert seg.GetSegmentation().GetNumberOfSegments() == count
