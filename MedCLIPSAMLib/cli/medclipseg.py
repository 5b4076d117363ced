"""`medclipsam medclipseg train` and `medclipsam medclipseg predict` (imports torch only when run)."""

import argparse

from ..runtime import DEVICE_CHOICES


def register(sub):
    p = sub.add_parser("medclipseg", help="MedCLIPSeg: train adapters on a few labels, predict masks with uncertainty")
    msub = p.add_subparsers(dest="medclipseg_command", metavar="ACTION", required=True)

    t = msub.add_parser(
        "train", help="train MedCLIPSeg adapters + head on labelled images (the CLIP stays frozen)",
        description="Train MedCLIPSeg's probabilistic vision-language adapters and its head on labelled "
                    "images. --images and --labels take files and/or folders (a folder: its image and volume "
                    "files, sorted by name) and are paired in order. 2D images (PNG, JPEG, TIFF...) pair with "
                    "2D masks; 3D volumes (NRRD, NIfTI, MHA) pair with label volumes or .seg.nrrd on the same "
                    "grid and are cut into axial slices. Any non-zero label is foreground. Defaults are the "
                    "paper's settings (Adam 3e-4, cosine decay, batch 24). Under 'torchrun --nproc_per_node N' "
                    "it trains with DistributedDataParallel.")
    t.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image/volume files or folders")
    t.add_argument("--labels", nargs="+", required=True, metavar="PATH", help="label files or folders, same order")
    t.add_argument("--prompts", nargs="+", required=True, metavar="TEXT",
                   help="what the labels show, e.g. 'liver tumor'; several prompts (or .txt files, one a line) "
                        "are drawn at random per sample")
    t.add_argument("--output", required=True, metavar="MODEL_DIR", help="folder for the trained model and metrics")
    t.add_argument("--fraction", type=float, default=1.0, help="share of the labelled samples to use (0-1]")
    t.add_argument("--model", default="biomedclip", help="base CLIP: biomedclip, tiny-random, random-biomedclip or a folder")
    t.add_argument("--epochs", type=int, default=50)
    t.add_argument("--batch-size", type=int, default=24, help="global batch size (split over torchrun processes)")
    t.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (Adam, cosine decay to 0)")
    t.add_argument("--layers", type=int, default=10, help="adapted layer pairs (the last N blocks)")
    t.add_argument("--bottleneck", type=int, help="adapter width (default: a third of the image width, 256 for ViT-B)")
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="light augmentation: random crop, brightness/contrast (never flips)")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off on CPU)")
    t.add_argument("--val-images", nargs="+", metavar="PATH", help="held-out images: Dice after every epoch")
    t.add_argument("--val-labels", nargs="+", metavar="PATH")
    t.add_argument("--overwrite", action="store_true", help="replace a model already in MODEL_DIR")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=0, help="data-loading processes")
    t.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    t.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    t.set_defaults(func=run_train)

    r = msub.add_parser(
        "predict", help="segment a volume or 2D image with a trained MedCLIPSeg model (mask + uncertainty)",
        description="The mean of --samples stochastic passes above 0.5 is the mask; the uncertainty is the "
                    "binary entropy (bits) of that mean. A volume is segmented slice by slice (axial) and the "
                    "output lies on its exact grid: .seg.nrrd (one segment named by the prompt) or a "
                    ".nrrd/.nii.gz labelmap. A 2D image with a .png output gives a PNG mask (0/255).")
    r.add_argument("model_dir", metavar="MODEL_DIR")
    r.add_argument("input", metavar="VOLUME_OR_IMAGE")
    r.add_argument("--prompt", required=True, help="what to segment (also the segment's name)")
    r.add_argument("--output", required=True, help="OUT.seg.nrrd, a .nrrd/.nii.gz labelmap, or a .png for 2D images")
    r.add_argument("--uncertainty-output", metavar="U", help="uncertainty volume (.nrrd/.nii.gz/.mha) or .png for 2D")
    r.add_argument("--samples", type=int, default=30, help="stochastic passes (0: one deterministic pass)")
    r.add_argument("--window", help="CT window: soft_tissue, lung, brain, bone, or LEVEL,WIDTH (default: automatic)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    r.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    r.set_defaults(func=run_predict)


def _window(text):
    if not text:
        return None
    if "," in text:
        from ..errors import MedCLIPSAMError

        try:
            level, width = (float(v) for v in text.split(","))
        except ValueError:
            raise MedCLIPSAMError(f"--window '{text}' is not LEVEL,WIDTH or a window name") from None
        return (level, width)
    return text


def run_train(args):
    from ..progress import ProgressReporter
    from ..training.medclipseg import MedCLIPSegOptions, train

    opts = MedCLIPSegOptions(
        images=args.images, labels=args.labels, prompts=args.prompts, output=args.output, fraction=args.fraction,
        model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, layers=args.layers,
        bottleneck=args.bottleneck, augment=args.augment, amp=args.amp, val_images=args.val_images,
        val_labels=args.val_labels, seed=args.seed, device=args.device, workers=args.workers,
        overwrite=args.overwrite)
    progress = ProgressReporter(args.progress)
    progress.install_signal_handlers()
    records = progress.run(lambda: train(opts, progress))
    if not records:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    last = records[-1]
    summary = f"trained MedCLIPSeg into {args.output}: loss {last.get('loss', float('nan')):.4f}"
    if "val_dice" in last:
        summary += f", validation Dice {last['val_dice']:.3f}"
    progress.finish("finished", summary)
    if args.progress != "json":
        print(summary)
    return 0


def run_predict(args):
    from ..progress import ProgressReporter
    from ..training.medclipseg import predict_file

    progress = ProgressReporter(args.progress)
    progress.install_signal_handlers()
    result = progress.run(lambda: predict_file(
        args.model_dir, args.input, args.prompt, args.output, args.uncertainty_output, args.samples, args.device,
        _window(args.window), args.seed, progress))
    summary = (f"wrote {args.output}: {result['foreground']} foreground pixels, mean uncertainty "
               f"{result['mean_uncertainty']:.3f} bits ({result['samples']} passes)")
    if result["random_clip"]:
        summary = "RANDOM-WEIGHT CLIP (meaningless output): " + summary
    progress.finish("finished", summary)
    if args.progress != "json":
        print(summary)
    return 0
