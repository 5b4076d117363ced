"""gScoreCAM (MedCLIP-SAM v1): ScoreCAM on the top-k channels ranked by their gradient.

On the layer's patch activations A [C,14,14] (`visual.trunk.blocks[11].norm2`, CLS token dropped):
  1. rank channels by the mean gradient of the image-text logit, keep the top k (paper 300; clamped to C);
  2. upsample each kept channel to the input size (bilinear, corner-aligned like pytorch-grad-cam's
     UpsamplingBilinear2d), min-max it, and multiply the (normalised) input by it;
  3. score the k masked images with the image-text logit, in batches of `batch_size` (optionally bf16);
  4. weights = softmax over the k scores; map = ReLU(sum_k w_k A_k) at 14x14, bilinear to the input
     size (half-pixel centres, like cv2.resize), min-max.

The logit is CLIP's own: logit_scale.exp() * cos(image embedding, text embedding), as the released code
(the model's logits_per_image). The scale does not change the ranking but it is the softmax temperature
of step 4, so it is part of the method.

Ranking tokens: the mean gradient is taken over all of the layer's tokens, prefix (CLS) included. With
BiomedCLIP's CLS pooling, the patch tokens of the last block's norm2 never reach the CLS token, so their
gradient is exactly zero and a patch-only ranking would be arbitrary; the CLS token's gradient then
decides which channels push the logit (on other layers the patch tokens contribute as usual).

With k = C this is pytorch-grad-cam's ScoreCAM (same masks, scores, softmax and weighted sum); the only
difference is that the final map is resized before a single min-max instead of min-max, cv2 resize,
min-max, which is the same map (bilinear interpolation commutes with the affine min-max).
"""

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MedCLIPSAMError
from ..models.clip_image import image_embeddings
from ..models.hooks import hooked
from ..progress import checkpoint
from ..runtime import autocast as amp
from .common import (as_batch, get_module, image_text_logit, logit_scale, minmax, prefix_tokens,
                     text_matrix, to_numpy_maps, tokens_to_grid, upsample, vit_trunk)

DEFAULT_LAYER = "visual.trunk.blocks[11].norm2"


@dataclass
class GScoreCAMResult:
    maps: np.ndarray            # [B,H,W] float32 in [0,1]
    channels: torch.Tensor      # [B,k] kept channels, best ranked first
    scores: torch.Tensor        # [B,k] logits of the masked images (same order as channels)
    ranking: torch.Tensor       # [B,C] mean gradient of the logit per channel
    activations: torch.Tensor   # [B,C,h,w] the layer's patch activations


def gscorecam(clip, images, text_embedding, **settings):
    """gScoreCAM maps [B,H,W] (float32 numpy in [0,1]); settings as in run_gscorecam."""
    return run_gscorecam(clip, images, text_embedding, **settings).maps


def default_batch_size(device):
    """Masked images per forward pass when none is given: 64 on a GPU, 16 on a CPU (see run_gscorecam)."""
    return 64 if str(device).startswith("cuda") else 16


def run_gscorecam(clip, images, text_embedding, topk=300, batch_size=None, autocast=False,
                  layer=DEFAULT_LAYER, scale=None):
    """gScoreCAM of normalised images [B,3,H,W] (or [3,H,W]) for a [D] (or [B,D]) text embedding.

    topk: channels kept (clamped to the layer width). batch_size: masked images per forward pass (the
    batches run over all images' masked copies); None: 64 on a GPU, 16 on a CPU, where ViT-B/16 in bf16
    took 119 ms per image at 16 and 152 ms at 64 on a 2-core CPU. autocast: bf16 for the masked scoring
    (the gradient pass that ranks channels stays fp32). scale: override CLIP's logit scale (softmax temperature).
    """
    vit_trunk(clip)
    if batch_size is None:
        batch_size = default_batch_size(clip.device)
    if int(topk) < 1 or int(batch_size) < 1:
        raise MedCLIPSAMError("gScoreCAM needs topk >= 1 and batch_size >= 1")
    device = clip.device
    # inference_mode(False): the ranking needs a gradient even if the caller runs in inference mode
    with torch.inference_mode(False):
        x = as_batch(images, device)
        texts = text_matrix(text_embedding, x.shape[0], device)
        s = logit_scale(clip, scale)
        acts, ranking = _activations_and_ranking(clip, x, texts, s, get_module(clip.model, layer))
        k = min(int(topk), acts.shape[1])
        channels = ranking.topk(k, dim=1).indices                          # [B,k]
        kept = torch.gather(acts, 1, channels[:, :, None, None].expand(-1, -1, *acts.shape[2:]))
        scores = _score_masked(clip, x, texts, kept, s, int(batch_size), autocast)
        maps = combine(kept, scores, x.shape[-2:])
    return GScoreCAMResult(to_numpy_maps(maps), channels, scores, ranking, acts)


def combine(kept, scores, size):
    """Softmax(scores)-weighted sum of the kept activations [B,k,h,w], ReLU, resize, min-max -> [B,H,W]."""
    weights = torch.softmax(scores.float(), dim=1)
    cam = torch.relu(torch.einsum("bk,bkhw->bhw", weights, kept.float()))
    return minmax(upsample(cam[:, None], size)[:, 0])


def _activations_and_ranking(clip, x, texts, scale, target):
    """One fp32 forward + backward: the layer's patch activations [B,C,h,w] and the per-channel mean
    gradient of the logit over all tokens [B,C]."""
    with torch.enable_grad():
        x = x.clone().requires_grad_(True)  # a graph even if the weights are frozen
        with hooked(target) as store:
            logits = image_text_logit(clip.model.encode_image(x), texts, scale)
        tokens = store[-1]
        (grads,) = torch.autograd.grad(logits.sum(), tokens)
    ranking = grads.float().mean(dim=1)
    return tokens_to_grid(tokens.detach().float(), prefix_tokens(clip)), ranking


def mask_images(x, kept):
    """Masked inputs for kept activations [n,h,w] of images x [n,3,H,W]: each activation upsampled
    (corner-aligned bilinear), min-max normalised (flat channel -> zero mask), times its image."""
    masks = upsample(kept[:, None].float(), x.shape[-2:], align_corners=True)
    flat = masks.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    masks = (masks - low[:, None, None, None]) / (high - low + 1e-8)[:, None, None, None]
    return x * masks


def _score_masked(clip, x, texts, kept, scale, batch_size, autocast):
    """Logits [B,k] of all B*k masked images, built lazily and scored batch_size at a time."""
    n_images, k = kept.shape[:2]
    flat = kept.reshape(n_images * k, *kept.shape[2:])
    owner = torch.arange(n_images, device=x.device).repeat_interleave(k)
    scores = []
    with torch.no_grad():
        for start in range(0, n_images * k, batch_size):
            checkpoint()   # a cancel stops within a batch, not after the slice's hundreds of masked images
            idx = owner[start:start + batch_size]
            masked = mask_images(x[idx], flat[start:start + batch_size])
            with amp(x.device, autocast):
                embeddings = image_embeddings(clip, masked)
            scores.append(image_text_logit(embeddings, texts[idx], scale))
    return torch.cat(scores).view(n_images, k)
