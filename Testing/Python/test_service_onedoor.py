"""One door: trained models and weak-supervision training through the segmentation service, on two REAL
services (uvicorn, tiny-random models): a "local" one and a "remote" one (another port, token and
MEDCLIPSAM_HOME; the client knows only its URL and token, and every byte goes over HTTP). Volumes come
from a slicer-core scene and results go back into it, as the panel does, through the module's Qt-free
client (MedCLIPSAMModuleLib/serviceclient.py).

The random models make meaningless masks: the plumbing is what is checked (ids, progress, metrics,
registration, grids, cancel, one training at a time, the API's sentences)."""

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedCLIPSAM"))
from MedCLIPSAMModuleLib import serviceclient as jobs  # noqa: E402
from MedCLIPSAMModuleLib.serviceclient import LocalService, RemoteService, ServiceError  # noqa: E402

from MedCLIPSAMLib import mrml  # noqa: E402
from MedCLIPSAMLib.io import geometry_equal, read_segmentation, read_volume  # noqa: E402
from MedCLIPSAMLib.phantoms import make_volume  # noqa: E402
from MedCLIPSAMLib.service.children import group_alive  # noqa: E402

PROMPT = "brain tumor"
# the smallest real training: pseudo-labels without SAM, one epoch of a 4-filter 2D network
TINY = dict(preset="fast", sam="none", epochs=1, snapshots=1, batch_size=4, base_filters=4, samples_per_epoch=4)
TIMEOUT = 600


def phantom(seed, shape=(4, 24, 24), direction="oblique"):
    return make_volume("mr", shape=shape, spacing=(1.4, 1.1, 3.5), origin=(12.0, -40.0, 5.0), direction=direction,
                       seed=seed, lesion={"size": "large"}).image


def start_service(tmp_path_factory, name):
    """A `medclipsam serve` with its own home. The random test models (made once per test run by the
    tiny_* fixtures) are linked in: a remote machine would have its own models installed."""
    home = tmp_path_factory.mktemp(f"{name}-home")
    os.symlink(Path(os.environ["MEDCLIPSAM_HOME"]) / "models", home / "models")
    env = dict(os.environ, MEDCLIPSAM_HOME=str(home), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    service = LocalService(sys.executable, ["--models", "tiny-random", "--device", "cpu"], env=env, idle_exit=900)
    return service, home


@pytest.fixture(scope="module")
def services(tiny_clip, tiny_sam2, tmp_path_factory):
    """{"local": (client, LocalService, home), "remote": (...)}: the remote one is reached only through
    RemoteService(url, token), as the panel reaches a GPU machine."""
    local, local_home = start_service(tmp_path_factory, "local")
    remote, remote_home = start_service(tmp_path_factory, "remote")
    failed = []

    def start_remote():
        try:
            remote.ensure()
        except Exception as exc:
            failed.append(exc)

    starting = threading.Thread(target=start_remote)      # both load their models at once
    starting.start()
    local.ensure()
    starting.join()
    assert not failed, failed
    remote_client = RemoteService(remote.client.url, remote.client.token).ensure()
    assert remote_client.url != local.client.url and remote_client.token != local.client.token
    yield {"local": (local.client, local, local_home), "remote": (remote_client, remote, remote_home)}
    local.stop()
    remote.stop()


@pytest.fixture(scope="module")
def scene():
    scene = slicer.vtkMRMLScene()
    nodes = {f"train {k}": mrml.volume_node_from_sitk(scene, phantom(k), f"train {k}") for k in range(2)}
    nodes["target"] = mrml.volume_node_from_sitk(scene, phantom(7, shape=(5, 26, 22), direction="ras"), "target")
    return scene, nodes


def upload(client, node, folder):
    """What the panel sends: the node written as NRRD bytes (the service never sees a client path)."""
    path = os.path.join(folder, f"{node.GetID()}.nrrd")
    mrml.write_volume_node(node, path)
    return client.upload(path)["volume_id"]


def leftovers(home):
    trained = Path(home) / "trained"
    return sorted(p.name for p in trained.iterdir() if p.name.startswith(".")) if trained.is_dir() else []


def gone(condition, timeout=60):
    """Wait (bounded) for condition(): a killed process is reaped by its new parent a moment later."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def training_children(service_pid):
    """Process ids of the service's training children (their own process groups), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == service_pid and b"MedCLIPSAMLib.cli.chain" in command:
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def trained(services, scene, tmp_path_factory):
    """Both services train at once from the same two scene volumes (each in its own child: two cores);
    {which: (final status or the exception met, every status seen, the volume ids)}."""
    folder = tmp_path_factory.mktemp("uploads")
    nodes = scene[1]
    runs, results = {}, {}
    for which, (client, _service, _home) in services.items():
        ids = [upload(client, nodes[f"train {k}"], folder) for k in range(2)]
        status = jobs.startTraining(client, ids, [PROMPT], f"{which} weak", **TINY)
        runs[which] = (client, status, ids, [])

    def follow(which):
        client, status, _ids, seen = runs[which]
        try:
            assert status["state"] == "running" and status["kind"] == "train", status
            results[which] = jobs.waitTraining(client, status["job_id"], onStatus=seen.append, every=0.2,
                                               timeout=TIMEOUT)
        except Exception as exc:   # raised by the test of that service
            results[which] = exc

    threads = [threading.Thread(target=follow, args=(which,)) for which in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {which: (results[which], runs[which][3], runs[which][2]) for which in runs}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the service's children in /proc")
@pytest.mark.parametrize("which", ["local", "remote"])
def test_train_on_scene_volumes_list_the_model_and_predict_with_it(services, scene, trained, which, tmp_path):
    client, service, home = services[which]
    other_client = services["remote" if which == "local" else "local"][0]
    scene, nodes = scene
    name = f"{which} weak"
    final, seen, ids = trained[which]
    if isinstance(final, Exception):
        raise final
    assert final["state"] == "done", final
    # both steps were reported, in order, and the fraction only grew
    steps = [s["step"] for s in seen if s["step"]]
    assert steps[0] == "pseudo-label" and steps[-1] == "train" and sorted(set(steps)) == ["pseudo-label", "train"]
    fractions = [jobs.fraction(s) for s in seen if jobs.fraction(s) is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # the metrics stream: one record per epoch with a finite loss, then the ensemble's record
    epochs = [r for r in final["metrics"] if "loss" in r]
    assert [r["epoch"] for r in epochs] == [1] and math.isfinite(epochs[0]["loss"])
    assert "ensemble_val_dice" in final["metrics"][-1]
    assert final["model"] == {"name": name, "kind": "weak", "labels": [PROMPT], "date": final["model"]["date"],
                              "present": True}
    assert final["message"] == f"trained and registered '{name}'"

    # listed by this service only (its own home and registry), without any server folder
    listed = jobs.trainedModels(client)
    assert listed == [final["model"]]
    assert name not in [m["name"] for m in jobs.trainedModels(other_client)]
    registry = json.loads((home / "trained_models.json").read_text())
    assert [Path(e["folder"]).parent for e in registry["models"]] == [home / "trained"]
    assert leftovers(home) == [] and training_children(service.process.pid) == []

    # predict with it on another volume (another grid): segment named by the model, exact grid, uncertainty
    target = nodes["target"]
    job = jobs.submitTrained(client, upload(client, target, tmp_path), name, uncertainty=True)
    done = client.wait(job["job_id"], timeout=TIMEOUT)
    assert done["state"] == "done", done
    assert [r["prompt"] for r in done["report"]] == [PROMPT] and done["uncertainty"] is True
    out = client.result(job["job_id"], str(tmp_path / "out.seg.nrrd"))
    unc = client.result(job["job_id"], str(tmp_path / "unc.nrrd"), "uncertainty")
    reference = mrml.sitk_image_from_volume_node(target)
    segments, image = read_segmentation(out)
    assert [s["name"] for s in segments] == [PROMPT] and geometry_equal(image, reference)
    assert geometry_equal(read_volume(unc), reference)
    # into the scene as the panel imports a run
    node = mrml.import_segmentation_file(scene, out, target)["node"]
    labelmap = mrml.export_segments_to_labelmap(scene, node, target)
    assert labelmap.GetImageData().GetDimensions() == target.GetImageData().GetDimensions()
    np.testing.assert_allclose(mrml.ijk_to_ras_from_node(labelmap), mrml.ijk_to_ras_from_node(target), atol=1e-6)

    # a weak-supervision model takes no prompts: one sentence, nothing queued
    with pytest.raises(ServiceError) as err:
        jobs.submitTrained(client, ids[0], name, prompts=["liver"])
    assert err.value.status == 400
    assert str(err.value) == (f"'{name}' is a weak-supervision model: it segments what it was trained on "
                              f"({PROMPT}) and takes no prompts.")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the service's children in /proc")
def test_cancel_stops_the_training_process_tree_and_registers_nothing(services, scene, tmp_path):
    """Cancel once the first epoch is in the metrics (the model folder is being written)."""
    client, service, home = services["remote"]
    scene, nodes = scene
    before = jobs.trainedModels(client)
    ids = [upload(client, nodes[f"train {k}"], tmp_path) for k in range(2)]
    status = jobs.startTraining(client, ids, [PROMPT], "never registered", **dict(TINY, epochs=2000))
    # one training at a time: a second one is refused with one sentence
    with pytest.raises(ServiceError) as err:
        jobs.startTraining(client, ids, [PROMPT], "second", **TINY)
    assert err.value.status == 409
    assert str(err.value) == (f"A training is already running ({status['job_id']}); one runs at a time: wait for "
                              "it to end or cancel it.")

    # the metrics stream while it trains: cancel once the first epoch's record is there
    groups, streamed = {}, []

    def watch(s):
        for pid in training_children(service.process.pid):
            try:
                groups.setdefault(pid, os.getpgid(pid))
            except ProcessLookupError:
                pass
        if s["metrics"] and not streamed:
            streamed.append(s)
            jobs.cancelTraining(client, s["job_id"])

    final = jobs.waitTraining(client, status["job_id"], onStatus=watch, every=0.1, timeout=TIMEOUT)
    assert final["state"] == "cancelled" and final["message"] == "cancelled; nothing was registered"
    assert "error" not in final and final["model"] is None and final["step"] == "train"
    assert streamed[0]["state"] == "running" and streamed[0]["metrics"][0]["epoch"] == 1
    assert math.isfinite(streamed[0]["metrics"][0]["loss"])
    (pid, group), = groups.items()
    assert group == pid                       # its own process group, stopped as a whole
    assert gone(lambda: not group_alive(group)) and training_children(service.process.pid) == []
    assert jobs.trainedModels(client) == before and leftovers(home) == []
    assert client.info()["training"] == {"running": None}
    # the slot is free again: a new training is refused only for its own reasons now
    with pytest.raises(ServiceError) as err:
        jobs.startTraining(client, ["notuploaded"], [PROMPT], "x", **TINY)
    assert (err.value.status, str(err.value)) == (
        404, "Unknown volume 'notuploaded': it was never uploaded here or was forgotten; upload it again.")


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX")
def test_a_child_is_stopped_with_its_whole_process_tree(tmp_path):
    """Child.stop ends the group: a grandchild the child started goes too (SIGTERM ignored: SIGKILL)."""
    from MedCLIPSAMLib.service.children import Child

    script = ("import signal, subprocess, sys, time, json\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "g = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
              "print(json.dumps({'grandchild': g.pid}), flush=True)\n"
              "time.sleep(600)\n")
    lines = []
    child = Child([sys.executable, "-c", script], str(tmp_path / "log"), lines.append)
    deadline = time.monotonic() + 60
    while not lines and time.monotonic() < deadline:
        time.sleep(0.02)
    grandchild = lines[0]["grandchild"]
    try:
        assert os.getpgid(grandchild) == child.pid
        code = child.stop(grace=0.5)
        assert code == -9
        assert gone(lambda: not group_alive(child.pid))      # the grandchild too (reaped by init meanwhile)
    finally:
        for pid in (grandchild, child.pid):                  # nothing outlives a failed check
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("change, sentence", [
    ({"epochs": 0}, "'epochs': input should be greater than or equal to 1"),
    ({"epochs": 3, "snapshots": 4}, "'snapshots': value error, cannot be more than 'epochs' (one snapshot at most "
                                    "per epoch)"),
    ({"lr": float("nan")}, "'lr': input should be a finite number"),
    ({"min_confidence": float("inf")}, "'min_confidence': input should be a finite number"),
    ({"volume_ids": ["../etc/passwd"]}, "'volume_ids.0': string should match pattern '^[A-Za-z0-9_-]+$'"),
    ({"volume_ids": [f"v{k}" for k in range(65)]}, "'volume_ids': list should have at most 64 items after "
                                                    "validation, not 65"),
    ({"name": "/tmp/x"}, "'name': string should match pattern '^[A-Za-z0-9][A-Za-z0-9 ._-]*$'"),
    ({"prompts": ["liver", " Liver "]}, "'prompts': value error, the same prompt is given twice"),
    ({"patch_size": [64, 64, 64]}, "'patch_size': value error, needs 2 numbers for a 2D network"),
    ({"output": "/tmp/model"}, "'output': extra inputs are not permitted"),
    ({"trainer": "anything"}, "'trainer': input should be 'dynunet' or 'nnunetv2'"),
])
def test_training_requests_are_checked_field_by_field(services, change, sentence):
    client = services["local"][0]
    body = dict({"volume_ids": ["abc"], "prompts": [PROMPT], "name": "m"}, **change)
    with pytest.raises(ServiceError) as err:
        client._request("POST", "/trainings", body=body)
    assert err.value.status == 422
    assert str(err.value) == sentence[0].upper() + sentence[1:] + "."


def test_prediction_requests_name_ids_and_registered_models_only(services):
    client = services["local"][0]
    cases = [({"volume_id": "a/b", "model": "m"}, 422, "'volume_id': string should match pattern '^[A-Za-z0-9_-]+$'"),
             ({"volume_id": "abc", "model": "m", "samples": 101}, 422,
              "'samples': input should be less than or equal to 100"),
             ({"volume_id": "abc", "model": "m", "threshold": 1.5}, 422, "'threshold': input should be less than 1"),
             ({"volume_id": "abc", "model": "m", "window": "1e9"}, 422,
              "'window': value error, must be soft_tissue, lung, brain, bone or LEVEL,WIDTH"),
             ({"volume_id": "abc", "model": "m", "window": "40,0"}, 422,     # the CLI's rule: a positive width
              "'window': value error, must be soft_tissue, lung, brain, bone or LEVEL,WIDTH"),
             ({"volume_id": "abc", "model": "m"}, 404,
              "unknown volume 'abc': it was never uploaded here or was forgotten; upload it again")]
    for body, status, sentence in cases:
        with pytest.raises(ServiceError) as err:
            client._request("POST", "/jobs/trained", body=body)
        assert (err.value.status, str(err.value)) == (status, sentence[0].upper() + sentence[1:] + "."), body
    with pytest.raises(ServiceError) as err:
        jobs.training(client, "train-999")
    assert (err.value.status, str(err.value)) == (404, "Unknown training 'train-999'.")


@pytest.mark.slow
def test_a_medclipseg_model_predicts_through_the_service(services, scene, tmp_path, monkeypatch):
    """A tiny MedCLIPSeg model, registered on the service's side (as its administrator would with
    `medclipsam models trained --add DIR`), segments a scene volume: one segment per prompt, their uncertainty."""
    from MedCLIPSAMLib import trained_models
    from MedCLIPSAMLib.io import write_labelmap, write_volume
    from MedCLIPSAMLib.training.medclipseg import MedCLIPSegOptions, train

    client, _service, home = services["local"]
    scene, nodes = scene
    images, labels = [], []
    for seed in range(2):
        ph = make_volume("mr", shape=(3, 32, 32), seed=seed, lesion={"size": "large"})
        images.append(str(tmp_path / f"vol{seed}.nrrd"))
        labels.append(str(tmp_path / f"vol{seed}-label.nrrd"))
        write_volume(images[-1], ph.image)
        write_labelmap(labels[-1], ph.labels["tumor"], ph.image)
    train(MedCLIPSegOptions(images=images, labels=labels, prompts=[PROMPT], output=str(tmp_path / "seg"),
                            model="tiny-random", epochs=1, batch_size=3, augment=False, device="cpu"))
    monkeypatch.setenv("MEDCLIPSAM_HOME", str(home))
    trained_models.add(str(tmp_path / "seg"), "tiny seg")
    monkeypatch.undo()

    target = nodes["target"]
    volume = upload(client, target, tmp_path)
    job = jobs.submitTrained(client, volume, "tiny seg", prompts=[PROMPT, "tumor core"], samples=2,
                             uncertainty=True)
    done = client.wait(job["job_id"], timeout=TIMEOUT)
    assert done["state"] == "done", done
    assert [r["prompt"] for r in done["report"]] == [PROMPT, "tumor core"]
    segments, image = read_segmentation(client.result(job["job_id"], str(tmp_path / "seg.seg.nrrd")))
    reference = mrml.sitk_image_from_volume_node(target)
    assert [s["name"] for s in segments] == [PROMPT, "tumor core"] and geometry_equal(image, reference)
    unc = read_volume(client.result(job["job_id"], str(tmp_path / "unc.nrrd"), "uncertainty"))
    assert geometry_equal(unc, reference)
    # listed with its kind and prompts; a weak-supervision option is refused in the API's words
    assert {"name": "tiny seg", "kind": "medclipseg", "labels": [PROMPT]}.items() <= \
        next(m for m in jobs.trainedModels(client) if m["name"] == "tiny seg").items()
    with pytest.raises(ServiceError) as err:
        jobs.submitTrained(client, volume, "tiny seg", threshold=0.3)
    assert (err.value.status, str(err.value)) == (
        400, "'threshold' is a weak-supervision option; 'tiny seg' is a MedCLIPSeg model.")


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX")
def test_a_training_child_stops_itself_when_the_service_is_gone(tmp_path):
    """A SIGKILLed service cannot stop its children: the child (cli/chain.py's watch) ends its own group."""
    import subprocess

    service = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    code = (f"import os, time\nfrom MedCLIPSAMLib.cli.chain import watch_parent\n"
            f"watch_parent({service.pid}, every=0.1)\nprint('watching', flush=True)\ntime.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2])] +
                                                       [p for p in [os.environ.get("PYTHONPATH")] if p]))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, start_new_session=True)
    try:
        assert child.stdout.readline() == b"watching\n"
        service.kill()
        service.wait()
        assert child.wait(timeout=60) == -9
    finally:
        for process in (service, child):
            process.kill()
            process.wait()
        child.stdout.close()


def test_a_dead_services_hidden_training_folder_is_reclaimed(tmp_path, monkeypatch):
    """A SIGKILLed service leaves its training's hidden model folder behind; the next service reclaims it
    (and leaves a living service's alone)."""
    import subprocess

    from MedCLIPSAMLib.service.training_jobs import Trainings

    monkeypatch.setenv("MEDCLIPSAM_HOME", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()          # a finished, reaped process
    trained = tmp_path / "trained"
    (trained / f".training-{dead}-train-1").mkdir(parents=True)
    (trained / f".training-{os.getpid()}-train-2").mkdir()
    Trainings(service=None)
    assert sorted(p.name for p in trained.iterdir()) == [f".training-{os.getpid()}-train-2"]
