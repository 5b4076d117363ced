"""Weak supervision on phantoms: pseudo-labels, training on corrupted labels, the snapshot ensemble and its
uncertainty, prediction geometry, evaluation, torchrun, and one-sentence errors.

The learning test mimics how zero-shot masks go wrong (shifted boxes, over-segmentation, under-segmentation,
bounding boxes instead of outlines, missed cases) on the ground truth of 2D MR phantoms, trains a small
DynUNet on them and checks that the network is better than its own training labels on held-out phantoms.
"""

import contextlib
import io
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from MedCLIPSAMLib.cli import main
from MedCLIPSAMLib.io import geometry_equal, read_segmentation, read_volume, write_labelmap, write_volume
from MedCLIPSAMLib.metrics import dice, normalized_surface_dice
from MedCLIPSAMLib.phantoms import make_image, make_volume

pytest.importorskip("monai")

TARGET = "brain"
N_TRAIN, N_TEST = 24, 8
LEARN = ["--epochs", "20", "--snapshots", "3", "--schedule", "cosine", "--batch-size", "8", "--base-filters", "8",
         "--samples-per-epoch", "48", "--val-fraction", "0.2", "--val-every", "5", "--device", "cpu", "--seed", "0"]
TINY = ["--epochs", "2", "--snapshots", "2", "--batch-size", "4", "--base-filters", "4", "--samples-per-epoch", "8",
        "--device", "cpu", "--progress", "none"]


@contextlib.contextmanager
def one_thread():
    """Training with one thread: on a shared 2-core runner two OpenMP threads per process oversubscribe the
    cores and run ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(*args):
    """main(args) with stdout captured: (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


def corrupt(mask, rng):
    """One way a zero-shot mask goes wrong, drawn at random."""
    kind = rng.choice(["shift", "dilate", "erode", "box", "miss"], p=[0.4, 0.2, 0.15, 0.15, 0.1])
    if kind == "shift":       # the box prompt landed beside the target
        d, a = rng.integers(2, 5), rng.uniform(0, 2 * np.pi)
        return ndimage.shift(mask, (round(d * np.sin(a)), round(d * np.cos(a))), order=0)
    if kind == "dilate":      # over-segmentation into the surroundings
        return ndimage.binary_dilation(mask, iterations=int(rng.integers(2, 4))).astype(np.uint8)
    if kind == "erode":       # under-segmentation
        return ndimage.binary_erosion(mask, iterations=2).astype(np.uint8)
    if kind == "box":         # the coarse box itself instead of an outline
        out = np.zeros_like(mask)
        box = ndimage.find_objects(mask)[0]
        out[tuple(slice(max(0, s.start - 2), s.stop + 2) for s in box)] = 1
        return out
    return np.zeros_like(mask)  # the presence gate missed the case


def image_2d(array, spacing=(0.9, 0.9)):
    img = sitk.GetImageFromArray(array[None])
    img.SetSpacing((spacing[1], spacing[0], 1.0))
    return img


@pytest.fixture(scope="module")
def weak_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("weak")
    for sub in ("images", "labels", "test", "truth"):
        (root / sub).mkdir()
    rng = np.random.default_rng(0)
    pseudo_dice = []
    for i in range(N_TRAIN + N_TEST):
        ph = make_image("mr", size=(64, 64), seed=i, lesion={"size": "large"})
        img, truth = image_2d(ph.image), ph.labels[TARGET].astype(np.uint8)
        if i < N_TRAIN:
            weak = corrupt(truth, rng).astype(np.uint8)
            pseudo_dice.append(dice(weak, truth))
            write_volume(root / "images" / f"case{i:02d}.nrrd", img)
            write_labelmap(root / "labels" / f"case{i:02d}.nrrd", weak[None], img)
        else:
            write_volume(root / "test" / f"case{i:02d}.nrrd", img)
            write_labelmap(root / "truth" / f"case{i:02d}.nrrd", truth[None], img)
    return {"root": root, "pseudo_dice": float(np.mean(pseudo_dice))}


@pytest.fixture(scope="module")
def trained(weak_data):
    root = weak_data["root"]
    with one_thread():
        code, out = run_cli("train-weak", "--images", root / "images", "--labels", root / "labels", "--output",
                            root / "model", "--label-name", "brain", "--progress", "json", *LEARN)
    assert code == 0
    return {"model": root / "model", "progress": [json.loads(line) for line in out.splitlines()]}


def held_out_scores(model, root):
    from MedCLIPSAMLib.training.predict import predict_volume

    dices, unc_wrong, unc_right = [], [], []
    for path in sorted((root / "test").iterdir()):
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "truth" / path.name))) > 0
        pred = predict_volume(model, read_volume(path))
        dices.append(dice(pred.labels, truth))
        wrong = (pred.labels > 0) != truth
        unc_wrong.append(pred.uncertainty[wrong])
        unc_right.append(pred.uncertainty[~wrong])
    return float(np.mean(dices)), np.concatenate(unc_wrong), np.concatenate(unc_right)


# --------------------------------------------------------------------------------------------------
# learning from weak labels


def test_network_trained_on_weak_labels_beats_them(weak_data, trained):
    from MedCLIPSAMLib.training.predict import load_model

    model = load_model(trained["model"], "cpu")
    assert len(model.networks) == 3
    with one_thread():
        ensemble, wrong, right = held_out_scores(model, weak_data["root"])
        snapshots = [held_out_scores(model.snapshot(i), weak_data["root"])[0] for i in range(3)]
    print(f"\nphantom figures ({TARGET}, {N_TRAIN} training / {N_TEST} held-out 64x64 MR slices): pseudo-label "
          f"Dice {weak_data['pseudo_dice']:.3f}; snapshots {', '.join(f'{d:.3f}' for d in snapshots)}; "
          f"ensemble {ensemble:.3f}; uncertainty on errors {wrong.mean():.3f} vs correct {right.mean():.3f}")
    # the labels are wrong in 90% of the cases in uncorrelated ways: the network learns their consensus
    assert 0.7 < weak_data["pseudo_dice"] < 0.85
    assert ensemble > weak_data["pseudo_dice"] + 0.05
    assert max(snapshots) > weak_data["pseudo_dice"] + 0.05
    # entropy of the mean is high where the prediction is wrong and low where it is right
    assert wrong.size and wrong.mean() > 2 * right.mean()
    assert np.median(wrong) > np.median(right)


def test_ensemble_is_the_mean_of_every_snapshot_and_its_entropy(weak_data, trained):
    """The ensemble's probabilities are the mean over all snapshots (not the last one), and its uncertainty
    is the normalised entropy of that mean (not of one snapshot), both worked out here from the snapshots."""
    from MedCLIPSAMLib.training.predict import load_model, predict_volume

    model = load_model(trained["model"], "cpu")
    image = read_volume(sorted((weak_data["root"] / "test").iterdir())[0])
    with one_thread():
        ensemble = predict_volume(model, image)
        alone = [predict_volume(model.snapshot(i), image).probabilities for i in range(len(model.networks))]
    # the snapshots really differ, so a mean over fewer of them (or the last one alone) would show
    assert min(np.abs(a - b).max() for a, b in itertools.combinations(alone, 2)) > 1e-3
    mean = np.mean(alone, axis=0)
    np.testing.assert_allclose(ensemble.probabilities, mean, atol=1e-5)
    p = np.clip(mean, 1e-7, 1.0)
    np.testing.assert_allclose(ensemble.uncertainty, -(p * np.log(p)).sum(0) / np.log(len(mean)), atol=1e-5)
    assert np.array_equal(ensemble.labels, (mean[1] >= model.config["threshold"]).astype(np.uint8))


def test_model_folder_progress_and_metrics(trained):
    import torch

    from MedCLIPSAMLib.training.predict import read_config

    folder = trained["model"]
    config = read_config(folder)
    assert config["label_names"] == ["brain"] and config["classes"] == 2 and config["dims"] == 2
    assert config["patch_size"] == [64, 64]
    assert [s["epoch"] for s in config["snapshots"]] == [13, 17, 20]   # second half of one cosine decay
    for snap in config["snapshots"]:
        state = torch.load(folder / snap["file"], weights_only=True)   # tensors only
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "loss" in r]
    assert [r["epoch"] for r in epochs] == list(range(1, 21))
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert [r["epoch"] for r in epochs if r["val_dice"] is not None] == [5, 10, 13, 15, 17, 20]
    assert records[-1]["event"] == "ensemble" and 0 <= records[-1]["ensemble_val_dice"] <= 1
    assert epochs[-1]["lr"] < 1e-4                                      # annealed to ~0
    assert (folder / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = trained["progress"]
    assert all(set(r) == {"stage", "done", "total", "message"} for r in lines)
    train = [r for r in lines if r["stage"] == "train"]
    assert train[-1]["done"] == train[-1]["total"] == 20 and "loss" in train[-1]["message"]
    assert lines[-1]["stage"] == "finished"
    assert not list(folder.glob(".*part*"))                            # no temp files left


def test_training_is_reproducible_and_replaces_an_old_run(weak_data, tmp_path):
    import torch

    root = weak_data["root"]
    states = []
    with one_thread():
        for name in ("a", "b", "b"):
            assert run_cli("train-weak", "--images", root / "images", "--labels", root / "labels", "--output",
                           tmp_path / name, "--seed", "3", *TINY)[0] == 0
            states.append(torch.load(tmp_path / name / "snapshot-2.pt", weights_only=True))
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert sorted(p.name for p in (tmp_path / "b").glob("snapshot-*.pt")) == ["snapshot-1.pt", "snapshot-2.pt"]


# --------------------------------------------------------------------------------------------------
# network plan and schedule


def test_network_plan_follows_nnunet_rules():
    from MedCLIPSAMLib.training.weak import plan_network

    plan = plan_network((64, 64), (0.8, 0.8))
    assert plan["strides"] == [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]]    # down to 4 x 4
    assert plan["kernel_size"] == [[3, 3]] * 5 and plan["filters"] == [32, 64, 128, 256, 512]
    assert plan["deep_supr_num"] == 2
    # 5 mm slices, 0.8 mm pixels: the slice axis is neither convolved nor pooled while it is more than twice
    # as coarse; after two in-plane poolings (3.2 mm) it is convolved, after which it is pooled too
    plan = plan_network((20, 100, 90), (5.0, 0.8, 0.8))
    assert plan["strides"][:4] == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]]
    assert plan["kernel_size"][:4] == [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert plan["filters"][-1] == 320
    total = np.prod(plan["strides"], axis=0)
    assert all(p % t == 0 and p >= s for p, t, s in zip(plan["patch_size"], total, (20, 100, 90)))
    from MedCLIPSAMLib.errors import MedCLIPSAMError

    with pytest.raises(MedCLIPSAMError, match="too small"):
        plan_network((8, 8), (1.0, 1.0))


def test_schedules_restart_and_snapshot_at_their_lows():
    from MedCLIPSAMLib.training.weak import lr_factor, snapshot_epochs

    assert snapshot_epochs(30, 3, "cyclic") == [10, 20, 30]
    assert snapshot_epochs(20, 3, "cosine") == [13, 17, 20]
    ends = snapshot_epochs(30, 3, "cyclic")
    assert lr_factor(0, 4, ends) == 1.0 and lr_factor(40, 4, ends) == 1.0       # restart at epoch 10
    assert lr_factor(39, 4, ends) < 0.01 and lr_factor(119, 4, ends) < 0.01   # lowest at each snapshot
    assert lr_factor(20, 4, [30]) == pytest.approx(0.5 * (1 + np.cos(np.pi * 20 / 120)))


# --------------------------------------------------------------------------------------------------
# predict


def test_predict_keeps_the_exact_grid_of_an_oblique_anisotropic_volume(trained, tmp_path):
    with one_thread():
        _predict_keeps_the_grid(trained, tmp_path)


def _predict_keeps_the_grid(trained, tmp_path):
    from MedCLIPSAMLib.training.predict import load_model, predict_volume

    ph = make_volume("mr", shape=(5, 44, 40), spacing=(1.1, 0.9, 3.0), origin=(12.0, -30.0, 7.5),
                     direction="oblique", seed=4)
    vol = tmp_path / "oblique.nrrd"
    write_volume(vol, ph.image)
    seg, unc, lab = tmp_path / "out.seg.nrrd", tmp_path / "unc.nrrd", tmp_path / "out.nii.gz"
    assert run_cli("predict", trained["model"], vol, "--output", seg, "--uncertainty-output", unc,
                   "--progress", "none", "--device", "cpu")[0] == 0
    segments, reference = read_segmentation(seg)
    assert geometry_equal(reference, ph.image) and [s["name"] for s in segments] == ["brain"]
    unc_img = sitk.ReadImage(str(unc))
    assert geometry_equal(unc_img, ph.image)
    u = sitk.GetArrayFromImage(unc_img)
    assert u.dtype == np.float32 and 0.0 <= u.min() and u.max() <= 1.0
    assert run_cli("predict", trained["model"], vol, "--output", lab, "--prompt-name", "whole brain",
                   "--threshold", "0.5", "--progress", "none", "--device", "cpu")[0] == 0
    # same answer as the library, slice by slice through the patient-space axial view
    model = load_model(trained["model"], "cpu")
    expected = predict_volume(model, ph.image, threshold=0.5).labels
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(lab))), expected)
    assert np.array_equal(segments[0]["mask"] > 0, predict_volume(model, ph.image).labels > 0)


def _bad(*args):
    """Bad input: exit 2 and one sentence on the whole of stderr. In-process, log records reach pytest's
    handlers instead of stderr, so they are collected too: any the CLI would print fails the check."""
    err, records = io.StringIO(), []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, _ = run_cli(*args)
    finally:
        logging.getLogger().removeHandler(handler)
    printed = [r.getMessage() for r in records
               if r.levelno >= (logging.INFO if r.name.startswith("medclipsam") else logging.WARNING)]
    printed += [str(w.message) for w in caught]
    assert code == 2, err.getvalue()
    text = err.getvalue().strip()
    assert text.startswith("medclipsam: error: ") and "\n" not in text and not printed, (text, printed)
    return text


def test_predict_and_train_bad_inputs_get_one_sentence(trained, weak_data, tmp_path):
    model = trained["model"]
    vol = tmp_path / "v.nrrd"
    write_volume(vol, make_volume("mr", shape=(3, 24, 24), seed=1).image)
    out = tmp_path / "o.seg.nrrd"
    assert "does not exist" in _bad("predict", tmp_path / "nomodel", vol, "--output", out)
    (tmp_path / "empty").mkdir()
    assert "not a model folder" in _bad("predict", tmp_path / "empty", vol, "--output", out)
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "snapshot-2.pt").write_bytes(b"not a checkpoint")
    assert "corrupt" in _bad("predict", broken, vol, "--output", out, "--device", "cpu", "--progress", "none")
    assert "threshold" in _bad("predict", model, vol, "--output", out, "--threshold", "1.5")
    assert "must end with" in _bad("predict", model, vol, "--output", tmp_path / "o.txt")
    assert "does not exist" in _bad("predict", model, tmp_path / "missing.nrrd", "--output", out, "--progress", "none")
    arr = np.zeros((3, 24, 24), np.float32)
    arr[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "nan.nrrd"))
    assert "NaN" in _bad("predict", model, tmp_path / "nan.nrrd", "--output", out, "--progress", "none")
    assert "--prompt-name" in _bad("predict", model, vol, "--output", out, "--prompt-name", "a", "--prompt-name", "b")
    assert not out.exists() and not list(tmp_path.glob(".*part*"))

    root = weak_data["root"]
    assert "no image matches" in _bad("train-weak", "--images", root / "images", "--labels", root / "truth",
                                      "--output", tmp_path / "m", *TINY)
    assert "--snapshots" in _bad("train-weak", "--images", root / "images", "--labels", root / "labels",
                                 "--output", tmp_path / "m", *TINY[:2], "--snapshots", "5")
    assert "does not exist" in _bad("train-weak", "--images", tmp_path / "nothing", "--labels", root / "labels",
                                    "--output", tmp_path / "m")
    # a label on another grid than its image
    (tmp_path / "imgs").mkdir()
    (tmp_path / "labs").mkdir()
    write_volume(tmp_path / "imgs" / "a.nrrd", image_2d(np.zeros((32, 32), np.float32)))
    coarser = image_2d(np.zeros((32, 32)), (2.0, 2.0))
    write_labelmap(tmp_path / "labs" / "a.nrrd", np.zeros((1, 32, 32), np.uint8), coarser)
    assert "not on the grid" in _bad("train-weak", "--images", tmp_path / "imgs", "--labels", tmp_path / "labs",
                                     "--output", tmp_path / "m", *TINY)
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_matches_direct_metrics_with_anisotropic_spacing_and_2d(tmp_path):
    from MedCLIPSAMLib.io import write_segmentation

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    ph = make_volume("mr", shape=(10, 40, 36), spacing=(0.7, 1.3, 2.5), direction="oblique", seed=2)
    truth = ph.labels["ventricles"]
    guess = ndimage.binary_dilation(ndimage.shift(truth, (0, 1, 2), order=0), iterations=1).astype(np.uint8)
    write_labelmap(gt / "vol.nii.gz", truth, ph.image)
    write_segmentation(pred / "vol.seg.nrrd", [{"name": "ventricles", "mask": guess}], ph.image)
    flat = make_image("mr", size=(50, 60), seed=3, lesion={"size": "large"})
    img2d = image_2d(flat.image, spacing=(0.6, 1.4))
    t2 = flat.labels["tumor"]
    g2 = ndimage.shift(t2, (4, 1), order=0)     # 2.4 mm down, 1.4 mm across: beyond 2 mm only in rows
    write_labelmap(gt / "flat.nrrd", t2[None], img2d)
    write_labelmap(pred / "flat.nrrd", g2[None] * 3, img2d)         # any non-zero value counts
    empty = np.zeros((1, 20, 20), np.uint8)
    e_img = image_2d(np.zeros((20, 20), np.float32))
    write_labelmap(gt / "empty.nrrd", empty, e_img)
    write_labelmap(pred / "empty.nrrd", empty, e_img)
    write_labelmap(gt / "missed.nrrd", empty + 1, e_img)
    write_labelmap(pred / "missed.nrrd", empty, e_img)
    write_labelmap(gt / "unpredicted.nrrd", empty + 1, e_img)       # no prediction: scored as empty, counted

    csv_path = tmp_path / "scores.csv"
    code, out = run_cli("evaluate", "--pred", pred, "--gt", gt, "--csv", csv_path, "--tolerance-mm", "2")
    assert code == 0 and "mean" in out and "1 reference case(s) had no prediction" in out and "unpredicted" in out
    rows = {r.split(",")[0]: r.split(",")[1:] for r in csv_path.read_text().splitlines()[1:]}
    assert rows["unpredicted"][2] == "missing" and rows["vol"][2] == "found"
    spacing3 = tuple(reversed(sitk.ReadImage(str(gt / "vol.nii.gz")).GetSpacing()))   # as NIfTI stored it
    expected = {
        "vol": (dice(guess, truth), normalized_surface_dice(guess, truth, spacing3, 2.0)),
        "flat": (dice(g2, t2), normalized_surface_dice(g2, t2, (0.6, 1.4), 2.0)),
        "empty": (1.0, 1.0),
        "missed": (0.0, 0.0),
        "unpredicted": (0.0, 0.0),
    }
    assert set(rows) == set(expected) | {"mean"}
    for name, (d, n) in expected.items():
        assert float(rows[name][0]) == pytest.approx(d, abs=1e-6) and float(rows[name][1]) == pytest.approx(n, abs=1e-6)
    assert 0 < expected["vol"][1] < 1 and 0 < expected["flat"][1] < 1
    assert float(rows["mean"][0]) == pytest.approx(np.mean([v[0] for v in expected.values()]), abs=1e-6)
    # a segment picked by name (the labelmap's name from its data set's nnU-Net label table); shapes that do
    # not match are an error
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "ventricles": 1}}))
    code, out = run_cli("evaluate", "--pred", pred / "vol.seg.nrrd", "--gt", gt / "vol.nii.gz", "--label", "ventricles")
    assert code == 0
    assert "no segment 'liver'" in _bad("evaluate", "--pred", pred / "vol.seg.nrrd", "--gt", gt / "vol.nii.gz",
                                         "--label", "liver")
    assert "shape" in _bad("evaluate", "--pred", pred / "flat.nrrd", "--gt", gt / "empty.nrrd")
    # a label name no label table defines is an error, not every non-zero voxel
    assert "not one of its labels" in _bad("evaluate", "--pred", pred / "flat.nrrd", "--gt", gt / "flat.nrrd",
                                           "--label", "liver")
    # a prediction on another grid (same shape, other spacing) is an error, not a warning
    (tmp_path / "moved").mkdir()
    write_labelmap(tmp_path / "moved" / "flat.nrrd", g2[None], image_2d(flat.image, spacing=(0.6, 1.5)))
    assert "not on the grid" in _bad("evaluate", "--pred", tmp_path / "moved" / "flat.nrrd", "--gt", gt / "flat.nrrd")


# --------------------------------------------------------------------------------------------------
# pseudo-labels


def test_pseudo_label_end_to_end_resumes_and_exports_nnunet(tmp_path):
    from MedCLIPSAMLib.training.pseudo_labels import case_confidence, nnunet_dataset_name

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    ph = make_volume("mr", shape=(3, 32, 28), spacing=(1.1, 0.9, 3.0), direction="oblique", seed=0)
    write_volume(data / "vol.nrrd", ph.image)
    flat = make_image("mr", size=(40, 48), seed=1)
    sitk.WriteImage(sitk.GetImageFromArray(np.clip(flat.image / flat.image.max() * 255, 0, 255).astype(np.uint8)),
                    str(data / "xray.png"))
    args = ["pseudo-label", data, "--prompt", "brain tumor", "--output-dir", out, "--models", "tiny-random",
            "--sam", "none", "--preset", "fast", "--device", "cpu"]
    code, stdout = run_cli(*args, "--progress", "json", "--nnunet-dataset", "501")
    assert code == 0
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert all(set(r) == {"stage", "done", "total", "message"} for r in lines)
    assert [r for r in lines if r["stage"] == "pseudo-label"][-1]["done"] == 2 and lines[-1]["stage"] == "finished"
    summary = json.loads((out / "pseudo_labels.json").read_text())
    assert summary["labels"] == {"background": 0, "brain tumor": 1} and len(summary["cases"]) == 2
    for case, source in (("vol", data / "vol.nrrd"), ("xray", data / "xray.png")):
        label = read_volume(out / "labels" / f"{case}.nrrd")
        assert geometry_equal(label, read_volume(source))               # on the input's own grid
        record = next(r for r in summary["cases"] if r["case"] == case)
        assert 0.0 <= record["confidence"] <= 1.0
        assert record["voxels"] == int(np.count_nonzero(sitk.GetArrayFromImage(label)))
    assert (out / "pseudo_labels.csv").read_text().splitlines()[0] == "case,image,label,confidence,voxels,error"
    assert sorted((out / "labels.txt").read_text().split()) == ["labels/vol.nrrd", "labels/xray.nrrd"]

    ds = out / "nnUNet_raw" / "Dataset501_BrainTumor"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "zscore"} and meta["labels"] == {"background": 0, "brain tumor": 1}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (ds / "imagesTr").iterdir()) == ["vol_0000.nii.gz", "xray_0000.nii.gz"]
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == ["vol.nii.gz", "xray.nii.gz"]
    for case in ("vol", "xray"):
        img = sitk.ReadImage(str(ds / "imagesTr" / f"{case}_0000.nii.gz"))
        lab = sitk.ReadImage(str(ds / "labelsTr" / f"{case}.nii.gz"))
        assert geometry_equal(img, lab) and img.GetSize() == lab.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(lab))) <= {0, 1}

    # resume: nothing is redone
    stamp = os.path.getmtime(out / "labels" / "vol.nrrd")
    code, stdout = run_cli(*args, "--progress", "none")
    assert code == 0 and "0 case(s) to label" in stdout and os.path.getmtime(out / "labels" / "vol.nrrd") == stamp

    # confidence definition and data set names
    assert case_confidence(np.zeros((2, 2)), np.zeros((2, 2))) == 0.0
    assert case_confidence(np.ones((2, 2)), np.full((2, 2), 0.25)) == pytest.approx(0.75)
    assert nnunet_dataset_name("Dataset042_Liver", ["x"]) == "Dataset042_Liver"
    assert nnunet_dataset_name("Liver", ["x"]) == "Dataset500_Liver"
    # bad input: an empty prompt, a bad data set name, a missing folder
    assert "empty" in _bad("pseudo-label", data, "--prompt", " ", "--output-dir", out)
    assert "nnU-Net" in _bad("pseudo-label", data, "--prompt", "x", "--output-dir", out, "--nnunet-dataset", "a b")
    assert "does not exist" in _bad("pseudo-label", tmp_path / "nope", "--prompt", "x", "--output-dir", out)


# --------------------------------------------------------------------------------------------------
# 3D and torchrun


def test_3d_network_trains_and_predicts_on_the_input_grid(tmp_path):
    from MedCLIPSAMLib.io import write_segmentation
    from MedCLIPSAMLib.training.predict import load_model, predict_volume

    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for i in range(2):
        ph = make_volume("mr", shape=(8, 32, 32), spacing=(1.0, 1.0, 2.5), direction="ras", seed=i)
        write_volume(tmp_path / "img" / f"v{i}_0000.nii.gz", ph.image)          # nnU-Net image names
        segments = [{"name": "ventricles", "mask": ph.labels["ventricles"]}]
        write_segmentation(tmp_path / "lab" / f"v{i}.seg.nrrd", segments, read_volume(tmp_path / "img" / f"v{i}_0000.nii.gz"))
    with one_thread():
        assert run_cli("train-weak", "--images", tmp_path / "img", "--labels", tmp_path / "lab", "--output",
                       tmp_path / "m3", "--dims", "3", *TINY)[0] == 0
    model = load_model(tmp_path / "m3", "cpu")
    assert model.config["dims"] == 3 and model.config["network"]["kernel_size"][0] == [1, 3, 3]
    assert model.config["label_names"] == ["ventricles"]                        # named by the .seg.nrrd
    ph = make_volume("mr", shape=(7, 30, 26), spacing=(1.0, 1.2, 2.5), direction="oblique", seed=5)
    pred = predict_volume(model, ph.image)
    assert pred.labels.shape == pred.uncertainty.shape == tuple(reversed(ph.image.GetSize()))


def test_sigterm_cancels_training_and_keeps_the_finished_snapshots(weak_data, tmp_path):
    root, folder = weak_data["root"], tmp_path / "m"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "MedCLIPSAMLib", "train-weak", "--images", str(root / "images"),
                             "--labels", str(root / "labels"), "--output", str(folder), "--epochs", "100",
                             "--snapshots", "100", "--base-filters", "4", "--batch-size", "4", "--samples-per-epoch",
                             "8", "--device", "cpu", "--progress", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:   # wait until two epochs (and snapshots) are done
        record = json.loads(line)
        if record["stage"] == "train" and record["done"] >= 2:
            break
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert json.loads(rest.splitlines()[-1])["stage"] == "cancelled"
    assert "Traceback" not in err and "cancelled" in err
    config = json.loads((folder / "config.json").read_text())
    listed = sorted(s["file"] for s in config["snapshots"])
    assert len(listed) >= 2 and listed == sorted(p.name for p in folder.glob("snapshot-*.pt"))
    assert not list(folder.glob(".*part*"))


@pytest.mark.slow
def test_torchrun_trains_with_ddp_on_cpu(weak_data, tmp_path, torchrun):
    root = weak_data["root"]
    r = torchrun(["train-weak", "--images", root / "images", "--labels", root / "labels", "--output",
                  tmp_path / "ddp", *TINY])
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "loss" in r] == [1, 2]            # rank 0 alone writes
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["snapshots"][-1]["file"] == "snapshot-2.pt"
