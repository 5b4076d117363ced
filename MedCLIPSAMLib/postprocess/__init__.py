"""Saliency map -> coarse binary mask -> SAM prompts.

One entry point so presets can mix methods:
    postprocess(saliency, image_gray, method="crf" | "kmeans" | "threshold", top_n=1, fill_holes=True, ...)
Every function in POSTPROCESSORS has the signature (saliency, image_gray, **settings) -> bool mask.
"""

import numpy as np

from ..errors import MedCLIPSAMError
from .components import (
    fill_holes as _fill_holes,
    keep_top_components,
    largest_component,
    remove_small_components,
)
from .crf import crf_refine, crf_unary
from .kmeans import kmeans_mask
from .prompts import bounding_box, box_of_largest_component, boxes_per_component, points_inside


def threshold_mask(saliency, image_gray=None, threshold=0.5):
    """saliency > threshold (image_gray is ignored)."""
    return np.nan_to_num(np.asarray(saliency, dtype=np.float64)) > threshold


POSTPROCESSORS = {
    "crf": crf_refine,
    "kmeans": kmeans_mask,
    "threshold": threshold_mask,
}


def postprocess(
    saliency,
    image_gray=None,
    method="crf",
    top_n=1,
    fill_holes=True,
    rank_by="area",
    min_size=0,
    region=None,
    **settings,
):
    """Coarse mask from a saliency map: method -> drop specks -> keep top_n components -> fill holes.

    saliency: HxW map in [0, 1]. When image_gray has another size (the map is usually 224x224), the map
    is resized (linear, half-pixel aligned) to the image's HxW first and the mask has the image's size.
    top_n: components kept (None/0: all); rank_by "area" or "saliency" (summed saliency inside).
    min_size: components smaller than this many pixels are removed before ranking.
    region: optional bool mask of the image's size (e.g. postprocess.body.body_mask): the saliency outside
    it counts as zero, KMeans fits its centres inside it, and the mask never leaves it.
    settings go to the method (e.g. tau, iterations for crf; resize_to for kmeans; threshold).
    """
    if method not in POSTPROCESSORS:
        raise MedCLIPSAMError(f"unknown post-processing method '{method}'; choose one of {', '.join(POSTPROCESSORS)}")
    if rank_by not in ("area", "saliency"):
        raise MedCLIPSAMError(f"rank_by must be 'area' or 'saliency', got '{rank_by}'")
    s = np.asarray(saliency, dtype=np.float32)
    if s.ndim != 2:
        raise MedCLIPSAMError(f"expected a 2D saliency map, got shape {s.shape}")
    if image_gray is not None:
        shape = np.asarray(image_gray).shape[:2]
        if s.shape != shape:
            from ..imageops import resize

            s = resize(s, shape, order=1)
    elif method == "crf":
        raise MedCLIPSAMError("CRF post-processing needs the grayscale image as well as the saliency map")
    if region is not None:
        region = np.asarray(region, bool)
        if region.shape != s.shape:
            raise MedCLIPSAMError(f"the region's shape {region.shape} differs from the image's {s.shape}")
        s = np.where(region, s, 0.0).astype(np.float32)
        if method == "kmeans":
            settings = {**settings, "region": region}
    mask = POSTPROCESSORS[method](s, image_gray, **settings)
    if region is not None:
        mask = mask & region
    if min_size:
        mask = remove_small_components(mask, min_size)
    mask = keep_top_components(mask, top_n, saliency=s if rank_by == "saliency" else None)
    if fill_holes:
        mask = _fill_holes(mask)
    return mask


__all__ = [
    "POSTPROCESSORS",
    "postprocess",
    "threshold_mask",
    "crf_refine",
    "crf_unary",
    "kmeans_mask",
    "keep_top_components",
    "largest_component",
    "remove_small_components",
    "bounding_box",
    "box_of_largest_component",
    "boxes_per_component",
    "points_inside",
]
