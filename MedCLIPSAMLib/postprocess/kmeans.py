"""KMeans (k = 2) on saliency values -> binary mask (MedCLIP-SAMv2's post-processing).

On one feature (the saliency value) k = 2 Lloyd's algorithm is a threshold at the midpoint of the two
centres, so a few lines of numpy replace sklearn and are deterministic: the centres start at the minimum
and maximum, and the loop stops when the assignment no longer changes.
MedCLIP-SAMv2 resizes the map to 256x256 before clustering; here the centres are fitted on that resample
and every input pixel is then assigned to its nearer centre. That equals clustering at 256 and resizing
the labels back, without nearest-neighbour blockiness at the input size.
"""

import numpy as np


def kmeans_centres(values, max_iter=100):
    """(low, high) centres of 1D 2-means on `values` (Lloyd, started at the min and max)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo, hi
    upper = None
    for _ in range(max_iter):
        new_upper = v > (lo + hi) / 2.0
        if upper is not None and np.array_equal(new_upper, upper):
            break
        upper = new_upper
        # both clusters stay non-empty: the max is always above the midpoint, the min never
        lo, hi = float(v[~upper].mean()), float(v[upper].mean())
    return lo, hi


def kmeans_mask(saliency, image_gray=None, resize_to=256, region=None):
    """Foreground = pixels nearer the higher of the two KMeans centres of the saliency values.

    resize_to: side of the square resample the centres are fitted on (None: fit on the map as is).
    region: optional bool mask (same size as the map): the centres are fitted on its pixels only and the
    foreground stays inside it (e.g. the body, so that the zeroed air does not drag the low centre down).
    image_gray is accepted for a common post-processor signature and ignored.
    A constant map has no foreground/background split and gives an empty mask.
    """
    s = np.nan_to_num(np.asarray(saliency, dtype=np.float64))
    if s.ndim != 2:
        raise ValueError(f"expected a 2D saliency map, got shape {s.shape}")
    inside = np.ones(s.shape, bool) if region is None else np.asarray(region, bool)
    if inside.shape != s.shape:
        raise ValueError(f"region shape {inside.shape} differs from the map's {s.shape}")
    if not inside.any():
        return np.zeros(s.shape, dtype=bool)
    fit_on, fit_inside = s, inside
    if resize_to and s.shape != (resize_to, resize_to):
        from ..imageops import resize

        fit_on = resize(s, (resize_to, resize_to), order=1)
        # resample pixels wholly inside the region: at its edge the linear resample blends in the outside
        fit_inside = resize(inside.astype(np.float32), (resize_to, resize_to), order=1) > 0.999
    values = fit_on[fit_inside] if fit_inside.any() else s[inside]  # a region too thin for the resample
    lo, hi = kmeans_centres(values)
    if hi <= lo:
        return np.zeros(s.shape, dtype=bool)
    return (s > (lo + hi) / 2.0) & inside
