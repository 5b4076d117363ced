"""Clicks (refinement) keep their promises, with real tiny-random CLIP / SAM2 models:
- undo is 10 steps deep: ten undos restore the exact voxels of each earlier state in turn, the 11th
  refuses in one sentence and changes nothing (the session's store, through the service's core);
- the refine reply holds exactly the slices that changed (each as np.take of the new mask on the reply's
  axis), on grids whose axes are flipped or permuted, with the clicked slice where the point lies;
- the Slicer module (RefineLogic, slicer-core scene, a real local service): a Segment Editor edit made
  while a click is computed is the starting mask the next click sends.
Random weights say nothing about a click's quality: geometry and bookkeeping are checked."""

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import phantom_segmentation_scene

from MedCLIPSAMLib.errors import MedCLIPSAMError
from MedCLIPSAMLib.io.geometry import slicing_axis
from MedCLIPSAMLib.phantoms import make_volume
from MedCLIPSAMLib.pipeline.session import Session
from MedCLIPSAMLib.pipeline.session_refine import pack_bits, unpack_bits
from MedCLIPSAMLib.service.core import Service

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedCLIPSAM"))


@pytest.fixture(scope="module")
def service(tiny_clip, tiny_sam2):
    svc = Service(Session("tiny-random", "tiny-random", "cpu", video=False), 1 << 30)
    yield svc
    svc.close()


def upload(service, image, tmp_path):
    from MedCLIPSAMLib.io import write_volume

    path = tmp_path / "volume.nrrd"
    write_volume(path, image)
    return service.add_volume(str(path))["volume_id"]   # the upload as the server saved it


def lps_of(image, index_xyz):
    return list(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index_xyz]))


def planes_of(reply):
    return {s["index"]: unpack_bits(s["bits"], tuple(s["shape"])) for s in reply["slices"]}


# -- undo depth ------------------------------------------------------------------------------------------------
def test_undo_is_ten_steps_deep_and_restores_each_state_exactly(service, tmp_path):
    image = make_volume("mr", shape=(3, 24, 24), spacing=(1.0, 1.0, 2.5), seed=0).image
    volume = upload(service, image, tmp_path)
    rng = np.random.default_rng(0)
    shape = tuple(reversed(image.GetSize()))
    states = []
    for step in range(11):
        # the client's segment as it is before each click (edited meanwhile: a new random pattern), so that
        # every step changes voxels, then a click on slice 1 alone
        mask = (rng.random(shape) < 0.3).astype(np.uint8)
        states.append(mask)
        service.refine(volume, {"segment_id": "s", "points": [{"position": lps_of(image, (12, 12, 1)), "label": 1}],
                                "frame": "LPS", "propagate": False, "mask": pack_bits(mask)})
    held = service.session.segments.get(volume, "s")
    for step in range(10, 0, -1):               # ten undos: back to the state before steps 10, 9, ..., 1
        reply = service.undo(volume, "s")
        assert reply["slices"] and reply["can_undo"] == (step > 1)
        np.testing.assert_array_equal(held.mask[1], states[step][1])   # the clicked slice as it was
    before = held.mask.copy()
    with pytest.raises(MedCLIPSAMError, match="^nothing to undo for segment 's'$"):
        service.undo(volume, "s")
    np.testing.assert_array_equal(held.mask, before)


# -- the reply: the changed slices only, on flipped and permuted grids ----------------------------------------------
@pytest.mark.parametrize("direction, axis", [("oblique-flipped", "axial"),   # slices stored S to I
                                             ("coronal", "sagittal")])        # axes permuted, rows flipped
def test_the_reply_holds_exactly_the_changed_slices_on_flipped_grids(service, tmp_path, direction, axis):
    image = make_volume("mr", shape=(5, 20, 18), spacing=(1.1, 0.9, 2.0), origin=(4.0, -3.0, 8.0),
                        direction=direction, seed=1).image
    volume = upload(service, image, tmp_path)
    numpy_axis = slicing_axis(image, axis)
    shape = tuple(reversed(image.GetSize()))
    # a start: a block through the middle of every slice along the view's axis
    start = np.zeros(shape, np.uint8)
    centre = [n // 2 for n in shape]
    block = tuple(slice(None) if a == numpy_axis else slice(c - 3, c + 3) for a, c in enumerate(centre))
    start[block] = 1
    # a click on the slice holding voxel `index` (x, y, z), computed here from the image's own geometry
    index = [None] * 3
    for a in range(3):
        index[2 - a] = 1 if a == numpy_axis else centre[a]
    point = lps_of(image, index)
    k = image.TransformPhysicalPointToIndex(point)[2 - numpy_axis]
    reply = service.refine(volume, {"segment_id": "t", "axis": axis, "frame": "LPS", "propagate": True,
                                    "max_distance": 1, "mask": pack_bits(start), "points": [{"position": point, "label": 0}]})
    after = service.session.segments.get(volume, "t").mask
    assert reply["axis"] == numpy_axis and reply["clicked_slice"] == k == 1
    changed = {j for j in range(shape[numpy_axis])
               if not np.array_equal(np.take(after, j, numpy_axis), np.take(start, j, numpy_axis))}
    planes = planes_of(reply)
    assert changed and set(planes) == changed
    for j, plane in planes.items():
        np.testing.assert_array_equal(plane, np.take(after, j, numpy_axis))
    # and undo gives back exactly those slices as they were
    undone = service.undo(volume, "t")
    assert set(planes_of(undone)) == changed
    np.testing.assert_array_equal(service.session.segments.get(volume, "t").mask, start)


# -- the Slicer module: an edit made while a click is computed starts the next click --------------------------
class RecordingService:
    """The real local service, reached only once the test opens the gate; records what each refine sends."""

    def __init__(self, service):
        self.service, self.gate, self.sent = service, threading.Event(), []

    def ensure(self):
        assert self.gate.wait(120)
        return RecordingClient(self.service.ensure(), self.sent)


class RecordingClient:
    def __init__(self, client, sent):
        self.client, self.sent = client, sent

    def refine(self, volume_id, segment_id, **kwargs):
        self.sent.append(kwargs)
        return self.client.refine(volume_id, segment_id, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_an_edit_made_while_a_click_is_computed_is_the_next_clicks_starting_mask(local_service):
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    from MedCLIPSAMModuleLib.clickrefine import RefineLogic, RefineRunner

    from MedCLIPSAMLib import mrml

    scene, volume, seg, ph = phantom_segmentation_scene(shape=(5, 32, 28))
    recording = RecordingService(local_service)
    logic = RefineLogic(scene, recording)
    seg.GetSegmentation().AddEmptySegment("tumor", "brain tumor")
    logic.writeSlices(seg, "tumor", volume, (ph.labels["tumor"] > 0).astype(np.uint8), 0, list(range(5)))
    m = mrml.ijk_to_ras_from_node(volume)
    positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
    positive.AddControlPoint(*(m @ np.r_[14.0, 16.0, 2.0, 1.0])[:3])     # on slice 2

    # click 1 runs on the worker; meanwhile the Segment Editor paints slice 0
    runner = RefineRunner(logic)
    runner.start(logic.prepareRefine(seg, "tumor", volume, positive, propagate=False))
    edited = logic.segmentArray(seg, "tumor", volume)
    edited[0, 20:, 20:] = 1
    logic.writeSlices(seg, "tumor", volume, edited, 0, [0])
    recording.gate.set()
    runner.wait(300)
    request = runner.poll()
    assert request is not None and request.error is None
    logic.finish(request)
    now = logic.segmentArray(seg, "tumor", volume)
    np.testing.assert_array_equal(now[0], edited[0])                        # the edit stayed

    # click 2 starts from the segment as it is now: the edit and click 1's slice, sent in full
    logic.refine(seg, "tumor", volume, positive, propagate=False)
    sent = recording.sent[-1]["mask"]
    assert sent is not None, "the edit made during click 1 was not sent: the service would start without it"
    np.testing.assert_array_equal(unpack_bits(sent, now.shape), now)
    # click 3, nothing edited since: the service's copy is the scene's, nothing is sent again
    logic.refine(seg, "tumor", volume, positive, propagate=False)
    assert recording.sent[-1]["mask"] is None
