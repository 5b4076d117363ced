"""train-weak --trainer nnunetv2: nnU-Net v2 itself on a tiny 2D phantom data set (the shortest schedule),
then predict on an oblique volume (exact grid, uncertainty, the snapshots' mean) and on an anisotropic permuted
one (voxels compared with nnU-Net reading the file itself), the trained-model registry, cancel during
nnU-Net's training, and the missing extra (a real import failure in a subprocess).
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedCLIPSAMLib.cli import main
from MedCLIPSAMLib.io import geometry_equal, read_segmentation, read_volume, write_labelmap, write_volume
from MedCLIPSAMLib.phantoms import make_image, make_volume

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--trainer", "nnunetv2", "--epochs", "2", "--snapshots", "2", "--iterations-per-epoch", "2",
         "--device", "cpu"]


def run_cli(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


def _bad(*args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code, _ = run_cli(*args)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2, err.getvalue()
    assert "Traceback" not in err.getvalue() and lines[-1].startswith("medclipsam: error: ")
    return lines[-1]


def subprocess_env(**extra):
    # the worktree's code first (also for nnU-Net's spawned workers), one thread per process on CI's 2 cores
    path = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """An nnU-Net raw data set as pseudo-label --nnunet-dataset writes it: 6 one-slice MR phantoms, small
    enough (32 x 32) that nnU-Net plans a 4-stage network: a CPU trains and predicts it in seconds."""
    root = tmp_path_factory.mktemp("nnunet") / "Dataset501_Brain"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(6):
        ph = make_image("mr", size=(32, 32), seed=i, lesion={"size": "large"})
        img = sitk.GetImageFromArray(ph.image[None])
        img.SetSpacing((0.9, 0.9, 1.0))
        write_volume(root / "imagesTr" / f"case{i:02d}_0000.nii.gz", img)
        write_labelmap(root / "labelsTr" / f"case{i:02d}.nii.gz", ph.labels["brain"].astype(np.uint8)[None], img)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "zscore"}, "labels": {"background": 0, "brain": 1}, "numTraining": 6,
        "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO"}))
    return root


@pytest.fixture(scope="module")
def trained(dataset):
    pytest.importorskip("nnunetv2")
    import torch

    model = dataset.parent / "model"
    before, env_before = torch.get_num_threads(), {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_results")}
    torch.set_num_threads(1)
    try:
        code, out = run_cli("train-weak", "--dataset", dataset, "--output", model, "--progress", "json", *SHORT)
    finally:
        torch.set_num_threads(before)
    assert code == 0
    assert {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_results")} == env_before   # nothing leaked
    return {"model": model, "progress": [json.loads(line) for line in out.splitlines()]}


@pytest.mark.slow
def test_nnunet_trains_in_its_own_folders_and_predicts_on_the_exact_grid(trained, tmp_path, monkeypatch):
    from MedCLIPSAMLib import trained_models
    from MedCLIPSAMLib.training.predict import entropy, load_model, predict_volume

    model, lines = trained["model"], trained["progress"]
    # --progress json: only progress records on stdout (nnU-Net's own output went to its log)
    assert all(set(r) == {"stage", "done", "total", "message"} for r in lines)
    stages = [r["stage"] for r in lines]
    assert {"plan", "train", "write"} <= set(stages) and stages[-1] == "finished"
    assert [r["done"] for r in lines if r["stage"] == "train"] == [0, 1, 2]
    config = json.loads((model / "config.json").read_text())
    assert config["trainer"] == "nnunetv2" and config["nnunet"]["configuration"] == "2d"
    assert config["label_names"] == ["brain"] and config["threshold"] == 0.2
    assert [s["file"] for s in config["snapshots"]] == ["snapshot-1.pt", "snapshot-2.pt"]
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        assert (model / sub).is_dir()                                   # nnU-Net's folders inside the model
    assert (model / config["nnunet"]["results"] / "plans.json").is_file()
    assert [json.loads(x)["epoch"] for x in (model / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not [p for p in model.parent.iterdir() if p.name.startswith(".")]   # no working folder left

    ph = make_volume("mr", shape=(5, 44, 40), spacing=(1.1, 0.9, 3.0), origin=(12.0, -30.0, 7.5),
                     direction="oblique", seed=4)
    vol = tmp_path / "oblique.nrrd"
    write_volume(vol, ph.image)
    seg, unc = tmp_path / "out.seg.nrrd", tmp_path / "unc.nrrd"
    assert run_cli("predict", model, vol, "--output", seg, "--uncertainty-output", unc, "--progress", "none",
                   "--device", "cpu")[0] == 0
    segments, reference = read_segmentation(seg)
    assert geometry_equal(reference, ph.image) and [s["name"] for s in segments] == ["brain"]
    unc_img = sitk.ReadImage(str(unc))
    assert geometry_equal(unc_img, ph.image)
    u = sitk.GetArrayFromImage(unc_img)
    assert u.dtype == np.float32 and 0.0 <= u.min() and u.max() <= 1.0

    # the ensemble is the mean of its members' probabilities, thresholded at 0.2, entropy of the mean
    loaded = load_model(model, "cpu")
    pred = predict_volume(loaded, ph.image)
    members = [predict_volume(loaded.snapshot(i), ph.image).probabilities for i in range(2)]
    np.testing.assert_allclose(pred.probabilities, np.mean(members, axis=0), atol=1e-6)
    np.testing.assert_array_equal(pred.labels, (pred.probabilities[1] >= 0.2).astype(np.uint8))
    np.testing.assert_allclose(pred.uncertainty, entropy(pred.probabilities), atol=1e-6)
    np.testing.assert_array_equal(segments[0]["mask"] > 0, pred.labels > 0)

    # a DICOM series in, a DICOM SEG out: the same masks as the .seg.nrrd, the trainer named
    pytest.importorskip("highdicom")
    from test_dicom_seg import read_back, write_series

    uids, _ = write_series(ph.image, tmp_path / "series")
    dcm = tmp_path / "out.dcm"
    assert run_cli("predict", model, tmp_path / "series", "--output", dcm, "--progress", "none",
                   "--device", "cpu")[0] == 0
    ds, _, masks = read_back(str(dcm), uids, 1)
    series = read_volume(str(tmp_path / "series"))
    np.testing.assert_array_equal(masks[..., 0], predict_volume(loaded, series).labels > 0)
    algorithm = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "MedCLIP-SAM trained model (nnunetv2)"
    params = dict(p.split("=", 1) for p in algorithm.AlgorithmParameters.split(","))
    assert params == {"model": "model", "trainer": "nnunetv2", "labels": "given", "random_weights": "no"}
    assert ds.ContentDescription == "trained model"      # not "text-prompted segmentation" (issue 33)

    # the registry takes it as a train-weak model, like a DynUNet folder
    monkeypatch.setenv("MEDCLIPSAM_HOME", str(tmp_path / "home"))
    entry = trained_models.add(model, "nnunet brain")
    assert entry["kind"] == "weak" and entry["labels"] == ["brain"]
    assert [(m["name"], m["present"]) for m in trained_models.list_models()] == [("nnunet brain", True)]


@pytest.mark.slow
def test_nnunet_prediction_matches_nnunet_reading_the_file_itself(trained, tmp_path):
    """An anisotropic, permuted-direction volume: the labelmap is on the input's grid (exactly) and its voxels
    are what nnU-Net gives when its own SimpleITK reader takes the file (array and spacing in nnU-Net's order),
    so a spacing handed over reversed (x, y, z) or an array transposed would change the voxels."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from MedCLIPSAMLib.training.predict import load_model, predict_volume

    # x 0.8, y 1.3, z 3.0 mm; index axes along A-P, S-I, L-R; reversing the spacing swaps 0.8 and 3.0
    ph = make_volume("mr", shape=(3, 22, 36), spacing=(0.8, 1.3, 3.0), origin=(-20.5, 14.25, 33.0),
                     direction="sagittal", seed=7)
    vol = tmp_path / "sagittal.nrrd"
    write_volume(vol, ph.image)
    given = sitk.ReadImage(str(vol))
    assert given.GetSpacing() == (0.8, 1.3, 3.0)
    seg = tmp_path / "out.seg.nrrd"
    assert run_cli("predict", trained["model"], vol, "--output", seg, "--progress", "none", "--device", "cpu")[0] == 0
    segments, reference = read_segmentation(seg)
    for get in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        assert getattr(reference, get)() == getattr(given, get)(), get

    # the reference: nnU-Net reads the file itself and predicts it with each snapshot; the mean, thresholded
    loaded = load_model(trained["model"], "cpu")
    data, props = SimpleITKIO().read_images([str(vol)])
    assert list(props["spacing"]) == [3.0, 1.3, 0.8]                 # nnU-Net's order: z, y, x
    members = []
    for state in loaded.networks:
        loaded.predictor.list_of_parameters = [state]
        members.append(np.asarray(loaded.predictor.predict_single_npy_array(data, props, None, None, True)[1]))
    expected = np.mean(members, axis=0)
    assert expected.shape == (2, *sitk.GetArrayViewFromImage(given).shape)
    assert expected[1].max() - expected[1].min() > 0.05               # not flat: a wrong grid would show
    pred = predict_volume(loaded, given)
    np.testing.assert_allclose(pred.probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(segments[0]["mask"] > 0, expected[1] >= 0.2)


@pytest.mark.slow
def test_cancel_during_nnunet_training_leaves_no_model_folder(dataset, tmp_path, monkeypatch):
    pytest.importorskip("nnunetv2")
    from MedCLIPSAMLib import trained_models
    from MedCLIPSAMLib.errors import MedCLIPSAMError

    folder = tmp_path / "m"
    proc = subprocess.Popen([sys.executable, "-m", "MedCLIPSAMLib", "train-weak", "--dataset", str(dataset),
                             "--output", str(folder), "--progress", "json", *SHORT[:2], "--epochs", "200",
                             "--iterations-per-epoch", "2", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    seen = []
    for line in proc.stdout:    # wait until nnU-Net has finished an epoch (and saved a snapshot)
        seen.append(json.loads(line))
        if seen[-1]["stage"] == "train" and seen[-1]["done"] >= 1:
            break
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert json.loads(rest.splitlines()[-1])["stage"] == "cancelled"
    assert "Traceback" not in err
    assert not folder.exists() and list(tmp_path.iterdir()) == []     # not even the hidden working folder
    monkeypatch.setenv("MEDCLIPSAM_HOME", str(tmp_path / "home"))
    with pytest.raises(MedCLIPSAMError, match="does not exist"):
        trained_models.add(folder)
    assert trained_models.list_models() == []


BLOCKER = textwrap.dedent("""
    import sys

    class BlockNnunet:
        # a real ImportError for nnunetv2, as on a machine without the extra
        def find_spec(self, name, path=None, target=None):
            if name == "nnunetv2" or name.startswith("nnunetv2."):
                raise ModuleNotFoundError(f"No module named '{name}'", name=name)
            return None

    sys.meta_path.insert(0, BlockNnunet())
""")


def test_missing_extra_is_one_sentence_naming_it(dataset, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(blocker)])
    check = subprocess.run([sys.executable, "-c", "import nnunetv2"], capture_output=True, text=True, env=env)
    assert check.returncode == 1 and "No module named 'nnunetv2'" in check.stderr     # the blocker works
    r = subprocess.run([sys.executable, "-m", "MedCLIPSAMLib", "train-weak", "--dataset", str(dataset), "--output",
                        str(tmp_path / "m"), *SHORT], capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0] == ("medclipsam: error: train-weak --trainer nnunetv2 needs the Python package 'nnunetv2', "
                        "which is not installed; install it with: pip install 'medclipsam[nnunet]'")
    assert not (tmp_path / "m").exists()


def test_bad_nnunet_input_is_one_sentence(dataset, tmp_path):
    pytest.importorskip("nnunetv2")
    assert "needs --dataset" in _bad("train-weak", "--trainer", "nnunetv2", "--output", tmp_path / "m")
    assert "not an nnU-Net raw data set" in _bad("train-weak", "--trainer", "nnunetv2", "--dataset", tmp_path,
                                                 "--output", tmp_path / "m")
    assert "needs --images and --labels" in _bad("train-weak", "--output", tmp_path / "m")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert "holds other files" in _bad("train-weak", "--dataset", dataset, "--output", tmp_path / "other", *SHORT)
    assert "--iterations-per-epoch" in _bad("train-weak", "--dataset", dataset, "--output", tmp_path / "m",
                                            *SHORT[:-4], "--iterations-per-epoch", "0")
