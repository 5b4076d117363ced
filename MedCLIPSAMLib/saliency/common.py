"""Pieces shared by the saliency methods: layer lookup, ViT token <-> grid, the image-text logit,
upsampling and min-max (the forward hooks are in models/hooks.py).

All methods work on an open_clip model whose visual tower is a timm ViT wrapped by open_clip's TimmModel
(BiomedCLIP and the tiny-random model): `visual.trunk` is the timm VisionTransformer, `visual.head` the
projection. Tokens are [B, N, C] with `trunk.num_prefix_tokens` prefix tokens (the CLS token) first.
"""

import re

import torch
import torch.nn.functional as F

from ..errors import MedCLIPSAMError

_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[-?\d+\])*)$")


def get_module(root, path):
    """Resolve a dotted path with indices, e.g. "visual.trunk.blocks[11].norm2", below `root`."""
    module = root
    for part in path.split("."):
        match = _PART.match(part)
        if match is None:
            raise MedCLIPSAMError(f"bad layer name '{path}' (use a form like visual.trunk.blocks[11].norm2)")
        name, indices = match.groups()
        try:
            module = getattr(module, name)
            for index in re.findall(r"-?\d+", indices):
                module = module[int(index)]
        except (AttributeError, IndexError, TypeError):
            raise MedCLIPSAMError(f"the CLIP model has no layer '{path}'") from None
    return module


def vit_trunk(clip):
    """The timm ViT inside the CLIP image tower, or a clear error for other architectures."""
    visual = getattr(clip.model, "visual", None)
    trunk = getattr(visual, "trunk", None)
    if trunk is None or not hasattr(trunk, "blocks") or not hasattr(visual, "head"):
        raise MedCLIPSAMError("saliency needs a CLIP model with a timm ViT image tower (BiomedCLIP layout)")
    return trunk


def prefix_tokens(clip):
    return int(getattr(vit_trunk(clip), "num_prefix_tokens", 1))


def tokens_to_grid(tokens, n_prefix):
    """[B, N, C] tokens -> [B, C, h, w] patch grid, the prefix (CLS) tokens dropped."""
    patches = tokens[:, n_prefix:, :]
    batch, count, channels = patches.shape
    side = int(round(count ** 0.5))
    if side * side != count:
        raise MedCLIPSAMError(f"cannot arrange {count} patch tokens on a square grid")
    return patches.reshape(batch, side, side, channels).permute(0, 3, 1, 2)


def as_batch(images, device):
    """[3,H,W] or [B,3,H,W] (tensor or array) -> float32 [B,3,H,W] on `device`."""
    x = torch.as_tensor(images, dtype=torch.float32).detach().clone()  # never write to the caller's tensor
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise MedCLIPSAMError(f"saliency needs a normalised [3,H,W] or [B,3,H,W] image tensor, got {tuple(x.shape)}")
    return x.to(device)


def text_matrix(text_embedding, batch, device):
    """[D], [1,D] or [B,D] -> L2-normalised float32 [B,D] (one text per image)."""
    t = torch.as_tensor(text_embedding, dtype=torch.float32).detach().clone().to(device)
    if t.ndim == 1 or (t.ndim == 2 and t.shape[0] == 1):
        t = t.reshape(1, -1).expand(batch, -1)
    if t.ndim != 2 or t.shape[0] != batch:
        raise MedCLIPSAMError(f"text embedding must be [D] or [{batch},D], got {tuple(t.shape)}")
    return F.normalize(t, dim=-1)


def logit_scale(clip, override=None):
    """CLIP's own logit scale (exp of the learned log scale), as in the model's forward logits."""
    if override is not None:
        return float(override)
    scale = getattr(clip.model, "logit_scale", None)
    return float(scale.detach().exp()) if scale is not None else 1.0


def image_text_logit(embeddings, texts, scale):
    """scale * cos(image embedding, text embedding), row by row ([B,D] x [B,D] -> [B])."""
    return scale * (F.normalize(embeddings.float(), dim=-1) * texts).sum(-1)


def upsample(maps, size, align_corners=False):
    """Bilinear resize of [B,C,h,w] maps to `size` (H, W)."""
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=align_corners)


def minmax(maps, eps=1e-12):
    """Min-max normalise each [..., H, W] map to [0, 1]; a flat map (no signal) becomes all zeros."""
    flat = maps.flatten(-2)
    low = flat.min(-1, keepdim=True).values
    span = flat.max(-1, keepdim=True).values - low
    out = torch.where(span > eps, (flat - low) / span.clamp_min(eps), torch.zeros_like(flat))
    return out.reshape(maps.shape)


def to_numpy_maps(maps):
    """[B,H,W] tensor -> float32 numpy, clipped into [0, 1] (rounding can overshoot by an ulp)."""
    return maps.detach().float().clamp_(0.0, 1.0).cpu().numpy()
