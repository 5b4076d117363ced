"""`medclipsam finetune-clip` and `medclipsam evaluate-retrieval` (imports torch only when run)."""

import argparse
import json
import os

from ..runtime import DEVICE_CHOICES

LOSS_CHOICES = ("dhn-nce", "infonce", "hn-nce")


def register(sub):
    p = sub.add_parser(
        "finetune-clip", help="fine-tune a CLIP model on image-caption pairs (DHN-NCE, InfoNCE, HN-NCE)",
        description="Fine-tune BiomedCLIP (or another CLIP folder) on image-caption pairs. DATA is a CSV or "
                    "JSONL with 'image' and 'caption' fields (image paths relative to the file) or a folder of "
                    "images with same-name .txt captions. The output folder is a CLIP model folder usable "
                    "wherever a model is asked for, updated after every epoch, with metrics.jsonl and "
                    "metrics.png. Defaults are the released MedCLIP-SAM settings. Under "
                    "'torchrun --nproc_per_node N' it trains with DistributedDataParallel.")
    p.add_argument("--data", required=True, help="CSV / JSONL of image,caption or a folder of image + .txt")
    p.add_argument("--output", required=True, metavar="CKPT_DIR", help="folder for the fine-tuned model and logs")
    p.add_argument("--model", default="biomedclip", help="biomedclip, tiny-random, random-biomedclip or a CLIP folder")
    p.add_argument("--loss", choices=LOSS_CHOICES, default="dhn-nce")
    p.add_argument("--temperature", default="0.6", help="fixed tau, or 'learned' to train the model's logit scale")
    p.add_argument("--beta1", type=float, default=0.15, help="hard-negative weight, image->text")
    p.add_argument("--beta2", type=float, default=0.15, help="hard-negative weight, text->image")
    p.add_argument("--duplicate-negatives", action="store_true",
                   help="let pairs with identical captions in a batch count as each other's negatives (by "
                        "default they are left out of each other's denominators)")
    p.add_argument("--epochs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16, help="global batch size (split over torchrun processes)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=1000, help="linear warm-up, then cosine decay to 0")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off on CPU)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="light augmentation: small random crop, brightness/contrast (never flips)")
    p.add_argument("--freeze", choices=("none", "vision", "text"), default="none", help="keep a tower fixed")
    p.add_argument("--val-data", help="held-out pairs for retrieval after each epoch (default: training pairs)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in CKPT_DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    p.set_defaults(func=finetune_clip)

    e = sub.add_parser("evaluate-retrieval", help="image->text and text->image recall@1/@5 of a CLIP model",
                       description="Retrieval recall on image-caption pairs (the ROCO metric of the papers). "
                                   "Pairs with identical captions count as one caption class.")
    e.add_argument("--data", required=True, help="CSV / JSONL of image,caption or a folder of image + .txt")
    which = e.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", metavar="CKPT_DIR", help="a folder written by finetune-clip")
    which.add_argument("--model", help="a model name or CLIP folder (default: biomedclip)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    e.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA)")
    e.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    e.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    e.set_defaults(func=evaluate_retrieval)


def finetune_clip(args):
    from ..progress import ProgressReporter
    from ..training.clip_finetune import FinetuneOptions, finetune

    opts = FinetuneOptions(
        data=args.data, output=args.output, model=args.model, loss=args.loss, temperature=args.temperature,
        beta1=args.beta1, beta2=args.beta2, duplicate_negatives=args.duplicate_negatives, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, grad_accum=args.grad_accum,
        clip_grad=args.clip_grad, amp=args.amp, freeze=args.freeze, augment=args.augment,
        val_data=args.val_data, seed=args.seed, device=args.device, workers=args.workers, resume=args.resume)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    progress = ProgressReporter(args.progress if rank0 else "none")
    progress.install_signal_handlers()
    records = progress.run(lambda: finetune(opts, progress))
    if not rank0:
        return 0
    progress.finish(message=f"fine-tuned model in {args.output}")
    if records and args.progress != "json":
        print(f"fine-tuned model: {args.output}")
        print(format_table({f"epoch {r['epoch']}": r["retrieval"] for r in (records[0], records[-1])
                            if r.get("retrieval")}))
    return 0


def evaluate_retrieval(args):
    from ..progress import ProgressReporter
    from ..runtime import atomic_output

    progress = ProgressReporter(args.progress)
    progress.install_signal_handlers()
    name = args.checkpoint or args.model or "biomedclip"
    result = {"model": name, "data": args.data, **progress.run(lambda: _evaluate(args, name, progress))}
    if args.json:
        with atomic_output(args.json) as tmp:
            with open(tmp, "w") as f:
                json.dump(result, f, indent=2)
    if args.progress == "json":
        print(json.dumps({"stage": "result", "retrieval": result}), flush=True)
    else:
        print(format_table({name: result}))
        print(json.dumps(result))
    progress.finish()
    return 0


def _evaluate(args, name, progress):
    import torch

    from ..models import load_clip
    from ..runtime import select_device
    from ..training.clip_finetune import evaluate_retrieval
    from ..training.data import read_pairs

    pairs = read_pairs(args.data)  # a bad data set fails before a model loads
    device = select_device(args.device)
    bundle = load_clip(name, device)
    amp = device.type == "cuda" if args.amp is None else args.amp
    with torch.no_grad():
        return evaluate_retrieval(bundle, pairs, batch_size=args.batch_size, amp=amp, progress=progress)


def format_table(rows):
    """rows: label -> retrieval dict; a small text table of recall in percent."""
    keys = ("i2t_top1", "i2t_top5", "t2i_top1", "t2i_top5")
    width = max([len(label) for label in rows] + [5])
    lines = [f"{'':{width}}  " + "  ".join(f"{k.replace('_', ' '):>9}" for k in keys)]
    for label, r in rows.items():
        lines.append(f"{label:{width}}  " + "  ".join(f"{100 * r[k]:8.1f}%" for k in keys))
    return "\n".join(lines)
