"""MedCLIPSeg: train probabilistic vision-language adapters on a few labelled images, predict masks with
uncertainty maps.

    train(MedCLIPSegOptions(images=..., labels=..., prompts=[...], output="MODEL_DIR"))
    predictor = MedCLIPSegPredictor("MODEL_DIR", device="auto")
    mask, uncertainty = predict_volume(predictor, sitk_image, "liver tumor", samples=30)
    predict_file("MODEL_DIR", "ct.nrrd", "liver tumor", "out.seg.nrrd", uncertainty_output="u.nrrd")

The model is in medclipseg_model.py, the data rules in medclipseg_data.py.

Training (paper settings): the CLIP stays frozen; adapters and head are trained with
0.5 Dice + 0.5 BCE + 0.1 soft patch-level contrastive loss (temperature 0.2), Adam at 3e-4 with cosine
decay to 0, batch 24, bf16 autocast on CUDA. Under `torchrun --nproc_per_node N` it runs
DistributedDataParallel (DistributedSampler; `batch_size` is the global batch) and only rank 0 writes.
`fraction` keeps a seeded random subset of the labelled samples (data-efficiency runs).

A trained model folder holds
  medclipseg.safetensors  adapter + head weights (the CLIP itself is not copied)
  medclipseg.json         the base CLIP (registry name or absolute folder), the architecture, the training
                          prompts and options, the epoch reached
  metrics.jsonl           one line per epoch: losses, training Dice, learning rate, samples/s, validation Dice
all written atomically after every epoch, so a cancelled run leaves the last finished epoch.

Prediction: `samples` stochastic passes (values sampled in the adapters) share one frozen image prefix; the
mean foreground probability over the passes above 0.5 is the mask, and the uncertainty is the binary
entropy of that mean, in bits (0 = certain, 1 = p of 0.5), the same measure `segment --uncertainty-output`
writes. samples=0 makes one deterministic pass (adapter means). Volumes go slice by slice along the
patient axial axis with one intensity window and come back on the input's exact grid.
"""

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MedCLIPSAMError
from ..progress import null_progress
from ..runtime import atomic_output, autocast, log, seed_everything
# the folder format is defined once, beside the registry that recognises finished models
from ..trained_models import MEDCLIPSEG_CONFIG as CONFIG_FILE
from ..trained_models import MEDCLIPSEG_FORMAT as FORMAT
from ..trained_models import MEDCLIPSEG_WEIGHTS as WEIGHTS_FILE

METRICS_FILE = "metrics.jsonl"

# loss weights and contrastive temperature of the paper
DICE_WEIGHT, BCE_WEIGHT, CONTRASTIVE_WEIGHT, CONTRASTIVE_TEMPERATURE = 0.5, 0.5, 0.1, 0.2


# --------------------------------------------------------------------------------------------------
# losses

def dice_loss(logits, target, eps=1.0):
    """1 - soft Dice per image (smoothed by eps, so an empty target asks for an empty prediction), averaged."""
    import torch

    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    return 1 - ((2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def patch_coverage(masks, grid):
    """Fraction of each patch inside the mask: [B, S, S] -> [B, grid*grid] in [0, 1]."""
    import torch.nn.functional as F

    return F.adaptive_avg_pool2d(masks.float()[:, None], grid).flatten(1)


def soft_patch_contrastive_loss(patches, text, coverage, prompts, temperature=CONTRASTIVE_TEMPERATURE):
    """Soft patch-level InfoNCE, text-anchored, over every patch of the batch.

    patches [B, N, E] and text [B, E] (normalised here), coverage [B, N] (fraction of each patch inside its
    image's mask), prompts: B strings. Each text j ranks all B*N patches of the batch by cosine / temperature;
    its target distribution is soft: patch n of image b weighs coverage[b, n] when image b was asked for the
    same prompt as j, else 0. So patches only partly inside the target count partly (the "soft" part), the
    background and other prompts' targets are the negatives. Texts with no target in the batch are skipped.
    """
    import torch
    import torch.nn.functional as F

    z = F.normalize(patches.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    logits = torch.einsum("jd,bnd->jbn", t, z).flatten(1) / temperature          # [B, B*N]
    same = torch.tensor([[a == b for b in prompts] for a in prompts], device=z.device, dtype=z.dtype)
    target = (same[:, :, None] * coverage.float()[None]).flatten(1)             # [B, B*N]
    total = target.sum(1)
    valid = total > 0
    if not bool(valid.any()):
        return logits.sum() * 0.0  # keeps the graph (DDP wants every parameter used)
    q = target[valid] / total[valid, None]
    return -(q * logits[valid].log_softmax(-1)).sum(-1).mean()


def segmentation_loss(out, masks, prompts, grid):
    """(total, parts dict) = 0.5 Dice + 0.5 BCE + 0.1 soft patch contrastive."""
    import torch.nn.functional as F

    logits = out["logits"].float()[:, 0]
    d = dice_loss(logits, masks)
    b = F.binary_cross_entropy_with_logits(logits, masks.float())
    c = soft_patch_contrastive_loss(out["patches"], out["text"], patch_coverage(masks, grid), prompts)
    total = DICE_WEIGHT * d + BCE_WEIGHT * b + CONTRASTIVE_WEIGHT * c
    return total, {"dice_loss": d.item(), "bce": b.item(), "contrastive": c.item()}


# --------------------------------------------------------------------------------------------------
# building and saving

def tokenize(bundle, prompts):
    """Token ids [B, L] with the padding columns that every prompt has dropped (BiomedCLIP pads to 256
    tokens; padded keys are masked, so the embeddings are the same, at a fraction of the cost)."""
    ids = bundle.tokenize(list(prompts))
    pad = getattr(getattr(bundle.model.text, "config", None), "pad_token_id", 0) or 0
    keep = int((ids != pad).sum(1).max()) if ids.numel() else ids.shape[1]
    if bool((ids[:, keep:] != pad).any()):  # padding not only at the end: keep everything
        return ids
    return ids[:, :max(1, keep)]


def build_model(clip_name="biomedclip", device="cpu", layers=10, bottleneck=None, heads=None):
    """(MedCLIPSeg on `device`, its ClipBundle): a private CLIP copy with fresh adapters and head."""
    from ..models import load_clip
    from .medclipseg_model import MedCLIPSeg

    bundle = load_clip(clip_name, device, reuse=False)
    pad = getattr(getattr(bundle.model.text, "config", None), "pad_token_id", 0) or 0
    model = MedCLIPSeg(bundle.model, layers=layers, bottleneck=bottleneck, heads=heads, pad_token_id=pad)
    return model.to(device), bundle


def _clip_reference(name):
    """What the config records for the base CLIP: a registry/random name as given, a folder as an absolute path."""
    p = Path(str(name)).expanduser()
    return str(p.resolve()) if p.is_dir() else str(name)


def save_model(model, bundle, output, config):
    """Write the adapter + head weights and the config into `output` (atomically, file by file)."""
    from safetensors.torch import save_file

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    with atomic_output(output / WEIGHTS_FILE) as tmp:
        save_file(state, tmp)
    config = {"format": FORMAT, **model.dims, "image_size": bundle.image_size, "mean": list(bundle.mean),
              "std": list(bundle.std), "clip_random": bool(bundle.is_random), **config}
    with atomic_output(output / CONFIG_FILE) as tmp:
        Path(tmp).write_text(json.dumps(config, indent=2, default=str))


def read_config(model_dir):
    path = Path(model_dir) / CONFIG_FILE
    if not Path(model_dir).is_dir():
        raise MedCLIPSAMError(f"MedCLIPSeg model folder '{model_dir}' does not exist")
    if not path.is_file():
        raise MedCLIPSAMError(f"'{model_dir}' is not a trained MedCLIPSeg model: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except ValueError:
        raise MedCLIPSAMError(f"'{path}' is not valid JSON; the model folder is corrupt") from None
    if config.get("format") != FORMAT:
        raise MedCLIPSAMError(f"'{path}' is not a {FORMAT} model config")
    return config


def load_model(model_dir, device="cpu"):
    """(MedCLIPSeg in eval mode, its ClipBundle, config) from a trained model folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_config(model_dir)
    model, bundle = build_model(config["clip"], device, config["layers"], config["bottleneck"], config["heads"])
    if model.dims != {k: config.get(k) for k in model.dims}:
        raise MedCLIPSAMError(f"the CLIP '{config['clip']}' does not have the architecture the model in "
                              f"'{model_dir}' was trained on")
    path = Path(model_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise MedCLIPSAMError(f"'{model_dir}' lacks its weights file {WEIGHTS_FILE}")
    try:
        model.load_trainable_state_dict(load_file(str(path), device=str(device)))
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise MedCLIPSAMError(f"cannot load '{path}': corrupt or from another model "
                              f"({str(exc).splitlines()[0][:160]})") from None
    model.eval()
    return model, bundle, config


# --------------------------------------------------------------------------------------------------
# prediction

class MedCLIPSegPredictor:
    """A trained model ready to segment uint8 slices; keeps the model loaded between calls."""

    def __init__(self, model_dir=None, device="auto", model=None, bundle=None, amp=None, batch_size=8):
        from ..runtime import select_device

        if model is None:
            device = select_device(device) if isinstance(device, str) else device
            model, bundle, self.config = load_model(model_dir, device)
        else:
            self.config = {}
        self.model, self.bundle = model, bundle
        self.device = bundle.device
        self.amp = (self.device.type == "cuda") if amp is None else bool(amp)
        self.batch_size = batch_size
        self.is_random = bool(bundle.is_random)

    def __call__(self, grays, prompt, samples=30, progress=None):
        """Per slice (HxW uint8): (mean foreground probability HxW float32, uncertainty HxW float32 in bits)."""
        import torch

        from ..pipeline.preprocess import unpad
        from .medclipseg_data import square_input

        if not str(prompt or "").strip():
            raise MedCLIPSAMError("the prompt is empty; give the text that names the target")
        progress = progress or null_progress()
        passes = max(1, int(samples))
        # about 32 images through the adapted blocks at once, whatever the batch / sample split
        chunk = max(1, min(passes, 32 // max(1, min(self.batch_size, len(grays)))))
        results = []
        self.model.eval()
        for start in range(0, len(grays), self.batch_size):
            batch = grays[start:start + self.batch_size]
            inputs = [square_input(g, self.bundle.image_size, self.bundle.mean, self.bundle.std) for g in batch]
            x = torch.stack([i[0] for i in inputs]).to(self.device)
            ids = tokenize(self.bundle, [prompt] * len(batch))
            total = torch.zeros(len(batch), x.shape[-2], x.shape[-1], device=self.device)
            done = 0
            with torch.no_grad(), autocast(self.device, self.amp):
                while done < passes:
                    n = min(chunk, passes - done)
                    out = self.model(x, ids, sample=samples > 0, samples=n)
                    probs = torch.sigmoid(out["logits"].float()[:, 0]).view(len(batch), n, *x.shape[-2:])
                    total += probs.sum(1)
                    done += n
            mean = (total / passes).cpu().numpy()
            for m, (_, pad) in zip(mean, inputs):
                p = np.clip(unpad(m.astype(np.float32), pad, order=1), 0.0, 1.0).astype(np.float32)
                results.append((p, binary_entropy(p)))
            progress.advance(len(batch))
        return results


def binary_entropy(p):
    """Entropy of a Bernoulli(p) in bits: 0 where p is 0 or 1, 1 where p = 0.5."""
    q = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return (-(q * np.log2(q) + (1 - q) * np.log2(1 - q))).astype(np.float32)


def predict_volume(predictor, image, prompt, samples=30, window=None, progress=None):
    """(mask uint8 z/y/x, uncertainty float32 z/y/x) of a 3D SimpleITK image on its own grid.

    Axial slices (patient axis, display orientation, one intensity window) go through the predictor;
    blank slices (one value) are skipped and stay background with zero uncertainty."""
    from .medclipseg_data import volume_gray_slices

    progress = progress or null_progress()
    if image.GetDimension() != 3:
        raise MedCLIPSAMError(f"expected a 3D volume, got a {image.GetDimension()}D image")
    view, _, gray = volume_gray_slices(image, window=window)
    shape = tuple(reversed(image.GetSize()))
    mask = np.zeros(shape, np.uint8)
    uncertainty = np.zeros(shape, np.float32)
    slices = [(k, gray(k)) for k in range(view.count)]
    slices = [(k, g) for k, g in slices if g.max() > g.min()]
    progress.stage("predict", len(slices), f"MedCLIPSeg: {samples} passes per slice")
    results = predictor([g for _, g in slices], prompt, samples, progress) if slices else []
    for (k, _), (p, h) in zip(slices, results):
        view.put(mask, k, (p > 0.5).astype(np.uint8))
        view.put(uncertainty, k, h)
    return mask, uncertainty


def predict_file(model_dir, input_path, prompt, output, uncertainty_output=None, samples=30, device="auto",
                 window=None, seed=0, progress=None, predictor=None):
    """Segment a volume or a 2D image file and write the outputs; returns a summary dict.

    A 2D image with a .png output gives a PNG mask (0 / 255) and, with `uncertainty_output` .png, the
    uncertainty scaled to 0..255. Anything else is read as a volume (a 2D image as one slice): .seg.nrrd
    output gets one segment named by the prompt, .nrrd/.nii(.gz) a labelmap, and the uncertainty is a float
    volume (.nrrd/.nii(.gz)/.mha), all on the input's exact grid."""
    from ..io import image_from_array, read_volume, write_labelmap, write_segmentation, write_volume
    from .medclipseg_data import gray8_of, is_2d_image_file

    progress = progress or null_progress()
    prompt = str(prompt or "").strip()
    if not prompt:
        raise MedCLIPSAMError("the prompt is empty; give the text that names the target, e.g. 'liver tumor'")
    flat = is_2d_image_file(input_path) and str(output).lower().endswith(".png")
    check_output(output, (".png",) if flat else (".seg.nrrd", ".nrrd", ".nii.gz", ".nii"))
    if uncertainty_output:
        check_output(uncertainty_output, (".png",) if flat else (".nrrd", ".nii.gz", ".nii", ".mha"))
    if not Path(input_path).exists():
        raise MedCLIPSAMError(f"input '{input_path}' does not exist")
    if samples < 0:
        raise MedCLIPSAMError(f"--samples must be 0 (one deterministic pass) or more, got {samples}")
    read_config(model_dir)  # a bad model folder fails before anything is loaded
    seed_everything(seed)   # the stochastic passes are reproducible
    predictor = predictor or MedCLIPSegPredictor(model_dir, device)
    if flat:
        from ..io.images import read_image_2d
        from ..overlay import save_png

        gray = gray8_of(read_image_2d(input_path))
        progress.stage("predict", 1, f"MedCLIPSeg: {samples} passes")
        (p, h), = predictor([gray], prompt, samples, progress)
        mask = p > 0.5
        save_png(output, mask.astype(np.uint8) * 255)
        if uncertainty_output:
            save_png(uncertainty_output, np.rint(h * 255).astype(np.uint8))
    else:
        image = read_volume(input_path)  # a 2D image becomes a one-slice volume
        mask, h = predict_volume(predictor, image, prompt, samples, window, progress)
        if str(output).lower().endswith(".seg.nrrd"):
            write_segmentation(output, [{"name": prompt, "mask": mask}], image)
        else:
            write_labelmap(output, mask, image)
        if uncertainty_output:
            write_volume(uncertainty_output, image_from_array(h, image))
    return {"output": str(output), "foreground": int(np.count_nonzero(mask)), "samples": int(samples),
            "mean_uncertainty": float(np.mean(h)) if np.size(h) else 0.0, "random_clip": predictor.is_random}


def check_output(path, suffixes):
    import os

    if not any(str(path).lower().endswith(s) for s in suffixes):
        raise MedCLIPSAMError(f"output '{path}' must end with one of {', '.join(suffixes)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise MedCLIPSAMError(f"cannot write '{path}': folder '{folder}' does not exist or is not writable")


def evaluate_dice(predictor, samples, prompt, passes=0):
    """Mean Dice (metrics.dice, per sample) of the predictor on labelled samples, one deterministic pass
    by default."""
    from ..metrics import dice

    results = predictor([s.gray for s in samples], prompt, passes)
    return float(np.mean([dice(p > 0.5, s.mask) for (p, _), s in zip(results, samples)]))


# --------------------------------------------------------------------------------------------------
# training

class PrefixCache:
    """The frozen image prefix of each training sample, computed once (only without augmentation, where
    a sample's picture never changes). With BiomedCLIP and 10 adapted blocks it saves 2 of 12 blocks;
    with fewer adapted blocks most of the image tower. Kept on the CPU in float32."""

    LIMIT_BYTES = 4 << 30

    def __init__(self):
        self.store = {}

    @classmethod
    def maybe(cls, n, model, bundle):
        tokens = model.grid * model.grid + model.prefix_tokens
        need = n * tokens * model.dims["vision_width"] * 4
        if need > cls.LIMIT_BYTES:
            log.info("not caching the frozen image prefix: it would take %.1f GiB", need / (1 << 30))
            return None
        return cls()

    def get(self, model, images, indices):
        import torch

        indices = [int(i) for i in indices]
        missing = [pos for pos, i in enumerate(indices) if i not in self.store]
        if missing:
            with torch.no_grad():
                fresh = model.vision_prefix(images[missing]).float().cpu()
            for pos, tokens in zip(missing, fresh):
                self.store[indices[pos]] = tokens
        return torch.stack([self.store[i] for i in indices]).to(images.device)


@dataclass
class MedCLIPSegOptions:
    images: object = None              # files / folders (see medclipseg_data); or pass samples= to train()
    labels: object = None
    prompts: object = None             # strings and/or .txt files, one prompt a line
    output: str = "medclipseg-model"
    fraction: float = 1.0              # share of the labelled samples used (seeded subset)
    model: str = "biomedclip"          # base CLIP: registry name, tiny-random, random-biomedclip or a folder
    epochs: int = 50
    batch_size: int = 24               # global (all ranks together)
    lr: float = 3e-4
    layers: int = 10                   # adapted layer pairs (clamped to the towers' depths)
    bottleneck: object = None          # None: 256 for width 768 (ratio 1/3)
    heads: object = None
    augment: bool = True
    amp: object = None                 # None: bf16 autocast on CUDA only
    val_images: object = None
    val_labels: object = None
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    overwrite: bool = False
    extra: dict = field(default_factory=dict)


def _check_options(opts):
    if opts.epochs < 1 or opts.batch_size < 1:
        raise MedCLIPSAMError("--epochs and --batch-size must be at least 1")
    if not opts.lr > 0:
        raise MedCLIPSAMError("--lr must be positive")
    if not 0 < opts.fraction <= 1:
        raise MedCLIPSAMError(f"--fraction must be in (0, 1], got {opts.fraction}")
    if opts.layers < 1:
        raise MedCLIPSAMError("--layers must be at least 1")
    out = Path(opts.output)
    if (out / CONFIG_FILE).exists() and not opts.overwrite:
        raise MedCLIPSAMError(f"'{out}' already holds a trained MedCLIPSeg model; choose another --output "
                              "or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise MedCLIPSAMError(f"--output '{out}' is a file; give a folder")


def train(opts, progress=None, samples=None, val_samples=None):
    """Train adapters + head; returns the metric records (one per epoch). `samples` / `val_samples`
    (lists of medclipseg_data.Sample) replace opts.images/labels and opts.val_images/val_labels.
    Under torchrun it joins (and afterwards leaves) the process group; non-zero ranks return []."""
    from .clip_finetune import leaving_process_group

    with leaving_process_group():
        return _train(opts, progress, samples, val_samples)


def _train(opts, progress, samples, val_samples):
    import torch

    from .clip_finetune import append_metrics, init_distributed, lr_lambda
    from .medclipseg_data import SegmentationDataset, choose_fraction, collate, load_samples, read_prompts

    _check_options(opts)
    prompts = read_prompts(opts.prompts)
    dist_info, device = init_distributed(opts.device)
    progress = progress if (progress is not None and dist_info.main) else null_progress()
    amp = device.type == "cuda" if opts.amp is None else bool(opts.amp)

    # data first: a bad data set fails before a model is built
    if samples is None:
        if not opts.images or not opts.labels:
            raise MedCLIPSAMError("give the training images and their labels (--images and --labels)")
        samples = load_samples(opts.images, opts.labels)
    if val_samples is None and opts.val_images:
        val_samples = load_samples(opts.val_images, opts.val_labels or [])
    all_count = len(samples)
    samples = choose_fraction(samples, opts.fraction, opts.seed)
    say = log.info if dist_info.main else log.debug  # one report per run, not one per rank
    say("MedCLIPSeg: %d of %d labelled samples (fraction %g), prompts %s", len(samples), all_count,
        opts.fraction, prompts)

    seed_everything(opts.seed + dist_info.rank)
    model, bundle = build_model(opts.model, device, opts.layers, opts.bottleneck, opts.heads)
    trainable = model.trainable_parameters()
    n_trainable = sum(p.numel() for p in trainable)
    say("MedCLIPSeg on '%s': %d adapted layer pairs, %d trainable parameters (CLIP frozen)",
        opts.model, model.layers, n_trainable)

    dataset = SegmentationDataset(samples, prompts, bundle.image_size, bundle.mean, bundle.std,
                                  augment=opts.augment, seed=opts.seed)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist_info.world, rank=dist_info.rank,
                                                  shuffle=True, seed=opts.seed, drop_last=False)
    local_batch = max(1, opts.batch_size // dist_info.world)
    loader = torch.utils.data.DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=opts.workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda")
    total_steps = len(loader) * opts.epochs
    optimizer = torch.optim.Adam(trainable, lr=opts.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(0, total_steps))  # cosine to 0

    ddp = model
    if dist_info.active:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    predictor = MedCLIPSegPredictor(model=model, bundle=bundle, amp=amp)
    cache = None if opts.augment else PrefixCache.maybe(len(dataset), model, bundle)
    val_prompt = prompts[0]

    output = Path(opts.output)
    metrics_path = output / METRICS_FILE
    config = {"clip": _clip_reference(opts.model), "prompts": prompts, "trainable_parameters": n_trainable,
              "samples": len(samples), "samples_available": all_count, "world_size": dist_info.world,
              "options": {k: v for k, v in asdict(opts).items() if k not in ("images", "labels", "val_images",
                                                                            "val_labels", "extra")}}
    if dist_info.main:
        output.mkdir(parents=True, exist_ok=True)
        if metrics_path.exists():
            metrics_path.unlink()
    records, step = [], 0
    for epoch in range(opts.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        model.train()
        progress.stage("train", len(loader), f"epoch {epoch + 1}/{opts.epochs}")
        sums, seen, started = {}, 0, time.perf_counter()
        for images, masks, batch_prompts, indices in loader:
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            ids = tokenize(bundle, batch_prompts)
            prefix = cache.get(model, images, indices) if cache is not None else None
            with autocast(device, amp, dtype=torch.bfloat16):
                out = ddp(images, ids, prefix=prefix)
            loss, parts = segmentation_loss(out, masks, batch_prompts, model.grid)
            value = loss.item()
            if not math.isfinite(value):
                raise MedCLIPSAMError(f"the loss became {value} at step {step + 1}; lower --lr or use --no-amp")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            with torch.no_grad():
                pred = out["logits"].float()[:, 0] > 0
                inter = (pred & (masks > 0.5)).flatten(1).sum(1).float()
                sizes = pred.flatten(1).sum(1) + (masks > 0.5).flatten(1).sum(1)
                batch_dice = torch.where(sizes > 0, 2 * inter / sizes.clamp_min(1), torch.ones_like(inter))
            for k, v in {"loss": value, **parts, "train_dice": float(batch_dice.mean())}.items():
                sums[k] = sums.get(k, 0.0) + v * len(images)
            seen += len(images)
            progress.advance(1, f"loss {value:.4f}")
        seconds = time.perf_counter() - started
        if dist_info.active:  # the epoch's averages over all ranks' samples
            keys = sorted(sums)
            totals = torch.tensor([sums[k] for k in keys] + [seen], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(totals)
            sums, seen = dict(zip(keys, totals[:-1].tolist())), int(totals[-1])
        record = {"epoch": epoch + 1, "step": step, **{k: v / max(1, seen) for k, v in sums.items()},
                  "lr": scheduler.get_last_lr()[0], "samples_per_s": seen / seconds,
                  "seconds": seconds}
        if dist_info.main:
            if val_samples:
                record["val_dice"] = evaluate_dice(predictor, val_samples, val_prompt)
            records.append(record)
            save_model(model, bundle, output, {**config, "epoch": epoch + 1})
            append_metrics(metrics_path, record)
            log.info("epoch %d/%d: loss %.4f, train Dice %.3f%s, %.1f samples/s", epoch + 1, opts.epochs,
                     record["loss"], record["train_dice"],
                     f", val Dice {record['val_dice']:.3f}" if "val_dice" in record else "", record["samples_per_s"])
        if dist_info.active:
            torch.distributed.barrier()
    return records
