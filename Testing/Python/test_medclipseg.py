"""MedCLIPSeg: frozen-CLIP equivalence, gradients, probabilistic attention, learning on phantoms,
uncertainty, geometry of volume predictions, the CLI and bad input.

Tiny random CLIP (timm ViT-tiny/16 + 2-layer BERT): 2 adapted layer pairs. The learning test trains on
2D MR phantoms with a brain lesion (96 px, resized to 224) without augmentation, so the frozen image
prefix is cached and the runs stay short on two CPU cores. Its runs are seeded inside the test, in fp32,
and compare label fractions at the same number of optimiser steps: alone or after other tests, the same
figures.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from MedCLIPSAMLib import phantoms  # noqa: E402
from MedCLIPSAMLib.cli import main as cli_main  # noqa: E402
from MedCLIPSAMLib.training import medclipseg as mcs  # noqa: E402
from MedCLIPSAMLib.training.medclipseg_data import Sample, gray8_of  # noqa: E402
from MedCLIPSAMLib.training.medclipseg_model import (  # noqa: E402
    probabilistic_attention,
    trainable_parameter_count,
)

PROMPT = "brain tumor"


def phantom_sample(seed, size=(96, 96)):
    ph = phantoms.make_image("mr", size=size, seed=seed, lesion={"size": "large"})
    return Sample(gray8_of(ph.image), ph.labels["tumor"] > 0, f"mr-{seed}")


def _perturb_up_projections(model, scale=0.05):
    """Give the zero-initialised up-projections values, as training would."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in model.adapters:
            for up in (a.up_v, a.up_t):
                up.weight.copy_(torch.randn(up.weight.shape, generator=g) * scale)


# --------------------------------------------------------------------------------------------------

def test_untrained_model_equals_frozen_clip():
    torch.manual_seed(0)
    model, bundle = mcs.build_model("tiny-random", "cpu")
    model.eval()
    images = torch.randn(2, 3, 224, 224)
    ids = bundle.tokenize(["a brain tumor", "a small bright lesion in the left kidney"])  # full padding
    with torch.no_grad():
        ref_image = bundle.model.encode_image(images)
        ref_text = bundle.model.encode_text(ids)
        for sample in (False, True):  # deterministic and stochastic passes: the adapters add exactly 0
            out = model(images, ids, sample=sample)
            assert torch.equal(out["image_embedding"], ref_image)
            assert torch.equal(out["text_embedding"], ref_text)
        # the gate is at its initial value (sigmoid(0) = 0.5); the zero up-projection makes the identity
        assert all(float(a.image_from_text.gate) == 0.0 for a in model.adapters)
        # the adapters are really in the path: once trained (perturbed), the embeddings move
        _perturb_up_projections(model)
        out = model(images, ids)
        assert not torch.allclose(out["image_embedding"], ref_image)
        assert not torch.allclose(out["text_embedding"], ref_text)
        # outside a MedCLIPSeg pass the wrapped text tower still encodes text as before
        assert torch.equal(bundle.model.encode_text(ids), ref_text)


def test_only_adapters_and_head_receive_gradients():
    model, bundle = mcs.build_model("tiny-random", "cpu")
    _perturb_up_projections(model)
    model.train()
    images = torch.randn(2, 3, 224, 224)
    masks = torch.zeros(2, 224, 224)
    masks[:, 80:140, 90:150] = 1
    prompts = [PROMPT, PROMPT]
    out = model(images, mcs.tokenize(bundle, prompts))
    loss, _ = mcs.segmentation_loss(out, masks, prompts, model.grid)
    loss.backward()
    for name, p in model.clip.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    trainable = dict(model.adapters.named_parameters(prefix="adapters"))
    trainable.update(model.head.named_parameters(prefix="head"))
    assert all(p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    nonzero = [n for n, p in trainable.items() if p.grad.abs().sum() > 0]
    assert len(nonzero) == len(trainable), set(trainable) - set(nonzero)
    n_tiny = sum(p.numel() for p in trainable.values())
    assert n_tiny == sum(p.numel() for p in model.trainable_parameters())
    assert n_tiny == trainable_parameter_count(**{k: model.dims[k] for k in
                                                  ("vision_width", "text_width", "embed_dim", "layers")})
    n_full = trainable_parameter_count()  # BiomedCLIP: ViT-B/16 768, PubMedBERT 768, embedding 512, 10 layers
    print(f"\ntrainable parameters: tiny-random {n_tiny:,}; BiomedCLIP size {n_full:,} (paper: about 18.7M)")
    assert 15e6 < n_full < 22e6


def test_probabilistic_attention_without_variance_is_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7 if i == 0 else 9, 16, generator=g) for i in range(3))
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 6:] = False
    zero = torch.zeros_like(k)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for sample in (False, True):
        got = probabilistic_attention(q, k, zero, v, torch.zeros_like(v), mask, sample=sample)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # a key with variance gets less attention than the same key without
    var = zero.clone()
    var[..., 0, :] = 4.0
    onehot = torch.eye(9)[None, None].expand(2, 4, 9, 9)
    w_plain = probabilistic_attention(q, k, zero, onehot, mask=mask)
    w_var = probabilistic_attention(q, k, var, onehot, mask=mask)
    assert (w_var[..., 0] < w_plain[..., 0]).all()


def test_soft_patch_contrastive_loss():
    torch.manual_seed(0)
    text = torch.randn(2, 8)
    coverage = torch.zeros(2, 4)
    coverage[:, 1] = 1.0
    coverage[:, 2] = 0.5
    aligned = torch.randn(2, 4, 8)
    aligned[:, 1] = text * 5
    aligned[:, 2] = text * 5
    against = aligned.clone()
    against[:, 1] = -text * 5
    prompts = ["a", "b"]
    good = mcs.soft_patch_contrastive_loss(aligned, text, coverage, prompts)
    bad = mcs.soft_patch_contrastive_loss(against, text, coverage, prompts)
    assert good < bad
    empty = mcs.soft_patch_contrastive_loss(aligned.requires_grad_(), text, torch.zeros(2, 4), prompts)
    assert empty.item() == 0.0
    empty.backward()  # no target anywhere: zero loss, still differentiable


# --------------------------------------------------------------------------------------------------
# learning on phantoms

STEPS, BATCH = 60, 4        # every run makes the same number of optimiser steps with the same batch size
FEW = 1 / 6                 # 4 of the 24 labelled phantoms: one batch, so one step per epoch
FEW_SEEDS = (0, 1, 2)       # three subsets (and inits): one unlucky or lucky subset does not decide


def _train_run(out, train, fraction, seed):
    from MedCLIPSAMLib.runtime import seed_everything

    n = max(1, round(fraction * len(train)))
    epochs = STEPS // -(-n // BATCH)   # equal optimisation steps, whatever the number of labels
    # amp=False: fp32 on every CPU (bf16 autocast exists only where the CPU has it, and changes the result)
    opts = mcs.MedCLIPSegOptions(prompts=[PROMPT], output=str(out), model="tiny-random", epochs=epochs,
                                 batch_size=BATCH, lr=2e-3, fraction=fraction, augment=False, device="cpu",
                                 seed=seed, amp=False)
    seed_everything(seed)  # train() seeds too; this keeps any state earlier tests left out of the picture
    records = mcs.train(opts, samples=train)
    return records, mcs.MedCLIPSegPredictor(str(out), "cpu", amp=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run on all 24 labelled phantoms, three on a sixth of them, all with the same number of steps."""
    train = [phantom_sample(s) for s in range(24)]
    held_out = [phantom_sample(1000 + s) for s in range(10)]
    out = tmp_path_factory.mktemp("medclipseg-all")
    records, predictor = _train_run(out, train, 1.0, 0)
    runs = {"all": (out, records, predictor, mcs.evaluate_dice(predictor, held_out, PROMPT)), "few": []}
    for seed in FEW_SEEDS:
        few = tmp_path_factory.mktemp(f"medclipseg-few{seed}")
        few_records, few_predictor = _train_run(few, train, FEW, seed)
        runs["few"].append((few, few_records, few_predictor, mcs.evaluate_dice(few_predictor, held_out, PROMPT)))
    return runs, held_out


def test_learning_on_phantoms_and_label_fraction(trained):
    runs, _ = trained
    dice_all = runs["all"][3]
    dice_few = [r[3] for r in runs["few"]]
    print(f"\nheld-out Dice after {STEPS} steps: all 24 labels {dice_all:.3f}, 4 labels "
          f"{', '.join(f'{d:.3f}' for d in dice_few)} (mean {np.mean(dice_few):.3f})")
    assert dice_all > 0.75
    # fewer labels, same optimisation: worse on held-out images (paper: 81.10 at 10 % vs 88.66 at 100 %)
    assert dice_all > np.mean(dice_few) + 0.05
    out, records, _, _ = runs["all"]
    epochs = STEPS // (24 // BATCH)
    assert len(records) == epochs and records[-1]["step"] == STEPS and records[-1]["loss"] < records[0]["loss"]
    assert all(r[1][-1]["step"] == STEPS for r in runs["few"])
    config = json.loads((out / mcs.CONFIG_FILE).read_text())
    assert config["clip"] == "tiny-random" and config["epoch"] == epochs and config["samples"] == 24
    assert config["trainable_parameters"] > 0 and config["prompts"] == [PROMPT]
    assert json.loads((runs["few"][0][0] / mcs.CONFIG_FILE).read_text())["samples"] == 4
    lines = (out / mcs.METRICS_FILE).read_text().splitlines()
    assert len(lines) == epochs
    assert {"loss", "dice_loss", "bce", "contrastive", "lr", "samples_per_s"} <= set(json.loads(lines[0]))


def test_uncertainty_is_higher_on_wrong_pixels(trained):
    runs, held_out = trained
    predictor = runs["all"][2]
    torch.manual_seed(0)
    results = predictor([s.gray for s in held_out], PROMPT, samples=8)
    wrong = np.concatenate([((p > 0.5) != s.mask).ravel() for (p, _), s in zip(results, held_out)])
    entropy = np.concatenate([h.ravel() for _, h in results])
    assert wrong.any() and (~wrong).any()
    corr = np.corrcoef(wrong.astype(float), entropy)[0, 1]
    print(f"\nuncertainty: wrong pixels {entropy[wrong].mean():.3f} bits, right {entropy[~wrong].mean():.3f} bits, "
          f"correlation with error {corr:.3f}")
    assert entropy[wrong].mean() > 2 * entropy[~wrong].mean()
    assert corr > 0.2
    assert all(0.0 <= h.min() and h.max() <= 1.0 for _, h in results)


def test_sampling_is_on_in_prediction_and_off_with_zero_samples(trained):
    """samples > 0 draws the adapters' values (each pass differs); samples=0 is one deterministic pass."""
    runs, held_out = trained
    predictor = runs["all"][2]
    grays = [s.gray for s in held_out[:2]]

    def once(samples, seed):
        torch.manual_seed(seed)
        return np.stack([p for p, _ in predictor(grays, PROMPT, samples=samples)])

    deterministic = once(0, 0)
    np.testing.assert_array_equal(once(0, 1), deterministic)
    draws = [once(1, seed) for seed in (0, 1)]
    print(f"\nsampling: one draw vs another differs by up to {np.abs(draws[0] - draws[1]).max():.3f}, "
          f"a draw vs the deterministic pass by {np.abs(draws[0] - deterministic).max():.3f}")
    assert np.abs(draws[0] - draws[1]).max() > 0.01
    assert np.abs(draws[0] - deterministic).max() > 0.01


# --------------------------------------------------------------------------------------------------
# volumes, files and the command line

def _write_png(path, array):
    from PIL import Image

    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def test_predict_volume_keeps_geometry(trained, tmp_path):
    import SimpleITK as sitk

    from MedCLIPSAMLib.io import geometry_equal, read_segmentation, read_volume, write_volume

    model_dir = trained[0]["all"][0]
    ph = phantoms.make_volume("mr", shape=(5, 44, 52), spacing=(0.9, 1.1, 3.0), origin=(-21.5, 7.0, 33.0),
                              direction="oblique", seed=3, lesion={"size": "large"})
    volume = tmp_path / "oblique.nrrd"
    write_volume(volume, ph.image)
    out, unc = tmp_path / "out.seg.nrrd", tmp_path / "u.nii.gz"
    rc = cli_main(["medclipseg", "predict", str(model_dir), str(volume), "--prompt", PROMPT, "--output", str(out),
                   "--uncertainty-output", str(unc), "--samples", "3", "--device", "cpu", "--progress", "none"])
    assert rc == 0
    segments, reference = read_segmentation(out)
    assert geometry_equal(reference, ph.image)
    assert [s["name"] for s in segments] == [PROMPT]
    u = read_volume(unc)
    assert geometry_equal(u, ph.image)
    values = sitk.GetArrayFromImage(u)
    assert values.dtype == np.float32 and values.min() >= 0 and values.max() <= 1
    # a labelmap output lies on the same grid
    labelmap = tmp_path / "out.nrrd"
    assert cli_main(["medclipseg", "predict", str(model_dir), str(volume), "--prompt", PROMPT, "--output",
                     str(labelmap), "--samples", "0", "--device", "cpu", "--progress", "none"]) == 0
    assert geometry_equal(read_volume(labelmap), ph.image)


def test_predict_2d_png(trained, tmp_path):
    from PIL import Image

    sample = phantom_sample(2000, size=(80, 112))  # not square: padded, then cropped back
    image = tmp_path / "slice.png"
    _write_png(image, sample.gray)
    out, unc = tmp_path / "mask.png", tmp_path / "u.png"
    rc = cli_main(["medclipseg", "predict", str(trained[0]["all"][0]), str(image), "--prompt", PROMPT, "--output",
                   str(out), "--uncertainty-output", str(unc), "--samples", "2", "--device", "cpu",
                   "--progress", "none"])
    assert rc == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (80, 112) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(unc)).shape == (80, 112)


def test_cli_train_from_files(tmp_path, capsys):
    """PNG pairs and an oblique volume pair on the command line; JSON progress; the model folder."""
    from MedCLIPSAMLib.io import write_labelmap, write_volume

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i in range(3):
        s = phantom_sample(500 + i, size=(64, 64))
        _write_png(images / f"case{i}.png", s.gray)
        _write_png(labels / f"case{i}.png", s.mask * 255)
    ph = phantoms.make_volume("mr", shape=(3, 40, 40), direction="oblique", seed=1, lesion={"size": "large"})
    write_volume(tmp_path / "vol.nrrd", ph.image)
    write_labelmap(tmp_path / "vol-label.nrrd", ph.labels["tumor"], ph.image)
    model_dir = tmp_path / "model"
    rc = cli_main(["medclipseg", "train", "--images", str(images), str(tmp_path / "vol.nrrd"),
                   "--labels", str(labels), str(tmp_path / "vol-label.nrrd"), "--prompts", PROMPT, "a brain lesion",
                   "--output", str(model_dir), "--model", "tiny-random", "--epochs", "1", "--batch-size", "3",
                   "--device", "cpu", "--progress", "json", "--no-augment"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines[-1]["stage"] == "finished" and any(line["stage"] == "train" for line in lines)
    config = json.loads((model_dir / mcs.CONFIG_FILE).read_text())
    assert config["samples"] == 6 and config["prompts"] == [PROMPT, "a brain lesion"]  # 3 PNGs + 3 slices
    from safetensors.torch import load_file

    state = load_file(str(model_dir / mcs.WEIGHTS_FILE))
    assert all(k.startswith(("adapters.", "head.")) for k in state)
    assert sum(v.numel() for v in state.values()) == config["trainable_parameters"]
    # a second run into the same folder is refused unless asked for
    rc = cli_main(["medclipseg", "train", "--images", str(images), "--labels", str(labels), "--prompts", PROMPT,
                   "--output", str(model_dir), "--model", "tiny-random", "--epochs", "1", "--device", "cpu"])
    assert rc == 2 and "already holds" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["no-model", "empty-prompt", "bad-suffix", "pair-count", "grid", "corrupt"])
def test_bad_input_is_one_sentence(case, tmp_path, capsys):
    from MedCLIPSAMLib.io import write_labelmap, write_volume

    ph = phantoms.make_volume("mr", shape=(2, 24, 24), seed=0, lesion=False)
    vol = tmp_path / "v.nrrd"
    write_volume(vol, ph.image)
    model = tmp_path / "model"
    model.mkdir()
    (model / mcs.CONFIG_FILE).write_text(json.dumps({"format": mcs.FORMAT, "clip": "tiny-random", "layers": 2,
                                                     "bottleneck": 64, "heads": 1, "vision_width": 192,
                                                     "text_width": 64, "embed_dim": 64}))
    (model / mcs.WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    predict = ["medclipseg", "predict", str(model), str(vol), "--prompt", PROMPT, "--output",
               str(tmp_path / "o.seg.nrrd"), "--device", "cpu", "--progress", "none"]
    if case == "no-model":
        argv = predict[:2] + [str(tmp_path / "missing")] + predict[3:]
    elif case == "empty-prompt":
        argv = predict[:5] + ["  "] + predict[6:]
    elif case == "bad-suffix":
        argv = predict[:7] + [str(tmp_path / "o.txt")] + predict[8:]
    elif case == "corrupt":
        argv = predict
    else:
        label = tmp_path / "l.nrrd"
        other = phantoms.make_volume("mr", shape=(2, 24, 24), spacing=(2, 2, 2), seed=0, lesion=False)
        write_labelmap(label, np.zeros((2, 24, 24), np.uint8), other.image if case == "grid" else ph.image)
        labels = [str(label)] + ([str(label)] if case == "pair-count" else [])
        argv = ["medclipseg", "train", "--images", str(vol), "--labels", *labels, "--prompts", PROMPT,
                "--output", str(tmp_path / "m2"), "--model", "tiny-random", "--device", "cpu", "--progress", "none"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    print(f"\n{case}: {err}")
    assert err.startswith("medclipsam: error:") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o.seg.nrrd").exists()


def test_registration_imports_no_torch():
    code = ("import argparse, sys; from MedCLIPSAMLib.cli import medclipseg; "
            "medclipseg.register(argparse.ArgumentParser().add_subparsers()); print('torch' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(phantoms.__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, torchrun):
    """DistributedDataParallel on two CPU processes (gloo): rank 0 alone writes the model and metrics."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i in range(4):
        s = phantom_sample(700 + i, size=(64, 64))
        _write_png(images / f"c{i}.png", s.gray)
        _write_png(labels / f"c{i}.png", s.mask * 255)
    model_dir = tmp_path / "model"
    out = torchrun(["medclipseg", "train", "--images", images, "--labels", labels, "--prompts", PROMPT,
                    "--output", model_dir, "--model", "tiny-random", "--epochs", "1", "--batch-size", "4",
                    "--device", "cpu", "--progress", "json"])
    assert out.returncode == 0, out.stderr[-3000:]
    finished = [json.loads(line) for line in out.stdout.splitlines() if '"finished"' in line]
    assert len(finished) == 1  # only rank 0 reports
    config = json.loads((model_dir / mcs.CONFIG_FILE).read_text())
    assert config["world_size"] == 2 and config["samples"] == 4
    assert len((model_dir / mcs.METRICS_FILE).read_text().splitlines()) == 1
