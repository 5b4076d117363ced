"""Refinement through the service (POST /volumes/{id}/refine and /undo) on a real uvicorn server on
127.0.0.1 with tiny-random models, driven through the Slicer module's own client; plus the session's
refinement in-process (a click on a slice the segmentation encoded costs no new encoding).

Random weights say nothing about a click's quality: checked are the bookkeeping (only the returned slices
change, undo restores bit for bit, errors change nothing) and the reuse of the encodings."""

import base64
import http.client
import json
import os
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from MedCLIPSAMLib.io import write_volume
from MedCLIPSAMLib.phantoms import make_volume

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("sam2")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedCLIPSAM"))
from MedCLIPSAMModuleLib.serviceclient import LocalService, ServiceError  # noqa: E402

SHAPE = (5, 40, 36)


def phantom():
    return make_volume("mr", shape=SHAPE, spacing=(1.1, 0.9, 3.0), origin=(10.0, -20.0, 5.0), direction="oblique",
                       seed=0)


def ras(image, index):
    """RAS mm of a continuous (x, y, z) voxel index."""
    lps = np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index]))
    return (lps * [-1, -1, 1]).tolist()


def unpack(reply, mask):
    """Write a refine / undo reply's slices into a copy of `mask`; returns (new mask, changed indices)."""
    out = mask.copy()
    axis = reply["axis"]
    for s in reply["slices"]:
        n = int(np.prod(s["shape"]))
        plane = np.unpackbits(np.frombuffer(base64.b64decode(s["bits"]), np.uint8), count=n).reshape(s["shape"])
        index = [slice(None)] * 3
        index[axis] = s["index"]
        out[tuple(index)] = plane
    return out, [s["index"] for s in reply["slices"]]


def packed(mask):
    return base64.b64encode(np.packbits(mask.astype(bool).ravel()).tobytes()).decode()


@pytest.fixture(scope="module")
def served(tiny_clip, tiny_sam2, tmp_path_factory):
    service = LocalService(sys.executable, ["--models", "tiny-random", "--device", "cpu"], env=dict(os.environ),
                           idle_exit=600)
    client = service.ensure()
    ph = phantom()
    path = str(tmp_path_factory.mktemp("refine") / "a.nrrd")
    write_volume(path, ph.image)
    volume_id = client.upload(path)["volume_id"]
    yield client, volume_id, ph
    service.stop()


def raw_post(client, path, body):
    url = urllib.parse.urlsplit(client.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {client.token}",
                                                   "Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


def test_a_box_makes_a_segment_a_click_changes_only_the_returned_slices_and_undo_restores_them(served):
    client, volume_id, ph = served
    img = ph.image
    empty = np.zeros(SHAPE, np.uint8)
    # a new segment from a box alone (no text)
    first = client.refine(volume_id, "box-made", box=[ras(img, (4, 5, 2)), ras(img, (24, 30, 2))])
    assert first["axis"] == 0 and first["clicked_slice"] == 2 and first["can_undo"]
    made, changed = unpack(first, empty)
    assert set(changed) == {k for k in range(SHAPE[0]) if made[k].any()}   # every slice it reports changed
    # the segment as the client holds it, edited by hand on slice 0 (as the Segment Editor would)
    current = made.copy()
    current[0, :3, :3] = 1
    reply = client.refine(volume_id, "box-made", positive=[ras(img, (12, 14, 3))], negative=[ras(img, (2, 2, 3))],
                          mask=packed(current), propagate=False)
    after, changed = unpack(reply, current)
    assert changed in ([], [3]) and reply["clicked_slice"] == 3
    untouched = [k for k in range(SHAPE[0]) if k not in changed]
    assert np.array_equal(after[untouched], current[untouched])             # bit for bit
    # undo: the planes before the click, bit for bit, then the planes before the box
    back, restored = unpack(client.undo(volume_id, "box-made"), after)
    assert restored == changed and np.array_equal(back, current)
    gone = client.undo(volume_id, "box-made")
    assert not gone["can_undo"]
    assert not unpack(gone, made)[0].any()
    with pytest.raises(ServiceError, match="(?i)nothing to undo") as err:
        client.undo(volume_id, "box-made")
    assert err.value.status == 400


def test_bad_requests_get_one_sentence_and_change_nothing(served):
    client, volume_id, ph = served
    img = ph.image
    start = client.refine(volume_id, "kept", box=[ras(img, (4, 5, 1)), ras(img, (24, 30, 1))], propagate=False)
    held, _ = unpack(start, np.zeros(SHAPE, np.uint8))
    cases = [
        (dict(positive=[ras(img, (12, 14, 40))]), 400, "lies outside the volume"),
        (dict(), 400, "at least one point or a box"),
        (dict(positive=[ras(img, (12, 14, 1))], mask="AAAA"), 400, "bytes of packed bits"),
    ]
    for kwargs, status, words in cases:
        with pytest.raises(ServiceError, match="(?i)" + words) as err:
            client.refine(volume_id, "kept", **kwargs)
        assert err.value.status == status and str(err.value).count(". ") == 0 and str(err.value).endswith(".")
    with pytest.raises(ServiceError, match="(?i)unknown volume") as err:
        client.refine("0123456789abcdef", "kept", positive=[ras(img, (12, 14, 1))])
    assert err.value.status == 404
    for body in (b"{not json", json.dumps({"segment_id": "kept", "points": [{"position": [1, 2]}]}).encode(),
                 json.dumps({"segment_id": "kept", "colour": "red"}).encode()):
        status, reply = raw_post(client, f"/volumes/{volume_id}/refine", body)
        assert status == 422 and isinstance(reply["detail"], str)
    # nothing changed: one undo takes the segment back to empty, and there is nothing more to undo
    undone, _ = unpack(client.undo(volume_id, "kept"), held)
    assert not undone.any()
    with pytest.raises(ServiceError, match="(?i)nothing to undo"):
        client.undo(volume_id, "kept")


def test_a_click_on_a_slice_the_segmentation_encoded_reuses_its_encoding(tiny_clip, tiny_sam2):
    from MedCLIPSAMLib.pipeline.session import SegmentRequest, Session

    session = Session("tiny-random", "tiny-random", device="cpu")
    ph = phantom()
    volume_id = session.add_volume(ph.image)
    prompts, settings, options = SegmentRequest(["brain tumor"], preset="fast", mode="per-slice",
                                                no_gate=True).validate()
    result = session.segment(volume_id, prompts, settings, options)
    encoded = session.cache.stats()["by_kind"]["sam2"]["entries"]
    assert encoded == SHAPE[0]
    hits = session.cache.hits
    # no mask sent: the segmentation's own result for "brain tumor" is the starting mask
    r = session.refine(volume_id, "brain tumor", positive=[ras(ph.image, (12, 14, 2))], propagate=False)
    assert session.cache.stats()["by_kind"]["sam2"]["entries"] == encoded     # no new encoding
    assert session.cache.hits > hits
    start = result.segments[0]["mask"]
    others = [k for k in range(SHAPE[0]) if k not in r.changed]
    assert np.array_equal(r.segment.mask[others], start[others])
    # forgetting the volume forgets its segments
    session.forget(volume_id)
    assert session.segments.get(volume_id, "brain tumor") is None
