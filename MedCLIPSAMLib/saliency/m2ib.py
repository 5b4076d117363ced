"""M2IB saliency (MedCLIP-SAMv2): an information bottleneck on the image tower, fitted to the text.

On the output x of vision block 9 (tokens [N, C], CLS first) a per-token, per-channel gate
lambda = sigmoid(alpha) (alpha starts at 5) mixes the features with noise:
    t = lambda * x + (1 - lambda) * eps,   eps ~ N(mean_c, std_c^2)   (mean 0, std 1 by default, see below).
In normalised units r = (x - mean) / std, q(t|x) = N(lambda r, (1 - lambda)^2) and the prior is N(0, 1), so
    KL = 0.5 * ((lambda r)^2 + (1 - lambda)^2 - 1) - log(1 - lambda)   per token and channel.
Loss per image = beta * mean(KL) - mean over noisy copies of cos(text, image_embedding(t)); Adam (lr 1)
on alpha for 10 steps with a batch of 10 noisy copies. The map is KL (for the final alpha, on the clean
features) summed over channels, prefix (CLS) token dropped, 14x14 -> bilinear to the input size, min-max.

Noise statistics (`noise_stats`): "standard" (default) uses N(0, 1) for every channel, which is what
the released MedCLIP-SAMv2 / M2IB code does (its estimator is set to mean 0 and variance `var` = 1,
whatever the features; the features only give it its shape). "image" takes the per-channel mean and std
over the image's own block-9 tokens (DESIGN's "layer's per-channel statistics"). The default follows the
released code, and because on a constructed model whose text-image signal sits in a known quadrant
(Testing/Python/test_saliency.py) "standard" puts the map on that quadrant for each seed tried (0, 1, 2)
while "image" puts it on the other one: noise with the image's own mean still carries the image's
average token, so dropping the informative tokens costs little and side effects drive the objective.

Speed: blocks 0..9 do not depend on alpha, so their output is computed once and each step runs only
blocks 10, 11 (the last for the pooled CLS token only: models/clip_image.py), the final norm, the pooling
and the projection (`encode_from_block`).
`recompute_prefix=True` instead runs the whole encoder every step with the bottleneck hooked onto block 9
(the straightforward reference, for tests and benchmarks); both draw the same noise and give the same map.
Several images are fitted at once: each has its own alpha and its own loss, and Adam is elementwise, so
that equals fitting them one by one.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MedCLIPSAMError
from ..models.clip_image import encode_from_block
from ..models.hooks import hooked, run_until
from ..progress import checkpoint
from ..runtime import autocast as amp
from .common import (as_batch, minmax, prefix_tokens, text_matrix, to_numpy_maps, tokens_to_grid, upsample,
                     vit_trunk)

NOISE_STATS = ("standard", "image")


@dataclass
class M2IBResult:
    maps: np.ndarray           # [B,H,W] float32 in [0,1]
    loss_history: np.ndarray   # [steps, B] loss of each image at each step (before that step's update)
    kl_history: np.ndarray     # [steps, B] the mean KL part of it
    cos_history: np.ndarray    # [steps, B] the mean cosine part of it
    capacity: torch.Tensor     # [B,N,C] KL per token and channel for the final alpha


def m2ib(clip, images, text_embedding, **settings):
    """M2IB maps [B,H,W] (float32 numpy in [0,1]); settings as in run_m2ib."""
    return run_m2ib(clip, images, text_embedding, **settings).maps


def run_m2ib(clip, images, text_embedding, beta=1.0, steps=10, lr=1.0, batch_size=10, init_alpha=5.0,
             block=9, noise_stats="standard", recompute_prefix=False, autocast=False, seed=0):
    """M2IB of normalised images [B,3,H,W] (or [3,H,W]) for a [D] (or [B,D]) text embedding.

    beta: weight of the compression term (1; 2 for brain MRI). steps, lr: Adam on alpha. batch_size:
    noisy copies per image and step. block: the bottleneck sits on this block's output. noise_stats:
    "standard" | "image" (see the module notes). recompute_prefix: run the whole encoder each step
    (reference). autocast: bf16 for the transformer blocks (the bottleneck and the KL stay fp32).
    seed: the noise generator's seed (the map is reproducible).
    """
    trunk = vit_trunk(clip)
    if noise_stats not in NOISE_STATS:
        raise MedCLIPSAMError(f"noise_stats must be one of {', '.join(NOISE_STATS)}, got '{noise_stats}'")
    if int(batch_size) < 1 or int(steps) < 0:
        raise MedCLIPSAMError("M2IB needs batch_size >= 1 and steps >= 0")
    if not 0 <= int(block) < len(trunk.blocks):
        raise MedCLIPSAMError(f"M2IB block must be in 0..{len(trunk.blocks) - 1}, got {block}")
    block, copies, device = int(block), int(batch_size), clip.device
    layer = trunk.blocks[block]
    with torch.inference_mode(False):
        x = as_batch(images, device)
        texts = text_matrix(text_embedding, x.shape[0], device)
        with torch.no_grad(), amp(device, autocast), hooked(layer, stop=True) as store:
            run_until(clip.model.encode_image, x)  # blocks 0..block once; the forward stops there
        feats = store[0].detach().float()          # [B,N,C]
        mean, std = _noise_statistics(feats, noise_stats)
        alpha = torch.full_like(feats, float(init_alpha), requires_grad=True)
        optimizer = torch.optim.Adam([alpha], lr=float(lr))
        # one generator per image, all with the same seed: an image gets the same noise (and map) whether
        # it is fitted alone or in a batch of slices
        generators = [torch.Generator(device=device).manual_seed(int(seed)) for _ in range(x.shape[0])]
        text_rows = texts.repeat_interleave(copies, dim=0)
        history = []
        for _ in range(int(steps)):
            checkpoint()   # a cancel stops within a step, not after the whole fit
            noise = torch.stack([torch.randn((copies, *feats.shape[1:]), generator=g, device=device)
                                 for g in generators])
            with torch.enable_grad():
                if recompute_prefix:
                    embeddings = _encode_recomputed(clip, x, layer, alpha, noise, noise_stats, autocast)
                else:
                    with amp(device, autocast):
                        embeddings = encode_from_block(clip, _bottleneck(feats, alpha, noise, mean, std), block + 1)
                cos = (F.normalize(embeddings.float(), dim=-1) * text_rows).sum(-1).view(x.shape[0], copies)
                kl = capacity(alpha, feats, mean, std).mean(dim=(1, 2))
                loss = float(beta) * kl - cos.mean(1)
                # the gradient of alpha only: no weight gradients computed, none left on the shared model;
                # per-image losses are independent, so their sum fits each image's alpha on its own
                (alpha.grad,) = torch.autograd.grad(loss.sum(), [alpha])
            optimizer.step()
            history.append(torch.stack([loss, kl, cos.mean(1)]).detach().cpu())
        with torch.no_grad():
            kl_tokens = capacity(alpha, feats, mean, std)
            grid = tokens_to_grid(kl_tokens.sum(-1, keepdim=True), prefix_tokens(clip))  # [B,1,h,w]
            maps = minmax(upsample(grid, x.shape[-2:])[:, 0])
    hist = torch.stack(history).numpy() if history else np.zeros((0, 3, x.shape[0]), np.float32)
    return M2IBResult(to_numpy_maps(maps), hist[:, 0], hist[:, 1], hist[:, 2], kl_tokens.detach())


def capacity(alpha, feats, mean, std):
    """KL(q(t|x) || prior) per token and channel, in the layer's normalised units (see module notes)."""
    lam = torch.sigmoid(alpha)
    r = (feats - mean) / std
    # log(1 - sigmoid(a)) = logsigmoid(-a): stable where lambda is close to 1
    return 0.5 * ((lam * r) ** 2 + (1 - lam) ** 2 - 1) - F.logsigmoid(-alpha)


def _noise_statistics(feats, mode):
    """Per-image, per-channel mean and std [B,1,C] of the noise (and of the prior)."""
    if mode == "standard":
        return torch.zeros_like(feats[:, :1]), torch.ones_like(feats[:, :1])
    mean = feats.mean(dim=1, keepdim=True)
    std = feats.std(dim=1, keepdim=True, unbiased=False)
    # a channel that is constant over the image's tokens (e.g. a blank image) still needs some noise
    return mean, torch.maximum(std, 1e-6 + 1e-3 * std.mean(dim=-1, keepdim=True))


def _bottleneck(feats, alpha, noise, mean, std):
    """Noisy copies t = lambda x + (1 - lambda) eps for features [B,N,C] and noise [B,n,N,C] -> [B*n,N,C]."""
    lam = torch.sigmoid(alpha)[:, None]
    eps = mean[:, None] + std[:, None] * noise
    t = lam * feats[:, None] + (1 - lam) * eps
    return t.reshape(-1, *feats.shape[1:])


def _encode_recomputed(clip, x, layer, alpha, noise, noise_stats, autocast):
    """Reference: the whole encoder on the repeated images, with the bottleneck replacing block's output."""
    copies = noise.shape[1]

    def replace(out):
        clean = out.float().view(x.shape[0], copies, *out.shape[1:])[:, 0]  # the copies are identical
        mean, std = _noise_statistics(clean, noise_stats)
        return _bottleneck(clean, alpha, noise, mean, std).to(out.dtype)

    with hooked(layer, replace=replace), amp(x.device, autocast):
        return clip.model.encode_image(x.repeat_interleave(copies, dim=0))
