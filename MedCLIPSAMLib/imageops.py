"""Image operations below every stage: intensities to uint8 (CT windows, percentiles) and resizing.

The pipeline's slice preparation (pipeline/preprocess.py), the post-processing stages and the trainers all
use them, so they live here rather than in any one of those packages.

Intensity rules
- CT (Hounsfield units): a named window (level, width) maps [L - W/2, L + W/2] linearly onto 0..255.
- MR and anything else: robust percentiles (0.5 / 99.5 by default) map onto 0..255.
- uint8 input is already display-ready and passes through unchanged (8-bit PNGs, ultrasound, X-ray).
For a volume, compute the range once with `intensity_range(volume)` and pass it to every slice
(`normalize_to_uint8(slice, value_range=...)`) so slices share one mapping.

`resize` uses the half-pixel convention (pixel i covers [i, i+1)), like cv2 and torch's
align_corners=False, so mapping a map back onto a slice is exact in position.
"""

import re

import numpy as np

from .errors import MedCLIPSAMError

# (level, width) in Hounsfield units
CT_WINDOWS = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}

# word starts in a text prompt that pick a window in auto_ct_window (matched at word boundaries, so
# "rib" is not found in "distribution"); ambiguous words ("nodule", "ventricle", "hemorrhage") are left out
_PROMPT_WINDOW_WORDS = {
    "lung": ("lung", "pulmonary", "airway", "emphysema", "pneumothorax", "bronch"),
    "brain": ("brain", "intracranial", "cerebr", "subdural", "epidural", "subarachnoid", "stroke"),
    "bone": ("bone", "fracture", "vertebra", "skull", "rib", "femur", "spine", "osseous"),
}


def _window_key(name):
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in CT_WINDOWS:
        raise MedCLIPSAMError(f"unknown CT window '{name}'; choose one of {', '.join(CT_WINDOWS)}")
    return key


def window_range(window):
    """(low, high) HU for a window given by name or as (level, width)."""
    if isinstance(window, str):
        level, width = CT_WINDOWS[_window_key(window)]
    else:
        level, width = (float(v) for v in window)
    if width <= 0:
        raise MedCLIPSAMError(f"CT window width must be positive, got {width}")
    return level - width / 2.0, level + width / 2.0


def _check_finite(array):
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise MedCLIPSAMError("the image contains NaN or infinite values; fix or mask them before segmenting")


def _sample(values, cap=2_000_000):
    # statistics of a whole CT volume (~10^8 voxels) from an even stride of at most `cap` voxels
    flat = np.asarray(values).ravel()
    return flat[:: max(1, flat.size // cap)]


def looks_like_ct(array):
    """Guess whether intensities are CT Hounsfield units.

    CT in HU has air and lung well below -200 HU (outside the body air sits near -1000, padding at -1024
    to -3024) and nothing above ~4000 HU (dense metal is clipped there by most scanners). MR and 8-bit
    images are non-negative, and z-scored MR stays within a few units of zero. So: at least 1 % of the
    voxels below -200, none below -3100, and the 99.9th percentile under 4000 (statistics from an even
    stride of at most 2M voxels, so a whole volume is quick). A CT stored without
    its rescale intercept (0..4095) is not recognised; pass `modality="ct"` for it.
    """
    a = np.asarray(array)
    if a.dtype == np.uint8 or a.dtype == bool or a.size == 0:
        return False
    a = _sample(a)
    a = a[np.isfinite(a)] if np.issubdtype(a.dtype, np.floating) else a
    if a.size == 0 or a.min() < -3100:
        return False
    return bool(np.mean(a < -200) >= 0.01 and np.percentile(a, 99.9) < 4000)


def auto_ct_window(volume_or_slice, prompt=None):
    """Name of the CT window to use: a prompt keyword wins, else lung if the body is mostly lung, else soft tissue.

    Prompt keywords (case-insensitive word starts): lung/pulmonary/... -> "lung",
    brain/intracranial/subdural/... -> "brain", bone/fracture/vertebra/rib/... -> "bone".
    Without a keyword: of the voxels in the body range [-950, 3000] HU (outside air excluded), if more
    than 15 % are lung parenchyma ([-950, -500] HU), the lung window; otherwise soft tissue, which suits
    the abdominal and pelvic organs and tumours that most prompts target.
    """
    if prompt:
        text = str(prompt).lower()
        for name, words in _PROMPT_WINDOW_WORDS.items():
            if any(re.search(r"\b" + w, text) for w in words):
                return name
    a = _sample(volume_or_slice).astype(np.float32)
    body = a[(a >= -950) & (a <= 3000)]
    if body.size and np.mean(body <= -500) > 0.15:
        return "lung"
    return "soft_tissue"


def intensity_range(array, modality="auto", window=None, percentiles=(0.5, 99.5), prompt=None):
    """(low, high) input values that map to 0 and 255 (see the module docstring for the rules).

    modality: "auto" (CT if `looks_like_ct`), "ct", "mr" or "other" (both percentiles).
    window: a CT window name or (level, width); overrides modality. Returns None for uint8 input with
    modality "auto" and no window (meaning: leave it as it is).
    """
    a = np.asarray(array)
    _check_finite(a)
    if window is not None:
        return window_range(window)
    if modality not in ("auto", "ct", "mr", "other"):
        raise MedCLIPSAMError(f"unknown modality '{modality}'; choose auto, ct, mr or other")
    if modality == "auto" and a.dtype == np.uint8:
        return None
    if modality == "ct" or (modality == "auto" and looks_like_ct(a)):
        return window_range(auto_ct_window(a, prompt))
    if a.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(_sample(a).astype(np.float64), percentiles)
    if hi <= lo:  # nearly constant image: fall back to the full range
        lo, hi = float(a.min()), float(a.max())
    return float(lo), float(hi)


def normalize_to_uint8(array, modality="auto", window=None, value_range=None, percentiles=(0.5, 99.5), prompt=None):
    """Map an 8-bit, 16-bit or float image (2D or 3D) to uint8.

    value_range=(low, high) skips the statistics (use one range for all slices of a volume).
    A constant image becomes all zeros.
    """
    a = np.asarray(array)
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    _check_finite(a)
    if value_range is None:
        value_range = intensity_range(a, modality, window, percentiles, prompt)
        if value_range is None:
            return a.copy()
    lo, hi = (float(v) for v in value_range)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    # divide before scaling so window ends and the level land exactly (L40 W400: 40 HU -> 127.5 -> 128)
    scaled = (a.astype(np.float64) - lo) / (hi - lo) * 255.0
    return np.floor(np.clip(scaled, 0, 255) + 0.5).astype(np.uint8)


def apply_window(array, window):
    """uint8 image of CT data (HU) under a window given by name or (level, width)."""
    return normalize_to_uint8(array, value_range=window_range(window))


def _source_index_nearest(n_in, n_out):
    # centre of output pixel j sits at (j + 0.5) * n_in / n_out in input pixel units; integer maths
    # keeps it exact (no floating rounding at pixel edges)
    return np.minimum((2 * np.arange(n_out) + 1) * n_in // (2 * n_out), n_in - 1)


def resize(array, shape, order=1):
    """Resize the leading axes of `array` to `shape` (trailing axes, e.g. channels, are kept).

    order 0: nearest, keeps the dtype (use for masks); order 1: linear, returns float.
    Half-pixel convention: pixel i covers [i, i+1), as in cv2.resize and torch align_corners=False.
    """
    a = np.asarray(array)
    if order not in (0, 1):
        raise ValueError("order must be 0 (nearest) or 1 (linear)")
    if a.dtype == bool:
        order = 0
    out = a if order == 0 else a.astype(np.float32 if a.dtype == np.float32 else np.float64)
    for axis, n_out in enumerate(shape):
        n_in = out.shape[axis]
        n_out = int(n_out)
        if n_out == n_in:
            continue
        if order == 0:
            out = np.take(out, _source_index_nearest(n_in, n_out), axis=axis)
            continue
        x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        i0 = np.floor(x).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        wshape = [1] * out.ndim
        wshape[axis] = n_out
        w = (x - i0).reshape(wshape).astype(out.dtype)
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i1, axis=axis) * w
    return out
