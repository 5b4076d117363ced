"""The segmentation service against hostile or careless clients (issue 31), on a real uvicorn server on
127.0.0.1 with tiny-random models: uploads that name server files or promise more bytes than they hold,
unbounded bodies (chunked too), untyped overrides, NaN and Infinity, the queue's limit, the token's scheme,
API sentences without command-line flags, a property-based run generated from the service's own OpenAPI
schema, and SIGTERM / SIGINT ending the service cleanly with exit code 0.

Every refusal is checked by its exact status and sentence."""

import bz2
import gzip
import json
import os
import random
import re
import signal
import struct
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from conftest import http_request as request

from MedCLIPSAMLib.io import write_volume
from MedCLIPSAMLib.phantoms import make_volume

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedCLIPSAM"))
from MedCLIPSAMModuleLib.serviceclient import LocalService  # noqa: E402

MODELS = ["--models", "tiny-random", "--device", "cpu"]
UPLOAD = 2 * 1024**2          # --max-upload-mb 2
BODY = 64 * 1024              # --max-body-kb 64
LONG = {"preset": "fast", "mode": "per-slice", "no_gate": True}
JOB_TIMEOUT = 300
DETACHED = ("the upload's header refers to another file; send one .nrrd, .nii or .nii.gz with the voxels "
            "inside")


def start(*extra):
    service = LocalService(sys.executable, MODELS + list(extra), env=dict(os.environ), idle_exit=600)
    service.ensure()
    return service


@pytest.fixture(scope="module")
def served(tiny_clip, tiny_sam2):
    """One service for the module; it ends with SIGINT (Ctrl-C), which must stop it cleanly (item 7)."""
    service = start("--max-upload-mb", "2", "--max-body-kb", "64", "--max-queue", "1")
    yield service
    try:
        ended_cleanly(service, signal.SIGINT)
    finally:
        service.stop()


def ended_cleanly(service, signum):
    """Send `signum`: the service exits 0, logs "service stopped" once and leaves no folder behind."""
    pid = service.process.pid
    assert len(service_folders(pid)) == 1
    os.kill(pid, signum)
    assert service.process.wait(120) == 0
    log = Path(service.folder, "service.log").read_text()
    assert log.count("service stopped") == 1 and "Traceback" not in log, log
    assert service_folders(pid) == []


@pytest.fixture(scope="module")
def nrrd(tmp_path_factory):
    """A small real NRRD (raw float voxels): its header and its voxel bytes."""
    ph = make_volume("mr", shape=(5, 40, 36), spacing=(1.1, 0.9, 3.0), origin=(10.0, -20.0, 5.0), seed=0)
    path = str(tmp_path_factory.mktemp("hostile") / "a.nrrd")
    write_volume(path, ph.image, compress=False)
    data = Path(path).read_bytes()
    end = data.index(b"\n\n")
    return data[:end], data[end + 2:]


def refused(client, method, path, body=b"", **kwargs):
    status, answer = request(client, method, path, body, **kwargs)
    assert isinstance(answer, dict), (status, answer)
    return status, answer["detail"]


def nrrd_bytes(fields, payload, comment=b""):
    return b"NRRD0004\n" + comment + b"\n".join(fields) + b"\n\n" + payload


# -- 1. a client never makes the server read its own files -------------------------------------------
def test_a_nrrd_naming_another_file_is_refused_alike_whether_the_file_exists_or_not(served, nrrd):
    header, voxels = nrrd
    client = served.client
    comments = b"".join(b"# %06d padding the header past the old 64 KB look\n" % i for i in range(1500))
    assert len(comments) > 73 * 1024
    cases = {
        "passwd after 73 KB of comments": header.replace(b"\n", b"\n" + comments, 1) + b"\ndata file: /etc/passwd",
        "a missing file": header + b"\ndata file: /nonexistent/volume.raw",
        "datafile spelling": header + b"\ndatafile: /etc/hostname",
        "a LIST": header + b"\ndata file: LIST\n/etc/passwd",
        "a key/value of that name": header + b"\ndata file:=/etc/passwd",
        "a line a lone CR hides": header + b"\n# comment\rdata file: /etc/passwd",
    }
    for name, text in cases.items():
        assert refused(client, "POST", "/volumes", text + b"\n\n" + voxels) == (400, DETACHED), name
    # the same header without the reference is a volume
    status, answer = request(client, "POST", "/volumes", header + b"\n\n" + voxels)
    assert status == 200 and answer["size"] == [36, 40, 5]
    client.forget(answer["volume_id"])


def test_a_nifti_header_pointing_at_an_img_file_is_refused(served):
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, 4, 4, 4, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 2, 8)
    struct.pack_into("<f", header, 108, 0.0)
    header[344:348] = b"ni1\x00"
    assert refused(served.client, "POST", "/volumes", bytes(header)) == (400, DETACHED)


def test_a_nrrd_header_past_one_mib_is_refused(served, nrrd):
    header, voxels = nrrd
    comments = b"# " + b"x" * 1000 + b"\n"
    text = header.replace(b"\n", b"\n" + comments * 1100, 1) + b"\n\n" + voxels
    assert 1024**2 < len(text) < UPLOAD
    assert refused(served.client, "POST", "/volumes", text) == (
        400, "the NRRD header is longer than 1 MiB (or has no empty line ending it); send a NRRD with a shorter header")


# -- 2./3. the bytes a header promises: against the cap and the payload, before anything is allocated ---
def test_headers_promising_more_than_the_cap_or_the_payload_are_refused(served, nrrd):
    client = served.client
    fields = [b"type: float", b"dimension: 3", b"sizes: 64 64 64", b"endian: little"]   # 1 MiB, within the cap
    promised = 64**3 * 4
    short = f"the upload's raw data does not hold the {promised} bytes of voxels its header promises " \
            "(a truncated or corrupt file)"
    assert refused(client, "POST", "/volumes", nrrd_bytes(fields + [b"encoding: raw"], b"\0" * 64)) == (400, short)
    assert refused(client, "POST", "/volumes", nrrd_bytes(fields + [b"encoding: raw"], b"\0" * (promised + 1))) \
        == (400, short)
    tiny_gzip = gzip.compress(b"\0" * 1000)                                # 30-odd bytes claiming 1 MiB
    gz = short.replace("raw data", "gzip data")
    assert refused(client, "POST", "/volumes", nrrd_bytes(fields + [b"encoding: gzip"], tiny_gzip)) == (400, gz)
    bomb = gzip.compress(b"\0" * (64 * 1024**2))                           # ~64 KB that inflate to 64 MB
    assert len(bomb) < UPLOAD
    assert refused(client, "POST", "/volumes", nrrd_bytes(fields + [b"encoding: gzip"], bomb)) == (400, gz)
    bz = short.replace("raw data", "bzip2 data")
    assert refused(client, "POST", "/volumes", nrrd_bytes(fields + [b"encoding: bzip2"],
                                                          bz2.compress(b"\0" * 100))) == (400, bz)
    twice = nrrd_bytes([b"sizes: 1 1 1"] + fields + [b"encoding: raw"], b"\0" * 4)   # Teem keeps which one?
    assert refused(client, "POST", "/volumes", twice) == (400, "the NRRD header gives 'sizes' twice")
    # past the byte cap (voxels x their size, not voxels): 1 G voxels of double promise 8 GiB
    big = [b"type: double", b"dimension: 3", b"sizes: 1024 1024 1024", b"endian: little", b"encoding: raw"]
    assert refused(client, "POST", "/volumes", nrrd_bytes(big, b"\0" * 64)) == (
        413, f"the volume's voxels take {8 * 1024**3} bytes, more than the service's limit of {UPLOAD} bytes; "
             "crop or downsample it first")
    uchar = [b"type: uchar", b"dimension: 3", b"sizes: 2048 1024 2", b"encoding: raw"]   # 4 MiB of uint8
    assert refused(client, "POST", "/volumes", nrrd_bytes(uchar, b"\0" * 64))[0] == 413
    # the same promises kept: gzip and bzip2 payloads holding exactly the voxels are volumes
    exact = np.random.default_rng(0).random((64, 64, 64), dtype=np.float32).tobytes()
    for encoding, packed in ((b"gzip", gzip.compress(exact)), (b"bzip2", bz2.compress(exact))):
        status, answer = request(client, "POST", "/volumes", nrrd_bytes(fields + [b"encoding: " + encoding], packed))
        assert status == 200 and answer["size"] == [64, 64, 64], (encoding, answer)
        client.forget(answer["volume_id"])


def test_decompression_comes_in_bounded_pieces_whatever_the_ratio():
    """What bounds the service's memory on a gzip/bzip2 bomb (benchmarks/service_uploads.py measures it):
    inflate() yields at most CHUNK bytes at a time, however much one compressed piece holds."""
    import io

    from MedCLIPSAMLib.service.uploads import CHUNK, inflate

    total = 8 * CHUNK
    for kind, packed in (("gzip", gzip.compress(b"\0" * total)), ("bzip2", bz2.compress(b"\0" * total))):
        assert len(packed) < CHUNK                           # one read holds the whole stream
        sizes = [len(piece) for piece in inflate(io.BytesIO(packed), kind)]
        assert max(sizes) <= CHUNK and sum(sizes) == total, kind
        with pytest.raises(ValueError):                      # cut short: refused, not zero-filled
            list(inflate(io.BytesIO(packed[: len(packed) // 2]), kind))


def nifti1(folder):
    """A real NIfTI-1 file's bytes (written by ITK): 6 x 5 x 4 int16 voxels."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.arange(120, dtype=np.int16).reshape(4, 5, 6))
    image.SetSpacing((1.5, 2.0, 3.0))
    sitk.WriteImage(image, str(folder / "one.nii"))
    return (folder / "one.nii").read_bytes()


def test_a_nifti_header_alone_or_truncated_is_refused_not_zero_filled(served, tmp_path):
    client = served.client
    header = bytearray(352)                                # a header alone claiming 512 x 512 x 256 uint8
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, 512, 512, 256, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 2, 8)
    struct.pack_into("<f", header, 108, 352.0)
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    header[344:348] = b"n+1\x00"
    assert refused(client, "POST", "/volumes", bytes(header)) == (
        413, f"the volume's voxels take {512 * 512 * 256} bytes, more than the service's limit of {UPLOAD} bytes; "
             "crop or downsample it first")
    struct.pack_into("<8h", header, 40, 3, 128, 128, 64, 1, 1, 1, 1)   # 1 MiB: within the cap
    promised = 128 * 128 * 64
    sentence = f"the upload's NIfTI file does not hold the {promised} bytes of voxels its header promises " \
               "(a truncated or corrupt file)"
    assert refused(client, "POST", "/volumes", bytes(header)) == (400, sentence)
    assert refused(client, "POST", "/volumes", bytes(header) + b"\0" * (promised // 8)) == (400, sentence)
    whole = nifti1(tmp_path)
    status, answer = request(client, "POST", "/volumes", whole)
    assert status == 200 and answer["size"] == [6, 5, 4]
    client.forget(answer["volume_id"])
    cut = whole[: len(whole) - 7]
    assert refused(client, "POST", "/volumes", cut) == (400, sentence.replace(str(promised), str(6 * 5 * 4 * 2)))
    gz = sentence.replace(str(promised), str(6 * 5 * 4 * 2)).replace("NIfTI file", "gzip data")
    assert refused(client, "POST", "/volumes", gzip.compress(cut)) == (400, gz)
    assert refused(client, "POST", "/volumes", gzip.compress(whole)[:-12]) == (400, gz)   # the stream cut short
    status, answer = request(client, "POST", "/volumes", gzip.compress(whole))
    assert status == 200 and answer["size"] == [6, 5, 4]
    client.forget(answer["volume_id"])


def test_a_real_nifti2_file_is_read_like_its_nifti1_twin_and_checked_the_same(served, tmp_path):
    """ITK reads NIfTI-1 only: a NIfTI-2 upload is read through a NIfTI-1 header made field by field.
    Written by nibabel from one array and one oblique affine, the two files give the same volume."""
    import SimpleITK as sitk

    nibabel = pytest.importorskip("nibabel")
    from MedCLIPSAMLib.service.uploads import read_upload

    c, s = np.cos(0.5), np.sin(0.5)                     # oblique: turned about z then x, spacing 1.1 0.9 3
    turn = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = turn @ np.diag([1.1, 0.9, 3.0]), [10.0, -20.0, 5.0]
    array = np.random.default_rng(2).integers(-1000, 1000, (6, 5, 4)).astype(np.int16)
    files = {}
    for qform in (True, False):                        # ITK takes the qform when there is one, else the sform
        for name, kind in (("one.nii", nibabel.Nifti1Image), ("two.nii", nibabel.Nifti2Image)):
            image = kind(array, affine)
            image.set_qform(affine if qform else None, 1 if qform else 0)
            image.set_sform(affine, 2)
            image.to_filename(str(tmp_path / name))
            files[name] = (tmp_path / name).read_bytes()
        two = files["two.nii"]
        assert struct.unpack("<i", two[:4])[0] == 540 and two[4:8] == b"n+2\x00"
        answers = [request(served.client, "POST", "/volumes", data) for data in
                   (files["one.nii"], two, gzip.compress(two))]
        assert [status for status, _ in answers] == [200, 200, 200], answers
        for _, answer in answers:
            served.client.forget(answer.pop("volume_id"))
        assert answers[1][1] == answers[0][1] == answers[2][1] and answers[1][1]["size"] == [6, 5, 4]
    one, other = (read_upload(str(tmp_path / name), str(tmp_path), UPLOAD) for name in ("one.nii", "two.nii"))
    assert np.array_equal(sitk.GetArrayFromImage(one), sitk.GetArrayFromImage(other))
    promised = 6 * 5 * 4 * 2
    assert refused(served.client, "POST", "/volumes", two[:-3]) == (
        400, f"the upload's NIfTI file does not hold the {promised} bytes of voxels its header promises "
             "(a truncated or corrupt file)")
    wide = bytearray(two[:544])                        # 40000 x 1 x 1: fits the cap, not NIfTI-1's int16 sizes
    struct.pack_into("<8q", wide, 16, 3, 40000, 1, 1, 1, 1, 1, 1)
    assert refused(served.client, "POST", "/volumes", bytes(wide) + b"\0" * 80000) == (
        400, "the NIfTI-2 header holds a value NIfTI-1 cannot (e.g. a size past 32767) and ITK reads NIfTI-1 "
             "only; send the volume as NRRD")


def test_a_4d_upload_is_told_in_the_apis_words(served, nrrd):
    header, voxels = nrrd
    four = header.replace(b"dimension: 3", b"dimension: 4").replace(b"sizes: 36 40 5", b"sizes: 36 40 5 2")
    four = re.sub(rb"space directions: ([^\n]*)", rb"space directions: \1 none", four)
    four = re.sub(rb"kinds: ([^\n]*)", rb"kinds: \1 list", four)
    status, detail = refused(served.client, "POST", "/volumes", four + b"\n\n" + voxels * 2)
    assert (status, detail) == (400, "the upload is a 4D time series with 2 frames; send one frame as a 3D volume")


# -- 4. every body has a size limit, counted as it streams -----------------------------------------
def test_every_body_is_capped_with_or_without_a_content_length(served, nrrd):
    client = served.client
    big_json = json.dumps({"volume_id": "x", "prompts": ["a" * 100] * 800}).encode()
    assert len(big_json) > BODY
    sentence = f"the request body is larger than the service's limit of {BODY} bytes"
    json_type = {"Content-Type": "application/json"}
    assert refused(client, "POST", "/jobs", big_json, headers=json_type) == (413, sentence)
    assert refused(client, "POST", "/jobs", big_json, headers=json_type, chunked=True) == (413, sentence)
    assert refused(client, "POST", "/volumes/x/undo", big_json, chunked=True) == (413, sentence)
    upload = f"the upload is larger than the service's limit of {UPLOAD} bytes"
    header, voxels = nrrd
    oversize = header + b"\n\n" + voxels * (UPLOAD // len(voxels) + 1)
    assert refused(client, "POST", "/volumes", oversize, chunked=True) == (413, upload)
    assert refused(client, "POST", "/volumes", oversize) == (413, upload)
    assert client.info()["queue"]["running"] is None


# -- 5./6./9. overrides, numbers and sentences checked at submission ----------------------------------
@pytest.fixture(scope="module")
def volume(served, nrrd):
    header, voxels = nrrd
    return served.client.upload(header + b"\n\n" + voxels)["volume_id"]


def job_body(volume, **change):
    return json.dumps({"volume_id": volume, "prompts": ["brain tumor"], "preset": "fast", **change}).encode()


def test_overrides_are_typed_at_submission_by_the_clis_own_rules(served, volume):
    cases = [
        (["mask_threshold=abc"], "setting 'mask_threshold' must be a number, got \"abc\""),
        (["mask_threshold=NaN"], "setting 'mask_threshold' must be a number, got NaN"),
        (["top_n=1.5"], "setting 'top_n' must be a whole number, got 1.5"),
        (["saliency_settings.layer=3"], "setting 'saliency_settings.layer' must be text, got 3"),
        (["fill_holes=yes"], "setting 'fill_holes' must be true or false, got \"yes\""),
    ]
    for overrides, sentence in cases:
        assert refused(served.client, "POST", "/jobs", job_body(volume, overrides=overrides)) == (422, sentence)


def test_numbers_and_windows_must_be_finite_and_in_range(served, volume):
    client = served.client
    window = "a window's level and width must be finite, the width positive (at most 1e6), got '{}'"
    for text in ("nan,nan", "1e999,40", "40,-5"):
        assert refused(client, "POST", "/jobs", job_body(volume, window=text)) == (422, window.format(text)), text
    assert refused(client, "POST", "/jobs", job_body(volume, window="liver")) == (
        422, "unknown CT window 'liver'; choose one of soft_tissue, lung, brain, bone")
    raw_numbers = [('"gate_min_similarity": NaN', "'gate_min_similarity': input should be a finite number"),
                   ('"absent_margin": Infinity', "'absent_margin': input should be a finite number"),
                   ('"min_size_mm3": 1e999', "'min_size_mm3': input should be a finite number"),
                   ('"absent_margin": 5', "'absent_margin': input should be less than or equal to 2"),
                   ('"gate_min_similarity": -3', "'gate_min_similarity': input should be greater than or equal to -1")]
    for text, sentence in raw_numbers:
        body = job_body(volume)[:-1] + b", " + text.encode() + b"}"
        assert refused(client, "POST", "/jobs", body) == (422, sentence), text
    click = {"segment_id": "s", "points": [{"position": [1.0, float("nan"), 2.0]}]}
    assert refused(client, "POST", f"/volumes/{volume}/refine", json.dumps(click).encode()) == (
        422, "'points.0.position.1': input should be a finite number")


def test_sentences_name_request_fields_not_command_line_flags(served, volume):
    client = served.client
    assert refused(client, "POST", "/jobs", job_body(volume, prompts=["x", "y", "z"], absent_if=["a", "b"])) == (
        422, "'absent_if' was given 2 times for 3 prompts: give it once (for every prompt) or once per prompt")
    assert refused(client, "POST", "/jobs", job_body(volume, prompts=["  "])) == (
        422, "the text prompt is empty; say what to segment, e.g. 'brain tumor'")
    assert refused(client, "POST", "/jobs", b"[1, 2]") == (422, "the request body must be a JSON object")


def test_json_without_a_content_type_is_read_as_json(served, volume):
    status, job = request(served.client, "POST", "/jobs", job_body(volume, sam="none"))
    assert status == 200 and job["state"] in ("queued", "running"), job
    served.client.wait(job["job_id"], timeout=JOB_TIMEOUT)


def test_a_finished_job_says_done_not_its_last_stage(served, volume):
    client = served.client
    final = client.wait(client.submit(volume, ["liver"], preset="fast", sam="none")["job_id"], timeout=JOB_TIMEOUT)
    assert final["state"] == "done" and final["stage"] == "write" and final["message"] == "done"


# -- 8. the queue, the token's scheme, websockets ------------------------------------------------------
def test_the_bearer_scheme_is_case_insensitive(served):
    client = served.client
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert request(client, "GET", "/info", token=f"{scheme} {client.token}")[0] == 200, scheme
    assert refused(client, "GET", "/info", token=f"Basic {client.token}") == (
        401, "a valid bearer token is required (Authorization: Bearer TOKEN)")


def test_the_queue_has_a_limit(served, volume):
    client = served.client
    running = client.submit(volume, ["brain tumor"], **LONG)["job_id"]
    waiting = client.submit(volume, ["liver"], **LONG)["job_id"]   # the one place in the queue (--max-queue 1)
    try:
        status, detail = refused(client, "POST", "/jobs", job_body(volume, prompts=["lung"], **LONG))
        assert (status, detail) == (429, "1 jobs are already waiting, the service's limit; submit again when one "
                                         "has finished, or cancel one")
    finally:
        client.cancel(waiting)
        client.cancel(running)
    assert client.wait(running, timeout=JOB_TIMEOUT)["state"] in ("cancelled", "done")
    assert client.job(waiting)["message"] == "cancelled"


def test_the_auth_layer_closes_websockets_and_passes_only_lifespan():
    import asyncio

    from MedCLIPSAMLib.service.auth import BearerAuth

    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["type"])

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "websocket.connect"}

    auth = BearerAuth(app, "t" * 32)
    headers = [(b"authorization", b"Bearer " + b"t" * 32)]
    asyncio.run(auth({"type": "websocket", "path": "/info", "headers": headers}, receive, send))
    asyncio.run(auth({"type": "lifespan"}, receive, send))
    assert reached == ["lifespan"] and sent == [{"type": "websocket.close", "code": 1008}]


# -- a property-based run from the service's own OpenAPI schema -------------------------------------
# valid values of fields whose schema is only "a string" (text the job checks at submission)
MEANINGFUL = {"preset": ["fast", "v2"], "window": [None, "40,400", "brain"], "overrides": [[], ["top_n=2"]],
              "absent_if": [None, ["normal tissue"]], "mask": [None], "gate_min_similarity": [None, 0.1],
              "min_size_mm3": [0.0, 10.0], "key_slices": [1, 3]}


def schema_value(rng, schema, defs, valid):
    """A random value for a JSON schema: valid (within every bound) or hostile (at and past the bounds,
    NaN, Infinity, huge integers, the wrong type, unknown fields)."""
    if "$ref" in schema:
        return schema_value(rng, defs[schema["$ref"].split("/")[-1]], defs, valid)
    if "anyOf" in schema:
        return schema_value(rng, rng.choice(schema["anyOf"]), defs, valid)
    if not valid and rng.random() < 0.08:            # the wrong type entirely
        return rng.choice([None, "x", -1, 1e308, float("nan"), float("inf"), [], {}, True, "1e999", "\u00e9" * 9])
    kind = schema.get("type")
    if "enum" in schema or "const" in schema:
        return rng.choice(schema.get("enum") or [schema.get("const")])
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        out = {k: schema_value(rng, v, defs, valid) for k, v in props.items()
               if k in schema.get("required", ()) or rng.random() < 0.3}
        if not valid and rng.random() < 0.05:
            out["unexpected"] = 1
        return out
    if kind == "array":
        low, high = schema.get("minItems", 0), min(schema.get("maxItems", 3), 3)
        n = rng.randint(low, max(low, high)) if valid else rng.choice([low, high, max(0, low - 1), high + 1])
        return [schema_value(rng, schema.get("items", {}), defs, valid) for _ in range(n)]
    if kind == "integer":
        low, high = schema.get("minimum", 0), schema.get("maximum", 2**31)
        low, high = int(low), int(high)
        return rng.randint(low, min(high, low + 5)) if valid else rng.choice([low - 1, high + 1, 2**70, -2**70])
    if kind == "number":
        low, high = schema.get("minimum", -1e6), schema.get("maximum", 1e6)
        return rng.uniform(low, high) if valid else rng.choice([low - 1, high + 1, float("nan"), float("inf"), -1e308])
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "string":
        if valid:
            word = f"{rng.choice(['brain tumor', 'liver', 'lung', 'seg'])} {rng.randint(0, 9999)}"
            return word[: schema.get("maxLength", 16)]
        n = rng.choice([0, 1, schema.get("maxLength", 16), schema.get("maxLength", 16) + 1])
        return "".join(rng.choice("ab ,=.-/\\%0123456789\u00e9\x00") for _ in range(min(n, 5000)))
    return rng.choice([None, 0, "x", [], {}])


def test_no_request_generated_from_the_openapi_schema_gets_a_5xx_or_a_traceback(served, volume):
    """60 requests (fixed seed) over every route of the OpenAPI schema the running service serves, bodies
    from its JSON schemas (half valid, half hostile), path ids real or not; each must answer (no hang: the
    client's timeout), below 500, with one sentence, no traceback, no command-line flag; an accepted job
    must finish (its input was checked at submission)."""
    client = served.client
    status, schema = request(client, "GET", "/openapi.json")               # the running service's own schema
    assert status == 200 and "/volumes/{volume_id}/refine" in schema["paths"]
    defs = schema.get("components", {}).get("schemas", {})
    operations = [(path, method.upper(), op) for path, item in schema["paths"].items() for method, op in item.items()]
    ids = {"volume_id": [volume, "nope", "../../etc", "%2e%2e"], "job_id": ["job-1", "job-99999", "..%2f"],
           "index": ["0", "7", "-1", "99999999999999999999", "x"]}
    rng = random.Random(31)
    seen = set()
    for _ in range(60):
        path, method, op = rng.choice(operations)
        choices = dict(ids, volume_id=ids["volume_id"][1:]) if method == "DELETE" else ids   # keep the volume
        url = re.sub(r"\{(\w+)\}", lambda m: urllib.parse.quote(rng.choice(choices[m.group(1)]), safe="%."), path)
        body = b""
        content = op.get("requestBody", {}).get("content", {}).get("application/json")
        if content:
            valid = rng.random() < 0.5
            value = schema_value(rng, content["schema"], defs, valid)
            if valid and isinstance(value, dict):      # what the schema cannot say: the words a field takes
                value.update({k: rng.choice(v) for k, v in MEANINGFUL.items() if k in value})
            if isinstance(value, dict) and "volume_id" in value and rng.random() < 0.7:
                value["volume_id"] = volume
            if isinstance(value, dict) and value.get("prompts") and rng.random() < 0.8:
                value.update(preset="fast", sam="none", mode="auto")   # a job that runs, cheaply
            body = json.dumps(value).encode()              # NaN / Infinity as JSON5-style literals, on purpose
        status, answer = request(client, method, url, body, headers={"Content-Type": "application/json"})
        seen.add((path, status))
        assert status < 500, (method, url, body[:200], answer)
        if status >= 400:
            assert isinstance(answer, dict) and isinstance(answer["detail"], str), (url, answer)
            assert "Traceback" not in answer["detail"] and "\n" not in answer["detail"], answer
            assert not re.search(r"(?<![\w-])--[a-z]", answer["detail"]), answer   # no command-line flags
        if status == 200 and path == "/trainings" and method == "POST":   # a real training: not this test's work
            request(client, "POST", f"/trainings/{answer['job_id']}/cancel", b"")
        if status == 200 and path == "/jobs" and method == "POST":   # accepted: it must not fail on its input
            final = client.wait(answer["job_id"], timeout=JOB_TIMEOUT)
            assert final["state"] == "done", (body, final)
    assert len({p for p, _ in seen}) >= 8                                  # most routes were met


# -- 7. SIGTERM and SIGINT end the service cleanly --------------------------------------------------
def service_folders(pid):
    from MedCLIPSAMLib.runtime import scratch_root

    return [p for p in scratch_root().glob(f"serve-{pid}-*")]


def test_sigterm_cancels_the_running_job_removes_the_folder_logs_and_exits_0(tiny_clip, tiny_sam2, nrrd):
    """SIGTERM, how the Slicer module stops its service, with a job running (SIGINT: the `served`
    fixture's end, on an idle service)."""
    service = start()
    try:
        client = service.client
        header, voxels = nrrd
        volume = client.upload(header + b"\n\n" + voxels)["volume_id"]
        job = client.submit(volume, ["brain tumor"], **LONG)["job_id"]
        pause = threading.Event()
        for _ in range(6000):                          # bounded: 5 minutes at most
            if client.job(job)["state"] != "queued":
                break
            pause.wait(0.05)
        assert client.job(job)["state"] in ("running", "done")
        ended_cleanly(service, signal.SIGTERM)
    finally:
        service.stop()


def test_serve_help_lists_every_route_every_limit_and_what_a_remote_deployment_adds(capsys):
    from MedCLIPSAMLib.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for route in ("GET /info", "POST /volumes", "DELETE /volumes/ID", "POST /jobs", "GET /jobs/ID",
                  "POST /jobs/ID/cancel", "GET /jobs/ID/result", "/uncertainty", "/report", "/saliency/K",
                  "POST /volumes/ID/refine", "POST /volumes/ID/undo"):
        assert route in text, route
    for limit in ("--max-upload-mb (default 1024 MB", "--max-body-kb (default 1024 KB", "--max-queue (default 16)",
                  "--max-volumes (default 8)", "--cache-mb (default 2048 MB)"):
        assert limit in text, limit
    for need in ("TLS", "HTTPS reverse proxy", "a token per team", "body and upload limits"):
        assert need in text, need
