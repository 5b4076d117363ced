"""nnU-Net v2 vs DynUNet for weak supervision: the same pseudo-labels, the same budget, side by side.

    python -m benchmarks.weak_trainers --json benchmarks/results/weak_trainers_cpu.json [--epochs 8]

Data: 2D MR phantoms (64 x 64, "brain"), written as an nnU-Net raw data set. Their training labels are the
ground truth corrupted the way zero-shot masks go wrong (shifted, over- or under-segmented, a bounding box,
or missed), as in the weak-supervision test: these stand in for pseudo-labels, which need real CLIP / SAM
weights this machine cannot download. Held-out phantoms (other seeds) are scored against their ground truth:
Dice and NSD (2 mm), mean over cases, and the pseudo-labels' own Dice as the baseline to beat.

Budget: both trainers see the same number of training patches. nnU-Net runs first with its planned batch
size b, EPOCHS x ITERATIONS batches; DynUNet then gets the same epochs, batch b and ITERATIONS x b samples
per epoch, the same snapshots (cyclic schedule) and SGD 0.01. Time: wall-clock seconds of the whole train
call (nnU-Net's includes its fingerprint, planning and preprocessing, reported apart) and of the epochs alone.
One thread per process; the machine's load average is recorded, since the cores are shared.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import write_record

TARGET = "brain"


def corrupt(mask, rng):
    from scipy import ndimage

    kind = rng.choice(["shift", "dilate", "erode", "box", "miss"], p=[0.4, 0.2, 0.15, 0.15, 0.1])
    if kind == "shift":
        d, a = rng.integers(2, 5), rng.uniform(0, 2 * np.pi)
        return ndimage.shift(mask, (round(d * np.sin(a)), round(d * np.cos(a))), order=0)
    if kind == "dilate":
        return ndimage.binary_dilation(mask, iterations=int(rng.integers(2, 4))).astype(np.uint8)
    if kind == "erode":
        return ndimage.binary_erosion(mask, iterations=2).astype(np.uint8)
    if kind == "box":
        out = np.zeros_like(mask)
        box = ndimage.find_objects(mask)[0]
        out[tuple(slice(max(0, s.start - 2), s.stop + 2) for s in box)] = 1
        return out
    return np.zeros_like(mask)


def make_data(root, n_train, n_test, seed):
    import SimpleITK as sitk

    from MedCLIPSAMLib.io import write_labelmap, write_volume
    from MedCLIPSAMLib.metrics import dice
    from MedCLIPSAMLib.phantoms import make_image

    raw = root / "Dataset501_Brain"
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    tests, pseudo = [], []
    rng = np.random.default_rng(seed)
    for i in range(n_train + n_test):
        ph = make_image("mr", size=(64, 64), seed=seed * 1000 + i, lesion={"size": "large"})
        img = sitk.GetImageFromArray(ph.image[None])
        img.SetSpacing((0.9, 0.9, 1.0))
        truth = ph.labels[TARGET].astype(np.uint8)
        if i < n_train:
            weak = corrupt(truth, rng).astype(np.uint8)
            pseudo.append(dice(weak, truth))
            write_volume(raw / "imagesTr" / f"case{i:03d}_0000.nii.gz", img)
            write_labelmap(raw / "labelsTr" / f"case{i:03d}.nii.gz", weak[None], img)
        else:
            tests.append((img, truth))
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "zscore"}, "labels": {"background": 0, TARGET: 1}, "numTraining": n_train,
        "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO"}))
    return raw, tests, float(np.mean(pseudo))


def score(folder, tests):
    from MedCLIPSAMLib.metrics import dice, normalized_surface_dice
    from MedCLIPSAMLib.training.predict import load_model, predict_volume

    model = load_model(folder, "cpu")
    dices, nsds = [], []
    start = time.perf_counter()
    for img, truth in tests:
        pred = predict_volume(model, img).labels[0] > 0
        dices.append(dice(pred, truth))
        nsds.append(normalized_surface_dice(pred, truth, spacing=(0.9, 0.9), tolerance_mm=2.0))
    return {"dice": float(np.mean(dices)), "nsd": float(np.mean(nsds)), "dice_per_case": [round(d, 4) for d in dices],
            "predict_seconds_per_case": (time.perf_counter() - start) / len(tests)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--iterations", type=int, default=20, help="batches per epoch")
    p.add_argument("--snapshots", type=int, default=2)
    p.add_argument("--train", type=int, default=24)
    p.add_argument("--test", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from MedCLIPSAMLib.progress import null_progress
    from MedCLIPSAMLib.training.nnunet import NnUNetOptions, train_nnunet
    from MedCLIPSAMLib.training.weak import WeakOptions, train_weak

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="weak-trainers-") as tmp:
        root = Path(tmp)
        raw, tests, pseudo_dice = make_data(root, args.train, args.test, args.seed)
        results = {}

        start = time.perf_counter()
        records = train_nnunet(NnUNetOptions(dataset=str(raw), output=str(root / "nnunet"), dims=2, epochs=args.epochs,
                                             iterations_per_epoch=args.iterations, snapshots=args.snapshots,
                                             device="cpu", seed=args.seed), null_progress())
        total = time.perf_counter() - start
        config = json.loads((root / "nnunet" / "config.json").read_text())
        plans = json.loads((root / "nnunet" / config["nnunet"]["results"] / "plans.json").read_text())
        plan = plans["configurations"]["2d"]
        batch = int(plan["batch_size"])
        epochs_s = sum(r["seconds"] for r in records)
        results["nnunetv2"] = {"train_seconds": round(total, 1), "epoch_seconds": round(epochs_s, 1),
                               "plan_and_preprocess_seconds": round(total - epochs_s, 1), "batch_size": batch,
                               "patch_size": plan["patch_size"], "features": plan["architecture"]["arch_kwargs"]
                               ["features_per_stage"], **score(root / "nnunet", tests)}
        print(f"nnU-Net: Dice {results['nnunetv2']['dice']:.3f}, NSD {results['nnunetv2']['nsd']:.3f}, "
              f"{total:.0f} s ({epochs_s:.0f} s of epochs)", flush=True)

        start = time.perf_counter()
        records = train_weak(WeakOptions(images=[str(raw / "imagesTr")], labels=[str(raw / "labelsTr")],
                                         output=str(root / "dynunet"), dims=2, epochs=args.epochs, batch_size=batch,
                                         samples_per_epoch=args.iterations * batch, snapshots=args.snapshots,
                                         schedule="cyclic", lr=0.01, val_fraction=0.2, val_every=args.epochs,
                                         device="cpu", seed=args.seed), null_progress())
        total = time.perf_counter() - start
        epochs_s = sum(r["seconds"] for r in records if "loss" in r)
        dyn = json.loads((root / "dynunet" / "config.json").read_text())
        results["dynunet"] = {"train_seconds": round(total, 1), "epoch_seconds": round(epochs_s, 1),
                              "batch_size": batch, "patch_size": dyn["patch_size"],
                              "features": dyn["network"]["filters"], **score(root / "dynunet", tests)}
        print(f"DynUNet: Dice {results['dynunet']['dice']:.3f}, NSD {results['dynunet']['nsd']:.3f}, "
              f"{total:.0f} s ({epochs_s:.0f} s of epochs)", flush=True)

    report = {
        "what": "weak supervision on the same corrupted 'pseudo-labels' of 2D MR phantoms, same budget; held-out "
                "Dice / NSD (2 mm) against ground truth; CPU, one thread per process",
        "settings": {**vars(args), "patches_seen": args.epochs * args.iterations * batch},
        "pseudo_label_dice_vs_truth": round(pseudo_dice, 4),
        "results": results,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
    }
    print(f"\n{'trainer':10s} {'Dice':>6s} {'NSD':>6s} {'train s':>8s} {'epochs s':>9s}")
    print(f"{'pseudo':10s} {pseudo_dice:6.3f}")
    for name, r in results.items():
        print(f"{name:10s} {r['dice']:6.3f} {r['nsd']:6.3f} {r['train_seconds']:8.1f} {r['epoch_seconds']:9.1f}")
    if args.json:
        write_record(args.json, report)
    return report


if __name__ == "__main__":
    main()
