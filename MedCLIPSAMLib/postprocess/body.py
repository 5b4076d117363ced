"""The imaged body: everything but the near-black background around it.

CLIP saliency maps often light up the air around the patient (a ViT parks global information in
background tokens, so the map's peak can sit in the corner of the image). No prompt asks for air, so the
pipeline passes the body to post-processing as the region the mask must stay in (`body_only`, on by
default): the saliency outside it counts as zero and KMeans fits its centres on the body's pixels.

Body = the pixels of the smoothed uint8 image above the lowest three-class Otsu threshold, closed (radius
2 % of the image) so that thin bright rims like scalp or skin are unbroken, holes filled, specks under
0.5 % of the image dropped. Dark regions inside the body (lungs, ventricles, bowel gas, the skull) are
enclosed by tissue and stay in. An image whose border is mostly tissue (no dark surround: a cropped image,
many radiographs) is all body, and so is a flat one.
"""

import numpy as np


def body_mask(gray8, min_fraction=0.005, surround=0.5):
    """HxW bool: True inside the imaged body (see the module docstring)."""
    from scipy import ndimage
    from skimage.filters import threshold_multiotsu
    from skimage.morphology import disk

    g = ndimage.gaussian_filter(np.asarray(gray8, np.float32), 1.0)
    everything = np.ones(g.shape, bool)
    if float(g.max() - g.min()) < 1.0:  # a flat image: nothing to tell apart
        return everything
    # the lowest of three-class Otsu thresholds: background against the darkest tissue (plain Otsu splits
    # grey from white matter on an MR head and would cut away the scalp)
    tissue = g > float(threshold_multiotsu(g, classes=3)[0])
    edge = np.concatenate([tissue[0], tissue[-1], tissue[:, 0], tissue[:, -1]])
    if 1.0 - edge.mean() < surround:  # the border is mostly tissue: no dark surround to remove
        return everything
    # close gaps in thin bright rims (scalp, skin) so that the dark layers inside them stay enclosed
    radius = max(2, round(0.02 * min(g.shape)))
    tissue = ndimage.binary_closing(np.pad(tissue, radius), structure=disk(radius))[radius:-radius, radius:-radius]
    body = ndimage.binary_fill_holes(tissue)
    labels, n = ndimage.label(body)
    if n:
        sizes = ndimage.sum(body, labels, index=np.arange(1, n + 1))
        body = np.isin(labels, 1 + np.flatnonzero(sizes >= min_fraction * body.size))
    return body if body.any() else everything  # nothing but specks: keep everything rather than nothing
