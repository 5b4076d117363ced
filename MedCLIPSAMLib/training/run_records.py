"""A training run's schedule and records, shared by the DynUNet and nnU-Net trainers: snapshot epochs, the
cyclic learning rate, and metrics.jsonl / metrics.png / JSON files written atomically."""

import json
import math
from pathlib import Path

from ..runtime import atomic_output

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"


def snapshot_epochs(epochs, snapshots, schedule):
    """Epochs (1-based) after which a snapshot is saved."""
    if schedule == "cyclic":
        points = [round(k * epochs / snapshots) for k in range(1, snapshots + 1)]
    else:  # evenly over the second half of one cosine decay
        half = epochs / 2.0
        points = [epochs - round((snapshots - 1 - k) * half / snapshots) for k in range(snapshots)]
    return sorted({max(1, int(p)) for p in points})


def lr_factor(iteration, iterations_per_epoch, cycle_ends):
    """Cosine from 1 to 0 within each cycle; cycles end at the epochs in `cycle_ends` (last = epochs)."""
    bounds = [0] + [e * iterations_per_epoch for e in cycle_ends]
    for start, end in zip(bounds, bounds[1:]):
        if iteration < end:
            return 0.5 * (1.0 + math.cos(math.pi * (iteration - start) / max(1, end - start)))
    return 0.0


# --------------------------------------------------------------------------------------------------
# output files


def write_json(path, obj):
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n")   # default: Path options


def append_jsonl(path, record):
    # rewritten whole through a temp file: a reader (the Slicer panel) never sees a torn last line
    old = Path(path).read_text() if Path(path).is_file() else ""
    with atomic_output(path) as tmp:
        Path(tmp).write_text(old + json.dumps(record) + "\n")


def read_metrics(folder):
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(records, path):
    """Training loss and validation Dice per epoch (snapshots as dotted lines), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r for r in records if "loss" in r]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["epoch"] for r in epochs], [r["loss"] for r in epochs], "-", color="tab:blue")
    ax_loss.set(xlabel="epoch", ylabel="DiceCE loss", title="training loss")
    val = [(r["epoch"], r["val_dice"]) for r in epochs if r.get("val_dice") is not None]
    if val:
        ax_dice.plot(*zip(*val), "o-", color="tab:green", markersize=3, label="validation Dice")
    ens = [r for r in records if r.get("ensemble_val_dice") is not None]
    if ens:
        ax_dice.axhline(ens[-1]["ensemble_val_dice"], color="tab:red", linestyle="--", label="snapshot ensemble")
    for r in epochs:
        if r.get("snapshot"):
            for ax in (ax_loss, ax_dice):
                ax.axvline(r["epoch"], color="grey", linestyle=":", linewidth=0.8)
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="validation Dice", ylim=(0, 1.02))
    if val or ens:
        ax_dice.legend(loc="lower right")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
