"""Weak supervision with nnU-Net v2 itself: `train-weak --trainer nnunetv2` and prediction with its folders.

Training runs nnU-Net's own fingerprint extraction, experiment planning, preprocessing and trainer (through
its Python API) on an nnU-Net raw data set (what `pseudo-label --nnunet-dataset` writes). nnU-Net's three
folders live inside the model folder; its path variables are set for this process (and the worker processes
it spawns) only while it runs, so the user sets nothing. The trainer (nnunet_trainer.py) takes the epoch count,
iterations per epoch and a cyclic cosine learning rate from the command line and saves a weights-only
snapshot at the end of each cycle: the snapshots are the ensemble, as in the DynUNet trainer.

The model folder is a train-weak folder (config.json, format medclipsam-weak-v1, "trainer": "nnunetv2"):
  config.json            label names, threshold (0.2), snapshots, the nnU-Net configuration and folders
  snapshot-K.pt          network state dict of snapshot K (tensors only)
  metrics.jsonl / .png   one line per epoch (loss, nnU-Net's validation pseudo-Dice, lr, seconds, snapshot)
  nnunet_log.txt         everything nnU-Net printed
  nnUNet_raw/ nnUNet_preprocessed/ nnUNet_results/   nnU-Net's own folders (plans.json, checkpoint_final.pth)
It is built in a hidden sibling folder and renamed into place when training is over: a cancelled or failed
run leaves nothing behind, and never a folder the trained-model registry would accept.

Prediction (predict.py calls `load_model` / `mean_probabilities`): nnU-Net's predictor (its preprocessing,
sliding window and resampling back to the input's array) runs once per snapshot; the snapshots' softmax
probabilities are averaged, then thresholded and their entropy taken exactly as for a DynUNet folder.
"""

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MedCLIPSAMError, optional_import
from ..progress import null_progress
from ..runtime import log, seed_everything
from ..trained_models import WEAK_CONFIG as CONFIG_FILE
from ..trained_models import WEAK_FORMAT as FORMAT
from .run_records import METRICS_FILE, PLOT_FILE, append_jsonl, plot_metrics, snapshot_epochs, write_json

TRAINER = "nnunetv2"
EXTRA = "nnunet"
LOG_FILE = "nnunet_log.txt"
CONFIGURATIONS = {2: "2d", 3: "3d_fullres"}
FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@dataclass
class NnUNetOptions:
    dataset: str                      # an nnU-Net raw data set folder DatasetNNN_Name
    output: str                       # model folder
    dims: int = 2                     # 2 -> nnU-Net "2d", 3 -> "3d_fullres"
    epochs: int = 50
    iterations_per_epoch: int = 250   # nnU-Net's default
    snapshots: int = 5
    schedule: str = "cyclic"
    lr: float = 0.01                  # nnU-Net's initial rate
    mirror: bool = False
    threshold: float = 0.2
    label_names: list = None
    val_fraction: float = 0.2         # > 0: nnU-Net's fold 0 (a fifth held out); 0: fold "all"
    device: str = "auto"
    seed: int = 0
    workers: int = 0                  # nnU-Net's data-augmentation processes (nnUNet_n_proc_DA)


def require_nnunet(feature="train-weak --trainer nnunetv2"):
    return optional_import("nnunetv2", EXTRA, feature)


# --------------------------------------------------------------------------------------------------
# nnU-Net's environment, for this process only


@contextlib.contextmanager
def quiet_prints():
    """nnU-Net prints notes on stdout ('perform_everything_on_device: False' for every image predicted, its
    import-time notes): they mean nothing to the user and would break --progress json. They go to the log
    at debug level (seen with -v)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                log.debug("nnU-Net: %s", line.strip())


@contextlib.contextmanager
def nnunet_environment(root, workers=0):
    """nnU-Net's folders under `root`, set in os.environ (read by the processes nnU-Net spawns) and in every
    loaded nnunetv2 module (which copy nnunetv2.paths at import); the previous values come back afterwards."""
    root = Path(root)
    values = {name: str(root / name) for name in FOLDERS}
    # its planner sets torch's thread count to nnUNet_n_proc_DA, which must then be positive; the trainer
    # is given the real worker count (0: augmentation in this process) just before it starts
    env = {**values, "nnUNet_n_proc_DA": str(max(1, int(workers))), "nnUNet_compile": "false"}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    saved_attrs = []

    def patch_modules():
        for name, module in list(sys.modules.items()):
            if name.startswith("nnunetv2") and module is not None:
                for key, value in values.items():
                    if hasattr(module, key):
                        saved_attrs.append((module, key, getattr(module, key)))
                        setattr(module, key, value)

    try:
        patch_modules()
        yield patch_modules          # call again after importing more nnunetv2 modules
    finally:
        for module, key, value in reversed(saved_attrs):
            setattr(module, key, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def nnunet_output_to(path, progress):
    """nnU-Net prints a lot, also from its worker processes: send file descriptor 1 and sys.stdout to a log
    file while it runs, and keep JSON progress lines going to the real stdout."""
    log_file = open(path, "a", buffering=1)
    old_stdout, old_stream = sys.stdout, progress.stream
    try:
        real_fd = old_stdout.fileno()
    except (AttributeError, OSError, ValueError):
        real_fd = None      # a captured stdout (tests): only the Python level needs redirecting
    sys.stdout.flush()
    saved_fd = os.dup(1)
    if progress.mode == "json" and progress.stream is None:
        progress.stream = os.fdopen(os.dup(1), "w", buffering=1) if real_fd == 1 else old_stdout
    os.dup2(log_file.fileno(), 1)
    sys.stdout = log_file
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
        sys.stdout = old_stdout
        if progress.stream is not old_stream:
            if progress.stream is not old_stdout:
                progress.stream.close()
            progress.stream = old_stream
        log_file.close()


# --------------------------------------------------------------------------------------------------
# training


def check_dataset(folder):
    """(dataset id, name, dataset.json) of an nnU-Net raw data set; one sentence when it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MedCLIPSAMError(f"nnU-Net data set '{folder}' does not exist")
    match = re.fullmatch(r"Dataset(\d{3})_[A-Za-z0-9_-]+", folder.name)
    if not match:
        raise MedCLIPSAMError(f"'{folder}' is not an nnU-Net raw data set folder (DatasetNNN_Name, as written by "
                              "pseudo-label --nnunet-dataset)")
    try:
        meta = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError):
        raise MedCLIPSAMError(f"'{folder}' has no readable dataset.json") from None
    for sub in ("imagesTr", "labelsTr"):
        if not (folder / sub).is_dir() or not any((folder / sub).iterdir()):
            raise MedCLIPSAMError(f"nnU-Net data set '{folder}' has no {sub} files")
    if not isinstance(meta.get("labels"), dict) or len(meta["labels"]) < 2:
        raise MedCLIPSAMError(f"'{folder / 'dataset.json'}' names no foreground label")
    return int(match.group(1)), folder.name, meta


def check_options(opts):
    if opts.dims not in CONFIGURATIONS:
        raise MedCLIPSAMError(f"--dims must be 2 or 3, got {opts.dims}")
    if opts.epochs < 1:
        raise MedCLIPSAMError("--epochs must be at least 1")
    if opts.iterations_per_epoch < 1:
        raise MedCLIPSAMError("--iterations-per-epoch must be at least 1")
    if not 1 <= opts.snapshots <= opts.epochs:
        raise MedCLIPSAMError(f"--snapshots must lie between 1 and the number of epochs ({opts.epochs})")
    if opts.schedule not in ("cyclic", "cosine"):
        raise MedCLIPSAMError(f"unknown schedule '{opts.schedule}'; choose cyclic or cosine")
    if not opts.lr > 0:
        raise MedCLIPSAMError("--lr must be positive")
    if not 0.0 < opts.threshold < 1.0:
        raise MedCLIPSAMError("--threshold must lie between 0 and 1")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise MedCLIPSAMError("the nnunetv2 trainer runs as one process; start it without torchrun")
    out = Path(opts.output)
    if out.exists() and not out.is_dir():
        raise MedCLIPSAMError(f"output '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise MedCLIPSAMError(f"output folder '{out}' holds other files; name a new or a model folder")
    if not out.parent.resolve().is_dir():
        raise MedCLIPSAMError(f"cannot create '{out}': folder '{out.parent}' does not exist")


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)         # the raw images are only read: a hard link saves the copy
    except OSError:
        shutil.copy2(src, dst)


def train_nnunet(opts, progress=None):
    """Train with nnU-Net v2 on opts.dataset; returns the metrics records. See the module docstring."""
    require_nnunet()
    check_options(opts)
    dataset_id, name, meta = check_dataset(opts.dataset)
    progress = progress or null_progress()
    out = Path(opts.output)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent.resolve()))
    try:
        records = _train(opts, dataset_id, name, meta, work, progress)
        _install(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return records


def _install(work, out):
    """Rename the finished folder onto `out` (an older model there is replaced only now)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)     # mkdtemp made it owner-only
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _provenance(meta):
    """The data set's label provenance (pseudo-label --nnunet-dataset writes it into dataset.json)."""
    from .weak_data import provenance_of

    part = meta.get("medclipsam_provenance")
    return provenance_of([part]) if isinstance(part, dict) else {"labels": "given", "random_weights": False}


def _train(opts, dataset_id, name, meta, work, progress):
    import torch

    from ..runtime import select_device

    device = select_device(opts.device)
    seed_everything(opts.seed)
    labels = sorted(((int(v), k) for k, v in meta["labels"].items()), key=lambda t: t[0])
    found = [k for v, k in labels if v != 0]
    names = (list(opts.label_names or []) + found[len(opts.label_names or []):])[: len(found)]
    progress.stage("prepare", 1, "copying the nnU-Net data set into the model folder")
    raw = work / "nnUNet_raw" / name
    shutil.copytree(opts.dataset, raw, copy_function=_link_or_copy)
    # list the files in dataset.json (a format nnU-Net reads): without the list nnU-Net matches file names
    # in a forked pool of 12 processes, which can hang a process that already runs torch threads
    (raw / "dataset.json").unlink()
    write_json(raw / "dataset.json", {**meta, "dataset": _file_list(raw, meta)})
    for sub in FOLDERS[1:]:
        (work / sub).mkdir()
    progress.advance(1)

    configuration = CONFIGURATIONS[opts.dims]
    snaps = snapshot_epochs(opts.epochs, opts.snapshots, opts.schedule)
    cycle_ends = snaps if opts.schedule == "cyclic" else [opts.epochs]
    config = {
        "format": FORMAT, "trainer": TRAINER, "dims": opts.dims, "classes": len(labels), "label_names": names,
        "threshold": opts.threshold, "snapshots": [],
        "options": {k: getattr(opts, k) for k in opts.__dataclass_fields__},
        "provenance": _provenance(meta),
    }
    records = []

    def save_snapshot(state, epoch, val_dice):
        from ..runtime import atomic_output

        file = f"snapshot-{len(config['snapshots']) + 1}.pt"
        with atomic_output(work / file) as tmp:
            torch.save(state, tmp)
        config["snapshots"].append({"file": file, "epoch": epoch, "val_dice": val_dice})
        return file

    def on_epoch(record):
        records.append(record)
        append_jsonl(work / METRICS_FILE, record)
        if record["snapshot"] or record["epoch"] == opts.epochs:
            plot_metrics(records, work / PLOT_FILE)
        progress.advance(1, f"epoch {record['epoch']}/{opts.epochs}: loss {record['loss']:.4f}, "
                            f"validation pseudo-Dice {record['val_dice']:.3f}")

    processes = max(1, int(opts.workers))
    with nnunet_environment(work, processes) as patch, nnunet_output_to(work / LOG_FILE, progress):
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                          preprocess)

        from .nnunet_trainer import nnUNetTrainer_MedCLIPSAM

        patch()
        progress.stage("plan", 3, "nnU-Net: fingerprint, plans, preprocessing")
        extract_fingerprints([dataset_id], num_processes=processes, check_dataset_integrity=False, clean=True,
                             verbose=False, show_progress_bar=False)
        progress.advance(1, "fingerprint")
        plans_name = plan_experiments([dataset_id])
        plans = json.loads((work / "nnUNet_preprocessed" / name / f"{plans_name}.json").read_text())
        if configuration not in plans["configurations"]:
            raise MedCLIPSAMError(f"nnU-Net planned no '{configuration}' configuration for this data set "
                                  f"(it planned {', '.join(plans['configurations'])}); use the other --dims")
        progress.advance(1, "plans")
        preprocess([dataset_id], plans_name, configurations=(configuration,), num_processes=(processes,),
                   verbose=False, show_progress_bar=False)
        progress.advance(1, "preprocessing")
        patch()

        cases = len(list((work / "nnUNet_raw" / name / "labelsTr").glob("*" + meta.get("file_ending", ".nii.gz"))))
        fold = 0 if opts.val_fraction > 0 and cases >= 5 else "all"   # nnU-Net's 5-fold split needs 5 cases
        os.environ["nnUNet_n_proc_DA"] = str(int(opts.workers))
        plans["continue_training"] = False
        trainer = nnUNetTrainer_MedCLIPSAM(plans, configuration, fold, meta, device)
        trainer.initial_lr = opts.lr
        trainer.configure(opts.epochs, opts.iterations_per_epoch, snaps, cycle_ends, opts.mirror, save_snapshot,
                          on_epoch, progress.check_cancelled)
        progress.stage("train", opts.epochs, f"training nnU-Net {configuration} on {cases} case(s)")
        try:
            trainer.run_training()
        finally:
            for loader in (trainer.dataloader_train, trainer.dataloader_val):
                if hasattr(loader, "_finish"):   # nnU-Net's augmentation worker processes
                    loader._finish()
        results = Path(trainer.output_folder_base).relative_to(work)
        config["nnunet"] = {
            "dataset": name, "configuration": configuration, "plans": plans_name, "fold": fold,
            "results": results.as_posix(), "trainer_class": type(trainer).__name__,
            "mirror_axes": list(trainer.inference_allowed_mirroring_axes or []) or None,
            "version": _version(),
        }
    progress.stage("write", 1, "writing the model folder")
    write_json(work / CONFIG_FILE, config)    # last: a folder with config.json is a finished model
    progress.advance(1)
    log.info("nnU-Net %s: %d epoch(s) x %d iteration(s), %d snapshot(s)", configuration, opts.epochs,
             opts.iterations_per_epoch, len(config["snapshots"]))
    return records


def _file_list(raw, meta):
    ending = meta.get("file_ending", ".nii.gz")
    channels = len(meta.get("channel_names") or {"0": ""})
    cases = sorted(p.name[: -len(ending)] for p in (raw / "labelsTr").glob("*" + ending))
    listing = {}
    for case in cases:
        images = [f"imagesTr/{case}_{c:04d}{ending}" for c in range(channels)]
        missing = [i for i in images if not (raw / i).is_file()]
        if missing:
            raise MedCLIPSAMError(f"nnU-Net data set '{raw.name}': label {case}{ending} has no image {missing[0]}")
        listing[case] = {"images": images, "label": f"labelsTr/{case}{ending}"}
    if not listing:
        raise MedCLIPSAMError(f"nnU-Net data set '{raw.name}' has no labelsTr/*{ending} files")
    return listing


def _version():
    from importlib.metadata import version

    return version("nnunetv2")


# --------------------------------------------------------------------------------------------------
# prediction


def load_model(folder, config, device):
    """(network, predictor, snapshot state dicts) of an nnunetv2 model folder."""
    import torch

    require_nnunet(f"the nnU-Net model in '{folder}'")
    folder = Path(folder)
    info = config.get("nnunet") or {}
    results = folder / str(info.get("results", ""))
    try:
        plans = json.loads((results / "plans.json").read_text())
        dataset_json = json.loads((results / "dataset.json").read_text())
    except (OSError, ValueError):
        raise MedCLIPSAMError(f"'{folder}' is an nnunetv2 model folder without its nnU-Net plans "
                              f"({results / 'plans.json'})") from None
    states = []
    for snap in config["snapshots"]:
        path = folder / snap["file"]
        if not path.is_file():
            raise MedCLIPSAMError(f"snapshot '{path}' listed in {CONFIG_FILE} is missing")
        try:
            states.append(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # zip / unpickling errors come in many types
            raise MedCLIPSAMError(f"checkpoint '{path}' is corrupt or not a train-weak snapshot "
                                  f"({str(exc).splitlines()[0][:120]})") from None
    with nnunet_environment(folder), quiet_prints():   # its import-time notes
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        plans_manager = PlansManager(plans)
        manager = plans_manager.get_configuration(info["configuration"])
        heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        network = nnUNetTrainer.build_network_architecture(plans_manager, manager, len(dataset_json["channel_names"]),
                                                           heads, enable_deep_supervision=False)
        try:
            network.load_state_dict(states[0])
        except (RuntimeError, KeyError) as exc:
            raise MedCLIPSAMError(f"the snapshots of '{folder}' do not fit its nnU-Net plans "
                                  f"({str(exc).splitlines()[0][:120]})") from None
        axes = tuple(info["mirror_axes"]) if info.get("mirror_axes") else None
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=axes is not None,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(network.to(device).eval(), plans_manager, manager, states[:1], dataset_json,
                                        info.get("trainer_class", "nnUNetTrainer"), axes)
    return predictor, states


def mean_probabilities(predictor, states, image, progress=None):
    """Mean softmax of the snapshots over a SimpleITK image -> (classes, z, y, x) on its own array grid.

    The image goes in as nnU-Net's SimpleITK reader gives it (array axes, spacing reversed to match; a 2D
    image gets a first axis of spacing 999): nnU-Net then plans its own transposition and resampling."""
    import SimpleITK as sitk

    progress = progress or null_progress()
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    spacing = list(image.GetSpacing())[::-1]
    if array.ndim == 2:
        array, spacing = array[None], [999.0] + spacing
    total = None
    for state in states:
        predictor.list_of_parameters = [state]
        with quiet_prints():   # 'perform_everything_on_device: False' for every image
            _, prob = predictor.predict_single_npy_array(array[None], {"spacing": spacing}, None, None, True)
        prob = np.asarray(prob, np.float32)
        total = prob if total is None else total + prob
        progress.advance(1)
    return (total / len(states)).reshape((total.shape[0], *sitk.GetArrayViewFromImage(image).shape))
