"""The Slicer module's Logic segmenting through the segmentation service (MedCLIPSAMModuleLib/
servicebackend.py): slicer-core's MRML scene, the module's Logic, and a real local `medclipsam serve`
(started by the Logic itself, tiny random-weight models on the CPU), one service kept for the whole file
as Slicer keeps it between Applies (the restart test makes the second).

Checked: a prompt goes through the service and lands in the scene; a second prompt on the same volume
sends nothing again and meets warm caches; a changed or removed volume's upload is forgotten; a queued
job says how many are ahead; Cancel leaves the scene as it was; the service killed mid-job gives one
sentence and the next run starts a new service (with its notice) and succeeds; the choice of backend.
"""

import os
import signal
import sys
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_slicer_module import load_module_file  # noqa: E402

from MedCLIPSAMModuleLib import servicebackend  # noqa: E402
from MedCLIPSAMModuleLib.serviceclient import LocalService, ServiceClient  # noqa: E402

RUN = {"models": "tiny-random", "device": "cpu", "preset": "fast"}
SLOW = {"mode": "per-slice", "no_gate": True}   # every slice through saliency + SAM2: long enough to catch
TIMEOUT = 300
WAITING = ("service", "upload", "queued")         # stages before the service runs the job


@pytest.fixture(scope="module")
def mod():
    return load_module_file()


@pytest.fixture(scope="module")
def logic(mod, tiny_clip, tiny_sam2):   # the random models exist before the service looks for them
    logic = mod.MedCLIPSAMLogic(scene=slicer.vtkMRMLScene())
    yield logic
    logic.serviceBackend.stop()


def service_of(logic):
    return logic.serviceBackend.service


def run_until(job, condition):
    """Poll a job (as the panel's timer does) until condition() holds; fails if the job ends first."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert job.poll(), f"the job ended first: {job.result}"
        assert time.monotonic() < deadline, "the condition did not come"
        time.sleep(0.02)


def test_prompts_go_through_one_warm_service_and_an_unchanged_volume_is_sent_once(logic):
    scene, backend = logic.scene, logic.serviceBackend
    volume, _phantom = logic.createPhantomVolume("head", seed=0)
    events = []
    job = logic.startSegmentation(volume, ["brain tumor"], progressCallback=events.append, **RUN)
    assert isinstance(job, servicebackend.ServiceJob)          # zero-shot: the service, not a process
    result = job.wait(TIMEOUT)
    assert result.status == "succeeded", result.message
    segmentation = result.segmentationNode
    assert scene.IsNodePresent(segmentation)
    names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
    assert names == ["brain tumor"]
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume
    assert "brain tumor: " in result.message and "RANDOM-WEIGHT" in result.message   # the report's summary
    # the evidence comes through the service as from a local run: report, summary line, saliency on the grid
    assert result.report["prompts"][0]["prompt"] == "brain tumor" and set(result.summaries) == {"brain tumor"}
    saliency = result.saliencyVolumeNodes["brain tumor"]
    assert scene.IsNodePresent(saliency) and saliency.GetImageData().GetDimensions() == \
        volume.GetImageData().GetDimensions()
    assert events[0]["stage"] == "service" and events[-1]["stage"] == "write" and events[-1]["fraction"] == 1.0
    assert job.uploaded and backend.uploads == 1 and not os.path.exists(job.tempDir)
    service = service_of(logic)
    assert isinstance(service, LocalService) and service.process.poll() is None
    client = service.client
    hits = client.info()["cache"]["hits"]

    # the second prompt: nothing sent again, the slices' encodings are met in the service's cache
    job = logic.startSegmentation(volume, ["brain"], segmentation, **RUN)
    result = job.wait(TIMEOUT)
    assert result.status == "succeeded", result.message
    assert not job.uploaded and backend.uploads == 1
    assert client.info()["cache"]["hits"] > hits
    assert result.segmentationNode is segmentation and segmentation.GetSegmentation().GetNumberOfSegments() == 2
    assert service_of(logic) is service and client.info()["volumes"] == 1
    assert "Local service: running on port " + client.url.rsplit(":", 1)[-1] in backend.describe()

    # changed voxels: sent again, and the old upload forgotten at the service
    from vtk.util import numpy_support

    voxels = numpy_support.vtk_to_numpy(volume.GetImageData().GetPointData().GetScalars())   # shared memory
    voxels += 1
    volume.GetImageData().Modified()
    result = logic.process(volume, ["brain"], segmentation, timeout=TIMEOUT, **RUN)
    assert result.status == "succeeded", result.message
    assert backend.uploads == 2 and client.info()["volumes"] == 1

    # the node removed from the scene: its upload is forgotten
    scene.RemoveNode(volume)
    assert backend._sent == {}
    deadline = time.monotonic() + 30
    while client.info()["volumes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.info()["volumes"] == 0


def test_a_queued_job_says_how_many_are_ahead_and_cancel_leaves_the_scene_unchanged(logic):
    scene, backend = logic.scene, logic.serviceBackend
    volume, _phantom = logic.createPhantomVolume("long", seed=1, shape=(16, 40, 32))
    before = scene.GetNumberOfNodes()
    backend.jobOptions = SLOW
    try:
        first, second = [], []
        a = logic.startSegmentation(volume, ["brain tumor"], progressCallback=first.append, **RUN)
        run_until(a, lambda: first and first[-1]["stage"] not in WAITING)       # the service runs it
        b = logic.startSegmentation(volume, ["brain"], progressCallback=second.append, **RUN)
        run_until(b, lambda: any(e["stage"] == "queued" for e in second))
        assert [e["message"] for e in second if e["stage"] == "queued"][0] == "queued: 1 job ahead"
        for job in (b, a):
            job.cancel()
        results = [job.wait(TIMEOUT) for job in (a, b)]
    finally:
        backend.jobOptions = {}
    assert [r.status for r in results] == ["cancelled", "cancelled"]
    assert results[0].message == "cancelled; the scene was not changed"
    assert scene.GetNumberOfNodes() == before
    client = service_of(logic).client
    assert {client.job(job.jobId)["state"] for job in (a, b)} == {"cancelled"}
    assert all(not job.process.aliveMembers() and not os.path.exists(job.tempDir) for job in (a, b))


@pytest.mark.skipif(os.name == "nt", reason="process groups and signals are POSIX")
def test_the_service_killed_mid_job_fails_in_one_sentence_and_the_next_run_restarts_it(logic):
    scene, backend = logic.scene, logic.serviceBackend
    volume, _phantom = logic.createPhantomVolume("killed", seed=2, shape=(16, 40, 32))
    before = scene.GetNumberOfNodes()
    old = service_of(logic).process
    events = []
    backend.jobOptions = SLOW
    try:
        job = logic.startSegmentation(volume, ["brain tumor"], progressCallback=events.append, **RUN)
        run_until(job, lambda: events and events[-1]["stage"] not in WAITING)
        os.killpg(old.pid, signal.SIGKILL)            # its own process group (start_new_session)
        result = job.wait(TIMEOUT)
    finally:
        backend.jobOptions = {}
    assert result.status == "failed"
    assert result.message == ("The local segmentation service stopped unexpectedly (killed by SIGKILL); "
                              "a new one starts with the next Apply.")
    assert scene.GetNumberOfNodes() == before
    assert "not running" in backend.describe()

    events.clear()
    result = logic.process(volume, ["brain tumor"], progressCallback=events.append, timeout=TIMEOUT, **RUN)
    assert result.status == "succeeded", result.message
    new = service_of(logic).process
    assert new.pid != old.pid and new.poll() is None
    assert "had stopped (killed by SIGKILL); a new one was started" in backend.notice
    assert any(backend.notice == e["message"] for e in events)     # the panel's status line showed it
    assert "(Restarted after it stopped.)" in backend.describe()


def test_one_backend_and_the_former_process_setting_means_local(logic, monkeypatch):
    """Every run goes to the service (zero-shot and trained models alike); a saved "off" (the process per
    run that is gone) is read as the local service."""
    assert servicebackend.serviceCanRun()                           # this Python has fastapi and uvicorn
    calls = []

    class Recorder:
        def startSegmentation(self, *args, **kwargs):
            calls.append(kwargs.get("trainedModel"))

    monkeypatch.setattr(logic, "serviceBackend", Recorder())
    logic.startSegmentation(None, ["a"])
    logic.startSegmentation(None, ["a"], trainedModel="weak-1")
    assert calls == [None, "weak-1"]
    backend = servicebackend.ServiceBackend(logic)
    backend.configure("off")
    assert backend.mode == "local" and servicebackend.MODES == ("local", "remote")


def test_one_local_service_for_every_logic_of_this_process(mod, logic):
    """The panel's Logic, a script's and the self-test's share the local service (one set of models)."""
    other = mod.MedCLIPSAMLogic(scene=slicer.vtkMRMLScene())
    assert other.serviceBackend._serviceFor(RUN["models"], RUN["device"]) == []
    assert service_of(other) is service_of(logic) and service_of(logic).process.poll() is None


def test_remote_settings_and_test_connection(logic):
    backend = servicebackend.ServiceBackend(logic)
    with pytest.raises(ValueError):
        backend.configure("cloud")
    backend.configure("remote", "", "")
    ok, sentence = backend.testConnection()
    assert not ok and "URL" in sentence
    running = service_of(logic).client
    backend.configure("remote", running.url + "/", "wrong-token")
    ok, sentence = backend.testConnection()
    assert not ok and "refused the token" in sentence
    backend.configure("remote", running.url, running.token)
    ok, sentence = backend.testConnection()
    assert ok and sentence.startswith("Connected: medclipsam") and "RANDOM-WEIGHT" in sentence
    backend.configure("off")                    # the former "process per run": the local service now
    assert backend.testConnection() == (True, "The local service can run; the next Apply starts it.")
    assert backend.describe() == "Local service: not running; the next Apply starts it."
    assert isinstance(running, ServiceClient)


def test_the_token_stays_out_of_the_scene_and_in_the_user_settings(mod):
    from MedCLIPSAMModuleLib.panels import servicepanel

    fields = [name.lower() for name in mod.MedCLIPSAMParameterNode.__annotations__]
    assert not [f for f in fields if "token" in f or "service" in f or "url" in f]   # saved in .mrml files
    stored = {"MedCLIPSAM/serviceMode": "remote", "MedCLIPSAM/serviceUrl": "https://gpu:8765",
              "MedCLIPSAM/serviceToken": "s3cret"}
    assert servicepanel.loadSettings(lambda key, default: stored.get(key, default)) == \
        ("remote", "https://gpu:8765", "s3cret")
    assert servicepanel.loadSettings(lambda key, default: {"MedCLIPSAM/serviceMode": "bogus"}.get(key, default)) \
        == ("local", "", "")


def test_a_remote_service_runs_a_prompt_into_the_scene(mod, logic):
    """The remote mode end to end, the running service standing in for a GPU machine (taken out of the
    local registry, so that switching this Logic to remote does not stop it)."""
    box = service_of(logic)
    servicebackend._localServices.clear()
    other = mod.MedCLIPSAMLogic(scene=logic.scene)
    other.serviceBackend.configure("remote", box.client.url, box.client.token)
    volume, _phantom = other.createPhantomVolume("remote", seed=3)
    result = other.process(volume, ["brain tumor"], timeout=TIMEOUT, **RUN)
    assert result.status == "succeeded", result.message
    assert isinstance(service_of(other), servicebackend.RemoteService) and box.process.poll() is None
    assert result.segmentationNode.GetSegmentation().GetNumberOfSegments() == 1
    assert other.serviceBackend.describe().startswith(f"Remote service at {box.client.url}")
    other.serviceBackend.stop()                 # a remote service is left running: only the observer goes
    assert box.process.poll() is None and other.serviceBackend._observed is None
