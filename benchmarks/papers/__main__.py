"""python -m benchmarks.papers DATASET DATA_DIR [--preset v1|v2] [--weak] [--ablation] [--limit N] --json OUT

Runs the MedCLIP-SAM papers' evaluation on a public data set with this project's pipeline and prints one
table: data set, stage, the paper's figure, ours, the difference, and the models (random weights or not).
Scores are cached per case in OUT's folder (OUT.cache/), so a stopped run picks up where it was.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from MedCLIPSAMLib.errors import MedCLIPSAMError

from .. import write_record
from .datasets import DATASETS, load_dataset
from .published import SOURCES, paper_figure
from .run import Runner
from .stages import plan

SCHEMA = "medclipsam-papers"
SCHEMA_VERSION = 1
# closest to the papers: BiomedCLIP as published and a SAM trained on natural images only (the papers used
# SAM ViT-H; MedSAM-style models saw medical test sets in training, which the MedCLIP-SAM rebuttal names as
# breaking the zero-shot setting). '--models default' runs the project's default (MedSAM2).
DEFAULT_MODELS = "biomedclip,sam2.1-hiera-large"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.papers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=DATASETS, help="busi | brain | covidqu | lungct | msd")
    p.add_argument("data_dir", help="the data set's folder, in its published layout (benchmarks/README.md)")
    p.add_argument("--preset", choices=("v1", "v2"), default="v2")
    p.add_argument("--weak", action="store_true", help="also the weak-supervision stage (trains on the "
                   "zero-shot pseudo-labels of the training split, predicts the test split)")
    p.add_argument("--ablation", action="store_true", help="also MedCLIP-SAMv2's ablation rows (v2)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N cases of each split used")
    p.add_argument("--json", required=True, metavar="OUT", help="the record (schema: benchmarks/README.md)")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"'CLIP,SAM2' names or folders (default {DEFAULT_MODELS}), 'default' (the project's), "
                        "or 'tiny-random' (random weights: checks the harness, measures nothing)")
    p.add_argument("--finetuned-clip", metavar="FOLDER", help="a DHN-NCE fine-tuned CLIP (medclipsam "
                   "finetune-clip): used from the +dhn-nce row on, and by the zero-shot rows")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a pipeline setting in every zero-shot row (as medclipsam's --set), e.g. "
                        "--set sam=none; recorded in the JSON")
    p.add_argument("--mode", default="per-slice", help="3D (msd): the volume mode; per-slice is the papers'")
    p.add_argument("--device", default="auto")
    p.add_argument("--weak-epochs", type=int, default=50)
    p.add_argument("--weak-snapshots", type=int, default=5)
    p.add_argument("--weak-filters", type=int, default=32)
    p.add_argument("--weak-max-patch", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    return args


def load_models(args, device, need_sam=True):
    """{"clip", "finetuned", "sam", "sam_name", "names", "random"}; a missing model file raises one sentence.
    SAM2 loads only when a row uses it."""
    from MedCLIPSAMLib.models import load_clip, load_sam2, resolve_model_set

    clip_name, sam_name = resolve_model_set(args.models)
    clip = load_clip(clip_name, device)
    finetuned = load_clip(args.finetuned_clip, device) if args.finetuned_clip else None
    sam = load_sam2(sam_name, device) if need_sam else None
    random = bool(clip.is_random or clip_name == "tiny-random" or str(sam_name).startswith(("tiny-random", "random-")))
    return {"clip": clip, "finetuned": finetuned, "sam": sam, "sam_name": sam_name, "random": random,
            "names": {"clip": clip_name, "sam": sam_name, "finetuned_clip": args.finetuned_clip}}


def summarize(dataset, stage, rows, from_cache):
    dice = [r["dice"] for r in rows]
    nsd = [r["nsd"] for r in rows]
    ours = {"dice": float(np.mean(dice)) if dice else None, "nsd": float(np.mean(nsd)) if nsd else None}
    paper = paper_figure(dataset.key, stage.name)

    def diff(key):
        return None if not paper or paper.get(key) is None or ours[key] is None else ours[key] - paper[key]

    return {"stage": stage.name, "description": stage.description, "cases": len({r["case"] for r in rows}),
            "from_cache": from_cache, "dice": ours["dice"], "nsd": ours["nsd"], "paper": paper,
            "diff_dice": diff("dice"), "diff_nsd": diff("nsd"), "finetuned_clip": bool(stage.finetuned)}


def _num(v):
    return "-" if v is None else f"{v:.2f}"


def _signed(v):
    return "-" if v is None else f"{v:+.2f}"


def table(record):
    models = record["models"]
    weights = "RANDOM weights: meaningless figures" if models["random"] else "published weights"
    used = f"{models['clip']} + {models['sam']} ({weights})"
    head = ("data set", "stage", "paper DSC", "ours DSC", "diff", "paper NSD", "ours NSD", "diff", "n")
    lines = []
    for row in record["rows"]:
        paper = row["paper"] or {}
        note = " *" if paper.get("note") else ""
        lines.append((record["dataset"]["key"], row["stage"], _num(paper.get("dice")) + note, _num(row["dice"]),
                      _signed(row["diff_dice"]), _num(paper.get("nsd")), _num(row["nsd"]), _signed(row["diff_nsd"]),
                      str(row["cases"])))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in (head, *lines)]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append(f"models: {used}; split: {record['split']} ({record['dataset']['split_source']})")
    if any((r["paper"] or {}).get("note") for r in record["rows"]):
        out.append("* the paper's ablation figure is the mean over its four data sets")
    if models["random"]:
        out.append("NOTE: random-weight models: these numbers check the harness, not the method")
    return "\n".join(out)


def environment(device):
    import torch

    from ..speed import cpu_description

    repo = Path(__file__).resolve().parents[2]

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    gpu = torch.cuda.get_device_name(0) if str(device).startswith("cuda") else None
    return {"device": str(device), "gpu": gpu, **cpu_description(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.papers", *sys.argv[1:]])}


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.json)
    try:
        if not out.parent.resolve().is_dir():
            raise MedCLIPSAMError(f"cannot write '{out}': folder '{out.parent}' does not exist")
        dataset = load_dataset(args.dataset, args.data_dir)
        stages = plan(dataset.key, args.preset, args.weak, args.ablation, bool(args.finetuned_clip), args.overrides)
        from MedCLIPSAMLib.runtime import seed_everything, select_device

        seed_everything(args.seed)
        device = select_device(args.device)
        models = load_models(args, device, need_sam=any(s.settings.sam == "sam" for s in stages))
        runner = Runner(dataset, models, f"{out}.cache", device, args)
        test = dataset.split("test", args.limit)
        train = dataset.split("train", args.limit)
        rows, per_case = [], {}
        for stage in stages:
            if stage.name in per_case:
                continue
            scores = runner.weak(stage, train, test) if stage.kind == "weak" else runner.zero_shot(stage, test)
            per_case[stage.name] = scores
            rows.append(summarize(dataset, stage, scores, runner.from_cache.get(stage.name, 0)))
    except MedCLIPSAMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    record = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "dataset": {"key": dataset.key, "title": dataset.title, "layout": dataset.layout,
                    "data_dir": os.path.abspath(args.data_dir), "split_source": dataset.split_source,
                    "targets": [{"value": v, "prompt": p} for v, p in dataset.targets],
                    "cases": {s: len(dataset.split(s)) for s in ("train", "val", "test")}},
        "split": "test", "limit": args.limit, "preset": args.preset, "overrides": args.overrides,
        "settings": {s.name: _settings(s) for s in stages},
        "models": {**models["names"], "random": models["random"]},
        "rows": rows, "per_case": per_case, "sources": SOURCES,
        "environment": environment(device),
    }
    write_record(str(out), record)
    print(table(record))
    print(f"record: {out}")
    return 0


def _settings(stage):
    from dataclasses import asdict

    return {"kind": stage.kind, **json.loads(json.dumps(asdict(stage.settings), default=str))}


if __name__ == "__main__":
    sys.exit(main())
