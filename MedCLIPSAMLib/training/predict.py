"""Inference with a model folder written by `train-weak`: sliding-window prediction with every snapshot,
the mean of their probabilities (the MedCLIP-SAMv2 checkpoint ensemble), a threshold (v2: 0.2 on the
foreground probability) and the entropy of the mean as the uncertainty map.

Labels from probabilities: a voxel gets the foreground class with the highest mean probability when that
probability reaches the threshold, else background. With one foreground class this is p(fg) >= threshold.
Uncertainty: entropy of the mean class distribution divided by log(classes), so it lies in [0, 1]
(1 = all classes equally likely). It is high where the snapshots disagree or each is unsure.
A folder trained with --trainer nnunetv2 gets each snapshot's probabilities from nnU-Net's own predictor
(training/nnunet.py); the mean, threshold and entropy are the same.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import MedCLIPSAMError
from ..progress import null_progress
from ..runtime import autocast
from ..trained_models import WEAK_CONFIG as CONFIG_FILE
from ..trained_models import WEAK_FORMAT as FORMAT
from .weak_network import build_network
from .weak_data import from_stack, normalize, stack_view, to_stack


@dataclass
class WeakModel:
    config: dict
    networks: list          # one network per snapshot, in eval mode, on `device` (nnunetv2: state dicts)
    device: object
    folder: str
    predictor: object = None   # nnunetv2 folders: nnU-Net's predictor, run once per snapshot

    @property
    def label_names(self):
        return list(self.config["label_names"])

    def snapshot(self, i):
        """The same model with only snapshot i (to compare one checkpoint with the ensemble)."""
        return replace(self, networks=[self.networks[i]])


@dataclass
class Prediction:
    labels: np.ndarray          # (z, y, x) uint8: 0 background, 1.. classes
    probabilities: np.ndarray   # (classes, z, y, x) float32: the ensemble's mean
    uncertainty: np.ndarray     # (z, y, x) float32 in [0, 1]


def read_config(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise MedCLIPSAMError(f"model folder '{folder}' does not exist")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise MedCLIPSAMError(f"'{folder}' is not a model folder written by train-weak (it has no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise MedCLIPSAMError(f"'{path}' is corrupt (not valid JSON)") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise MedCLIPSAMError(f"'{path}' is not a train-weak model description (format '{FORMAT}' expected)")
    return config


def load_model(folder, device="auto"):
    """Every snapshot of a train-weak model folder, ready for inference. Checkpoints are plain state
    dicts, loaded with torch.load(weights_only=True): no code from the file is run."""
    import torch

    from ..runtime import select_device

    config = read_config(folder)
    device = select_device(device) if isinstance(device, str) else device
    if not config.get("snapshots"):
        raise MedCLIPSAMError(f"model folder '{folder}' holds no snapshot yet (training stopped before the first one)")
    if config.get("trainer") == "nnunetv2":
        from . import nnunet

        predictor, states = nnunet.load_model(folder, config, device)
        return WeakModel(config, states, device, str(folder), predictor)
    networks = []
    for snap in config["snapshots"]:
        path = Path(folder) / snap["file"]
        if not path.is_file():
            raise MedCLIPSAMError(f"snapshot '{path}' listed in {CONFIG_FILE} is missing")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # zip / unpickling errors come in many types
            raise MedCLIPSAMError(f"checkpoint '{path}' is corrupt or not a train-weak snapshot "
                                  f"({str(exc).splitlines()[0][:120]})") from None
        net = build_network(config)
        try:
            net.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError, KeyError) as exc:
            raise MedCLIPSAMError(f"checkpoint '{path}' does not fit the network described in {CONFIG_FILE} "
                                  f"({str(exc).splitlines()[0][:120]})") from None
        networks.append(net.to(device).eval())
    return WeakModel(config, networks, device, str(folder))


def infer_stack(networks, stack, dims, patch, device, amp=False, overlap=0.5, chunk=8, progress=None):
    """Mean softmax probability of `networks` over a normalised (S, R, C) stack -> (classes, S, R, C).

    2D: the slices go through in chunks, each slice tiled by patches (Gaussian-weighted overlap, padded
    where the slice is smaller than a patch); 3D: the whole stack is tiled."""
    import torch
    import torch.nn.functional as F

    from ..errors import optional_import

    sliding_window_inference = optional_import("monai.inferers", "train", "weak supervision").sliding_window_inference
    progress = progress or null_progress()
    total = None
    starts = range(0, stack.shape[0], chunk) if dims == 2 else [None]
    for net in networks:
        for start in starts:
            if dims == 2:
                x = torch.from_numpy(np.ascontiguousarray(stack[start:start + chunk, None], np.float32))
            else:
                x = torch.from_numpy(np.ascontiguousarray(stack[None, None], np.float32))
            with torch.no_grad(), autocast(device, amp):
                logits = sliding_window_inference(x.to(device), tuple(patch), sw_batch_size=chunk, predictor=net,
                                                  overlap=overlap, mode="gaussian")
            prob = F.softmax(logits.float(), dim=1).cpu().numpy()
            prob = prob.transpose(1, 0, 2, 3) if dims == 2 else prob[0]   # -> (classes, S', R, C)
            if total is None:
                total = np.zeros((prob.shape[0], *stack.shape), np.float32)
            if dims == 2:
                total[:, start:start + chunk] += prob
            else:
                total += prob
            progress.advance(1)
    return total / len(networks)


def labels_from_probabilities(prob, threshold):
    """Foreground class with the highest probability where it reaches `threshold`, else 0 (uint8)."""
    fg = prob[1:]
    best = fg.argmax(axis=0)
    return np.where(fg.max(axis=0) >= threshold, best + 1, 0).astype(np.uint8)


def entropy(prob):
    """Entropy of a class distribution along axis 0, divided by log(classes): in [0, 1]."""
    p = np.clip(prob, 1e-7, 1.0)
    return (-(p * np.log(p)).sum(axis=0) / np.log(prob.shape[0])).astype(np.float32)


def predict_volume(model, image, threshold=None, amp=None, progress=None):
    """Segment a SimpleITK volume (or one-slice 2D image) with the ensemble; everything on its exact grid."""
    import SimpleITK as sitk

    config = model.config
    threshold = config["threshold"] if threshold is None else float(threshold)
    if not 0.0 < threshold < 1.0:
        raise MedCLIPSAMError(f"the threshold must lie between 0 and 1, got {threshold}")
    progress = progress or null_progress()
    if model.predictor is not None:   # nnU-Net: its own preprocessing and resampling, on the array grid
        from .nnunet import mean_probabilities

        progress.stage("predict", len(model.networks), f"ensemble of {len(model.networks)} nnU-Net snapshot(s)")
        mean = mean_probabilities(model.predictor, model.networks, image, progress)
        return Prediction(labels_from_probabilities(mean, threshold), mean, entropy(mean))
    amp = (model.device.type == "cuda") if amp is None else amp
    view = stack_view(image, config["axis"])
    stack = normalize(to_stack(sitk.GetArrayViewFromImage(image), view), config["normalization"])
    chunks = -(-stack.shape[0] // 8) if config["dims"] == 2 else 1
    progress.stage("predict", chunks * len(model.networks), f"ensemble of {len(model.networks)} snapshot(s)")
    mean = infer_stack(model.networks, stack, config["dims"], config["patch_size"], model.device, amp,
                       progress=progress)
    probabilities = np.stack([from_stack(p, view) for p in mean])
    return Prediction(from_stack(labels_from_probabilities(mean, threshold), view), probabilities,
                      from_stack(entropy(mean), view))
