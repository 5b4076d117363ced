"""Coarse 2D mask -> SAM prompts (boxes and points), in the mask's own pixel coordinates.

Boxes are [x0, y0, x1, y1] with x = column and y = row; x0, y0 inclusive and x1, y1 exclusive
(x1 = last column + 1), i.e. the pixel edges of the component when pixel i covers [i, i+1). That is the
box's true extent in SAM's continuous coordinates, and x1 - x0 is the width in pixels.
Points are (x, y) = (column, row) of foreground pixels, label 1 (foreground).
An empty mask gives None (box), [] (boxes) or (None, None) (points): SAM predictors take None as
"no prompt of this kind", so the caller can pass the result straight on or skip the slice.
"""

import numpy as np

from .components import component_slices


def _check_2d(mask):
    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim != 2:
        raise ValueError(f"prompts are made from a 2D mask, got shape {m.shape}")
    return m


def _box(sl):
    rows, cols = sl
    return np.array([cols.start, rows.start, cols.stop, rows.stop], dtype=np.int64)


def box_of_largest_component(mask, connectivity=None):
    """[x0, y0, x1, y1] around the largest connected component, or None if the mask is empty."""
    found = component_slices(_check_2d(mask), top_n=1, connectivity=connectivity)
    return _box(found[0]) if found else None


def boxes_per_component(mask, top_n=None, saliency=None, connectivity=None):
    """One box per component, largest first (by area, or summed saliency if given); at most top_n."""
    return [_box(sl) for sl in component_slices(_check_2d(mask), top_n, saliency, connectivity)]


def bounding_box(mask):
    """[x0, y0, x1, y1] around all foreground pixels, or None if the mask is empty."""
    m = _check_2d(mask)
    if not m.any():
        return None
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.int64)


def points_inside(mask, n=10, seed=0):
    """(points, labels): up to n distinct foreground pixels drawn at random (seeded), as an Nx2 float
    array of (x, y) and an int array of ones. Fewer pixels than n gives all of them; empty gives (None, None)."""
    m = _check_2d(mask)
    rows, cols = np.nonzero(m)
    if rows.size == 0:
        return None, None
    rng = np.random.default_rng(seed)
    pick = rng.choice(rows.size, size=min(int(n), rows.size), replace=False)
    points = np.stack([cols[pick], rows[pick]], axis=1).astype(np.float32)
    return points, np.ones(len(points), dtype=np.int64)
