"""The Slicer module's training parts without the Slicer application (slicer-core, real MRML scene):
the trained-model registry, the command lines the Logic builds for pseudo-label / train-weak / predict /
medclipseg predict (checked by the real parser), and the Logic driving the REAL CLI with tiny settings:
weak supervision on phantom volumes (progress, metrics table and chart, registration, segmenting with the
trained model), Cancel during training, and a tiny MedCLIPSeg model segmenting through the Logic.

The real-CLI runs use random-weight models: the masks mean nothing, the plumbing is what is checked.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
sitk = pytest.importorskip("SimpleITK")

from test_slicer_module import _alive, load_module_file, register_conversion_rules  # noqa: E402

from MedCLIPSAMModuleLib import commands, progress, trained, weak  # noqa: E402

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
    assert [m["name"] for m in logic.trainedModels()] == ["my net", "s"]
    with pytest.raises(ValueError, match="not a trained model folder"):
        logic.registerTrainedModel(str(tmp_path))
    with pytest.raises(ValueError, match="no trained model named"):
        logic.trainedModel("unknown")
    (tmp_path / "s" / "medclipseg.safetensors").unlink()
    assert [m["name"] for m in logic.trainedModels()] == ["my net"]
    with pytest.raises(ValueError, match="no longer complete"):
        logic.trainedModel("s")
    logic.removeTrainedModel("s")
    with pytest.raises(ValueError):
        logic.removeTrainedModel("s")
    assert logic.defaultTrainingFolder() == str(home / "trained")


def test_weak_supervision_refuses_bad_input(logic, tmp_path):
    import tempfile

    volume = add_volume(logic.scene, phantom(0).image, "v")
    temporary = set(Path(tempfile.gettempdir()).glob("MedCLIPSAM-*"))
    for images, prompts, name, match in (
            ([volume], " \n ", "m", "prompt"),
            ([], PROMPT, "m", "Load at least one volume"),
            (str(tmp_path / "nope"), PROMPT, "m", "does not exist"),
            ([volume], PROMPT, "  ", "name"),
    ):
        with pytest.raises(ValueError, match=match):
            logic.startWeakSupervision(images, prompts, name, outputFolder=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="epoch"):
        logic.startWeakSupervision([volume], PROMPT, "m", outputFolder=str(tmp_path / "out"), epochs=0)
    assert set(Path(tempfile.gettempdir()).glob("MedCLIPSAM-*")) == temporary  # no temporary folder left
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- command lines
def test_training_command_lines_are_accepted_by_the_real_parser(mod):
    from MedCLIPSAMLib.cli import build_parser

    parser = build_parser()
    cli = mod.MedCLIPSAMLogic().cliCommand()

    args = parser.parse_args(commands.pseudoLabel(cli, ["/d"], "/pl", "a\nb\nA", preset="fast", axis="coronal",
                                                           device="cpu", models="tiny-random",
                                                           extraArgs=["--sam", "none"])[3:])
    assert (args.command, args.data, args.prompt, args.output_dir) == ("pseudo-label", ["/d"], ["a", "b"], "/pl")
    assert (args.preset, args.axis, args.device, args.models, args.sam, args.progress) == (
        "fast", "coronal", "cpu", "tiny-random", "none", "json")

    args = parser.parse_args(commands.trainWeak(cli, "/d", "/pl/labels.txt", "/m", ["liver", "spleen"], epochs=3,
                                                         dims=3, axis="sagittal", device="cuda", batchSize=4,
                                                         baseFilters=4, samplesPerEpoch=8, patchSize=(16, 16, 8))[3:])
    assert (args.command, args.images, args.labels, args.output) == ("train-weak", ["/d"], ["/pl/labels.txt"], "/m")
    assert (args.epochs, args.dims, args.axis, args.device, args.progress) == (3, 3, "sagittal", "cuda", "json")
    assert args.snapshots == 3  # the CLI's default 5 would exceed 3 epochs
    assert args.label_name == ["liver", "spleen"] and args.patch_size == [16, 16, 8]
    assert (args.batch_size, args.base_filters, args.samples_per_epoch) == (4, 4, 8)
    with pytest.raises(ValueError):
        commands.trainWeak(cli, "/d", "/l", "/m", ["x"], dims=4)

    args = parser.parse_args(commands.predict(cli, "/m", "in.nrrd", "o.seg.nrrd", "mps", "u.nrrd")[3:])
    assert (args.command, args.model, args.volume, args.output, args.uncertainty_output) == (
        "predict", "/m", "in.nrrd", "o.seg.nrrd", "u.nrrd")
    assert args.device == "mps" and args.progress == "json"
    assert "--uncertainty-output" not in commands.predict(cli, "/m", "i", "o.seg.nrrd")

    args = parser.parse_args(commands.medclipsegPredict(cli, "/m", "in.nrrd", " liver  tumor ", "o.seg.nrrd",
                                                                 "cpu", "u.nrrd", samples=4)[3:])
    assert (args.command, args.medclipseg_command, args.model_dir, args.input) == ("medclipseg", "predict", "/m",
                                                                                   "in.nrrd")
    assert (args.prompt, args.output, args.uncertainty_output, args.samples, args.progress) == (
        "liver tumor", "o.seg.nrrd", "u.nrrd", 4, "json")
    with pytest.raises(ValueError):
        commands.medclipsegPredict(cli, "/m", "i", " ", "o.seg.nrrd")


def test_metrics_table_and_chart(mod, logic, tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "loss": 1.5, "lr": 0.01, "val_dice": null}\nnot json\n'
                    '{"epoch": 2, "loss": 1.25, "lr": 0.005, "val_dice": 0.4}\n'
                    '{"epoch": 2, "event": "ensemble", "ensemble_val_dice": 0.5}\n{"epoch": 3, "lo')
    records = progress.readMetricsFile(str(path))
    assert [r["epoch"] for r in records] == [1, 2]
    table, series, chart = weak.createMetricsPlot(logic.scene, "m")
    weak.updateMetricsTable(table, records)
    assert table.GetNumberOfRows() == 2
    assert [table.GetTable().GetValueByName(i, "loss").ToDouble() for i in range(2)] == [1.5, 1.25]
    assert np.isnan(table.GetTable().GetValueByName(0, "val_dice").ToDouble())
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    assert [chart.GetNthPlotSeriesNodeID(i) for i in range(2)] == [s.GetID() for s in series]
    assert all(s.GetTableNodeID() == table.GetID() for s in series)
    assert [s.GetYColumnName() for s in series] == ["loss", "val_dice"]


# ------------------------------------------------------------------------------------- the real CLI
def _tiny_training(**overrides):
    """The smallest real run: random models, no SAM for the pseudo-labels, a 4-filter network."""
    return dict(dict(epochs=2, dims=2, device="cpu", preset="fast", models="tiny-random", snapshots=2, batchSize=4,
                     baseFilters=4, samplesPerEpoch=8, pseudoLabelArgs=["--sam", "none"]), **overrides)


@pytest.mark.slow
def test_weak_supervision_with_the_real_cli_then_segment_with_the_model(logic, tmp_path):
    """Three phantom volumes from the scene -> pseudo-label (tiny-random) -> train-weak (2 epochs) ->
    registered -> `predict` through the segmentation path, with an uncertainty volume."""
    register_conversion_rules()
    scene = logic.scene
    volumes = [add_volume(scene, phantom(seed).image, f"phantom {seed}") for seed in range(3)]
    events, logs, metrics, done = [], [], [], []
    started = time.monotonic()
    job = logic.startWeakSupervision(volumes, PROMPT, "phantom weak", outputFolder=str(tmp_path / "models"),
                                     progressCallback=events.append, logCallback=logs.append,
                                     metricsCallback=lambda t, c: metrics.append((t, c)),
                                     completedCallback=done.append, **_tiny_training())
    result = job.wait(timeout=600)
    trained_s = time.monotonic() - started
    assert result.succeeded, result.message + "\n" + "\n".join(logs[-20:])
    assert done == [result] and not os.path.exists(job.tempDir)

    # progress over both steps: the fraction only grows and ends at 1
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(set(fractions)) >= 4
    assert {e["step"] for e in events} == {"pseudo-label", "train-weak"}
    assert any(e["stage"] == "train" for e in events)

    # the table mirrors metrics.jsonl, one row per epoch; the chart shows its two series
    model_dir = tmp_path / "models" / "phantom_weak"
    assert result.modelDir == str(model_dir)
    lines = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "loss" in r]
    table, chart = result.tableNode, result.chartNode
    assert metrics and metrics[-1] == (table, chart) and len(epochs) == 2
    assert table.GetNumberOfRows() == len(epochs)
    for row, record in enumerate(epochs):
        assert table.GetTable().GetValueByName(row, "epoch").ToDouble() == record["epoch"]
        assert table.GetTable().GetValueByName(row, "loss").ToDouble() == record["loss"]
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    for i in range(2):
        series = scene.GetNodeByID(chart.GetNthPlotSeriesNodeID(i))
        assert series.GetTableNodeID() == table.GetID()

    # registered, with the kind read from the folder
    entry = logic.trainedModel("phantom weak")
    assert (entry["kind"], entry["folder"], entry["labels"]) == ("weak", str(model_dir), [PROMPT])
    assert result.model["name"] == "phantom weak"

    # segment another volume (another grid) with it: segment named by the model, geometry, uncertainty
    target_image = phantom(9, shape=(5, 30, 26), direction="ras").image
    target = add_volume(scene, target_image, "target")
    started = time.monotonic()
    seg_events = []
    seg = logic.process(target, "", trainedModel="phantom weak", device="cpu", computeUncertainty=True,
                        progressCallback=seg_events.append, timeout=300)
    predict_s = time.monotonic() - started
    assert seg.succeeded, seg.message
    from MedCLIPSAMLib import mrml

    assert mrml.segment_names(seg.segmentationNode) == [PROMPT]
    labelmap = logic.exportToLabelmap(seg.segmentationNode, target)
    geometry_matches(labelmap, target)
    assert seg.uncertaintyVolumeNode is not None
    geometry_matches(seg.uncertaintyVolumeNode, target)
    assert seg_events[-1]["stage"] == "finished"
    print(f"\nweak supervision via the Logic: {trained_s:.1f} s (pseudo-label + train-weak), predict {predict_s:.1f} s")


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX")
def test_cancel_during_training_kills_the_process_tree_and_registers_nothing(logic, tmp_path):
    """A folder as the image source; Cancel once train-weak runs: the process is gone, the scene (the
    metrics table and chart included) is as before, nothing is registered, the temporary folder is gone."""
    folder = tmp_path / "images"
    folder.mkdir()
    from MedCLIPSAMLib.io import write_volume

    for seed in range(2):
        write_volume(folder / f"case{seed}.nrrd", phantom(seed).image)
    before = logic.scene.GetNumberOfNodes()
    events = []
    job = logic.startWeakSupervision(str(folder), PROMPT, "cancelled net", outputFolder=str(tmp_path / "models"),
                                     progressCallback=events.append,
                                     **_tiny_training(epochs=2000, snapshots=1))
    deadline = time.monotonic() + 300
    # wait for a finished epoch (the metrics table exists by then)
    while job.poll() and time.monotonic() < deadline and not (
            job.tableNode is not None and any(e["stage"] == "train" and e["done"] >= 1 for e in events)):
        time.sleep(0.05)
    assert job.isRunning and job.process.step == 1 and job.tableNode is not None
    pid = job.process.proc.pid
    assert _alive(pid)
    started = time.monotonic()
    job.cancel()
    result = job.wait(timeout=60)
    assert result.status == "cancelled", result.message
    assert time.monotonic() - started < 15
    assert job.process.returnCode is not None and not _alive(pid)
    assert logic.trainedModels(presentOnly=False) == []
    assert logic.scene.GetNumberOfNodes() == before
    assert not os.path.exists(job.tempDir)


@pytest.mark.slow
def test_medclipseg_model_segments_through_the_logic(logic, tmp_path):
    """A tiny MedCLIPSeg model trained by the real CLI, registered from its folder, run per prompt (two
    prompts: two processes) and merged into one segmentation with one uncertainty volume."""
    register_conversion_rules()
    from MedCLIPSAMLib.io import write_labelmap, write_volume

    images, labels = [], []
    for seed in range(2):
        ph = phantom(seed, shape=(3, 40, 40))
        images.append(tmp_path / f"vol{seed}.nrrd")
        labels.append(tmp_path / f"vol{seed}-label.nrrd")
        write_volume(images[-1], ph.image)
        write_labelmap(labels[-1], ph.labels["tumor"], ph.image)
    model_dir = tmp_path / "seg-model"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "MedCLIPSAMLib", "medclipseg", "train", "--images", *map(str, images),
                           "--labels", *map(str, labels), "--prompts", PROMPT, "--output", str(model_dir), "--model",
                           "tiny-random", "--epochs", "1", "--batch-size", "3", "--device", "cpu", "--no-augment",
                           "--progress", "none"], capture_output=True, text=True, timeout=300,
                          env=dict(logic.environment()))
    assert done.returncode == 0, done.stderr[-2000:]
    train_s = time.monotonic() - started

    entry = logic.registerTrainedModel(str(model_dir), "tiny seg")
    assert entry["kind"] == "medclipseg" and entry["labels"] == [PROMPT]
    assert trained.label(entry) == "MedCLIPSeg (trained): tiny seg"

    target = add_volume(logic.scene, phantom(5, shape=(4, 36, 30)).image, "target")
    events = []
    started = time.monotonic()
    result = logic.process(target, f"{PROMPT}\ntumor core", trainedModel="tiny seg", device="cpu", samples=2,
                           computeUncertainty=True, progressCallback=events.append, timeout=300)
    predict_s = time.monotonic() - started
    assert result.succeeded, result.message
    from MedCLIPSAMLib import mrml

    node = result.segmentationNode
    assert mrml.segment_names(node) == [PROMPT, "tumor core"]
    geometry_matches(logic.exportToLabelmap(node, target), target)
    assert result.uncertaintyVolumeNode is not None
    geometry_matches(result.uncertaintyVolumeNode, target)
    assert logic.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    fractions = [e["fraction"] for e in events if e["fraction"] is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(e["message"].startswith("2/2: ") for e in events)

    # no prompt: the model's first training prompt
    again = logic.process(target, "", segmentationNode=node, trainedModel="tiny seg", device="cpu", samples=0,
                          timeout=300)
    assert again.succeeded and mrml.segment_names(node) == [PROMPT, "tumor core"]
    print(f"\nMedCLIPSeg: train {train_s:.1f} s, predict with 2 prompts via the Logic {predict_s:.1f} s")
