"""Weak supervision: `pseudo-label`, `train-weak`, `predict` and `evaluate` (torch / MONAI load only when run)."""

import argparse

from ..runtime import DEVICE_CHOICES
from .segment import add_volume_options

PROGRESS = ("bar", "json", "none")


def register(sub):
    p = sub.add_parser(
        "pseudo-label", help="zero-shot masks for a whole data set (training labels), with a confidence per case",
        description="Run the zero-shot pipeline over 2D images or 3D volumes and write one labelmap per case on its "
                    "own grid (OUTPUT_DIR/labels/<case>.nrrd, value k = k-th prompt), a per-case confidence "
                    "(1 - mean entropy of the foreground probability inside the mask; 0 for an empty mask) in "
                    "pseudo_labels.csv/.json, and OUTPUT_DIR/labels.txt listing the labels at or above "
                    "--min-confidence (give it to train-weak --labels). Resumable (finished cases are skipped); "
                    "under torchrun each rank takes every WORLD_SIZE-th case.")
    p.add_argument("data", nargs="+", help="folder(s) of images / volumes, list files, or files")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--nnunet-dataset", metavar="NAME_OR_ID",
                   help="also write an nnU-Net v2 raw data set OUTPUT_DIR/nnUNet_raw/DatasetNNN_Name "
                        "(501, MyName, or Dataset501_MyName)")
    p.add_argument("--nnunet-channel-name", default="auto",
                   help="nnU-Net channel name (decides its normalisation); auto: CT for HU images, else zscore")
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="cases below this confidence are left out of labels.txt and the nnU-Net export")
    add_volume_options(p)
    p.set_defaults(func=pseudo_label)

    t = sub.add_parser(
        "train-weak", help="train a segmentation network (DynUNet, or nnU-Net v2 itself) on (pseudo-)labels",
        description="Train MONAI's DynUNet in the nnU-Net configuration on images and labels matched by case "
                    "name (<case>.nrrd, <case>_0000.nii.gz...). 2D by default (slices along --axis), --dims 3 for "
                    "patches of whole volumes. DiceCE loss, cyclic (snapshot ensemble) or cosine learning rate, "
                    "snapshots saved at several points of training and averaged by 'predict'. MODEL_DIR gets "
                    "config.json, snapshot-K.pt, metrics.jsonl (one line per epoch) and metrics.png. Under "
                    "'torchrun --nproc_per_node N' it trains with DistributedDataParallel. --trainer nnunetv2 runs nnU-Net v2 "
                    "itself (its planning, preprocessing and trainer; --dims 2: 2d, 3: 3d_fullres) on --dataset, "
                    "with its folders inside MODEL_DIR and the same snapshot ensemble for 'predict'.")
    t.add_argument("--trainer", choices=("dynunet", "nnunetv2"), default="dynunet",
                   help="dynunet: MONAI DynUNet, light, no extra package (default); nnunetv2: nnU-Net v2 itself "
                        "(planning, preprocessing, training) on an nnU-Net raw data set (--dataset), needs "
                        "pip install 'medclipsam[nnunet]'")
    t.add_argument("--images", nargs="+", help="image folder(s), list files or files (dynunet)")
    t.add_argument("--labels", nargs="+",
                   help="label folder(s), list files (e.g. pseudo-label's labels.txt) or files: labelmaps or .seg.nrrd "
                        "(dynunet)")
    t.add_argument("--dataset", metavar="DatasetNNN_Name",
                   help="nnU-Net raw data set folder, e.g. pseudo-label's OUTPUT_DIR/nnUNet_raw/Dataset501_X (nnunetv2)")
    t.add_argument("--iterations-per-epoch", type=int, default=250,
                   help="nnunetv2: training batches per epoch (nnU-Net's 250); its batch size and patch are planned")
    t.add_argument("--output", required=True, metavar="MODEL_DIR")
    t.add_argument("--dims", type=int, choices=(2, 3), default=2)
    t.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"), help="slicing axis for 2D")
    t.add_argument("--epochs", type=int, default=50)
    t.add_argument("--batch-size", type=int, default=12, help="global batch (split over torchrun processes)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 0.01 SGD, 0.001 AdamW)")
    t.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="sgd: Nesterov 0.99 as nnU-Net")
    t.add_argument("--weight-decay", type=float, default=3e-5)
    t.add_argument("--schedule", choices=("cyclic", "cosine"), default="cyclic",
                   help="cyclic: cosine restarts, a snapshot at each cycle's end; cosine: one decay, snapshots "
                        "spread over its second half")
    t.add_argument("--snapshots", type=int, default=5, help="checkpoints in the ensemble")
    t.add_argument("--samples-per-epoch", type=int, help="default: every slice (2D) / case (3D) once")
    t.add_argument("--patch-size", type=int, nargs="+", help="default: the median image size, capped by --max-patch")
    t.add_argument("--max-patch", type=int, help="largest automatic patch edge (default 512 in 2D, 128 in 3D)")
    t.add_argument("--base-filters", type=int, default=32, help="filters of the first stage (doubling per stage)")
    t.add_argument("--max-filters", type=int, help="filter cap (default 512 in 2D, 320 in 3D)")
    t.add_argument("--no-deep-supervision", dest="deep_supervision", action="store_false")
    t.add_argument("--normalization", choices=("auto", "ct", "zscore"), default="auto")
    t.add_argument("--val-fraction", type=float, default=0.2, help="cases held out for validation Dice")
    t.add_argument("--val-every", type=int, default=1, help="validate every N epochs (and at every snapshot)")
    t.add_argument("--threshold", type=float, default=0.2, help="foreground probability threshold (v2: 0.2)")
    t.add_argument("--label-name", action="append",
                   help="name of label 1, 2, ... (repeat); .seg.nrrd labels name themselves")
    t.add_argument("--no-augment", dest="augment", action="store_false", help="no intensity augmentation")
    t.add_argument("--mirror", action="store_true", help="random flips (off: prompts can be lateral)")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA)")
    t.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=0, help="data-loading processes")
    t.add_argument("--progress", choices=PROGRESS, default="bar",
                   help="json: one line per epoch on stdout ({stage, done, total, message}); the numbers are in "
                        "MODEL_DIR/metrics.jsonl")
    t.set_defaults(func=train_weak)

    r = sub.add_parser(
        "predict", help="segment a volume or image with a train-weak model (snapshot ensemble + uncertainty)",
        description="Sliding-window inference with every snapshot of MODEL_DIR, mean probability, threshold, and "
                    "the entropy of the mean (0..1) as uncertainty. Outputs lie on the input's exact grid.")
    r.add_argument("model", metavar="MODEL_DIR")
    r.add_argument("volume", help="NRRD, NIfTI, MHA/MHD, a DICOM folder, or a 2D image file")
    r.add_argument("--output", required=True,
                   help="OUT.seg.nrrd, a .nrrd / .nii.gz labelmap, or OUT.dcm: a DICOM SEG (input: a DICOM series folder)")
    r.add_argument("--uncertainty-output", help="entropy of the ensemble mean, a float volume (.nrrd, .nii.gz, .mha)")
    r.add_argument("--threshold", type=float, help="foreground probability threshold (default: the model's, 0.2)")
    r.add_argument("--prompt-name", action="append", help="segment name(s) (default: the model's label names)")
    r.add_argument("--frame", type=int, help="frame of a 4D (time series) image")
    r.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA)")
    r.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    r.add_argument("--progress", choices=PROGRESS, default="bar")
    r.set_defaults(func=predict)

    e = sub.add_parser(
        "evaluate", help="Dice and normalised surface Dice per case and mean (CSV and table)",
        description="Compare predictions with references matched by case name (.seg.nrrd or labelmaps). NSD uses "
                    "the reference's spacing (tolerance in mm); one-voxel axes are dropped (2D images). Both empty "
                    "scores 1, one empty 0.")
    e.add_argument("--pred", nargs="+", required=True, help="prediction folder(s), list files or files")
    e.add_argument("--gt", nargs="+", required=True, help="reference folder(s), list files or files")
    e.add_argument("--tolerance-mm", type=float, default=2.0)
    e.add_argument("--label", metavar="PRED=REF",
                   help="which label to score: PRED=REF, the prediction's segment name (.seg.nrrd) or label value "
                        "and the reference's (e.g. 'brain tumor=tumor'), or one NAME both use; needed when a file "
                        "holds several labels (a phantom's .seg.nrrd does)")
    e.add_argument("--csv", metavar="OUT.csv", help="write the per-case table and the mean here")
    e.add_argument("--progress", choices=PROGRESS, default="none")
    e.set_defaults(func=evaluate)


# --------------------------------------------------------------------------------------------------


def pseudo_label(args):
    from dataclasses import replace

    from ..errors import MedCLIPSAMError
    from ..pipeline.text import make_prompt
    from ..progress import ProgressReporter
    from ..training.pseudo_labels import PseudoLabeller, describe, nnunet_dataset_name, shard
    from ..training.weak_data import list_inputs
    from .segment import Session

    prompts = [make_prompt(p).text for p in args.prompt]   # cheap checks before any model loads
    if len(set(prompts)) != len(prompts):
        raise MedCLIPSAMError("the same prompt was given twice")
    if not 0.0 <= args.min_confidence <= 1.0:
        raise MedCLIPSAMError("--min-confidence must lie between 0 and 1")
    if args.nnunet_dataset:
        nnunet_dataset_name(args.nnunet_dataset, prompts)
    rank, world = shard()
    labeller = PseudoLabeller(list_inputs(args.data, "inputs", role="images"), args.output_dir, prompts)
    todo = labeller.todo(rank, world)
    progress = ProgressReporter(args.progress)       # one step per case
    inner = ProgressReporter("none")                 # the pipeline's own stages, silent; owns the signals
    inner.install_signal_handlers(announcer=progress)
    say = print if args.progress != "json" else (lambda *a: None)
    say(f"rank {rank}/{world}: {len(todo)} case(s) to label")

    def run():
        failures, random = 0, False
        if todo:
            progress.stage("load", 1, "loading models")
            session = Session(args, inner)
            session.options = replace(session.options, uncertainty=True)   # the confidence needs it
            random = session.random
            clip, sam = session.model_names
            models = {"clip": clip, "sam": sam or "none", "preset": args.preset, "random_weights": bool(random)}
            progress.advance(1)
            progress.stage("pseudo-label", len(todo), f"labelling {len(todo)} case(s)")
            for case in todo:
                try:
                    record = labeller.label_case(case, session.segment, models)
                except MedCLIPSAMError as exc:
                    failures += 1
                    record = {"case": case, "error": str(exc)}
                say(describe(record))
                inner.check_cancelled()
                progress.advance(1, describe(record))
        note = ""
        if labeller.complete():
            summary = labeller.write_summary(args.min_confidence)
            random = summary["random_models"]   # this run's models or, resumed, the earlier runs' ones
            if args.nnunet_dataset:
                progress.stage("export", 1, "writing the nnU-Net data set")
                folder = labeller.export_nnunet(args.nnunet_dataset, args.min_confidence, args.nnunet_channel_name)
                progress.advance(1)
                note = f"; nnU-Net data set {folder}"
        elif world > 1:
            note = "; other ranks are still labelling (the last one to finish writes the summary)"
        if random:
            note += "; RANDOM-WEIGHT MODELS (meaningless labels)"
        return failures, note

    failures, note = progress.run(run)
    message = f"{len(todo) - failures} labelled, {failures} failed, in {args.output_dir}{note}"
    progress.finish("finished", message)
    say(message)
    return 1 if failures else 0


def train_weak(args):
    from ..errors import MedCLIPSAMError
    from ..progress import ProgressReporter
    from ..training.weak import WeakOptions, train_weak as train

    if args.trainer == "nnunetv2":
        return train_weak_nnunet(args)
    if not (args.images and args.labels):
        raise MedCLIPSAMError("train-weak needs --images and --labels (or --trainer nnunetv2 with --dataset)")

    lr = args.lr if args.lr is not None else (0.01 if args.optimizer == "sgd" else 1e-3)
    opts = WeakOptions(
        images=args.images, labels=args.labels, output=args.output, dims=args.dims, axis=args.axis, epochs=args.epochs,
        batch_size=args.batch_size, lr=lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
        schedule=args.schedule, snapshots=args.snapshots, samples_per_epoch=args.samples_per_epoch,
        patch_size=tuple(args.patch_size) if args.patch_size else None, max_patch=args.max_patch,
        base_filters=args.base_filters, max_filters=args.max_filters, deep_supervision=args.deep_supervision,
        normalization=args.normalization, val_fraction=args.val_fraction, val_every=args.val_every,
        threshold=args.threshold, label_names=args.label_name, augment=args.augment, mirror=args.mirror,
        amp=args.amp, device=args.device, seed=args.seed, workers=args.workers)
    progress = ProgressReporter(args.progress)
    progress.install_signal_handlers()
    records = progress.run(lambda: train(opts, progress))
    epochs = [r for r in records if "loss" in r]
    final = records[-1] if records and "ensemble_val_dice" in records[-1] else {}
    speed = sum(r["samples_per_s"] for r in epochs) / max(1, len(epochs))
    message = (f"model in {args.output}: {len(epochs)} epochs, final loss {epochs[-1]['loss']:.4f}, "
               f"ensemble validation Dice {final.get('ensemble_val_dice', float('nan')):.3f}, "
               f"{speed:.1f} samples/s")
    progress.finish("finished", message)
    if args.progress != "json":
        print(message)
    return 0


def train_weak_nnunet(args):
    from ..errors import MedCLIPSAMError
    from ..progress import ProgressReporter
    from ..training.nnunet import NnUNetOptions, require_nnunet, train_nnunet

    require_nnunet()     # before any other check: a missing extra is the first thing to fix
    if not args.dataset:
        raise MedCLIPSAMError("train-weak --trainer nnunetv2 needs --dataset, an nnU-Net raw data set folder "
                              "(pseudo-label --nnunet-dataset writes one)")
    opts = NnUNetOptions(
        dataset=args.dataset, output=args.output, dims=args.dims, epochs=args.epochs,
        iterations_per_epoch=args.iterations_per_epoch, snapshots=args.snapshots, schedule=args.schedule,
        lr=args.lr if args.lr is not None else 0.01, mirror=args.mirror, threshold=args.threshold,
        label_names=args.label_name, val_fraction=args.val_fraction, device=args.device, seed=args.seed,
        workers=args.workers)
    progress = ProgressReporter(args.progress)
    progress.install_signal_handlers()
    records = progress.run(lambda: train_nnunet(opts, progress))
    seconds = sum(r["seconds"] for r in records)
    message = (f"nnU-Net model in {args.output}: {len(records)} epochs, final loss {records[-1]['loss']:.4f}, "
               f"validation pseudo-Dice {records[-1]['val_dice']:.3f}, {seconds:.0f} s of training")
    progress.finish("finished", message)
    if args.progress != "json":
        print(message)
    return 0


RANDOM_PSEUDO_LABELS = "TRAINED ON PSEUDO-LABELS OF RANDOM-WEIGHT MODELS"


def trained_provenance(config, model_dir):
    """How a trained model's result is made (write_outputs' provenance): a trained model, not a text
    prompt; on pseudo-labels or given labels; random_weights=yes when the pseudo-labels came from
    random-weight models (train-weak's config.json "provenance")."""
    from pathlib import Path

    source = config.get("provenance") or {"labels": "given", "random_weights": False}
    models = {"model": Path(model_dir).resolve().name, "trainer": config.get("trainer", "dynunet"),
              "labels": source.get("labels", "given")}
    first = (source.get("models") or [{}])[0]
    for key in ("clip", "sam", "preset"):      # the zero-shot models that made the pseudo-labels
        if key in first:
            models[f"pseudo_label_{key}"] = first[key]
    random = bool(source.get("random_weights"))
    description = "trained model" + (", on pseudo-labels" if source.get("labels") == "pseudo-labels" else "")
    return {"method": f"MedCLIP-SAM trained model ({models['trainer']})", "models": models, "random": random,
            "description": description}


def predict(args):
    from pathlib import Path

    from ..errors import MedCLIPSAMError
    from ..io import read_volume
    from ..pipeline.volume import VolumeResult
    from ..progress import ProgressReporter
    from ..training.predict import load_model, predict_volume, read_config
    from .segment import _check_output, write_result

    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise MedCLIPSAMError(f"--threshold must lie between 0 and 1, got {args.threshold}")
    _check_output(args.output, (".seg.nrrd", ".nrrd", ".nii.gz", ".nii", ".dcm"))
    if args.output.endswith(".dcm"):
        from ..io.dicom_seg import check_input

        check_input(args.volume)
    if args.uncertainty_output:
        _check_output(args.uncertainty_output, (".nrrd", ".nii.gz", ".nii", ".mha"))
    config = read_config(args.model)
    names = args.prompt_name or config["label_names"]
    if len(names) != config["classes"] - 1:
        raise MedCLIPSAMError(f"the model segments {config['classes'] - 1} label(s) but {len(names)} "
                              "--prompt-name value(s) were given")
    progress = ProgressReporter(args.progress)
    progress.install_signal_handlers()

    def run():
        image = read_volume(args.volume, frame=args.frame)
        sources = None
        if args.output.endswith(".dcm"):   # the series checked against the volume before the model loads
            from ..io.dicom_seg import prepare

            sources = prepare(args.volume, image, names)
        progress.stage("load", 1, "loading the model")
        model = load_model(args.model, args.device)
        progress.advance(1)
        result = predict_volume(model, image, args.threshold, args.amp, progress)
        progress.stage("write", 1, "writing the segmentation")
        segments = [{"name": name, "mask": (result.labels == k).astype("uint8")} for k, name in enumerate(names, 1)]
        provenance = trained_provenance(config, args.model)
        if args.output.endswith(".dcm"):
            provenance.update(source_folder=args.volume, sources=sources)
        write_result(VolumeResult(segments, result.uncertainty), image, args.output, args.uncertainty_output,
                     progress, provenance)
        return segments, len(model.networks)

    segments, n = progress.run(run)
    summary = "; ".join(f"{s['name']}: {int(s['mask'].sum())} voxels" for s in segments)
    message = f"wrote {args.output} ({n} snapshot(s)): {summary}"
    if trained_provenance(config, args.model)["random"]:
        message = f"{RANDOM_PSEUDO_LABELS} (meaningless output): {message}"
    progress.finish("finished", message)
    if args.progress != "json":
        print(message)
    return 0


def evaluate(args):
    from ..progress import ProgressReporter
    from ..training.evaluation import evaluate_files, format_table, write_csv
    from .segment import _check_output

    if args.csv:
        _check_output(args.csv, (".csv",))
    progress = ProgressReporter(args.progress)
    summary = progress.run(lambda: evaluate_files(args.pred, args.gt, args.tolerance_mm, args.label,
                                                                 progress))
    if args.csv:
        write_csv(args.csv, summary)
    mean = summary["mean"]
    message = (f"{summary['count']} case(s) ({len(summary['missing'])} without prediction, scored as empty): "
               f"mean Dice {mean['dice']:.4f}, mean NSD {mean['nsd']:.4f}")
    progress.finish("finished", message)
    if args.progress != "json":
        print(format_table(summary))
        if summary["missing"]:
            print(f"{len(summary['missing'])} reference case(s) had no prediction, scored as empty and counted "
                  f"in the mean: {', '.join(summary['missing'])}")
        if summary["extra"]:
            print(f"{len(summary['extra'])} prediction(s) without a reference, not scored: "
                  f"{', '.join(summary['extra'])}")
    return 0
