"""Connected-component clean-up of binary masks, 2D and 3D.

Connectivity defaults to full (8 neighbours in 2D, 26 in 3D), as cv2.connectedComponents uses in 2D,
so a diagonal chain of pixels is one object. Spacing, where asked for, is in the array's axis order.
"""

import numpy as np
from scipy import ndimage


def _as_mask(mask):
    m = np.asarray(mask)
    if m.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D mask, got shape {m.shape}")
    return m.astype(bool, copy=False)


def label_components(mask, connectivity=None):
    """(labels, count): integer labels 1..count for each connected component (0 = background).

    connectivity: 1 (faces only) .. mask.ndim (full); default full.
    """
    m = _as_mask(mask)
    structure = ndimage.generate_binary_structure(m.ndim, connectivity or m.ndim)
    labels, count = ndimage.label(m, structure=structure)
    return labels, count


def keep_top_components(mask, top_n=1, saliency=None, connectivity=None):
    """Keep the `top_n` largest components (by area, or by summed saliency when `saliency` is given).

    top_n None or 0 keeps all. Ties keep the component met first in array order.
    """
    m = _as_mask(mask)
    labels, count = label_components(m, connectivity)
    if count == 0 or not top_n or count <= top_n:
        return m.copy()
    weights = None if saliency is None else np.asarray(saliency, dtype=np.float64).ravel()
    score = np.bincount(labels.ravel(), weights=weights, minlength=count + 1)[1:]
    keep = np.argsort(-score, kind="stable")[:top_n] + 1
    return np.isin(labels, keep)


def largest_component(mask, connectivity=None):
    """The largest connected component (an empty mask stays empty)."""
    return keep_top_components(mask, 1, connectivity=connectivity)


def fill_holes(mask, axis=None):
    """Fill enclosed holes. axis=None fills in full 2D/3D; an axis fills each 2D slice along it
    (for slice-wise 3D masks whose holes open onto the next slice)."""
    m = _as_mask(mask)
    if axis is None:
        return ndimage.binary_fill_holes(m)
    out = np.empty_like(m)
    for i in range(m.shape[axis]):
        index = [slice(None)] * m.ndim
        index[axis] = i
        out[tuple(index)] = ndimage.binary_fill_holes(m[tuple(index)])
    return out


def remove_small_components(mask, min_size_mm3, spacing=None, connectivity=None):
    """Drop components smaller than `min_size_mm3` (mm^3 in 3D, mm^2 in 2D).

    spacing: voxel size per array axis in mm (anisotropic is fine); None means 1, so the size is in
    voxels/pixels (use that for removing specks from 2D masks).
    """
    m = _as_mask(mask)
    labels, count = label_components(m, connectivity)
    if count == 0:
        return m.copy()
    voxel = 1.0 if spacing is None else float(np.prod(np.broadcast_to(np.asarray(spacing, float), (m.ndim,))))
    sizes = np.bincount(labels.ravel(), minlength=count + 1) * voxel
    keep = sizes >= min_size_mm3
    keep[0] = False
    return keep[labels]


def component_slices(mask, top_n=None, saliency=None, connectivity=None):
    """Bounding slices of components, largest first (by area or summed saliency), at most top_n."""
    m = _as_mask(mask)
    labels, count = label_components(m, connectivity)
    if count == 0:
        return []
    weights = None if saliency is None else np.asarray(saliency, dtype=np.float64).ravel()
    score = np.bincount(labels.ravel(), weights=weights, minlength=count + 1)[1:]
    order = np.argsort(-score, kind="stable")
    if top_n:
        order = order[:top_n]
    found = ndimage.find_objects(labels)
    return [found[i] for i in order]
