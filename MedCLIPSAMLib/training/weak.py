"""Weak supervision: a segmentation network trained on (pseudo-)labels, MedCLIP-SAM v1/v2's last stage.

Network: MONAI's DynUNet in the nnU-Net configuration. The patch is the training cases' median size (capped);
the spacing is their median; kernels and strides follow nnU-Net's rules: an axis is pooled while its
current spacing is at most twice the finest one and the feature map along it stays at least 4 voxels;
its kernel is 3 where its spacing is at most twice the finest, else 1 (so a 5 mm slice axis is neither
convolved nor pooled until the in-plane axes have caught up); filters 32, 64, ... capped at 512 (2D) /
320 (3D); instance norm, leaky ReLU, deep supervision on two extra scales (weights 1, 1/2, 1/4).

Training: DiceCE (batch Dice of the foreground classes + cross-entropy), SGD with Nesterov momentum 0.99
(nnU-Net) or AdamW, and a per-iteration learning-rate schedule:
  cyclic  cosine annealing restarted in `snapshots` equal cycles; a snapshot at the end of each cycle,
          where the rate is lowest (snapshot ensembles, Huang et al. 2017; the v2 paper's "checkpoints from
          several points of training" with a cyclic rate);
  cosine  one cosine decay over the whole run; snapshots evenly spread over its second half.
Inference averages the snapshots' probabilities (predict.py). bf16 autocast on CUDA by default, seeds
for python / numpy / torch and per-sample augmentation generators, so a run is reproducible.

Under `torchrun --nproc_per_node N` it trains with DistributedDataParallel (nccl on CUDA, gloo on CPU):
a DistributedSampler splits each epoch, `batch_size` is the global batch, and rank 0 validates and writes.

The model folder (every file written atomically by rank 0):
  config.json           the network plan, normalisation, label names, threshold, snapshots, options
  snapshot-K.pt         state dict of snapshot K (tensors only: loads with torch.load(weights_only=True))
  metrics.jsonl         one line per epoch: epoch, loss, lr, val_dice (or null), seconds, samples_per_s,
                        snapshot (file name or null); the last line has "ensemble_val_dice"
  metrics.png           training loss and validation Dice per epoch, snapshots marked
A cancelled run (SIGTERM / Ctrl-C, checked every iteration) keeps the snapshots already saved, which
config.json lists, so the folder stays usable; no file is ever half-written.
Validation Dice is measured against the held-out cases' labels, which are pseudo-labels when no ground
truth exists: it then measures agreement with the zero-shot masks, not accuracy.
"""

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import MedCLIPSAMError, optional_import
from ..progress import null_progress
from ..runtime import atomic_output, autocast, log, seed_everything
# the folder format is defined once, beside the registry that recognises finished models
from ..trained_models import WEAK_CONFIG as CONFIG_FILE
from ..trained_models import WEAK_FORMAT as FORMAT
from .run_records import (METRICS_FILE, PLOT_FILE, append_jsonl, lr_factor, plot_metrics,  # noqa: F401
                          read_metrics, snapshot_epochs, write_json)
from .weak_network import build_network

SCHEDULES = ("cyclic", "cosine")
OPTIMIZERS = ("sgd", "adamw")
DEEP_SUPERVISION_WEIGHTS = (1.0, 0.5, 0.25)


@dataclass
class WeakOptions:
    images: list                      # folders, list files or image files
    labels: list                      # the same for labels, matched to images by case name
    output: str                       # model folder
    dims: int = 2
    axis: str = "axial"               # stacking axis (patient space); 2D images use their flat axis
    epochs: int = 50
    batch_size: int = 12              # global batch (all ranks together)
    lr: float = 0.01
    optimizer: str = "sgd"
    weight_decay: float = 3e-5
    schedule: str = "cyclic"
    snapshots: int = 5
    samples_per_epoch: int = None     # default: every slice (2D) / case (3D) once
    patch_size: tuple = None          # default: the median case size, capped by max_patch
    max_patch: int = None             # default 512 (2D) / 128 (3D) voxels per axis
    base_filters: int = 32
    max_filters: int = None           # default 512 (2D) / 320 (3D), as nnU-Net
    deep_supervision: bool = True
    normalization: str = "auto"       # auto | ct | zscore
    val_fraction: float = 0.2
    val_every: int = 1
    fg_fraction: float = 0.33
    augment: bool = True
    mirror: bool = False
    threshold: float = 0.2            # v2: foreground probability of the ensemble mean
    label_names: list = None
    amp: bool = None                  # default: on for CUDA
    device: str = "auto"
    seed: int = 0
    workers: int = 0


# --------------------------------------------------------------------------------------------------
# network


def plan_network(patch, spacing, base_filters=32, max_filters=None, min_edge=4, max_stages=6,
                 deep_supervision=True):
    """nnU-Net-style kernels, strides and filters for a patch (voxels) at a spacing (mm), per axis.

    Returns {"patch_size" (rounded up to a multiple of each axis's total stride), "kernel_size",
    "strides", "filters", "deep_supr_num"}."""
    dims = len(patch)
    size, sp = [int(p) for p in patch], [float(s) for s in spacing]

    def kernel(spacing_now):
        finest = min(spacing_now)
        return [3 if s <= 2 * finest else 1 for s in spacing_now]

    kernels, strides, pools = [kernel(sp)], [[1] * dims], [0] * dims
    while len(strides) < max_stages:
        finest = min(sp)
        pool = [s <= 2 * finest and n >= 2 * min_edge for s, n in zip(sp, size)]
        if not any(pool):
            break
        strides.append([2 if p else 1 for p in pool])
        size = [n // 2 if p else n for n, p in zip(size, pool)]
        sp = [s * 2 if p else s for s, p in zip(sp, pool)]
        pools = [c + int(p) for c, p in zip(pools, pool)]
        # an axis convolved with 3 stays so; a coarse one joins once the others have caught up
        kernels.append([max(a, b) for a, b in zip(kernels[-1], kernel(sp))])
    if len(strides) < 3:
        raise MedCLIPSAMError(f"the patch {tuple(patch)} is too small for a U-Net; it needs at least "
                              f"{4 * min_edge} voxels along the finest axes")
    max_filters = max_filters or (512 if dims == 2 else 320)
    return {
        "patch_size": [int(math.ceil(p / 2 ** k) * 2 ** k) for p, k in zip(patch, pools)],
        "kernel_size": kernels,
        "strides": strides,
        "filters": [int(min(base_filters * 2 ** i, max_filters)) for i in range(len(strides))],
        "deep_supr_num": min(len(DEEP_SUPERVISION_WEIGHTS) - 1, len(strides) - 2) if deep_supervision else 0,
    }


# --------------------------------------------------------------------------------------------------
# schedule


def _clear_previous_run(folder):
    """A new run replaces an old one in the same folder: stale snapshots must not join the ensemble."""
    for p in folder.glob("snapshot-*.pt"):
        p.unlink()
    for name in (CONFIG_FILE, METRICS_FILE, PLOT_FILE):
        if (folder / name).exists():
            (folder / name).unlink()


# --------------------------------------------------------------------------------------------------
# training


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: object = None

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _init_distributed(device_name):
    import torch

    from ..runtime import select_device

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return _Dist(0, 1, select_device(device_name))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", 0))
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return _Dist(dist.get_rank(), dist.get_world_size(), device)


def check_options(opts):
    if opts.dims not in (2, 3):
        raise MedCLIPSAMError(f"--dims must be 2 or 3, got {opts.dims}")
    if opts.epochs < 1:
        raise MedCLIPSAMError("--epochs must be at least 1")
    if opts.batch_size < 1:
        raise MedCLIPSAMError("--batch-size must be at least 1")
    if not 1 <= opts.snapshots <= opts.epochs:
        raise MedCLIPSAMError(f"--snapshots must lie between 1 and the number of epochs ({opts.epochs})")
    if opts.schedule not in SCHEDULES:
        raise MedCLIPSAMError(f"unknown schedule '{opts.schedule}'; choose {' or '.join(SCHEDULES)}")
    if opts.optimizer not in OPTIMIZERS:
        raise MedCLIPSAMError(f"unknown optimizer '{opts.optimizer}'; choose {' or '.join(OPTIMIZERS)}")
    if not opts.lr > 0:
        raise MedCLIPSAMError("--lr must be positive")
    if not 0.0 <= opts.val_fraction < 1.0:
        raise MedCLIPSAMError("--val-fraction must lie in [0, 1)")
    if not 0.0 < opts.threshold < 1.0:
        raise MedCLIPSAMError("--threshold must lie between 0 and 1")
    if opts.patch_size is not None and len(opts.patch_size) != opts.dims:
        raise MedCLIPSAMError(f"--patch-size needs {opts.dims} numbers for a {opts.dims}D network")
    out = Path(opts.output)
    if out.exists() and not out.is_dir():
        raise MedCLIPSAMError(f"output '{out}' exists and is not a folder")
    if not out.parent.resolve().is_dir():
        raise MedCLIPSAMError(f"cannot create '{out}': folder '{out.parent}' does not exist")


def _split(pairs, fraction, seed):
    """Held-out cases for validation; with one case (or fraction 0) the training cases are validated."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = 0 if fraction <= 0 or len(pairs) < 2 else min(len(pairs) - 1, max(1, round(fraction * len(pairs))))
    val = sorted(order[:n_val].tolist())
    return [pairs[i] for i in sorted(order[n_val:].tolist())], [pairs[i] for i in val]


def _choose_patch(cases, dims, max_patch):
    shapes = np.array([c.image.shape[1:] if dims == 2 else c.image.shape for c in cases])
    median = np.median(shapes, axis=0)
    cap = max_patch or (512 if dims == 2 else 128)
    return [int(min(m, cap)) for m in median]


def _label_names(found, given, classes):
    names = list(given or found or [])
    names += [f"label {k}" for k in range(len(names) + 1, classes)]
    return names[: classes - 1]


def validate(networks, cases, config, device, amp):
    """Mean over cases (and foreground classes) of the Dice of the thresholded prediction."""
    from ..metrics import dice
    from .predict import infer_stack, labels_from_probabilities

    scores = []
    for case in cases:
        prob = infer_stack(networks, case.image, config["dims"], config["patch_size"], device, amp)
        pred = labels_from_probabilities(prob, config["threshold"])
        scores.append(np.mean([dice(pred == k, case.label == k) for k in range(1, config["classes"])]))
    return float(np.mean(scores))


def _load_cases(pairs, axis, progress):
    """The cases as stacks, and label names found in the files (.seg.nrrd, a data set's label table)."""
    from .weak_data import load_case

    progress.stage("load", len(pairs), "reading images and labels")
    cases, names = [], None
    for name, image, label in pairs:
        case, found = load_case(name, image, label, axis)
        cases.append(case)
        names = names or found
        progress.advance(1, name)
    return cases, names


def train_weak(opts, progress=None):
    """Train on opts.images / opts.labels; returns the metrics records. See the module docstring."""
    import torch

    optional_import("monai", "train", "weak supervision")
    check_options(opts)
    progress = progress or null_progress()
    dist = _init_distributed(opts.device)
    try:
        return _train(opts, progress, dist)
    finally:
        if dist.world > 1:
            torch.distributed.destroy_process_group()


def _prepare(opts, progress):
    """Read and normalise the cases and plan the network: (config, training cases, validation cases)."""
    from .weak_data import fit_normalization, labels_provenance, list_inputs, match_pairs, normalize

    pairs = match_pairs(list_inputs(opts.images, "images", role="images"),
                         list_inputs(opts.labels, "labels", folders_are_cases=False, role="labels"))
    train_pairs, val_pairs = _split(pairs, opts.val_fraction, opts.seed)
    cases, found_names = _load_cases(train_pairs + val_pairs, opts.axis, progress)
    train_cases, val_cases = cases[: len(train_pairs)], cases[len(train_pairs):]
    norm = fit_normalization(train_cases, opts.normalization, opts.seed)
    for c in cases:
        c.image = normalize(c.image, norm)
    classes = max(2, max(int(c.label.max()) for c in cases) + 1)
    spacing = np.median([c.spacing[3 - opts.dims:] for c in train_cases], axis=0).tolist()
    patch = list(opts.patch_size) if opts.patch_size else _choose_patch(train_cases, opts.dims, opts.max_patch)
    plan = plan_network(patch, spacing, opts.base_filters, opts.max_filters, deep_supervision=opts.deep_supervision)
    config = {
        "format": FORMAT, "dims": opts.dims, "axis": opts.axis, "classes": classes,
        "label_names": _label_names(found_names, opts.label_names, classes), "patch_size": plan.pop("patch_size"),
        "spacing": spacing, "network": plan, "normalization": norm, "threshold": opts.threshold, "snapshots": [],
        "cases": {"train": [p[0] for p in train_pairs], "validation": [p[0] for p in val_pairs]},
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "provenance": labels_provenance([p[2] for p in pairs]),   # pseudo-labels of random models stay marked
    }
    log.info("weak supervision: %d training / %d validation cases, %dD patch %s, spacing %s, %d classes",
             len(train_cases), len(val_pairs), opts.dims, config["patch_size"], [round(s, 3) for s in spacing],
             classes)
    return config, train_cases, val_cases or train_cases


def _loss(config):
    """nnU-Net's loss: Dice over the foreground classes only (a small target would otherwise be swamped by
    the background's near-perfect Dice), over the whole batch, plus cross-entropy; with deep supervision
    each extra scale (upsampled by DynUNet to the label's size) is weighted 1, 1/2, 1/4, normalised."""
    from monai.losses import DiceCELoss

    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    n = config["network"]["deep_supr_num"]
    if not n:
        return dice_ce
    weights = np.array(DEEP_SUPERVISION_WEIGHTS[: n + 1])
    weights = (weights / weights.sum()).tolist()
    return lambda out, y: sum(w * dice_ce(out[:, i], y) for i, w in enumerate(weights))


def _optimizer(opts, net):
    import torch

    if opts.optimizer == "sgd":
        return torch.optim.SGD(net.parameters(), lr=opts.lr, momentum=0.99, nesterov=True,
                               weight_decay=opts.weight_decay)
    return torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)


def _save_snapshot(net, folder, config, epoch, val_dice):
    import torch

    name = f"snapshot-{len(config['snapshots']) + 1}.pt"
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    with atomic_output(folder / name) as tmp:
        torch.save(state, tmp)
    config["snapshots"].append({"file": name, "epoch": epoch, "val_dice": val_dice})
    write_json(folder / CONFIG_FILE, config)   # the folder is usable from the first snapshot on
    return name, state


def _train(opts, progress, dist):
    import torch

    from .weak_data import PatchDataset

    seed_everything(opts.seed)
    torch.backends.cudnn.benchmark = False      # autotuning picks kernels by timing: not reproducible
    torch.backends.cudnn.deterministic = True
    device = dist.device
    amp = (device.type == "cuda") if opts.amp is None else bool(opts.amp)
    config, train_cases, val_cases = _prepare(opts, progress)

    net = build_network(config).to(device)
    model = net
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn, optimizer = _loss(config), _optimizer(opts, net)
    dataset = PatchDataset(train_cases, opts.dims, config["patch_size"], opts.samples_per_epoch, opts.fg_fraction,
                           opts.augment, opts.mirror, opts.seed)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                                  seed=opts.seed)
    per_rank = max(1, opts.batch_size // dist.world)
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=opts.workers,
                                         pin_memory=device.type == "cuda")
    per_epoch = len(loader)
    snaps = snapshot_epochs(opts.epochs, opts.snapshots, opts.schedule)
    cycle_ends = snaps if opts.schedule == "cyclic" else [opts.epochs]

    folder = Path(opts.output)
    if dist.main:
        folder.mkdir(parents=True, exist_ok=True)
        _clear_previous_run(folder)
        write_json(folder / CONFIG_FILE, config)
    dist.barrier()

    records, snapshot_states, iteration = [], [], 0
    progress.stage("train", opts.epochs, f"training a {opts.dims}D DynUNet on {len(train_cases)} case(s)")
    for epoch in range(1, opts.epochs + 1):
        start = time.perf_counter()
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        model.train()
        total, count = 0.0, 0
        for x, y in loader:
            for group in optimizer.param_groups:
                group["lr"] = opts.lr * lr_factor(iteration, per_epoch, cycle_ends)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                out = model(x)
            loss = loss_fn(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            optimizer.step()
            total, count, iteration = total + float(loss.detach()), count + 1, iteration + 1
            progress.check_cancelled()
        loss_value = _mean_over_ranks(total / max(1, count), dist, device)
        seconds = time.perf_counter() - start
        record = {"epoch": epoch, "loss": round(loss_value, 6), "lr": optimizer.param_groups[0]["lr"],
                  "val_dice": None, "seconds": round(seconds, 3),
                  "samples_per_s": round(count * per_rank * dist.world / max(seconds, 1e-9), 2), "snapshot": None}
        if dist.main:   # validation and files: rank 0 alone, the others wait at the barrier
            if epoch % max(1, opts.val_every) == 0 or epoch in snaps:
                net.eval()
                record["val_dice"] = round(validate([net], val_cases, config, device, amp), 6)
            if epoch in snaps:
                record["snapshot"], state = _save_snapshot(net, folder, config, epoch, record["val_dice"])
                snapshot_states.append(state)
            append_jsonl(folder / METRICS_FILE, record)
            if record["snapshot"] or epoch == opts.epochs:
                plot_metrics(records + [record], folder / PLOT_FILE)
        records.append(record)
        dist.barrier()
        dice_text = f", val Dice {record['val_dice']:.3f}" if record["val_dice"] is not None else ""
        progress.advance(1, f"epoch {epoch}/{opts.epochs}: loss {loss_value:.4f}{dice_text}")

    if dist.main:
        final = _ensemble_record(snapshot_states, config, val_cases, device, amp)
        config["ensemble_val_dice"] = final["ensemble_val_dice"]
        write_json(folder / CONFIG_FILE, config)
        append_jsonl(folder / METRICS_FILE, final)
        records.append(final)
        plot_metrics(records, folder / PLOT_FILE)
    dist.barrier()
    return records


def _ensemble_record(states, config, cases, device, amp):
    nets = []
    for state in states:
        n = build_network(config).to(device)
        n.load_state_dict(state)
        nets.append(n.eval())
    return {"epoch": config["options"]["epochs"], "event": "ensemble", "snapshots": len(nets),
            "ensemble_val_dice": round(validate(nets, cases, config, device, amp), 6)}


def _mean_over_ranks(value, dist, device):
    if dist.world == 1:
        return float(value)
    import torch
    import torch.distributed as tdist

    t = torch.tensor([float(value)], device=device)
    tdist.all_reduce(t)
    return float(t.item()) / dist.world
