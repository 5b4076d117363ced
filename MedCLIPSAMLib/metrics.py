"""Segmentation metrics: Dice and normalised surface Dice (NSD), 2D and 3D, spacing-aware.

Conventions
- Both masks empty: 1.0 (nothing to find, nothing found). One empty, the other not: 0.0.
  (MONAI returns NaN for empty-vs-empty; a per-case table and its mean need a number.)
- Spacing is the voxel size per array axis in mm, in the same order as the array's axes.
- NSD (Nikolov et al. 2021) counts surface voxels: the surface of a mask is its voxels with a
  face-neighbour outside it (mask minus its erosion; the array border counts as outside). A surface
  voxel is correct when the nearest surface voxel of the other mask is within tolerance_mm (<=);
  NSD = correct voxels of both surfaces / all voxels of both surfaces. This is MONAI's
  compute_surface_dice with use_subvoxels=False.
"""

import numpy as np
from scipy import ndimage


def _pair(pred, gt):
    p = np.asarray(pred).astype(bool, copy=False)
    g = np.asarray(gt).astype(bool, copy=False)
    if p.shape != g.shape:
        raise ValueError(f"prediction and reference differ in shape: {p.shape} vs {g.shape}")
    return p, g


def dice(pred, gt):
    """2 |P & G| / (|P| + |G|); 1.0 when both are empty."""
    p, g = _pair(pred, gt)
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / total


def surface(mask):
    """Voxels of the mask with a face-neighbour outside it (the array border counts as outside)."""
    m = np.asarray(mask).astype(bool, copy=False)
    return m & ~ndimage.binary_erosion(m, border_value=0)


def _spacing(spacing, ndim):
    if spacing is None:
        return np.ones(ndim)
    s = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,))
    if np.any(s <= 0):
        raise ValueError(f"spacing must be positive, got {spacing}")
    return s


def _crop_to_union(p, g, margin):
    # distances only matter near the two masks: crop to their joint bounding box plus a margin
    idx = np.argwhere(p | g)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, p.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return p[box], g[box]


def normalized_surface_dice(pred, gt, spacing=None, tolerance_mm=2.0):
    """NSD at `tolerance_mm` (see the module docstring); 2D or 3D; 1.0 both empty, 0.0 one empty."""
    p, g = _pair(pred, gt)
    if p.ndim not in (2, 3):
        raise ValueError(f"expected 2D or 3D masks, got shape {p.shape}")
    sp = _spacing(spacing, p.ndim)
    p_any, g_any = p.any(), g.any()
    if not p_any and not g_any:
        return 1.0
    if not p_any or not g_any:
        return 0.0
    # the border stays "outside" after cropping because the crop keeps a 1-voxel margin or the real border
    p, g = _crop_to_union(p, g, margin=1)
    sp_pred, sp_gt = surface(p), surface(g)
    # distance from every voxel to the nearest surface voxel of the other mask
    dist_to_gt = ndimage.distance_transform_edt(~sp_gt, sampling=sp)
    dist_to_pred = ndimage.distance_transform_edt(~sp_pred, sampling=sp)
    correct = np.count_nonzero(dist_to_gt[sp_pred] <= tolerance_mm) + np.count_nonzero(
        dist_to_pred[sp_gt] <= tolerance_mm
    )
    return correct / float(np.count_nonzero(sp_pred) + np.count_nonzero(sp_gt))


def evaluate(pred, gt, spacing=None, tolerance_mm=2.0):
    """{"dice": ..., "nsd": ...} for one case."""
    return {"dice": dice(pred, gt), "nsd": normalized_surface_dice(pred, gt, spacing, tolerance_mm)}


def summarize(cases, tolerance_mm=2.0):
    """Per-case Dice and NSD and their means.

    cases: a mapping name -> (pred, gt) or (pred, gt, spacing), or an iterable of
    (name, pred, gt) / (name, pred, gt, spacing) tuples.
    Returns {"cases": [{"name", "dice", "nsd"}, ...], "mean": {"dice", "nsd"}, "count": n};
    the means are None when there are no cases.
    """
    items = cases.items() if hasattr(cases, "items") else ((c[0], c[1:]) for c in cases)
    rows = []
    for name, data in items:
        pred, gt = data[0], data[1]
        spacing = data[2] if len(data) > 2 else None
        rows.append({"name": str(name), **evaluate(pred, gt, spacing, tolerance_mm)})
    mean = {
        key: (float(np.mean([r[key] for r in rows])) if rows else None) for key in ("dice", "nsd")
    }
    return {"cases": rows, "mean": mean, "count": len(rows)}
