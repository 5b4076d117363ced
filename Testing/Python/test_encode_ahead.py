"""The service encodes ahead (issue 37): between requests it SAM2-encodes the slices of the last volume that
no prompt carried, so the next prompt and clicks find them cached. Real tiny-random CLIP / SAM2 models, the
service's own core and job queue.
- after a prompt, every non-blank slice is encoded; a second prompt then encodes nothing, and its result is
  the one a service without encoding ahead gives (a cache hit hands SAM2 the same numbers);
- it stops when told (a request came) and before the cache would have to evict anything;
- a job submitted while idle work runs stops that work and runs."""

import threading

import numpy as np
import pytest

from MedCLIPSAMLib.phantoms import make_volume
from MedCLIPSAMLib.pipeline.session import SegmentRequest, Session
from MedCLIPSAMLib.service.core import Service
from MedCLIPSAMLib.service.jobs import JobQueue

SHAPE = (14, 40, 40)
REQUEST = dict(preset="fast")
WAIT = 300


def image():
    return make_volume("mr", shape=SHAPE, spacing=(1.0, 1.0, 2.0), seed=3, lesion={"side": "left"}).image


def non_blank_slices(img):
    import SimpleITK as sitk

    v = sitk.GetArrayViewFromImage(img)
    return sum(1 for k in range(v.shape[0]) if v[k].max() > v[k].min())


def upload(service, img, tmp_path):
    from MedCLIPSAMLib.io import write_volume

    path = tmp_path / "volume.nrrd"
    write_volume(path, img)
    return service.add_volume(str(path))["volume_id"]


def run(service, volume, prompt):
    job = service.submit(volume, SegmentRequest([prompt], **REQUEST))
    assert service.jobs.wait_idle(WAIT)
    status = service.jobs.status(job["job_id"])
    assert status["state"] == "done", status
    return service.job(job["job_id"]).output["result"]


def sam2_entries(service):
    return service.session.cache.stats()["by_kind"].get("sam2", {}).get("entries", 0)


@pytest.fixture
def services(tiny_clip, tiny_sam2):
    made = [Service(Session("tiny-random", "tiny-random", "cpu", video=False), 1 << 30, encode_ahead=ahead)
            for ahead in (True, False)]
    yield made
    for s in made:
        s.close()


def test_idle_time_encodes_every_slice_and_the_next_prompt_encodes_none(services, tmp_path):
    from MedCLIPSAMLib.io import read_segmentation

    ahead, plain = services
    img = image()
    vol_a, vol_p = upload(ahead, img, tmp_path), upload(plain, img, tmp_path)
    run(ahead, vol_a, "brain tumor")
    run(plain, vol_p, "brain tumor")
    carried_only = sam2_entries(plain)
    assert 0 < carried_only < non_blank_slices(img)          # the prompt alone encodes only its range
    assert sam2_entries(ahead) == non_blank_slices(img)      # idle time encoded the rest

    misses = ahead.session.cache.misses
    second_a, second_p = run(ahead, vol_a, "brain"), run(plain, vol_p, "brain")
    assert sam2_entries(ahead) == non_blank_slices(img)      # nothing new to encode
    # the only misses of the second prompt: its result, the gate's text-free lookups are hits
    assert ahead.session.cache.misses - misses == 1
    for a, p in zip((second_a,), (second_p,)):
        (tmp_path / "a.seg.nrrd").write_bytes(a)
        (tmp_path / "p.seg.nrrd").write_bytes(p)
        seg_a, seg_p = read_segmentation(str(tmp_path / "a.seg.nrrd"))[0], read_segmentation(str(tmp_path / "p.seg.nrrd"))[0]
        assert [s["name"] for s in seg_a] == [s["name"] for s in seg_p]
        for sa, sp in zip(seg_a, seg_p):
            assert np.array_equal(sa["mask"], sp["mask"])


def test_encoding_ahead_stops_when_told_and_before_the_cache_would_evict(tiny_clip, tiny_sam2):
    session = Session("tiny-random", "tiny-random", "cpu", video=False)
    img = image()
    volume = session.add_volume(img)
    _, settings, options = SegmentRequest(["brain tumor"], **REQUEST).validate()

    calls = []   # nothing encoded yet: each slice asked is a new encoding
    assert session.encode_ahead(volume, settings, options, 7, lambda: calls.append(1) or len(calls) > 2) == 2

    # room for two and a half more encodings: two are made, nothing held before is evicted
    before = set(session.cache._entries)
    entry = session.cache.stats()["by_kind"]["sam2"]["bytes"] // session.cache.stats()["by_kind"]["sam2"]["entries"]
    session.cache.budget = session.cache.used + int(2.5 * entry)
    assert session.encode_ahead(volume, settings, options, 7, lambda: False) == 2
    assert before <= set(session.cache._entries) and session.cache.used <= session.cache.budget

    # with room for all: every non-blank slice, and a second call finds nothing left to do
    session.cache.budget = 1 << 30
    session.encode_ahead(volume, settings, options, 7, lambda: False)
    assert session.cache.stats()["by_kind"]["sam2"]["entries"] == non_blank_slices(img)
    assert session.encode_ahead(volume, settings, options, 7, lambda: False) == 0


def test_a_job_submitted_during_idle_work_stops_it_and_runs():
    queue = JobQueue()
    seen = {"stopped": False}
    started = threading.Event()

    def idle(should_stop):
        started.set()
        for _ in range(3000):            # bounded: at most 30 s
            if should_stop():
                seen["stopped"] = True
                return
            threading.Event().wait(0.01)

    try:
        queue.submit("v", None, lambda job: queue.leave_idle_work(idle) or {"result": b""})
        assert started.wait(WAIT)
        assert queue.queue_info()["idle_work"] is True          # what /info's queue says meanwhile
        job = queue.submit("v", None, lambda job: {"result": b"second"})
        assert queue.wait_idle(WAIT)
        assert seen["stopped"] and queue.get(job["job_id"]).output == {"result": b"second"}
        assert queue.queue_info()["idle_work"] is False
    finally:
        queue.stop()
