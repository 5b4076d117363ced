"""Slice preparation: intensity normalisation, CT windows, pad/unpad geometry."""

import numpy as np
import pytest

from MedCLIPSAMLib.errors import MedCLIPSAMError
from MedCLIPSAMLib.pipeline.preprocess import (
    CT_WINDOWS,
    PadInfo,
    apply_window,
    auto_ct_window,
    intensity_range,
    looks_like_ct,
    normalize_to_uint8,
    pad_to_square,
    resize,
    to_rgb,
    unpad,
    window_range,
)

SIZES = [(37, 37), (64, 64), (40, 71), (71, 40), (33, 50), (50, 33), (1, 9), (128, 97)]


def _ct_phantom(rng, lung=False):
    """A slice in HU: air outside, a soft-tissue body, optionally two lungs, a bone rim."""
    yy, xx = np.mgrid[:128, :128]
    hu = np.full((128, 128), -1000.0)
    body = (yy - 64) ** 2 / 55**2 + (xx - 64) ** 2 / 60**2 <= 1
    hu[body] = 40
    hu[body & ((yy - 64) ** 2 / 55**2 + (xx - 64) ** 2 / 60**2 > 0.85)] = 700
    if lung:
        for cx in (40, 88):
            hu[(yy - 60) ** 2 / 30**2 + (xx - cx) ** 2 / 18**2 <= 1] = -800
    return hu + rng.normal(0, 10, hu.shape)


# ---- CT windows -----------------------------------------------------------------------------------


def test_window_presets_match_level_and_width():
    assert CT_WINDOWS["soft_tissue"] == (40, 400)
    assert CT_WINDOWS["lung"] == (-600, 1500)
    assert CT_WINDOWS["brain"] == (40, 80)
    assert CT_WINDOWS["bone"] == (400, 1800)
    assert window_range("Soft tissue") == (-160, 240)
    assert window_range("lung") == (-1350, 150)
    assert window_range((40, 80)) == (0, 80)


def test_soft_tissue_window_maps_hu_exactly():
    hu = np.array([-1000, -160, 40, 240, 3000, -60], dtype=np.int16)
    out = apply_window(hu, "soft_tissue")
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 128, 255, 255, 64]  # 127.5 rounds to 128; -60 is a quarter up


def test_other_windows_map_their_ends():
    for name, (level, width) in CT_WINDOWS.items():
        lo, hi = level - width / 2, level + width / 2
        out = apply_window(np.array([lo - 1, lo, hi, hi + 1]), name)
        assert out.tolist() == [0, 0, 255, 255], name


def test_unknown_window_is_a_clear_error():
    with pytest.raises(MedCLIPSAMError, match="unknown CT window"):
        window_range("liver-ish")


def test_looks_like_ct():
    rng = np.random.default_rng(0)
    assert looks_like_ct(_ct_phantom(rng).astype(np.int16))
    assert looks_like_ct(np.where(np.eye(10) > 0, 40.0, -1024.0))  # padding value and tissue
    mr = rng.gamma(2.0, 200.0, (64, 64)).astype(np.uint16)
    assert not looks_like_ct(mr)
    assert not looks_like_ct(rng.normal(0, 1, (64, 64)))  # z-scored MR
    assert not looks_like_ct(rng.integers(0, 256, (32, 32), dtype=np.uint8))


def test_auto_ct_window():
    rng = np.random.default_rng(1)
    assert auto_ct_window(_ct_phantom(rng)) == "soft_tissue"
    assert auto_ct_window(_ct_phantom(rng, lung=True)) == "lung"
    assert auto_ct_window(_ct_phantom(rng), prompt="Left lung nodule") == "lung"
    assert auto_ct_window(_ct_phantom(rng), prompt="intracranial hemorrhage") == "brain"
    assert auto_ct_window(_ct_phantom(rng), prompt="tumour with a fibrous distribution") == "soft_tissue"
    assert auto_ct_window(_ct_phantom(rng), prompt="Rib fracture") == "bone"
    assert auto_ct_window(_ct_phantom(rng), prompt="vertebra") == "bone"
    assert auto_ct_window(_ct_phantom(rng), prompt="liver tumor") == "soft_tissue"


def test_ct_auto_normalisation_uses_the_window():
    rng = np.random.default_rng(2)
    hu = _ct_phantom(rng)
    out = normalize_to_uint8(hu)
    assert np.array_equal(out, apply_window(hu, "soft_tissue"))


# ---- intensity normalisation ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_all_dtypes_give_full_range_uint8(dtype):
    rng = np.random.default_rng(3)
    top = 255 if dtype == np.uint8 else 3000
    img = (rng.random((50, 60)) * top).astype(dtype)
    img[0, 0], img[0, 1] = 0, top  # uint8 is passed through: give it the full range to keep
    out = normalize_to_uint8(img) if dtype == np.uint8 else normalize_to_uint8(img, modality="mr")
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert out.min() == 0 and out.max() == 255
    # monotone: order of intensities is kept
    order = np.argsort(img.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order].astype(int)) >= 0)


def test_uint8_passes_through_and_percentiles_clip_outliers():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(normalize_to_uint8(img), img)
    f = np.linspace(0, 1, 10000).reshape(100, 100)
    f[0, 0] = 1e6  # one hot pixel must not squash everything else
    lo, hi = intensity_range(f, modality="mr")
    assert 0 <= lo < 0.01 and 0.99 < hi < 1.01
    out = normalize_to_uint8(f, modality="mr")
    assert out[0, 0] == 255 and out[0, 1] == 0
    assert out[50, 50] == np.floor((f[50, 50] - lo) / (hi - lo) * 255 + 0.5)


def test_shared_value_range_for_a_volume():
    vol = np.stack([np.full((4, 4), 100.0), np.full((4, 4), 200.0)])
    rng_ = intensity_range(vol, modality="mr", percentiles=(0, 100))
    a = normalize_to_uint8(vol[0], value_range=rng_)
    b = normalize_to_uint8(vol[1], value_range=rng_)
    assert a.max() == 0 and b.min() == 255


def test_constant_image_and_bad_values():
    assert normalize_to_uint8(np.full((5, 5), 7.0), modality="mr").max() == 0
    bad = np.zeros((4, 4))
    bad[1, 1] = np.nan
    with pytest.raises(MedCLIPSAMError, match="NaN"):
        normalize_to_uint8(bad)


def test_to_rgb():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = to_rgb(g)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert all(np.array_equal(rgb[..., c], g) for c in range(3))
    assert to_rgb(rgb) is rgb


# ---- pad / unpad ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SIZES)
def test_pad_is_even_and_roundtrips_exactly(shape):
    rng = np.random.default_rng(4)
    img = rng.integers(1, 255, shape).astype(np.uint8)
    padded, info = pad_to_square(img, value=0)
    h, w = shape
    side = max(h, w)
    assert padded.shape == (side, side) and info == PadInfo(h, w, (side - h) // 2, (side - w) // 2, side)
    # even: the two sides differ by at most one pixel, never stretched
    rows = np.flatnonzero(padded.any(axis=1))
    cols = np.flatnonzero(padded.any(axis=0))
    assert abs(rows[0] - (side - 1 - rows[-1])) <= 1 and abs(cols[0] - (side - 1 - cols[-1])) <= 1
    assert np.array_equal(unpad(padded, info), img)


def test_pad_value_min_and_channels():
    img = np.full((4, 6), -1000.0)
    img[1, 1] = 50
    padded, _ = pad_to_square(img)
    assert padded[0, 0] == -1000.0 and padded.shape == (6, 6)
    rgb, info = pad_to_square(np.ones((3, 5, 3), np.uint8))
    assert rgb.shape == (5, 5, 3) and info.top == 1


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("model_side", [1024, 224])
def test_marker_block_maps_back_to_its_place(shape, model_side):
    """A map made on the model's square grid lands on the right original pixels (H>W, W>H, odd)."""
    h, w = shape
    img = np.zeros(shape, dtype=bool)
    y0, x0 = h * 2 // 3, w // 5  # off-centre, so a swapped axis or a wrong offset shows
    y1, x1 = min(y0 + max(h // 4, 1), h), min(x0 + max(w // 4, 1), w)
    img[y0:y1, x0:x1] = True
    padded, info = pad_to_square(img)
    model_map = resize(padded, (model_side, model_side), order=0)
    back = unpad(model_map, info)
    assert back.shape == shape and back.dtype == bool
    if model_side >= info.side:
        assert np.array_equal(back, img)  # upsampling and back with nearest is exact
    else:
        # a coarser grid can move an edge by at most one model pixel, i.e. side/model_side pixels
        tol = int(np.ceil(info.side / model_side))
        ys, xs = np.nonzero(back)
        assert ys.size > 0
        assert abs(ys.min() - y0) <= tol and abs(ys.max() - (y1 - 1)) <= tol
        assert abs(xs.min() - x0) <= tol and abs(xs.max() - (x1 - 1)) <= tol


def test_unpad_float_map_is_linear_and_placed():
    img = np.zeros((30, 80))
    img[:, 40:] = 1.0  # right half
    padded, info = pad_to_square(img, value=0)
    m = resize(padded, (224, 224), order=1)
    back = unpad(m, info)
    assert back.shape == (30, 80) and back.dtype.kind == "f"
    assert np.all(back[:, :39] < 0.5) and np.all(back[:, 41:] > 0.5)


def test_resize_half_pixel_convention():
    a = np.array([0.0, 1.0])
    # upsample x2: output pixel centres at -0.25, 0.25, 0.75, 1.25 in input units (clamped at ends)
    assert np.allclose(resize(a[:, None], (4, 1), order=1)[:, 0], [0, 0.25, 0.75, 1])
    assert resize(np.arange(6)[:, None], (3, 1), order=0)[:, 0].tolist() == [1, 3, 5]
    with pytest.raises(MedCLIPSAMError):
        unpad(np.zeros((4, 5)), PadInfo(4, 5, 0, 0, 5))
