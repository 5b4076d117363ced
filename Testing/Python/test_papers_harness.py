"""The papers' benchmark harness (python -m benchmarks.papers, issue 36) on small stand-ins.

This checks the HARNESS, not accuracy: each data set's published folder layout is written with a few
phantom images and masks (BUSI, the MedCLIP-SAMv2 prepared folders, COVID-QU-Ex, the Kaggle lung CT set, a
Medical Segmentation Decathlon task), and the runs use tiny random-weight models, so every Dice printed
here is meaningless. What is checked: the readers and their splits, the per-case cache (a second run
resumes), the weak-supervision and ablation rows, the table beside the papers' figures, the JSON record,
and one-sentence errors. To keep it cheap, M2IB takes one step and SAM is off (--set).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.papers import __main__ as papers
from benchmarks.papers.datasets import load_dataset, split_of
from MedCLIPSAMLib.phantoms import make_image, make_volume

REPO = Path(__file__).resolve().parents[2]
CHEAP = ["--models", "tiny-random", "--device", "cpu", "--set", "sam=none", "--set", "saliency_settings.steps=1",
         "--set", "saliency_settings.batch_size=2"]


def _u8(a):
    a = np.asarray(a, np.float32)
    return (255 * (a - a.min()) / (np.ptp(a) + 1e-6)).astype(np.uint8)


def _mask(labels, *names):
    out = np.zeros(next(iter(labels.values())).shape, bool)
    for n in names:
        out |= labels[n] > 0
    return out.astype(np.uint8) * 255


def _names(prefix, split, count):
    """`count` names whose hash split (datasets.split_of) is `split`."""
    found, i = [], 0
    while len(found) < count:
        name = f"{prefix}{i}"
        found += [name] if split_of(name) == split else []
        i += 1
    return found


def write_busi(root):
    base = root / "Dataset_BUSI_with_GT"
    names = {"benign": [f"benign ({i})" for i in range(1, 7)], "malignant": ["malignant (1)", "malignant (2)"]}
    for group, stems in names.items():
        (base / group).mkdir(parents=True)
        for k, stem in enumerate(stems):
            p = make_image("mr", (48, 64), seed=k + 10 * len(group))
            Image.fromarray(_u8(p.image)).convert("RGB").save(base / group / f"{stem}.png")
            Image.fromarray(_mask(p.labels, "tumor")).save(base / group / f"{stem}_mask.png")
    # a second lesion of one image: its own mask file, united with the first
    extra = np.zeros((48, 64), np.uint8)
    extra[2:6, 2:6] = 255
    Image.fromarray(extra).save(base / "benign" / "benign (1)_mask_1.png")
    (base / "normal").mkdir()
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(base / "normal" / "normal (1).png")
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(base / "normal" / "normal (1)_mask.png")


def write_authors(root, count=(3, 1, 3)):
    for split, n in zip(("train", "val", "test"), count):
        (root / f"{split}_images").mkdir(parents=True)
        (root / f"{split}_masks").mkdir()
        for i in range(n):
            p = make_image("mr", (48, 48), seed=100 + i + 10 * len(split))
            Image.fromarray(_u8(p.image)).save(root / f"{split}_images" / f"{i:03d}.png")
            Image.fromarray(_mask(p.labels, "tumor")).save(root / f"{split}_masks" / f"{i:03d}.png")


def write_covidqu(root):
    base = root / "Lung Segmentation Data" / "Lung Segmentation Data"
    for split, n in (("Train", 2), ("Val", 1), ("Test", 2)):
        for group in ("COVID-19", "Normal"):
            (base / split / group / "images").mkdir(parents=True)
            (base / split / group / "lung masks").mkdir()
            for i in range(n):
                p = make_image("xray", (48, 48), seed=i + 7 * len(split) + len(group))
                name = f"{group.lower()}_{split}_{i}.png"
                Image.fromarray(_u8(p.image)).save(base / split / group / "images" / name)
                lungs = _mask(p.labels, "left lung", "right lung")
                Image.fromarray(lungs).save(base / split / group / "lung masks" / name)


def write_lungct(root):
    """images/images/ID_k.jpg and RGB masks/masks/ID_k.jpg: lungs red, heart green."""
    (root / "images" / "images").mkdir(parents=True)
    (root / "masks" / "masks").mkdir(parents=True)
    patients = _names("ID0000", "test", 2) + _names("ID0000", "train", 2)
    seeds = (s for s in range(1000) if _mask(make_image("ct", (48, 48), seed=s).labels, "left lung").any())
    for patient in patients:
        for k in range(2):
            p = make_image("ct", (48, 48), seed=next(seeds))   # slices through the lungs
            Image.fromarray(_u8(np.clip(p.image, -1000, 400))).save(root / "images" / "images" / f"{patient}_{k}.jpg")
            rgb = np.stack([_mask(p.labels, "left lung", "right lung"), _mask(p.labels, "heart"),
                            np.zeros((48, 48), np.uint8)], axis=-1)
            Image.fromarray(rgb).save(root / "masks" / "masks" / f"{patient}_{k}.jpg", quality=95)
    return patients


def write_msd(root, labels_style="msd"):
    import SimpleITK as sitk

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    training = []
    for i, name in enumerate(_names("liver_", "test", 1) + _names("liver_", "train", 1)):
        v = make_volume("ct", (6, 32, 32), seed=i)
        sitk.WriteImage(v.image, str(root / "imagesTr" / f"{name}.nii.gz"))
        label = sitk.GetImageFromArray((v.labels["liver"] > 0).astype(np.uint8))
        label.CopyInformation(v.image)
        sitk.WriteImage(label, str(root / "labelsTr" / f"{name}.nii.gz"))
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    labels = {"0": "background", "1": "liver"} if labels_style == "msd" else {"background": 0, "liver": 1}
    meta = {"name": "Liver", "modality": {"0": "CT"}, "labels": labels, "numTraining": len(training),
            "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))


def write_figshare(root):
    """N.mat with a cjdata struct, as MATLAB's older format (scipy writes it; the published v7.3 is HDF5)."""
    from scipy.io import savemat

    (root / "brainTumorDataPublic_1-766").mkdir(parents=True)
    for i in range(1, 11):
        p = make_image("mr", (40, 48), seed=i)
        data = {"label": 1.0, "PID": str(i), "image": (p.image * 100).astype(np.int16),
                "tumorMask": (p.labels["tumor"] > 0).astype(np.uint8), "tumorBorder": np.zeros((1, 4))}
        savemat(root / "brainTumorDataPublic_1-766" / f"{i}.mat", {"cjdata": data})


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("papers")
    write_figshare(root / "figshare")
    write_busi(root / "busi")
    write_authors(root / "brain")
    write_covidqu(root / "covidqu")
    patients = write_lungct(root / "lungct")
    write_msd(root / "msd")
    return root, patients


def test_readers_and_splits(stand_ins, tmp_path):
    root, patients = stand_ins
    busi = load_dataset("busi", root / "busi")
    assert busi.layout == "public" and busi.targets == [(1, "breast tumor")]
    assert len(busi.cases) == 8                                   # 'normal' left out
    assert all(c.split == split_of(Path(c.image).stem) for c in busi.cases)
    first = next(c for c in busi.cases if c.id == "benign_benign_1")
    from benchmarks.papers.datasets import read_mask

    united = read_mask(busi, first)
    assert united[2:6, 2:6].all()                                 # the second mask file is united in

    brain = load_dataset("brain", root / "brain")                 # the authors' prepared split
    assert brain.layout == "authors"
    assert [len(brain.split(s)) for s in ("train", "val", "test")] == [3, 1, 3]
    assert brain.split("test", limit=2) == brain.split("test")[:2]

    mats = load_dataset("brain", root / "figshare")             # the figshare .mat files
    assert mats.layout == "public" and [c.id for c in mats.cases] == [f"mat_{i}" for i in range(1, 11)]
    assert all(c.split == split_of(c.id[4:]) for c in mats.cases)
    from benchmarks.papers.datasets import read_image

    p = make_image("mr", (40, 48), seed=3)
    assert np.array_equal(read_mask(mats, mats.cases[2]), (p.labels["tumor"] > 0).astype(np.uint8))
    assert read_image(mats, mats.cases[2]).shape == (40, 48)

    cxr = load_dataset("covidqu", root / "covidqu")
    assert [len(cxr.split(s)) for s in ("train", "val", "test")] == [4, 2, 4]   # the publisher's folders
    assert all(f"_{c.split.capitalize()}_" in Path(c.image).name for c in cxr.cases)

    ct = load_dataset("lungct", root / "lungct")
    by_patient = {}
    for c in ct.cases:
        by_patient.setdefault(c.id.rsplit("_", 1)[0], set()).add(c.split)
    assert by_patient == {p: {split_of(p)} for p in patients}     # one patient, one split
    case = ct.split("test")[0]
    lung = read_mask(ct, case)
    red = np.asarray(Image.open(case.mask))[..., 0] > 127
    assert lung.sum() > 0 and np.array_equal(lung > 0, red)       # the lung channel, not the heart's

    msd = load_dataset("msd", root / "msd")
    assert msd.dims == 3 and msd.targets == [(1, "liver")] and len(msd.split("test")) == 1
    write_msd(tmp_path / "v2style", labels_style="nnunet")
    assert load_dataset("msd", tmp_path / "v2style").targets == [(1, "liver")]


def test_rows_settings_and_published_figures():
    from benchmarks.papers.published import PUBLISHED, paper_figure
    from benchmarks.papers.stages import plan
    from MedCLIPSAMLib.errors import MedCLIPSAMError

    (v1,) = plan("busi", "v1")
    s = v1.settings
    assert (v1.name, s.saliency, s.postprocess, s.top_n) == ("zero-shot-v1", "gscorecam", "crf", 1)
    assert paper_figure("busi", "zero-shot-v1") == {"dice": 67.82, "nsd": None, "source": "v1-in-v2", "note": ""}
    lungs = plan("covidqu", "v2", weak=True, ablation=True, finetuned=True)
    assert [s.name for s in lungs][2:4] == ["ablation:saliency", "ablation:+dhn-nce"]
    assert [s.finetuned for s in lungs] == [True, True, False, True, True, True, True, True]
    assert (lungs[0].settings.top_n, lungs[0].settings.keep_largest) == (2, 2)      # the scripts' lung setting
    assert plan("brain", "v2")[0].settings.saliency_settings["beta"] == 2.0
    with pytest.raises(MedCLIPSAMError, match="the ablation rows are MedCLIP-SAMv2's: use --preset v2"):
        plan("busi", "v1", ablation=True)
    # the v2 means over the four data sets are the paper's own summary figures
    for stage, mean in (("zero-shot-v2", 77.61), ("weak-v2", 82.11)):
        assert round(np.mean([PUBLISHED[k][stage]["dice"] for k in ("busi", "brain", "covidqu", "lungct")]), 2) == mean


def test_run_resumes_and_prints_the_papers_figures(stand_ins, tmp_path, capsys):
    root, _ = stand_ins
    out = tmp_path / "busi.json"
    args = ["busi", str(root / "busi"), "--preset", "v2", "--json", str(out), *CHEAP]
    test_cases = load_dataset("busi", root / "busi").split("test")
    assert len(test_cases) >= 2
    assert papers.main([*args, "--limit", "1"]) == 0
    first = json.loads(out.read_text())
    assert first["rows"][0]["from_cache"] == 0 and first["rows"][0]["cases"] == 1

    assert papers.main([*args, "--limit", "2"]) == 0             # resumes: case 1 from the cache
    record = json.loads(out.read_text())
    row = record["rows"][0]
    assert (row["stage"], row["cases"], row["from_cache"]) == ("zero-shot-v2", 2, 1)
    assert [c["case"] for c in record["per_case"]["zero-shot-v2"]] == [c.id for c in test_cases[:2]]
    assert record["per_case"]["zero-shot-v2"][0] == first["per_case"]["zero-shot-v2"][0]
    assert row["paper"]["dice"] == 77.76 and row["paper"]["nsd"] == 81.11
    assert row["diff_dice"] == pytest.approx(row["dice"] - 77.76)
    assert row["dice"] == pytest.approx(np.mean([c["dice"] for c in record["per_case"]["zero-shot-v2"]]))
    assert (record["schema"], record["schema_version"], record["split"]) == ("medclipsam-papers", 1, "test")
    assert record["models"] == {"clip": "tiny-random", "sam": "tiny-random", "finetuned_clip": None, "random": True}
    assert record["dataset"]["cases"] == {"train": len(load_dataset("busi", root / "busi").split("train")),
                                          "val": len(load_dataset("busi", root / "busi").split("val")),
                                          "test": len(test_cases)}
    env = record["environment"]
    assert env["device"] == "cpu" and env["date"] and len(env["git_commit"]) == 40
    assert record["settings"]["zero-shot-v2"]["saliency"] == "m2ib"
    assert record["settings"]["zero-shot-v2"]["saliency_settings"]["beta"] == 1.0   # the breast script's
    printed = capsys.readouterr().out
    line = [ln.split() for ln in printed.splitlines() if ln.startswith("busi ")][-1]
    assert line == ["busi", "zero-shot-v2", "77.76", f"{row['dice']:.2f}", f"{row['diff_dice']:+.2f}", "81.11",
                    f"{row['nsd']:.2f}", f"{row['diff_nsd']:+.2f}", "2"]
    assert "tiny-random + tiny-random (RANDOM weights: meaningless figures)" in printed


def test_weak_and_ablation_rows(stand_ins, tmp_path, capsys):
    root, _ = stand_ins
    out = tmp_path / "brain.json"
    argv = ["brain", str(root / "brain"), "--weak", "--ablation", "--limit", "1", "--json", str(out),
            "--weak-epochs", "1", "--weak-snapshots", "1", "--weak-filters", "4", *CHEAP]
    assert papers.main(argv) == 0
    record = json.loads(out.read_text())
    stages = [r["stage"] for r in record["rows"]]
    assert stages == ["zero-shot-v2", "weak-v2", "ablation:saliency", "ablation:+postprocess",
                      "ablation:+components", "ablation:+sam", "ablation:+weak"]   # no +dhn-nce without a CLIP
    rows = {r["stage"]: r for r in record["rows"]}
    assert rows["weak-v2"]["paper"]["dice"] == 80.03 and rows["weak-v2"]["cases"] == 1
    assert rows["ablation:+sam"]["paper"] == {"dice": 77.61, "nsd": None, "source": "v2-ablation",
                                              "note": "mean of the four data sets"}
    assert record["settings"]["ablation:saliency"]["postprocess"] == "threshold"
    assert record["settings"]["zero-shot-v2"]["saliency_settings"]["beta"] == 2.0  # the brain script's
    # the same settings share one cache: +sam and +weak repeat zero-shot-v2 and weak-v2
    assert rows["ablation:+sam"]["from_cache"] == 1 and rows["ablation:+weak"]["from_cache"] == 1
    assert record["per_case"]["ablation:+weak"] == record["per_case"]["weak-v2"]
    # one network, trained on the training split's pseudo-labels, predicted the test split
    (trained,) = Path(f"{out}.cache").glob("weak-*/trained.json")
    brain = load_dataset("brain", root / "brain")
    assert json.loads(trained.read_text())["cases"] == [c.id for c in brain.split("train", 1)]
    assert [c["case"] for c in record["per_case"]["weak-v2"]] == [c.id for c in brain.split("test", 1)]
    assert record["per_case"]["weak-v2"] != record["per_case"]["zero-shot-v2"]
    printed = capsys.readouterr().out
    assert "* the paper's ablation figure is the mean over its four data sets" in printed


def test_msd_volume(stand_ins, tmp_path):
    root, _ = stand_ins
    out = tmp_path / "msd.json"
    assert papers.main(["msd", str(root / "msd"), "--json", str(out), "--mode", "per-slice", *CHEAP]) == 0
    record = json.loads(out.read_text())
    (case,) = record["per_case"]["zero-shot-v2"]
    assert case["target"] == "liver" and 0.0 <= case["dice"] <= 100.0
    assert record["rows"][0]["paper"] is None and record["dataset"]["title"] == "MSD Liver"


def test_missing_model_and_bad_folder_say_one_sentence(stand_ins, tmp_path, monkeypatch, capsys):
    root, _ = stand_ins
    out = tmp_path / "r.json"
    monkeypatch.setenv("MEDCLIPSAM_HOME", str(tmp_path / "empty-home"))     # offline, nothing downloaded
    assert papers.main(["busi", str(root / "busi"), "--json", str(out), "--device", "cpu"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: model 'biomedclip' is not available: missing open_clip_config.json")
    assert not out.exists()
    # the command itself, in a process of its own: a wrong folder stops before any model loads
    import os

    run = subprocess.run([sys.executable, "-m", "benchmarks.papers", "covidqu", str(tmp_path / "nowhere"),
                          "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 1 and run.stderr.strip() == f"error: data folder '{tmp_path / 'nowhere'}' does not exist"
    assert not out.exists()
