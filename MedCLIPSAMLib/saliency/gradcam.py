"""GradCAM for CLIP (the baseline saliency): channel weights = mean gradient of the image-text logit over
the patch grid, map = ReLU(sum_c w_c A_c), bilinear to the input size, min-max.

Layer: `visual.trunk.blocks[11].norm1` (the last block's attention input). Not `norm2`: BiomedCLIP pools
the CLS token, and after the last attention the patch tokens never reach it, so the logit's gradient on
the patch tokens of `blocks[11].norm2` is exactly zero and GradCAM there is an empty map. At `norm1` the
patch tokens feed the CLS token through attention (pytorch-grad-cam's ViT recipe uses the same layer).

Same result as pytorch-grad-cam's GradCAM with a reshape_transform that drops the CLS token. It min-maxes
at 14x14, resizes with cv2 (half-pixel centres) and min-maxes again; here the map is resized first
(bilinear, half-pixel centres) and min-maxed once, which is the same because bilinear interpolation
commutes with the affine min-max (only the epsilons differ).
"""

import torch

from ..models.hooks import hooked
from ..runtime import autocast as amp
from .common import (as_batch, get_module, image_text_logit, logit_scale, minmax, prefix_tokens,
                     text_matrix, to_numpy_maps, tokens_to_grid, upsample, vit_trunk)

DEFAULT_LAYER = "visual.trunk.blocks[11].norm1"


def gradcam(clip, images, text_embedding, layer=DEFAULT_LAYER, autocast=False):
    """GradCAM maps [B,H,W] (float32 numpy in [0,1]) of normalised images [B,3,H,W] (or [3,H,W]) for a
    [D] (or [B,D]) text embedding. One forward and one backward pass for the whole batch."""
    vit_trunk(clip)
    device = clip.device
    with torch.inference_mode(False), torch.enable_grad():
        # the input asks for a gradient so the graph exists even if the model's weights are frozen
        x = as_batch(images, device).requires_grad_(True)
        texts = text_matrix(text_embedding, x.shape[0], device)
        target = get_module(clip.model, layer)
        with hooked(target) as store, amp(device, autocast):
            embeddings = clip.model.encode_image(x)
            # the logit scale only scales the map, which min-max removes; kept to use CLIP's own logit
            logits = image_text_logit(embeddings, texts, logit_scale(clip))
        activations = store[-1]
        (grads,) = torch.autograd.grad(logits.sum(), activations)
    n_prefix = prefix_tokens(clip)
    acts = tokens_to_grid(activations.detach().float(), n_prefix)   # [B,C,h,w]
    weights = tokens_to_grid(grads.float(), n_prefix).mean(dim=(2, 3))  # [B,C]
    cam = torch.relu((weights[:, :, None, None] * acts).sum(1))       # [B,h,w]
    cam = upsample(cam[:, None], x.shape[-2:])[:, 0]
    return to_numpy_maps(minmax(cam))
