"""Shared test setup: offline, a private model cache per run, few threads (CI has 2 cores)."""

import atexit
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

# set before anything imports torch / huggingface_hub
os.environ.setdefault("MEDCLIPSAM_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "MEDCLIPSAM_HOME" not in os.environ:
    # random-weight checkpoints are written here (hundreds of MB): removed when the run ends
    _home = tempfile.mkdtemp(prefix="medclipsam-test-home-")
    os.environ["MEDCLIPSAM_HOME"] = _home
    atexit.register(shutil.rmtree, _home, True)
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip():
    from MedCLIPSAMLib.models import load_clip

    return load_clip("tiny-random")


@pytest.fixture(scope="session")
def tiny_sam2():
    from MedCLIPSAMLib.models import load_sam2

    return load_sam2("tiny-random")


@pytest.fixture
def torchrun():
    """run(args, nproc=2, env=None): `medclipsam ARGS` in nproc CPU processes under torchrun, each through
    torchrun_worker.py (which fails a rank that leaves its process group open); returns the CompletedProcess.

    --standalone: the launcher binds its rendezvous store to a free port and hands that very store to the
    workers, so concurrent runs cannot collide on a port. One thread per rank: two ranks share two cores."""
    repo = Path(__file__).resolve().parents[2]

    def run(args, nproc=2, env=None, timeout=300):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).with_name("torchrun_worker.py")), *map(str, args)]
        path = os.pathsep.join([str(repo)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        full_env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **(env or {})}
        return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)

    return run


@pytest.fixture(scope="module")
def local_service(tiny_clip, tiny_sam2):
    """A real `medclipsam serve` child with tiny-random models on the CPU, one per test file (the file puts
    MedCLIPSAM/ on sys.path for the module's serviceclient)."""
    from MedCLIPSAMModuleLib.serviceclient import LocalService

    svc = LocalService(sys.executable, ["--models", "tiny-random", "--device", "cpu"], env=dict(os.environ),
                       idle_exit=600)
    svc.ensure()
    yield svc
    svc.stop()


def phantom_segmentation_scene(shape=(6, 40, 36)):
    """A slicer-core scene (Segmentations logic set) holding an oblique MR phantom as a volume node and
    an empty segmentation node on its geometry, binary labelmap as source: (scene, volume, seg, phantom)."""
    import slicer

    from MedCLIPSAMLib import mrml
    from MedCLIPSAMLib.phantoms import make_volume

    scene = slicer.vtkMRMLScene()
    slicer.vtkSlicerSegmentationsModuleLogic().SetMRMLScene(scene)
    ph = make_volume("mr", shape=shape, spacing=(1.1, 0.9, 3.0), origin=(10.0, -20.0, 5.0),
                     direction="oblique", seed=0)
    volume = mrml.volume_node_from_sitk(scene, ph.image, "phantom")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "phantom segmentation")
    seg.SetSourceRepresentationToBinaryLabelmap()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return scene, volume, seg, ph


@pytest.fixture(autouse=True, scope="module")
def no_local_service_outlives_its_test_file():
    """A Logic that segments through the service starts a local one shared by the whole process (as in
    Slicer); stop it when its test file ends, so the next file starts from a known state."""
    yield
    backend = sys.modules.get("MedCLIPSAMModuleLib.servicebackend")
    if backend is not None:
        backend.stopLocalServices()


def http_request(client, method, path, body=b"", headers=None, token=True, chunked=False, timeout=120):
    """One HTTP request to a served client, outside the client (test_service*.py): (status, parsed JSON body
    or bytes). chunked: the body is sent without a Content-Length, in 64 KB chunks (a client that stops being
    read gets its answer all the same)."""
    url = urllib.parse.urlsplit(client.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    headers = dict(headers or {})
    if token is True:
        headers["Authorization"] = f"Bearer {client.token}"
    elif token:
        headers["Authorization"] = token
    if chunked:
        chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
        conn.request(method, path, body=chunks, headers=headers, encode_chunked=True)
    else:
        conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data[:1] == b"{" else data
