"""Slice preparation: intensities to uint8, padding to a square (never stretching) and mapping back.

The intensity rules (CT windows, percentiles) and `resize` are in imageops.py, below the pipeline, since
post-processing and training use them too; they are imported here for the pipeline's own use.

Geometry rules
`pad_to_square` pads evenly on both sides (the odd pixel goes after) and records a `PadInfo`;
`unpad` takes a square map of any size (224, 1024, ...), resizes it to the padded side and crops the
original HxW back out, so a map computed on the model's square grid lands on the slice's own pixels.
"""

from dataclasses import dataclass

import numpy as np

from ..errors import MedCLIPSAMError
from ..imageops import (  # noqa: F401  (re-exported: the pipeline prepares slices through this module)
    CT_WINDOWS,
    apply_window,
    auto_ct_window,
    intensity_range,
    looks_like_ct,
    normalize_to_uint8,
    resize,
    window_range,
)


def to_rgb(gray_uint8):
    """HxW uint8 -> HxWx3 uint8 (the grey value in all three channels); HxWx3 passes through."""
    g = np.asarray(gray_uint8)
    if g.ndim == 3 and g.shape[2] == 3:
        return g
    if g.ndim != 2:
        raise MedCLIPSAMError(f"expected a 2D grayscale image, got shape {g.shape}")
    return np.repeat(g[:, :, None], 3, axis=2)


@dataclass(frozen=True)
class PadInfo:
    """Where the original HxW image sits inside its side x side padded square."""

    height: int
    width: int
    top: int
    left: int
    side: int


def pad_to_square(img, value="min"):
    """Pad a HxW (or HxWxC) image evenly to a square; returns (padded, PadInfo).

    value: "min" (the image minimum: 0 for most 8-bit images, air for CT) or a number.
    The odd pixel of an odd difference goes to the bottom/right.
    """
    a = np.asarray(img)
    if a.ndim not in (2, 3):
        raise MedCLIPSAMError(f"expected a 2D image (HxW or HxWxC), got shape {a.shape}")
    h, w = a.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    fill = (a.min() if a.size else 0) if isinstance(value, str) and value == "min" else value
    out = np.full((side, side) + a.shape[2:], fill, dtype=a.dtype)
    out[top:top + h, left:left + w] = a
    return out, PadInfo(h, w, top, left, side)


def unpad(mask_or_map, pad_info, order=None):
    """Map a square map of any size back onto the original HxW pixels: resize to the padded side, crop.

    order: 0 (nearest) or 1 (linear); default nearest for bool/integer masks, linear for float maps.
    """
    m = np.asarray(mask_or_map)
    if m.ndim < 2 or m.shape[0] != m.shape[1]:
        raise MedCLIPSAMError(f"unpad expects a square map, got shape {m.shape}")
    if order is None:
        order = 1 if np.issubdtype(m.dtype, np.floating) else 0
    p = pad_info
    full = resize(m, (p.side, p.side), order=order)
    return full[p.top:p.top + p.height, p.left:p.left + p.width]
