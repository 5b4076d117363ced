"""SAM2 refinement of a coarse mask: prompts (boxes or points) -> SAM2 image predictor -> final mask.

SAM2's image transform resizes to a square, so the caller passes a square (padded) image and prompts in
its pixel coordinates; nothing is ever stretched.
"""

import numpy as np

from ..postprocess import box_of_largest_component, boxes_per_component, keep_top_components, points_inside


def make_prompts(coarse_mask, settings, saliency=None):
    """SAM prompts from a coarse mask: {"boxes": Kx4 array or None, "points": Nx2 or None, "labels": N or None}."""
    if settings.prompt_mode == "box":
        box = box_of_largest_component(coarse_mask)
        return {"boxes": None if box is None else box[None].astype(np.float32), "points": None, "labels": None}
    if settings.prompt_mode == "boxes":
        boxes = boxes_per_component(coarse_mask, top_n=settings.top_n or None, saliency=saliency)
        return {"boxes": np.stack(boxes).astype(np.float32) if boxes else None, "points": None, "labels": None}
    points, labels = points_inside(coarse_mask, settings.n_points, seed=settings.seed)
    return {"boxes": None, "points": points, "labels": labels}


def shift_prompts(prompts, dx, dy):
    """Move prompts from the unpadded image into the padded square (dx columns, dy rows)."""
    out = dict(prompts)
    if prompts["boxes"] is not None:
        out["boxes"] = prompts["boxes"] + np.array([dx, dy, dx, dy], np.float32)
    if prompts["points"] is not None:
        out["points"] = prompts["points"] + np.array([dx, dy], np.float32)
    return out


def predict_mask(predictor, prompts, threshold=0.5, keep_largest=1):
    """Run SAM2 on an image already given to predictor.set_image(); union of one mask per box, thresholded
    on probability, then the largest components kept. Returns (bool mask, probability map) at the image's
    size (the probability is the maximum over boxes), or (None, None) when there is no prompt."""
    import torch

    boxes, points = prompts["boxes"], prompts["points"]
    if boxes is None and points is None:
        return None, None
    logit_threshold = float(np.log(threshold / (1 - threshold)))
    with torch.inference_mode():
        if boxes is not None:
            masks, _, _ = predictor.predict(box=boxes, multimask_output=False, return_logits=True)
            masks = masks.reshape(len(boxes), *masks.shape[-2:])
        else:
            masks, _, _ = predictor.predict(point_coords=points, point_labels=prompts["labels"],
                                            multimask_output=False, return_logits=True)
            masks = masks.reshape(1, *masks.shape[-2:])
    logits = np.asarray(masks, dtype=np.float32).max(axis=0)
    mask = keep_top_components(logits > logit_threshold, keep_largest or None)
    return mask, 1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))
