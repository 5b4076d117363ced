"""CLIP fine-tuning: data reading, retrieval metric, schedule, learning, resume, DDP and the CLI."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from MedCLIPSAMLib.errors import Cancelled, MedCLIPSAMError
from MedCLIPSAMLib.progress import ProgressReporter
from MedCLIPSAMLib.training import data as D
from MedCLIPSAMLib.training.clip_finetune import (
    STATE_FILE, FinetuneOptions, finetune, lr_lambda, read_metrics, retrieval_metrics,
)

REPO = Path(__file__).resolve().parents[2]


# data -----------------------------------------------------------------------------------------------

def _write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    gray = np.zeros((20, 30), np.uint8)
    gray[5:10, 20:25] = 200
    Image.fromarray(gray).save(folder / "gray.png")
    Image.fromarray(np.full((16, 16, 3), (10, 20, 30), np.uint8)).save(folder / "rgb.png")
    deep = np.linspace(1000, 41000, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(deep).save(folder / "deep.png")
    return ["gray.png", "rgb.png", "deep.png"]


def test_csv_jsonl_and_folder_layouts(tmp_path):
    names = _write_images(tmp_path / "img")
    caps = ["tumor in the left kidney", "a normal chest", "bright lesion"]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "extra"])
        w.writerows([[f"img/{n}", c, "x"] for n, c in zip(names, caps)])
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for n, c in zip(names, caps):
            f.write(json.dumps({"image": f"img/{n}", "caption": c}) + "\n\n")
    for n, c in zip(names, caps):
        (tmp_path / "img" / n).with_suffix(".txt").write_text(c + "\n")
    by_csv, by_jsonl = D.read_pairs(tmp_path / "pairs.csv"), D.read_pairs(tmp_path / "pairs.jsonl")
    by_folder = D.read_pairs(tmp_path / "img")
    assert [p.caption for p in by_csv] == caps == [p.caption for p in by_jsonl]
    assert by_csv == by_jsonl and Path(by_csv[0].image) == tmp_path / "img" / "gray.png"
    assert sorted(p.caption for p in by_folder) == sorted(caps)

    gray, rgb, deep = (D.load_rgb(tmp_path / "img" / n) for n in names)
    assert gray.shape == (20, 30, 3) and gray.dtype == np.uint8 and (gray[..., 0] == gray[..., 2]).all()
    assert tuple(rgb[0, 0]) == (10, 20, 30)
    assert deep.dtype == np.uint8 and deep.min() == 0 and deep.max() == 255  # 16-bit: min-max to 0..255
    assert len(np.unique(deep)) > 32  # not truncated to its high byte

    x = D.to_model_input(gray, 224)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # padded, not stretched: the rows above and below the 20-row image are black (the padding)
    black = (0 - 0.48145466) / 0.26862954
    assert torch.allclose(x[0, :30], torch.full((30, 224), black), atol=1e-4)


def test_bad_data_sets_raise_one_clear_error(tmp_path):
    with pytest.raises(MedCLIPSAMError, match="does not exist"):
        D.read_pairs(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("image,caption\n")
    with pytest.raises(MedCLIPSAMError, match="no image-caption pairs"):
        D.read_pairs(tmp_path / "empty.csv")
    (tmp_path / "cols.csv").write_text("filename,text\na.png,hello\n")
    with pytest.raises(MedCLIPSAMError, match="'image' and 'caption'"):
        D.read_pairs(tmp_path / "cols.csv")
    (tmp_path / "missing.csv").write_text("image,caption\na.png,hello\n")
    with pytest.raises(MedCLIPSAMError, match="do not exist"):
        D.read_pairs(tmp_path / "missing.csv")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\nnot json\n')
    with pytest.raises(MedCLIPSAMError, match="line 2"):
        D.read_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(MedCLIPSAMError, match="not a .csv"):
        D.read_pairs(tmp_path / "pairs.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(MedCLIPSAMError, match="no image-caption pairs"):
        D.read_pairs(tmp_path / "folder")


def test_preprocessing_matches_the_model_and_augmentation_keeps_sides(tiny_clip):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    ours = D.to_model_input(rgb, tiny_clip.image_size, tiny_clip.mean, tiny_clip.std)
    assert torch.allclose(ours, tiny_clip.preprocess_array(rgb), atol=1e-5)

    img = np.zeros((64, 64, 3), np.uint8)
    img[20:40, 44:60] = 255  # a bright blob on the image's right
    for seed in range(20):
        out = D.augment(img, __import__("random").Random(seed))
        h, w = out.shape[:2]
        assert 0.8 * 64 * 64 <= h * w <= 64 * 64
        cols = np.nonzero(out[..., 0] > 128)[1]
        assert cols.min() > w / 2  # never mirrored to the other side


def test_phantom_dataset_writer(tmp_path):
    path = D.write_phantom_dataset(tmp_path / "a", 7, size=48, seed=3)
    pairs = D.read_pairs(path)
    assert len(pairs) == 7
    assert [p.caption for p in pairs[:6]] == [f"tumor in the {o}" for o in D.CT_ORGANS]
    again = D.read_pairs(D.write_phantom_dataset(tmp_path / "b", 7, size=48, seed=3))
    assert all((D.load_rgb(a.image) == D.load_rgb(b.image)).all() for a, b in zip(pairs, again))
    deep = D.read_pairs(D.write_phantom_dataset(tmp_path / "c", 2, size=48, seed=3, bits=16))
    assert Image.open(deep[0].image).mode.startswith("I")
    assert D.load_rgb(deep[0].image).shape == (48, 48, 3)


# metric and schedule ----------------------------------------------------------------------------------

def test_retrieval_metrics_with_distinct_and_repeated_captions():
    eye = torch.eye(4)
    r = retrieval_metrics(eye, eye, ["a", "b", "c", "d"])
    assert r["i2t_top1"] == r["t2i_top1"] == 1.0
    # image 3 matches caption 0 best: one miss in each direction at top-1, none at top-5
    images = eye.clone()
    images[3] = torch.tensor([1.0, 0, 0, 0.5])
    r = retrieval_metrics(images, eye, ["a", "b", "c", "d"])
    assert r["i2t_top1"] == 0.75 and r["i2t_top5"] == 1.0
    assert r["t2i_top1"] == 1.0  # caption 'a' still ranks image 0 first (1.0 vs 0.89)
    # repeated captions form one class: any image of that caption is a hit
    texts = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]])
    images = torch.tensor([[1.0, 0.1], [1.0, 0.2], [0.1, 1.0]])
    r = retrieval_metrics(images, texts, ["x", "x", "y"])
    assert r["captions"] == 2 and r["i2t_top1"] == 1.0 and r["t2i_top1"] == 1.0


def test_warmup_then_cosine():
    f = lr_lambda(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


# training ---------------------------------------------------------------------------------------------

def _tiny_variant(tmp_path, name, pooler=None, dropout=None):
    """A copy of the tiny-random CLIP folder with a different text pooler and/or text dropout."""
    from MedCLIPSAMLib.models import cache, load_clip

    src = load_clip("tiny-random").folder
    dst = tmp_path / name
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "open_clip_config.json").read_text())
    if pooler:
        cfg["model_cfg"]["text_cfg"]["hf_pooler_type"] = pooler
    (dst / "open_clip_config.json").write_text(json.dumps(cfg))
    bert = json.loads((dst / "text" / "config.json").read_text())
    if dropout is not None:
        bert["hidden_dropout_prob"] = bert["attention_probs_dropout_prob"] = dropout
    (dst / "text" / "config.json").write_text(json.dumps(bert))
    cache.record_files(dst, {"open_clip_config.json": None, "text/config.json": None}, source="test variant")
    return dst


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return D.write_phantom_dataset(tmp_path_factory.mktemp("small"), 8, size=48, seed=5)


def _state(path):
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)


class _StopBeforeEpoch(ProgressReporter):
    def __init__(self, epoch):
        super().__init__("none")
        self.epoch = epoch

    def stage(self, name, total, message=""):
        if name == "train" and message.startswith(f"epoch {self.epoch}/"):
            raise Cancelled("stopped")
        super().stage(name, total, message)


def test_resume_continues_with_the_same_optimiser_state(tmp_path, small_set):
    model = _tiny_variant(tmp_path, "model")  # text dropout kept: the saved RNG state must reproduce it
    common = dict(data=str(small_set), model=str(model), batch_size=4, lr=1e-4, warmup_steps=1, seed=1,
                  device="cpu")
    finetune(FinetuneOptions(output=str(tmp_path / "straight"), epochs=2, **common))
    with pytest.raises(Cancelled):  # stopped (Ctrl-C, preemption) once epoch 1 is saved
        finetune(FinetuneOptions(output=str(tmp_path / "split"), epochs=2, **common), _StopBeforeEpoch(2))
    first = _state(tmp_path / "split")
    assert first["step"] == 2 and first["epoch"] == 1
    with pytest.raises(MedCLIPSAMError, match="--resume"):
        finetune(FinetuneOptions(output=str(tmp_path / "split"), epochs=2, **common))
    with pytest.raises(MedCLIPSAMError, match="different batch_size"):
        finetune(FinetuneOptions(output=str(tmp_path / "split"), epochs=2, resume=True,
                                 **{**common, "batch_size": 2}))
    finetune(FinetuneOptions(output=str(tmp_path / "split"), epochs=2, resume=True, **common))

    a, b = _state(tmp_path / "straight"), _state(tmp_path / "split")
    assert a["step"] == b["step"] == 4
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    for key, ta in a["model"].items():
        assert torch.allclose(ta, b["model"][key], atol=1e-6), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.allclose(sa[i][name], sb[i][name], atol=1e-7, rtol=1e-5), (i, name)
    la, lb = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["epoch"] for r in lb] == [0, 1, 2]
    assert la[2]["loss"] == pytest.approx(lb[2]["loss"], abs=1e-6)  # the resumed epoch's loss, exactly

    # the output folder is a CLIP model folder: load_clip() reads it and gets the trained weights
    from MedCLIPSAMLib.models import load_clip

    loaded = load_clip(str(tmp_path / "split"), reuse=False)
    for key, value in loaded.model.state_dict().items():
        assert torch.allclose(value, b["model"][key]), key
    assert (tmp_path / "split" / "metrics.png").stat().st_size > 1000


def test_two_process_ddp_matches_one_process(tmp_path, small_set, torchrun):
    # no dropout: every other source of randomness (order, augmentation) is the same for any world size
    model = _tiny_variant(tmp_path, "model", dropout=0.0)
    finetune(FinetuneOptions(data=str(small_set), output=str(tmp_path / "one"), model=str(model), epochs=1,
                             batch_size=4, lr=1e-4, warmup_steps=1, device="cpu"))
    two = torchrun(["finetune-clip", "--data", small_set, "--model", model, "--epochs", "1", "--batch-size", "4",
                    "--lr", "1e-4", "--warmup-steps", "1", "--device", "cpu", "--progress", "none",
                    "--output", tmp_path / "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(m1) == len(m2) == 2  # rank 0 alone wrote the log
    assert m2[1]["loss"] == pytest.approx(m1[1]["loss"], rel=1e-5)
    assert m2[0]["retrieval"] == m1[0]["retrieval"]
    s1, s2 = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert s1["step"] == s2["step"] == 2
    # same gradients -> same AdamW updates: the global batch's features were gathered with gradients
    for key, value in s1["model"].items():
        assert torch.allclose(value, s2["model"][key], atol=2e-6), key


def test_identical_captions_are_not_negatives_unless_asked(tmp_path, small_set):
    """The small set repeats captions (8 pairs, 6 captions): by default a pair is not pushed away from its
    caption twin, so the same run with --duplicate-negatives gives another loss; resuming may not switch."""
    assert len({p.caption for p in D.read_pairs(str(small_set))}) < 8
    common = dict(data=str(small_set), model="tiny-random", epochs=1, batch_size=8, lr=1e-4, warmup_steps=1,
                  device="cpu", augment=False)
    masked = finetune(FinetuneOptions(output=str(tmp_path / "masked"), **common))
    counted = finetune(FinetuneOptions(output=str(tmp_path / "counted"), duplicate_negatives=True, **common))
    assert math.isfinite(masked[1]["loss"]) and math.isfinite(counted[1]["loss"])
    assert masked[1]["loss"] != pytest.approx(counted[1]["loss"], rel=1e-3)
    with pytest.raises(MedCLIPSAMError, match="different duplicate_negatives"):
        finetune(FinetuneOptions(output=str(tmp_path / "masked"), resume=True, duplicate_negatives=True,
                                 **{**common, "epochs": 2}))


def test_fine_tuning_learns_phantom_captions(tmp_path):
    """Held-out retrieval of "tumor in the liver / left lung / right lung" rises well above its start.

    A tiny CLIP trained from random weights for 60 steps learns which organ (chest or abdomen) a caption
    names; telling the left lung from the right takes much longer. tiny-random's text tower mean-pools:
    a CLS pooler on a random 2-layer BERT gives nearly identical embeddings for every caption (cosine
    ~0.9999), a saddle that contrastive training from scratch does not leave within a CPU test's budget
    (BiomedCLIP's pretrained tower has no such problem).
    """
    organs = ("liver", "left lung", "right lung")
    train = D.write_phantom_dataset(tmp_path / "train", 96, size=64, seed=1, organs=organs)
    held_out = D.write_phantom_dataset(tmp_path / "val", 48, size=64, seed=2, organs=organs)
    model = _tiny_variant(tmp_path, "model")
    assert json.loads((model / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"][
        "hf_pooler_type"] == "mean_pooler"
    records = finetune(FinetuneOptions(
        data=str(train), val_data=str(held_out), output=str(tmp_path / "out"), model=str(model),
        loss="dhn-nce", temperature=0.1, lr=1e-4, epochs=5, batch_size=8, warmup_steps=3, seed=0,
        device="cpu"))
    start, end = records[0]["retrieval"], records[-1]["retrieval"]
    mean_top1 = lambda r: (r["i2t_top1"] + r["t2i_top1"]) / 2  # noqa: E731
    assert end["i2t_top1"] >= start["i2t_top1"]
    assert end["t2i_top1"] >= start["t2i_top1"] + 0.3
    assert mean_top1(end) >= mean_top1(start) + 0.2
    assert records[-1]["loss"] < records[1]["loss"] - 0.3


# CLI --------------------------------------------------------------------------------------------------

def test_cli_registers_without_torch_and_reports_bad_input(tmp_path):
    code = ("import sys, argparse; from MedCLIPSAMLib.cli import training; p = argparse.ArgumentParser(); "
            "training.register(p.add_subparsers()); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr

    from MedCLIPSAMLib.cli import main

    assert main(["evaluate-retrieval", "--data", str(tmp_path / "none.csv"), "--model", "tiny-random"]) == 2
    assert main(["finetune-clip", "--data", str(tmp_path / "none.csv"), "--output", str(tmp_path / "o"),
                 "--model", "tiny-random"]) == 2
    assert not (tmp_path / "o").exists()


def test_cli_evaluate_retrieval(tmp_path, small_set, capsys):
    from MedCLIPSAMLib.cli import main

    out = tmp_path / "r.json"
    assert main(["evaluate-retrieval", "--data", str(small_set), "--model", "tiny-random", "--json", str(out),
                 "--progress", "none", "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["pairs"] == 8 and result["captions"] == 6
    assert all(0 <= result[k] <= 1 for k in ("i2t_top1", "i2t_top5", "t2i_top1", "t2i_top5"))
    assert result["i2t_top5"] >= result["i2t_top1"]
    assert "i2t top1" in capsys.readouterr().out


def test_fine_tuned_checkpoint_plugs_into_segment_image(tmp_path, small_set):
    """The output folder of finetune-clip is what --clip-checkpoint takes: its weights drive the saliency."""
    from MedCLIPSAMLib.cli import main

    finetune(FinetuneOptions(data=str(small_set), output=str(tmp_path / "ckpt"), model="tiny-random", epochs=1,
                             batch_size=4, lr=1e-3, warmup_steps=1, device="cpu"))
    image = tmp_path / "in.png"
    Image.fromarray(np.asarray(Image.open(next(Path(small_set).parent.glob("**/*.png"))))).save(image)
    maps = {}
    for label, extra in (("base", []), ("tuned", ["--clip-checkpoint", str(tmp_path / "ckpt")])):
        sal = tmp_path / f"{label}-saliency.png"
        assert main(["segment-image", str(image), "--prompt", "tumor in the liver", "--output",
                     str(tmp_path / f"{label}.png"), "--saliency-output", str(sal), "--models", "tiny-random",
                     "--preset", "fast", "--sam", "none", "--device", "cpu", *extra]) == 0
        maps[label] = np.asarray(Image.open(sal)).astype(int)
    assert maps["base"].shape == maps["tuned"].shape
    assert np.abs(maps["base"] - maps["tuned"]).max() > 10  # other weights, another map
