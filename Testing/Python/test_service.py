"""The segmentation service (`medclipsam serve`) on a real uvicorn server on 127.0.0.1 with tiny-random
models, driven through the Slicer module's own client and launcher (MedCLIPSAMModuleLib/serviceclient.py): the
token, upload -> job -> progress -> result (equal to the CLI's), cancel, two clients at once, malformed and
oversize requests, and a service killed mid-job. Plus the session's cache on its own."""

import http.client
import json
import os
import signal
import stat
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from conftest import http_request as raw

from MedCLIPSAMLib.io import geometry_equal, read_segmentation, read_volume, write_volume
from MedCLIPSAMLib.phantoms import make_volume

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedCLIPSAM"))
from MedCLIPSAMModuleLib.serviceclient import (  # noqa: E402
    LocalService, ServiceClient, ServiceError, ServiceUnavailable, localReport)

MODELS = ["--models", "tiny-random", "--device", "cpu"]
UPLOAD_LIMIT_MB = 1
FAST = {"preset": "fast"}
SALIENCY_ONLY = {"preset": "fast", "sam": "none"}   # where SAM2 is not the point: cheaper
# every kept slice through saliency + SAM2: long enough to be caught running
LONG = {"preset": "fast", "mode": "per-slice", "no_gate": True}
JOB_TIMEOUT = 300


def phantom_file(folder, name, shape=(5, 40, 36), seed=0, direction="oblique"):
    ph = make_volume("mr", shape=shape, spacing=(1.1, 0.9, 3.0), origin=(10.0, -20.0, 5.0), direction=direction,
                     seed=seed)
    path = os.path.join(folder, name)
    write_volume(path, ph.image)
    return path


def start(*extra):
    service = LocalService(sys.executable, MODELS + list(extra), env=dict(os.environ), idle_exit=600)
    service.ensure()
    return service


@pytest.fixture(scope="module")
def served(tiny_clip, tiny_sam2):   # the random models exist before the service looks for them
    service = start("--max-upload-mb", str(UPLOAD_LIMIT_MB))
    yield service
    service.stop()


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("service-volumes"))
    return {"a": phantom_file(folder, "a.nrrd"), "b": phantom_file(folder, "b.nii.gz", (4, 32, 44), 1, "ras"),
            "long": phantom_file(folder, "long.nrrd", (16, 40, 36), 2, "lps")}


def wait_for(client, job_id, condition):
    """Poll a job until condition(status) holds or it ended; returns the status."""
    deadline = threading.Event()
    timer = threading.Timer(JOB_TIMEOUT, deadline.set)
    timer.start()
    try:
        while not deadline.is_set():
            status = client.job(job_id)
            if condition(status) or status["state"] in ("done", "failed", "cancelled"):
                return status
            deadline.wait(0.05)
    finally:
        timer.cancel()
    raise AssertionError(f"job {job_id} did not reach the condition within {JOB_TIMEOUT} s")


# -- security -----------------------------------------------------------------------------------------
def test_requests_without_the_right_token_get_401_and_nothing_else(served):
    client = served.client
    for token in (None, "Bearer wrong-token", f"Bearer {client.token}x", client.token, f"bearer  {client.token}"):
        for method, path in (("GET", "/info"), ("POST", "/volumes"), ("GET", "/jobs/job-1"), ("GET", "/nowhere")):
            status, body = raw(client, method, path, token=token)
            assert status == 401, (token, path)
            assert list(body) == ["detail"] and "token" in body["detail"]
    with pytest.raises(ServiceError) as err:
        ServiceClient(client.url, "wrong").info()
    assert err.value.status == 401
    ok, sentence = ServiceClient(client.url, "wrong").test_connection()
    assert not ok and "token" in sentence


def test_the_token_file_is_readable_by_its_owner_only(served, tmp_path):
    from MedCLIPSAMLib.errors import MedCLIPSAMError
    from MedCLIPSAMLib.service.auth import load_or_create_token

    mode = os.stat(os.path.join(served.folder, "token")).st_mode
    assert stat.S_IMODE(mode) == 0o600
    path = tmp_path / "token"
    token = load_or_create_token(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and load_or_create_token(path) == token
    os.chmod(path, 0o644)
    with pytest.raises(MedCLIPSAMError, match="chmod 600"):
        load_or_create_token(path)


def test_serve_help_explains_local_and_remote_use(capsys):
    from MedCLIPSAMLib.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert "127.0.0.1" in text and "Remote use" in text and "--ssl-certfile" in text
    assert "--token-file" in text and "Test connection" in text and "/report" in text   # the Slicer side too


# -- the main flow --------------------------------------------------------------------------------------
def test_upload_segment_and_result_equal_the_cli(served, volumes, tmp_path):
    from MedCLIPSAMLib.cli import main

    client = served.client
    test_ok, sentence = client.test_connection()
    assert test_ok and "tiny-random" in sentence
    uploaded = client.upload(volumes["a"])
    image = read_volume(volumes["a"])
    assert uploaded["size"] == list(image.GetSize())
    assert np.allclose(uploaded["direction"], image.GetDirection())   # the geometry travelled with the bytes
    # another prompt first: "brain tumor" then meets cached encodings, the CLI computes them afresh
    warm = client.wait(client.submit(uploaded["volume_id"], ["liver"], **FAST)["job_id"], timeout=JOB_TIMEOUT)
    assert warm["state"] == "done" and client.info()["cache"]["by_kind"]["sam2"]["entries"] > 0
    job = client.submit(uploaded["volume_id"], ["brain tumor"], uncertainty=True, **FAST)
    assert job["state"] in ("queued", "running")
    seen = []
    final = client.wait(job["job_id"], on_status=seen.append, timeout=JOB_TIMEOUT)
    assert final["state"] == "done", final
    assert {s["state"] for s in seen} <= {"queued", "running", "done"}
    assert final["stage"] == "write" and final["done"] == final["total"] == 1
    client.result(job["job_id"], str(tmp_path / "service.seg.nrrd"))
    client.result(job["job_id"], str(tmp_path / "service-unc.nrrd"), "uncertainty")

    code = main(["segment", volumes["a"], "--prompt", "brain tumor", "--output", str(tmp_path / "cli.seg.nrrd"),
                 "--uncertainty-output", str(tmp_path / "cli-unc.nrrd"), "--preset", "fast", "--progress", "none",
                 *MODELS])
    assert code == 0
    (ours,), ref = read_segmentation(str(tmp_path / "service.seg.nrrd"))
    (theirs,), cli_ref = read_segmentation(str(tmp_path / "cli.seg.nrrd"))
    assert ours["name"] == theirs["name"] == "brain tumor"
    assert np.array_equal(ours["mask"], theirs["mask"]) and geometry_equal(ref, cli_ref)
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(read_volume(str(tmp_path / "service-unc.nrrd")))
    b = sitk.GetArrayFromImage(read_volume(str(tmp_path / "cli-unc.nrrd")))
    assert np.array_equal(a, b)

    # the same request again: the kept result
    hits = client.info()["cache"]["hits"]
    again = client.wait(client.submit(uploaded["volume_id"], ["brain tumor"], uncertainty=True, **FAST)["job_id"])
    client.result(again["job_id"], str(tmp_path / "again.seg.nrrd"))
    assert np.array_equal(read_segmentation(str(tmp_path / "again.seg.nrrd"))[0][0]["mask"], ours["mask"])
    assert client.info()["cache"]["hits"] > hits
    assert client.forget(uploaded["volume_id"]) == {"forgotten": uploaded["volume_id"]}
    with pytest.raises(ServiceError) as err:
        client.submit(uploaded["volume_id"], ["brain tumor"])
    assert err.value.status == 404 and "upload it again" in str(err.value)


def test_the_report_and_saliency_volumes_equal_the_clis(served, volumes, tmp_path):
    """A job asked for its evidence offers the report and one saliency volume per prompt, equal to what
    `segment --report-output --saliency-output` writes for the same input (names included)."""
    import SimpleITK as sitk

    from MedCLIPSAMLib.cli import main

    client = served.client
    prompts = ["brain tumor", "Liver"]
    volume = client.upload(volumes["b"])["volume_id"]
    plain = client.wait(client.submit(volume, prompts, **SALIENCY_ONLY)["job_id"], timeout=JOB_TIMEOUT)
    for kind, path in (("report", "r.json"), ("saliency", "s.nrrd")):   # not asked for: a 404 naming the flag
        with pytest.raises(ServiceError) as err:
            client.result(plain["job_id"], str(tmp_path / path), kind)
        assert err.value.status == 404 and f'"{kind}": true' in str(err.value)
    job = client.submit(volume, prompts, report=True, saliency=True, **SALIENCY_ONLY)["job_id"]
    final = client.wait(job, timeout=JOB_TIMEOUT)
    assert final["state"] == "done" and final["report_file"] and not final["uncertainty"]   # not asked for
    assert final["saliency"] == ["saliency_brain-tumor.nrrd", "saliency_liver.nrrd"]
    report = client.result(job, str(tmp_path / "service-report.json"), "report")
    files = client.result(job, str(tmp_path / "service-sal.nrrd"), "saliency")
    assert files == [str(tmp_path / "service-sal_brain-tumor.nrrd"), str(tmp_path / "service-sal_liver.nrrd")]
    output = str(tmp_path / "cli.seg.nrrd")
    mine = localReport(report, files, source=volumes["b"], output=output)

    code = main(["segment", volumes["b"], "--prompt", prompts[0], "--prompt", prompts[1], "--output", output,
                 "--report-output", str(tmp_path / "cli-report.json"), "--saliency-output",
                 str(tmp_path / "cli-sal.nrrd"), "--preset", "fast", "--sam", "none", "--progress", "none", *MODELS])
    assert code == 0
    theirs = json.loads((tmp_path / "cli-report.json").read_text())
    cli_files = [str(tmp_path / "cli-sal_brain-tumor.nrrd"), str(tmp_path / "cli-sal_liver.nrrd")]
    assert [p["saliency_file"] for p in theirs["prompts"]] == cli_files
    for entry in theirs["prompts"]:
        entry["saliency_file"] = files[theirs["prompts"].index(entry)]
    # the runtime section describes the process that computed: the service (a `medclipsam serve` process, OpenMP
    # policy set before torch loaded) and this in-process CLI call (torch already loaded here) differ there only
    assert mine.pop("runtime")["omp_wait_policy"] == "PASSIVE" and theirs.pop("runtime")["precision"]
    assert mine == theirs and len(mine["prompts"]) == 2 and mine["prompts"][0]["models"]["sam"] is None
    for ours, cli in zip(files, cli_files):
        a, b = read_volume(ours), read_volume(cli)
        assert geometry_equal(a, b) and np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert sitk.GetArrayFromImage(a).max() > 0


def test_cancel_leaves_nothing_running_and_no_result(served, volumes):
    client = served.client
    volume = client.upload(volumes["long"])["volume_id"]
    first = client.submit(volume, ["brain tumor"], **LONG)["job_id"]
    second = client.submit(volume, ["liver"], **LONG)["job_id"]
    waiting = client.job(second)
    assert waiting["state"] == "queued" and waiting["position"] >= 1 and "waiting" in waiting["message"]
    assert client.cancel(second)["state"] == "cancelled"            # a queued job goes at once
    running = wait_for(client, first, lambda s: s["stage"] == "segment" and s["done"] >= 1)
    assert running["state"] == "running", running
    assert client.cancel(first)["state"] in ("cancelling", "cancelled")
    final = client.wait(first, timeout=JOB_TIMEOUT)
    assert final["state"] == "cancelled" and "report" not in final
    for job_id in (first, second):
        with pytest.raises(ServiceError) as err:
            client.result(job_id, os.devnull)
        assert err.value.status == 409 and "cancelled" in str(err.value)
    queue = client.info()["queue"]
    assert queue["running"] is None and queue["waiting"] == 0
    client.forget(volume)


def test_two_clients_at_once_get_their_own_results(served, volumes, tmp_path):
    from MedCLIPSAMLib.pipeline.session import SegmentRequest, Session

    work = {"a": ("brain tumor", volumes["a"]), "b": ("liver", volumes["b"])}
    out, errors = {}, []

    def one(name):
        try:
            client = ServiceClient(served.client.url, served.client.token)
            prompt, path = work[name]
            volume = client.upload(path)["volume_id"]
            status = client.wait(client.submit(volume, [prompt], **SALIENCY_ONLY)["job_id"], timeout=JOB_TIMEOUT)
            out[name] = client.result(status["job_id"], str(tmp_path / f"{name}.seg.nrrd"))
        except Exception as exc:   # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(name,)) for name in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOB_TIMEOUT)
    assert not errors and set(out) == {"a", "b"}
    session = Session("tiny-random", None, "cpu")   # the same requests in this process
    for name, (prompt, path) in work.items():
        (segment,), reference = read_segmentation(out[name])
        image = read_volume(path)
        assert segment["name"] == prompt and geometry_equal(reference, image)
        expected = session.segment(session.add_volume(image), *SegmentRequest([prompt], **SALIENCY_ONLY).validate())
        assert np.array_equal(segment["mask"], expected.segments[0]["mask"])


def test_malformed_requests_get_one_sentence_and_the_service_goes_on(served, volumes):
    client = served.client
    nrrd = Path(volumes["a"]).read_bytes()
    header_end = nrrd.index(b"\n\n")
    detached = nrrd[:header_end] + b"\ndata file: /etc/passwd" + nrrd[header_end:]
    volume = client.upload(volumes["a"])["volume_id"]
    json_type = {"Content-Type": "application/json"}
    bad = [
        ("POST", "/jobs", b"{not json", json_type),
        ("POST", "/jobs", b"[]", json_type),
        ("POST", "/jobs", json.dumps({"volume_id": volume}).encode(), json_type),
        ("POST", "/jobs", json.dumps({"volume_id": volume, "prompts": []}).encode(), json_type),
        ("POST", "/jobs", json.dumps({"volume_id": volume, "prompts": ["  "]}).encode(), json_type),
        ("POST", "/jobs", json.dumps({"volume_id": volume, "prompts": ["x"], "preset": "v9"}).encode(), json_type),
        ("POST", "/jobs", json.dumps({"volume_id": volume, "prompts": ["x"], "key_slices": "many"}).encode(), json_type),
        ("POST", "/jobs", json.dumps({"volume_id": volume, "prompts": ["x"], "path": "/etc"}).encode(), json_type),
        ("POST", "/jobs", json.dumps({"volume_id": volume, "prompts": ["x"], "window": "a,b"}).encode(), json_type),
        ("POST", "/jobs", json.dumps({"volume_id": volume, "prompts": ["x"], "overrides": ["nokey"]}).encode(), json_type),
        ("POST", "/jobs", json.dumps({"volume_id": "../../etc", "prompts": ["x"]}).encode(), json_type),
        ("POST", "/volumes", b"", {}),
        ("POST", "/volumes", b"NRRD0004\ntype: float\ndimension: 3\nsizes: 9999 9999 9999\n\n", {}),
        ("POST", "/volumes", detached, {}),
        ("POST", "/volumes", nrrd[: len(nrrd) // 2], {}),
        ("POST", "/volumes", b"\x1f\x8b" + os.urandom(200), {}),
        ("POST", "/volumes", os.urandom(400), {}),
        ("GET", "/jobs/job-999999", b"", {}),
        ("POST", "/jobs/nope/cancel", b"", {}),
        ("GET", "/jobs/nope/result", b"", {}),
        ("DELETE", "/volumes/nope", b"", {}),
        ("PUT", "/info", b"", {}),
    ]
    for i in range(100):
        method, path, body, headers = bad[i % len(bad)]
        status, answer = raw(client, method, path, body, headers)
        assert 400 <= status < 500, (method, path, status, answer)
        assert isinstance(answer, dict) and isinstance(answer["detail"], str), (path, answer)
        assert "\n" not in answer["detail"] and len(answer["detail"]) < 300, answer
        assert "/etc/passwd" not in answer["detail"] and "upload-" not in answer["detail"]
    info = client.info()
    assert info["volumes"] >= 1 and info["queue"]["running"] is None
    client.forget(volume)


def test_an_oversize_upload_is_refused(served):
    url = urllib.parse.urlsplit(served.client.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.putrequest("POST", "/volumes")
    conn.putheader("Authorization", f"Bearer {served.client.token}")
    conn.putheader("Content-Length", str(UPLOAD_LIMIT_MB * 1024**2 + 1))
    conn.endheaders()                               # refused from the header: the body is never read
    response = conn.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["detail"]
    conn.close()
    assert served.client.info()["memory"]["rss_bytes"] > 0


# -- a service that dies ---------------------------------------------------------------------------------
def test_a_service_killed_mid_job_is_reported_and_restarted(tiny_clip, tiny_sam2, volumes):
    service = start()
    try:
        client = service.client
        volume = client.upload(volumes["long"])["volume_id"]
        job = client.submit(volume, ["brain tumor"], **LONG)["job_id"]
        wait_for(client, job, lambda s: s["state"] == "running")
        old_pid = service.process.pid
        os.killpg(old_pid, signal.SIGKILL)          # the group we started (its own session)
        service.process.wait(60)
        from MedCLIPSAMLib.runtime import scratch_root

        left = list(scratch_root().glob(f"serve-{old_pid}-*"))   # no clean-up runs after SIGKILL
        assert len(left) == 1
        with pytest.raises(ServiceUnavailable) as err:
            client.job(job)
        sentence = service.explain(err.value)
        assert "stopped unexpectedly" in sentence and "SIGKILL" in sentence and sentence.count(". ") == 0
        client = service.ensure()                   # the next Apply
        assert service.process.pid != old_pid and "was started" in service.notice
        assert not left[0].exists()                 # the new service reclaimed the dead one's folder
        assert client.test_connection()[0]
        with pytest.raises(ServiceError) as err:    # the new service holds no volume yet
            client.submit(volume, ["brain tumor"])
        assert err.value.status == 404
        assert service.ensure() is client and service.notice is None
    finally:
        service.stop()
    assert service.state() == "not started"


def test_the_watchdog_stops_the_server_when_the_parent_exits_or_after_idling():
    import subprocess
    from types import SimpleNamespace

    from MedCLIPSAMLib.service.jobs import JobQueue
    from MedCLIPSAMLib.service.server import Watchdog

    parent = subprocess.Popen([sys.executable, "-c", "pass"])
    parent.wait()
    for kwargs in ({"parent_pid": parent.pid}, {"idle": 0.05}):
        server, jobs = SimpleNamespace(should_exit=False), JobQueue()
        dog = Watchdog(server, SimpleNamespace(jobs=jobs, trainings=jobs), every=0.01, **kwargs)   # both idle
        dog.start()
        dog.join(60)
        jobs.stop()
        assert server.should_exit and not dog.is_alive()


# -- the session's cache ------------------------------------------------------------------------------------
def test_the_cache_stays_within_its_budget_and_evicts_the_least_recently_used():
    from MedCLIPSAMLib.pipeline.session import ByteLRU

    cache = ByteLRU(100)
    for i in range(10):
        cache.put(("sam2", "v1", i), i, 30)
        assert cache.used <= 100
    assert cache.get(("sam2", "v1", 9)) == 9 and cache.get(("sam2", "v1", 0)) is None
    cache.get(("sam2", "v1", 7))
    cache.put(("clip", "v2", 0), "x", 30)            # 7 was used last: 8 goes
    assert cache.get(("sam2", "v1", 8)) is None and cache.get(("sam2", "v1", 7)) == 7
    cache.put(("result", "v2", 1), "too big", 101)
    assert cache.get(("result", "v2", 1)) is None
    cache.drop_volume("v1")
    assert cache.stats()["by_kind"] == {"clip": {"entries": 1, "bytes": 30}}


def test_a_second_prompt_reuses_the_slice_embeddings_and_encodings(volumes):
    from MedCLIPSAMLib.pipeline.session import SegmentRequest, Session

    session = Session("tiny-random", "tiny-random", "cpu")
    volume = session.add_volume(read_volume(volumes["b"]))
    session.segment(volume, *SegmentRequest(["brain tumor"], **FAST).validate())
    before = session.cache.stats()
    session.segment(volume, *SegmentRequest(["liver"], **FAST).validate())
    after = session.cache.stats()
    assert after["by_kind"]["clip"]["entries"] == 1              # the slice embeddings were reused
    assert after["hits"] > before["hits"]                        # and SAM2 encodings of slices seen before
    session.forget(volume)
    assert session.cache.used == 0 and session.volume_ids() == []


def test_each_prompt_of_a_session_fits_its_key_slices_saliency_in_one_batch(volumes, monkeypatch):
    """The session's second prompt goes through the same key-slice path as the first: one M2IB fit for
    its 3 key slices, not three fits of one slice."""
    import MedCLIPSAMLib.saliency as saliency
    from MedCLIPSAMLib.pipeline.session import SegmentRequest, Session

    fits, compute = [], saliency.compute_saliency_batch

    def counted(method, clip, images, *args, **kwargs):  # every saliency call, single images included
        fits.append(len(images) if images.ndim == 4 else 1)
        return compute(method, clip, images, *args, **kwargs)

    monkeypatch.setattr(saliency, "compute_saliency_batch", counted)
    session = Session("tiny-random", "tiny-random", "cpu")
    volume = session.add_volume(read_volume(volumes["b"]))  # 4 slices: all kept (no gate), 3 of them key slices
    request = dict(preset="v2", overrides=["saliency_settings.steps=2", "saliency_settings.batch_size=2"],
                   mode="carry", no_gate=True)
    for prompt in ("brain tumor", "liver"):
        session.segment(volume, *SegmentRequest([prompt], **request).validate())
    assert fits == [3, 3]
