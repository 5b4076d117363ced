"""Fine-tuning a CLIP model (BiomedCLIP) on image-caption pairs with DHN-NCE, HN-NCE or InfoNCE.

One command runs on a CPU, a GPU or under `torchrun --nproc_per_node N` (DistributedDataParallel: gloo on
CPU, nccl on CUDA). `batch_size` is the global batch: each of N ranks takes batch_size / N pairs, the
features are gathered across ranks with gradients, so every rank computes the loss of the whole global
batch (negatives come from all ranks) and the gradients equal a single process's on that batch. With
gradient accumulation each micro-batch is its own contrastive batch; the optimiser steps once per
`grad_accum` micro-batches.

The output folder is a CLIP model folder that `load_clip(folder)` loads (open_clip_config.json,
open_clip_pytorch_model.bin, text/ tokenizer files, manifest.json with checksums), updated after every
epoch, plus:
  training_state.pt   model + optimiser + scheduler + step + RNG of the last finished epoch (for --resume)
  metrics.jsonl       one line per epoch (epoch 0 = before training): loss, lr, samples/s, retrieval
  metrics.png         loss and retrieval over epochs
  train_options.json  the options of the run
Only rank 0 writes, each file atomically (temp file + rename).

Settings as released for MedCLIP-SAM: tau 0.6, beta1 = beta2 = 0.15, batch 16, lr 1e-3, weight decay 0.1,
1000 warm-up steps, 32 epochs, all layers trainable. Biases, norms and the logit scale get no weight decay.
With a fixed temperature the model's logit_scale is frozen (it is not in the loss); `temperature="learned"`
uses tau = 1 / exp(logit_scale) and trains it (clamped at 100, as open_clip does).
"""

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import MedCLIPSAMError
from ..progress import null_progress
from ..runtime import atomic_output, autocast, log, seed_everything, select_device

STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
WEIGHTS_FILE = "open_clip_pytorch_model.bin"
FREEZE_CHOICES = ("none", "vision", "text")
# options that must match when resuming (the others, e.g. epochs or device, may change)
RESUME_FIXED = ("model", "loss", "temperature", "beta1", "beta2", "duplicate_negatives", "batch_size", "grad_accum",
                "freeze", "seed")


@dataclass
class FinetuneOptions:
    data: str
    output: str
    model: str = "biomedclip"
    loss: str = "dhn-nce"
    temperature: object = 0.6          # a float, or "learned"
    beta1: float = 0.15
    beta2: float = 0.15
    duplicate_negatives: bool = False  # True: identical captions in a batch count as negatives (see losses)
    epochs: int = 32
    batch_size: int = 16               # global batch (all ranks together)
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 1000
    grad_accum: int = 1
    clip_grad: float = 1.0             # max gradient norm; 0 switches clipping off
    amp: object = None                 # None: bf16 autocast on CUDA only
    freeze: str = "none"
    augment: bool = True
    val_data: object = None            # retrieval each epoch on this set (else on up to eval_limit training pairs)
    eval_limit: int = 1000
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    resume: bool = False


# distributed --------------------------------------------------------------------------------------

@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0

    @property
    def active(self):
        return self.world > 1


def init_distributed(device_name):
    """Start the process group when launched by torchrun (WORLD_SIZE > 1); returns (DistInfo, device)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), select_device(device_name)
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = select_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


@contextlib.contextmanager
def leaving_process_group():
    """Leave, after the block and also when it fails, the process group that the block starts under
    torchrun. A gloo group still alive at interpreter exit can abort the process while its threads are
    torn down (SIGABRT, "terminate called without an active exception"), failing a finished run."""
    import torch.distributed as dist

    started = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    try:
        yield
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


# pieces of the loop --------------------------------------------------------------------------------

def lr_lambda(warmup_steps, total_steps):
    """Linear warm-up from 0 to 1 over warmup_steps, then cosine down to 0 at total_steps."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))
    return factor


def parameter_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # biases, norm gains and the logit scale are not decayed (as in CLIP/open_clip training)
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def apply_freeze(model, freeze, learn_temperature):
    if freeze not in FREEZE_CHOICES:
        raise MedCLIPSAMError(f"unknown --freeze '{freeze}'; choose one of {', '.join(FREEZE_CHOICES)}")
    for p in model.parameters():
        p.requires_grad_(True)
    tower = {"vision": model.visual, "text": getattr(model, "text", None)}.get(freeze)
    if tower is not None:
        for p in tower.parameters():
            p.requires_grad_(False)
    model.logit_scale.requires_grad_(bool(learn_temperature))
    if getattr(model, "logit_bias", None) is not None:
        model.logit_bias.requires_grad_(False)  # not part of these losses


def set_train_mode(model, freeze):
    model.train()
    tower = {"vision": model.visual, "text": getattr(model, "text", None)}.get(freeze)
    if tower is not None:
        tower.eval()  # a frozen tower runs as at inference (no dropout)


def rng_state():
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _features(output):
    """(image_features, text_features, logit_scale) from an open_clip forward (tuple or dict)."""
    if isinstance(output, dict):
        return output["image_features"], output["text_features"], output["logit_scale"]
    return output[0], output[1], output[2]


# saving ---------------------------------------------------------------------------------------------

def export_clip_folder(model, source_folder, output, extra=None):
    """Write `model` into `output` as a CLIP folder load_clip() reads: the source's config and text tower
    files, the weights, and a checksum manifest."""
    import torch

    from ..models import cache
    from ..models.builders import TEXT_FILES, find_text_file

    source_folder, output = Path(source_folder), Path(output)
    (output / "text").mkdir(parents=True, exist_ok=True)
    if source_folder.resolve() != output.resolve():
        shutil.copyfile(source_folder / "open_clip_config.json", output / "open_clip_config.json")
        for name in TEXT_FILES:
            src = find_text_file(source_folder, name)
            if src is not None:
                shutil.copyfile(src, output / "text" / name)
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
             for k, v in model.state_dict().items()}
    with atomic_output(output / WEIGHTS_FILE) as tmp:
        torch.save(state, tmp)
    files = ["open_clip_config.json", WEIGHTS_FILE] + [f"text/{n}" for n in TEXT_FILES
                                                         if (output / "text" / n).is_file()]
    cache.record_files(output, {f: None for f in files}, source="medclipsam finetune-clip", extra=extra or {})


def write_json_atomic(path, obj):
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, default=str))


def append_metrics(path, record):
    # rewritten whole (atomic) so a crash never leaves a torn last line
    old = Path(path).read_text() if Path(path).is_file() else ""
    with atomic_output(path) as tmp:
        Path(tmp).write_text(old + json.dumps(record) + "\n")


def read_metrics(path):
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(records, path):
    """Loss and top-1/top-5 retrieval over epochs, one PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ret) = plt.subplots(1, 2, figsize=(10, 4))
    trained = [r for r in records if r.get("loss") is not None]
    ax_loss.plot([r["epoch"] for r in trained], [r["loss"] for r in trained], "o-")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, style in (("i2t_top1", "o-"), ("t2i_top1", "s-"), ("i2t_top5", "o--"), ("t2i_top5", "s--")):
        pts = [(r["epoch"], r["retrieval"][key]) for r in records if r.get("retrieval")]
        if pts:
            ax_ret.plot(*zip(*pts), style, label=key.replace("_", " "))
    ax_ret.set(xlabel="epoch", ylabel="recall", title="retrieval", ylim=(0, 1.02))
    ax_ret.legend(loc="lower right")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# retrieval ------------------------------------------------------------------------------------------

def retrieval_metrics(image_features, text_features, captions, ks=(1, 5)):
    """Image->text and text->image recall@k for pairs (row i of each belongs with captions[i]).

    Identical captions are one class: image->text ranks the distinct captions and a hit is the image's
    own caption in the top k; text->image ranks all images for each pair's caption and a hit is any image
    with that same caption in the top k. With distinct captions this is the usual recall@k.
    """
    import torch

    distinct = sorted(set(captions))
    index = {c: i for i, c in enumerate(distinct)}
    labels = torch.tensor([index[c] for c in captions])
    v = torch.nn.functional.normalize(image_features.float(), dim=-1)
    t = torch.nn.functional.normalize(text_features.float(), dim=-1)
    # one text embedding per distinct caption (the first pair that has it)
    first = [captions.index(c) for c in distinct]
    sim = v @ t[first].T                                    # [pairs, distinct captions]
    result = {"pairs": len(captions), "captions": len(distinct)}
    for k in ks:
        k_i2t = min(k, len(distinct))
        top = sim.topk(k_i2t, dim=1).indices
        result[f"i2t_top{k}"] = (top == labels[:, None]).any(1).float().mean().item()
        k_t2i = min(k, len(captions))
        top_images = sim.T.topk(k_t2i, dim=1).indices       # [distinct, k] image indices
        hit_per_caption = (labels[top_images] == torch.arange(len(distinct))[:, None]).any(1)
        result[f"t2i_top{k}"] = hit_per_caption[labels].float().mean().item()
    return result


def encode_dataset(model, tokenizer, dataset, device, batch_size=64, amp=False, progress=None):
    """Image and text features of every pair (no gradient, eval mode)."""
    import torch

    from .data import collate

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    was_training = model.training
    model.eval()
    images, texts = [], []
    try:
        with torch.no_grad(), autocast(device, amp):
            for batch_images, captions in loader:
                image_f, text_f, _ = _features(model(batch_images.to(device), tokenizer(captions).to(device)))
                images.append(image_f.float().cpu())
                texts.append(text_f.float().cpu())
                if progress is not None:
                    progress.advance(len(captions))
    finally:
        model.train(was_training)
    return torch.cat(images), torch.cat(texts)


def evaluate_retrieval(bundle, data, batch_size=64, amp=False, limit=None, progress=None):
    """Retrieval recall@1/@5 of a ClipBundle on a data set (path or list of Pair)."""
    from .data import ImageCaptionDataset, read_pairs

    pairs = data if isinstance(data, list) else read_pairs(data)
    pairs = pairs[:limit] if limit else pairs
    if len(pairs) < 2:
        raise MedCLIPSAMError("retrieval needs at least 2 image-caption pairs")
    dataset = ImageCaptionDataset(pairs, bundle.image_size, bundle.mean, bundle.std, train=False)
    if progress is not None:
        progress.stage("retrieval", len(pairs), "encoding images and captions")
    v, t = encode_dataset(bundle.model, bundle.tokenizer, dataset, bundle.device, batch_size, amp, progress)
    return retrieval_metrics(v, t, [p.caption for p in pairs])


# training --------------------------------------------------------------------------------------------

def _check_options(opts):
    from .losses import LOSSES

    if opts.loss not in LOSSES:
        raise MedCLIPSAMError(f"unknown loss '{opts.loss}'; choose one of {', '.join(LOSSES)}")
    if opts.temperature != "learned":
        try:
            opts.temperature = float(opts.temperature)
        except (TypeError, ValueError):
            raise MedCLIPSAMError(f"--temperature must be a positive number or 'learned', "
                                  f"not '{opts.temperature}'") from None
        if opts.temperature <= 0:
            raise MedCLIPSAMError("--temperature must be positive")
    for name in ("epochs", "batch_size", "grad_accum"):
        if int(getattr(opts, name)) < 1:
            raise MedCLIPSAMError(f"--{name.replace('_', '-')} must be at least 1")
    if opts.batch_size < 2:
        raise MedCLIPSAMError("--batch-size must be at least 2: a contrastive loss needs negatives")
    if opts.lr <= 0 or opts.weight_decay < 0 or opts.warmup_steps < 0 or opts.clip_grad < 0:
        raise MedCLIPSAMError("--lr must be positive and --weight-decay, --warmup-steps, --clip-grad non-negative")


def finetune(opts, progress=None):
    """Run (or resume) a fine-tuning; returns the list of metric records (one per epoch, epoch 0 first).

    Under torchrun it joins (and afterwards leaves) the process group; non-zero ranks return [].
    """
    with leaving_process_group():
        return _finetune(opts, progress)


def _finetune(opts, progress):
    import torch

    from .data import ImageCaptionDataset, collate, read_pairs
    from .losses import contrastive_loss, gather_features_with_grad, same_caption_matrix
    from ..models import load_clip

    _check_options(opts)
    dist_info, device = init_distributed(opts.device)
    progress = progress if (progress is not None and dist_info.main) else null_progress()
    if opts.batch_size % dist_info.world:
        raise MedCLIPSAMError(f"--batch-size {opts.batch_size} is not divisible by the {dist_info.world} processes")
    amp = device.type == "cuda" if opts.amp is None else bool(opts.amp)
    output = Path(opts.output)
    state_path = output / STATE_FILE

    # data first: a bad data set fails before a model is built
    pairs = read_pairs(opts.data)
    val_pairs = read_pairs(opts.val_data) if opts.val_data else pairs[:opts.eval_limit]
    if len(pairs) < opts.batch_size:
        raise MedCLIPSAMError(f"the data set has {len(pairs)} pairs, fewer than one batch ({opts.batch_size}); "
                              "use a smaller --batch-size")

    state = None
    if state_path.is_file():
        if not opts.resume:
            raise MedCLIPSAMError(f"'{output}' already holds a training run; pass --resume to continue it "
                                  "or choose another --output")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        saved = state["options"]
        changed = [k for k in RESUME_FIXED if str(saved.get(k)) != str(getattr(opts, k))]
        if changed:
            raise MedCLIPSAMError(f"cannot resume '{output}' with a different {', '.join(changed)} "
                                  "than the run was started with")
    elif opts.resume:
        log.info("nothing to resume in '%s': starting a new run", output)

    seed_everything(opts.seed + dist_info.rank)
    # a resumed run rebuilds the model from its own output folder: the source model need not be there
    bundle = load_clip(str(output) if state is not None else opts.model, device, reuse=False)
    source_folder, source_random = bundle.folder, bundle.is_random
    if state is not None:
        bundle.model.load_state_dict(state["model"])
    elif Path(source_folder).resolve() == output.resolve():
        raise MedCLIPSAMError("--output is the folder of the model being fine-tuned; choose a new folder")
    if dist_info.main:
        output.mkdir(parents=True, exist_ok=True)
    model = bundle.model
    learn_t = opts.temperature == "learned"
    apply_freeze(model, opts.freeze, learn_t)
    set_train_mode(model, opts.freeze)
    trainable = [p for p in model.parameters() if p.requires_grad]

    dataset = ImageCaptionDataset(pairs, bundle.image_size, bundle.mean, bundle.std, train=opts.augment,
                                  seed=opts.seed)
    val_set = ImageCaptionDataset(val_pairs, bundle.image_size, bundle.mean, bundle.std, train=False)
    # DistributedSampler also serves one process: a seeded permutation per epoch, resumable by epoch
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist_info.world, rank=dist_info.rank,
                                                  shuffle=True, seed=opts.seed, drop_last=True)
    local_batch = opts.batch_size // dist_info.world
    loader = torch.utils.data.DataLoader(dataset, batch_size=local_batch, sampler=sampler, drop_last=True,
                                         num_workers=opts.workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader) // opts.grad_accum
    if steps_per_epoch < 1:
        raise MedCLIPSAMError(f"one optimiser step needs {opts.batch_size * opts.grad_accum} pairs "
                              f"(batch size x grad accumulation); the data set has {len(pairs)}")
    total_steps = steps_per_epoch * opts.epochs
    if opts.warmup_steps >= total_steps:
        log.warning("warm-up (%d steps) is not shorter than the whole run (%d steps)", opts.warmup_steps, total_steps)

    optimizer = torch.optim.AdamW(parameter_groups(model, opts.weight_decay), lr=opts.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opts.warmup_steps, total_steps))
    step, start_epoch = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, start_epoch = state["step"], state["epoch"]
        if dist_info.main:
            set_rng_state(state["rng"])
        log.info("resuming '%s' after epoch %d (step %d)", output, start_epoch, step)

    ddp = model
    if dist_info.active:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def evaluate(epoch_label):
        if not dist_info.main:
            return None
        progress.stage("retrieval", len(val_set), f"retrieval after epoch {epoch_label}")
        v, t = encode_dataset(model, bundle.tokenizer, val_set, device, max(local_batch, 32), amp, progress)
        set_train_mode(model, opts.freeze)
        return retrieval_metrics(v, t, [p.caption for p in val_pairs])

    def barrier():
        if dist_info.active:
            torch.distributed.barrier()

    metrics_path = output / METRICS_FILE
    records = read_metrics(metrics_path) if state is not None else []
    if dist_info.main and state is None:
        write_json_atomic(output / "train_options.json", {**asdict(opts), "world_size": dist_info.world,
                                                          "source_folder": str(source_folder)})
        records = [{"epoch": 0, "step": 0, "loss": None, "retrieval": evaluate(0)}]
        if metrics_path.exists():
            metrics_path.unlink()
        append_metrics(metrics_path, records[0])
    barrier()

    for epoch in range(start_epoch, opts.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        progress.stage("train", steps_per_epoch, f"epoch {epoch + 1}/{opts.epochs}")
        losses, started = [], time.perf_counter()
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            step_loss = 0.0
            for micro in range(opts.grad_accum):
                images, captions = next(batches)
                images = images.to(device, non_blocking=True)
                tokens = bundle.tokenizer(captions).to(device)
                last = micro == opts.grad_accum - 1
                # DDP all-reduces gradients only on the micro-batch that ends an optimiser step
                sync = contextlib.nullcontext() if (last or not dist_info.active) else ddp.no_sync()
                with sync:
                    with autocast(device, amp, dtype=torch.bfloat16):
                        image_f, text_f, scale = _features(ddp(images, tokens))
                    image_f = gather_features_with_grad(image_f.float())
                    text_f = gather_features_with_grad(text_f.float())
                    tau = 1.0 / scale.float() if learn_t else opts.temperature
                    same = None if opts.duplicate_negatives else same_caption_matrix(captions, device)
                    loss = contrastive_loss(opts.loss, image_f, text_f, tau, opts.beta1, opts.beta2, same)
                    (loss / opts.grad_accum).backward()
                step_loss += loss.item() / opts.grad_accum
            if not math.isfinite(step_loss):
                raise MedCLIPSAMError(f"the loss became {step_loss} at step {step + 1}; lower --lr or use --no-amp")
            if opts.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(trainable, opts.clip_grad)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if learn_t:
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
            step += 1
            losses.append(step_loss)
            progress.advance(1, f"loss {step_loss:.4f}")
        seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "step": step, "loss": sum(losses) / len(losses),
                  "lr": scheduler.get_last_lr()[0],
                  "samples_per_s": steps_per_epoch * opts.grad_accum * opts.batch_size / seconds,
                  "seconds": seconds, "retrieval": evaluate(epoch + 1)}
        if dist_info.main:
            records.append(record)
            _save_epoch(model, optimizer, scheduler, step, epoch + 1, opts, source_folder, source_random, output)
            append_metrics(metrics_path, record)
            plot_metrics(records, output / PLOT_FILE)
            log.info("epoch %d/%d: loss %.4f, %.1f samples/s, retrieval %s", epoch + 1, opts.epochs,
                     record["loss"], record["samples_per_s"], _short(record["retrieval"]))
        barrier()
    return records


def _short(r):
    return " ".join(f"{k} {r[k]:.3f}" for k in ("i2t_top1", "t2i_top1", "i2t_top5", "t2i_top5")) if r else ""


def _save_epoch(model, optimizer, scheduler, step, epoch, opts, source_folder, source_random, output):
    import torch

    export_clip_folder(model, source_folder, output,
                       extra={"name": f"finetuned:{opts.model}", "random": bool(source_random),
                              "finetuned_from": str(opts.model), "epoch": epoch, "loss": opts.loss})
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch, "rng": rng_state(),
             "options": asdict(opts), "source_folder": str(source_folder)}
    with atomic_output(output / STATE_FILE) as tmp:
        torch.save(state, tmp)
