"""The Slicer module's training parts without the Slicer application (slicer-core, real MRML scene):
the trained-model registry, the metrics chart, and the Logic driving a REAL local service (tiny-random
models, its own MEDCLIPSAM_HOME): training from two scene volumes (progress, metrics table and chart,
the model listed by the service, predicting with it), a training from a folder (uploaded file by file)
that goes on when the scene is closed and stops on Cancel, and a tiny MedCLIPSeg model predicting
through the service. The HTTP side of the same is in test_service_onedoor.py.

Random-weight models: the masks mean nothing, the plumbing is what is checked.
"""

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
sitk = pytest.importorskip("SimpleITK")

from test_slicer_module import load_module_file, register_conversion_rules  # noqa: E402

from MedCLIPSAMModuleLib import trained  # noqa: E402
from MedCLIPSAMModuleLib import trainingjob as training  # noqa: E402

PROMPT = "brain tumor"
# one thread per process: two processes with two OpenMP threads each oversubscribe a 2-core runner
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def mod():
    return load_module_file()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private MEDCLIPSAM_HOME (the registry lives there); the CLI processes inherit it."""
    folder = tmp_path / "home"
    monkeypatch.setenv("MEDCLIPSAM_HOME", str(folder))
    return folder


@pytest.fixture
def logic(mod, home):
    logic = mod.MedCLIPSAMLogic(scene=slicer.vtkMRMLScene())
    logic.extraEnvironment = dict(ONE_THREAD)
    return logic


def phantom(seed, shape=(6, 32, 28), direction="oblique"):
    from MedCLIPSAMLib import phantoms

    return phantoms.make_volume("mr", shape=shape, spacing=(1.4, 1.1, 3.5), origin=(12.0, -40.0, 5.0),
                                direction=direction, seed=seed, lesion={"size": "large"})


def add_volume(scene, image, name):
    from MedCLIPSAMLib import mrml

    return mrml.volume_node_from_sitk(scene, image, name)


def fake_weak_folder(folder, snapshots=("snapshot-1.pt",), write=None, labels=("brain",)):
    folder.mkdir(parents=True)
    config = {"format": "medclipsam-weak-v1", "label_names": list(labels),
              "snapshots": [{"file": f, "epoch": 1} for f in snapshots]}
    (folder / "config.json").write_text(json.dumps(config))
    for f in snapshots if write is None else write:
        (folder / f).write_bytes(b"weights")
    return folder


def fake_medclipseg_folder(folder, weights=True):
    folder.mkdir(parents=True)
    (folder / "medclipseg.json").write_text(json.dumps({"format": "medclipseg/1", "prompts": ["liver", "a liver"]}))
    if weights:
        (folder / "medclipseg.safetensors").write_bytes(b"weights")
    return folder


def geometry_matches(node, volume):
    from MedCLIPSAMLib import mrml

    assert node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    np.testing.assert_allclose(mrml.ijk_to_ras_from_node(node), mrml.ijk_to_ras_from_node(volume), atol=1e-6)


# ------------------------------------------------------------------------------------------ registry
def test_registry_add_list_remove_and_kind_detection(tmp_path, home, capsys):
    from MedCLIPSAMLib import trained_models as tm
    from MedCLIPSAMLib.cli import main as cli_main
    from MedCLIPSAMLib.errors import MedCLIPSAMError

    weak = fake_weak_folder(tmp_path / "weak")
    seg = fake_medclipseg_folder(tmp_path / "seg")
    assert tm.list_models() == [] and not tm.registry_path().exists()

    a = tm.add(weak, "liver net")
    b = tm.add(seg)
    assert (a["kind"], a["name"], a["labels"]) == ("weak", "liver net", ["brain"])
    assert (b["kind"], b["name"], b["labels"]) == ("medclipseg", "seg", ["liver", "a liver"])
    assert tm.registry_path() == home / "trained_models.json"
    listed = tm.list_models()
    assert [(m["name"], m["kind"], m["present"]) for m in listed] == [("liver net", "weak", True),
                                                                      ("seg", "medclipseg", True)]
    assert listed[0]["folder"] == str(weak.resolve()) and listed[0]["date"]
    # the same folder again: its entry is replaced, not doubled; another folder under a taken name: a suffix
    assert tm.add(weak, "renamed")["name"] == "renamed" and len(tm.list_models()) == 2
    other = fake_weak_folder(tmp_path / "other")
    assert tm.add(other, "seg")["name"] == "seg-2"

    # incomplete or foreign folders are refused with one sentence, and nothing is written
    before = tm.registry_path().read_text()
    bad = {
        "missing": tmp_path / "nope",
        "empty": tmp_path / "empty",
        "no snapshot yet": fake_weak_folder(tmp_path / "nosnap", snapshots=()),
        "snapshot file missing": fake_weak_folder(tmp_path / "lost", snapshots=("snapshot-1.pt", "snapshot-2.pt"),
                                                  write=("snapshot-1.pt",)),
        "no weights": fake_medclipseg_folder(tmp_path / "noweights", weights=False),
        "foreign config": tmp_path / "foreign",
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text('{"model_type": "bert"}')
    for case, folder in bad.items():
        with pytest.raises(MedCLIPSAMError) as info:
            tm.add(folder)
        assert "\n" not in str(info.value) and str(folder.name) in str(info.value), case
    assert tm.registry_path().read_text() == before

    # a folder that lost its model is listed as not present; remove forgets an entry, keeps the folder
    (other / "snapshot-1.pt").unlink()
    assert [m["present"] for m in tm.list_models() if m["name"] == "seg-2"] == [False]
    tm.remove("seg-2")
    assert [m["name"] for m in tm.list_models()] == ["seg", "renamed"] and other.is_dir()
    with pytest.raises(MedCLIPSAMError):
        tm.remove("seg-2")

    # the CLI's listing, and its one-line refusal
    assert cli_main(["models", "trained"]) == 0
    out = capsys.readouterr().out
    assert "renamed" in out and "medclipseg" in out
    assert cli_main(["models", "trained", "--add", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medclipsam: error:") and err.count("\n") == 1


def test_logic_registry_wrappers_and_method_labels(mod, tmp_path, home):
    logic = mod.MedCLIPSAMLogic(scene=slicer.vtkMRMLScene())
    weak = logic.registerTrainedModel(str(fake_weak_folder(tmp_path / "w")), "my net")
    seg = logic.registerTrainedModel(str(fake_medclipseg_folder(tmp_path / "s")))
    assert trained.label(weak) == "Trained: my net (weak supervision)"
    assert trained.label(seg) == "MedCLIPSeg (trained): s"
    # the local service is not running: the listing it would give (its registry is this user's), no folders
    assert logic.trainedModels() == [{"name": "my net", "kind": "weak", "labels": ["brain"], "date": weak["date"],
                                      "present": True},
                                     {"name": "s", "kind": "medclipseg", "labels": ["liver", "a liver"],
                                      "date": seg["date"], "present": True}]
    assert logic.serviceBackend.service is None                  # nothing was started to list them
    with pytest.raises(ValueError, match="not a trained model folder"):
        logic.registerTrainedModel(str(tmp_path))
    with pytest.raises(ValueError) as err:
        logic.trainedModel("unknown")
    assert str(err.value) == "The trained model 'unknown' is not usable at the service in use."
    (tmp_path / "s" / "medclipseg.safetensors").unlink()
    assert [m["name"] for m in logic.trainedModels()] == ["my net"]
    with pytest.raises(ValueError, match="'s' is not usable"):
        logic.trainedModel("s")
    logic.removeTrainedModel("s")
    with pytest.raises(ValueError):
        logic.removeTrainedModel("s")


def test_weak_supervision_refuses_bad_input(logic, tmp_path):
    import tempfile

    volume = add_volume(logic.scene, phantom(0).image, "v")
    temporary = set(Path(tempfile.gettempdir()).glob("MedCLIPSAM-*"))
    for images, prompts, name, match in (
            ([volume], " \n ", "m", "prompt"),
            ([], PROMPT, "m", "Load at least one volume"),
            (str(tmp_path / "nope"), PROMPT, "m", "does not exist"),
            ([volume], PROMPT, "  ", "name"),
            ([volume], PROMPT, "m", "epoch"),
    ):
        with pytest.raises(ValueError, match=match):
            logic.startWeakSupervision(images, prompts, name, epochs=0 if match == "epoch" else 50)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no files"):
        logic.startWeakSupervision(str(tmp_path / "empty"), PROMPT, "m")
    assert set(Path(tempfile.gettempdir()).glob("MedCLIPSAM-*")) == temporary  # no temporary folder left
    assert logic.serviceBackend.service is None                                 # nothing was started


def test_metrics_table_and_chart(mod, logic, tmp_path):
    records = [{"epoch": 1, "loss": 1.5, "lr": 0.01, "val_dice": None},
               {"epoch": 2, "loss": 1.25, "lr": 0.005, "val_dice": 0.4}]
    table, series, chart = training.createMetricsPlot(logic.scene, "m")
    training.updateMetricsTable(table, records)
    assert table.GetNumberOfRows() == 2
    assert [table.GetTable().GetValueByName(i, "loss").ToDouble() for i in range(2)] == [1.5, 1.25]
    assert np.isnan(table.GetTable().GetValueByName(0, "val_dice").ToDouble())
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    assert [chart.GetNthPlotSeriesNodeID(i) for i in range(2)] == [s.GetID() for s in series]
    assert all(s.GetTableNodeID() == table.GetID() for s in series)
    assert [s.GetYColumnName() for s in series] == ["loss", "val_dice"]


# ---------------------------------------------------------------------------- a real local service
TINY = dict(device="cpu", preset="fast", models="tiny-random", sam="none", snapshots=1, batchSize=4, baseFilters=4,
            samplesPerEpoch=4)
TIMEOUT = 600


@pytest.fixture(scope="module")
def served(mod, tmp_path_factory, tiny_clip, tiny_sam2):
    """One Logic on the local service for this file, the service with its own MEDCLIPSAM_HOME (it trains
    and registers there; nothing relies on this process's home)."""
    home = tmp_path_factory.mktemp("service-home")
    # the random test models (made once per run by the tiny_* fixtures) are linked in, not built again
    os.symlink(Path(os.environ["MEDCLIPSAM_HOME"]) / "models", home / "models")
    logic = mod.MedCLIPSAMLogic(scene=slicer.vtkMRMLScene())
    logic.extraEnvironment = dict(ONE_THREAD, MEDCLIPSAM_HOME=str(home))
    logic.home = home
    yield logic
    logic.serviceBackend.stop()


def finish(job, until=lambda: False, timeout=TIMEOUT):
    """Poll `job` (as the panel's timer does) until it ends or until() holds; False once it ended."""
    deadline = time.monotonic() + timeout
    while job.poll():
        if until():
            return True
        assert time.monotonic() < deadline, "the job did not get there in time"
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_the_logic_trains_at_the_service_lists_predicts_and_cancels(mod, served, tmp_path):
    """Two scene volumes -> a training at the local service (2 epochs) -> the model in the service's
    listing -> a prediction on a third volume through POST /jobs/trained. Then a folder source (uploaded
    file by file) trains until File > Close Scene, goes on, its chart comes back, and Cancel stops it:
    nothing registered, its table and chart gone, the service free for the next one."""
    from MedCLIPSAMLib import mrml
    from MedCLIPSAMLib.io import write_volume

    register_conversion_rules()
    logic, scene = served, served.scene
    volumes = [add_volume(scene, phantom(seed).image, f"phantom {seed}") for seed in range(2)]
    events, metrics, done = [], [], []
    job = logic.startWeakSupervision(volumes, PROMPT, "phantom weak", epochs=2, progressCallback=events.append,
                                     metricsCallback=lambda t, c: metrics.append((t, c)),
                                     completedCallback=done.append, **TINY)
    result = job.wait(timeout=TIMEOUT)
    assert result.succeeded, result.message
    assert done == [result] and not os.path.exists(job.tempDir)
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    steps = list(dict.fromkeys(e["step"] for e in events))
    assert steps[0] == "upload" and {"pseudo-label", "train"} <= set(steps)
    table, chart = result.tableNode, result.chartNode
    assert metrics[-1] == (table, chart) and table.GetNumberOfRows() == 2
    assert [table.GetTable().GetValueByName(r, "epoch").ToDouble() for r in range(2)] == [1.0, 2.0]
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    # the service's registry, as the service lists it (running now: GET /models/trained), no server folder
    entry = logic.trainedModel("phantom weak")
    assert entry == result.model and (entry["kind"], entry["labels"]) == ("weak", [PROMPT])
    assert "folder" not in entry and logic.serviceBackend.service.process.poll() is None
    assert [m["name"] for m in trained.call("list_models")] == []     # this process's home: untouched

    target = add_volume(scene, phantom(9, shape=(5, 30, 26), direction="ras").image, "target")
    seg = logic.process(target, "a prompt the weak model ignores", trainedModel="phantom weak",
                        computeUncertainty=True, timeout=TIMEOUT, **{k: TINY[k] for k in ("device", "models")})
    assert seg.succeeded, seg.message
    assert mrml.segment_names(seg.segmentationNode) == [PROMPT]
    geometry_matches(logic.exportToLabelmap(seg.segmentationNode, target), target)
    geometry_matches(seg.uncertaintyVolumeNode, target)
    assert seg.message.startswith(f"{PROMPT}: ")             # the service's per-segment line

    # a folder source, File > Close Scene while it trains, then Cancel
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(2):
        write_volume(folder / f"case{seed}.nrrd", phantom(seed).image)
    uploads = logic.serviceBackend.uploads
    panel = types.SimpleNamespace(job=None, evidenceSection=types.SimpleNamespace(clear=lambda: None),
                                  setParameterNode=lambda node: None)
    from MedCLIPSAMModuleLib.panels.trainingpanel import WeakSupervisionSection

    panel.weakSection = WeakSupervisionSection(panel)
    closing = mod.MedCLIPSAMWidget.onSceneStartClose
    tag = scene.AddObserver(scene.StartCloseEvent, lambda caller, event: closing(panel, caller, event))
    job = panel.weakSection.job = logic.startWeakSupervision(str(folder), PROMPT, "cancelled net", epochs=2000,
                                                             **TINY)
    assert finish(job, lambda: job.tableNode is not None)
    first, rows = job.tableNode, job.tableNode.GetNumberOfRows()
    scene.Clear(0)                                            # File > Close Scene
    scene.RemoveObserver(tag)
    assert not scene.IsNodePresent(first) and job.isRunning and not job.process.cancelRequested
    # it goes on: the chart comes back in the new scene with every epoch so far, and grows
    assert finish(job, lambda: job.tableNode is not None and job.tableNode.GetNumberOfRows() > rows)
    assert scene.IsNodePresent(job.tableNode) and scene.IsNodePresent(job.chartNode)
    before = scene.GetNumberOfNodes() - 1 - 2 - 1             # without the table, two series, the chart
    job.cancel()
    result = job.wait(timeout=TIMEOUT)
    assert result.status == "cancelled" and result.message == "cancelled; no model was registered"
    assert scene.GetNumberOfNodes() == before
    assert [m["name"] for m in logic.trainedModels(presentOnly=False)] == ["phantom weak"]
    assert logic.serviceBackend.uploads == uploads            # not kept as segmentation uploads


@pytest.mark.slow
def test_a_medclipseg_model_predicts_through_the_service(served, tmp_path, monkeypatch):
    """A tiny MedCLIPSeg model trained by the real CLI, registered in the service's home, run with two
    prompts through the service into one segmentation with one uncertainty volume; no prompt: the model's
    first training prompt."""
    register_conversion_rules()
    from MedCLIPSAMLib import mrml
    from MedCLIPSAMLib.io import write_labelmap, write_volume

    logic = served
    images, labels = [], []
    for seed in range(2):
        ph = phantom(seed, shape=(3, 40, 40))
        images.append(tmp_path / f"vol{seed}.nrrd")
        labels.append(tmp_path / f"vol{seed}-label.nrrd")
        write_volume(images[-1], ph.image)
        write_labelmap(labels[-1], ph.labels["tumor"], ph.image)
    model_dir = tmp_path / "seg-model"
    done = subprocess.run([sys.executable, "-m", "MedCLIPSAMLib", "medclipseg", "train", "--images", *map(str, images),
                           "--labels", *map(str, labels), "--prompts", PROMPT, "--output", str(model_dir), "--model",
                           "tiny-random", "--epochs", "1", "--batch-size", "3", "--device", "cpu", "--no-augment",
                           "--progress", "none"], capture_output=True, text=True, timeout=300,
                          env=dict(logic.environment()))
    assert done.returncode == 0, done.stderr[-2000:]
    monkeypatch.setenv("MEDCLIPSAM_HOME", str(logic.home))   # `medclipsam models trained --add` at the service
    entry = logic.registerTrainedModel(str(model_dir), "tiny seg")
    assert entry["kind"] == "medclipseg" and trained.label(entry) == "MedCLIPSeg (trained): tiny seg"

    target = add_volume(logic.scene, phantom(5, shape=(4, 36, 30)).image, "target")
    result = logic.process(target, f"{PROMPT}\ntumor core", trainedModel="tiny seg", samples=2,
                           computeUncertainty=True, timeout=TIMEOUT, **{k: TINY[k] for k in ("device", "models")})
    assert result.succeeded, result.message
    node = result.segmentationNode
    assert mrml.segment_names(node) == [PROMPT, "tumor core"]
    geometry_matches(logic.exportToLabelmap(node, target), target)
    geometry_matches(result.uncertaintyVolumeNode, target)
    assert logic.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    again = logic.process(target, "", segmentationNode=node, trainedModel="tiny seg", samples=0, timeout=TIMEOUT,
                          **{k: TINY[k] for k in ("device", "models")})
    assert again.succeeded and mrml.segment_names(node) == [PROMPT, "tumor core"]
