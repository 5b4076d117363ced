"""Dice and NSD: hand-built cases with known answers, and agreement with MONAI on random shapes."""

import warnings

import numpy as np
import pytest
from scipy import ndimage

from MedCLIPSAMLib.metrics import dice, evaluate, normalized_surface_dice, summarize, surface


def _blobs(rng, shape, n=3, sigma=2.5):
    """Random smooth blobs: thresholded smoothed noise, non-empty."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return field > np.percentile(field, 100 - 100 / (n + 1))


def _monai(pred, gt, spacing, tol):
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")

    def onehot(m):
        t = torch.from_numpy(np.ascontiguousarray(m)).float()
        return torch.stack([1 - t, t])[None]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = metrics.compute_dice(onehot(pred), onehot(gt), include_background=False)
        nsd = metrics.compute_surface_dice(
            onehot(pred), onehot(gt), class_thresholds=[tol], spacing=list(spacing)
        )
    return float(d[0, 0]), float(nsd[0, 0])


# ---- known answers ---------------------------------------------------------------------------------


def test_dice_known_values_and_empty_rules():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:4, :5] = True  # 20 px
    b[2:6, :5] = True  # 20 px, 10 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    with pytest.raises(ValueError):
        dice(a, np.zeros((9, 10)))


def test_nsd_empty_rules():
    z = np.zeros((6, 6, 6), bool)
    one = z.copy()
    one[2:4, 2:4, 2:4] = True
    assert normalized_surface_dice(z, z) == 1.0
    assert normalized_surface_dice(one, z) == 0.0
    assert normalized_surface_dice(z, one) == 0.0
    assert normalized_surface_dice(one, one, tolerance_mm=0) == 1.0


def test_surface_of_a_cube():
    m = np.zeros((7, 7, 7), bool)
    m[1:6, 1:6, 1:6] = True
    s = surface(m)
    assert s.sum() == 5**3 - 3**3  # a 5-cube minus its 3-cube interior
    full = np.ones((4, 4), bool)
    assert surface(full).sum() == 12  # the array border counts as outside


def test_two_cubes_offset_by_one_voxel():
    a = np.zeros((12, 12, 12), bool)
    b = np.zeros_like(a)
    a[2:8, 2:8, 2:8] = True
    b[3:9, 2:8, 2:8] = True  # shifted one voxel along axis 0
    assert dice(a, b) == pytest.approx(2 * 5 * 36 / (2 * 216))
    # every surface voxel of one cube is within 1 voxel of the other's surface
    assert normalized_surface_dice(a, b, tolerance_mm=1.0) == 1.0
    # with 3 mm slices along axis 0 the shift is 3 mm: each cube's surface has 152 voxels, and only its
    # end face outside the other cube (36 voxels) is farther than 2 mm from the other surface (the face
    # inside the other cube is within 2 mm of that cube's side walls in its own slice)
    assert normalized_surface_dice(a, b, spacing=(3.0, 1.0, 1.0), tolerance_mm=2.0) == pytest.approx(
        (152 - 36 + 152 - 36) / (2 * 152)
    )
    assert normalized_surface_dice(a, b, spacing=(3.0, 1.0, 1.0), tolerance_mm=3.0) == 1.0


def test_2d_squares_known_nsd():
    a = np.zeros((20, 20), bool)
    b = np.zeros_like(a)
    a[5:15, 5:15] = True  # 10x10 square: 36 boundary pixels
    b[5:15, 8:18] = True  # shifted 3 px along x
    # tolerance 2, a's 36-pixel ring: its left column (10 px, x=5) is 3 px from b's ring; its right column
    # (x=14) lies inside b, 3 px from b's right side, so rows 8..11 (4 px) are 3+ px from b's ring while
    # rows 6, 7, 12, 13 are within 2 px of b's top/bottom rows. 22 of 36 correct, b the same by symmetry.
    assert normalized_surface_dice(a, b, tolerance_mm=2.0) == pytest.approx((22 + 22) / 72)
    assert normalized_surface_dice(a, b, tolerance_mm=3.0) == 1.0
    # half-millimetre pixels make the 3 px shift 1.5 mm
    assert normalized_surface_dice(a, b, spacing=(0.5, 0.5), tolerance_mm=2.0) == 1.0


def test_evaluate_and_summarize():
    a = np.zeros((10, 10), bool)
    a[2:6, 2:6] = True
    empty = np.zeros_like(a)
    res = summarize({"same": (a, a), "missed": (empty, a, (1.0, 1.0)), "both_empty": (empty, empty)})
    assert res["count"] == 3
    assert [r["name"] for r in res["cases"]] == ["same", "missed", "both_empty"]
    assert [r["dice"] for r in res["cases"]] == [1.0, 0.0, 1.0]
    assert res["mean"]["dice"] == pytest.approx(2 / 3) and res["mean"]["nsd"] == pytest.approx(2 / 3)
    res2 = summarize([("x", a, a, (2.0, 2.0))], tolerance_mm=1.0)
    assert res2["cases"][0] == {"name": "x", **evaluate(a, a, (2.0, 2.0), 1.0)}
    assert summarize({})["mean"] == {"dice": None, "nsd": None}


# ---- agreement with MONAI ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,spacing,tol",
    [
        ((64, 64), (1.0, 1.0), 2.0),
        ((64, 48), (0.7, 1.9), 2.0),
        ((50, 70), (1.3, 0.45), 1.1),
        ((24, 28, 20), (1.0, 1.0, 1.0), 2.0),
        ((24, 28, 20), (0.8, 0.8, 2.5), 2.0),
        ((20, 24, 26), (3.1, 0.6, 1.7), 1.5),
    ],
)
def test_matches_monai_on_random_shapes(shape, spacing, tol):
    rng = np.random.default_rng(abs(hash((shape, spacing))) % 2**32)
    for _ in range(3):
        gt = _blobs(rng, shape)
        # a prediction that overlaps but differs: the truth dilated or eroded, plus a random blob
        pred = ndimage.binary_dilation(gt, iterations=int(rng.integers(1, 3))) if rng.random() < 0.5 else (
            ndimage.binary_erosion(gt)
        )
        pred = pred ^ (_blobs(rng, shape, n=12, sigma=1.5) & (rng.random(shape) < 0.9))
        ref_dice, ref_nsd = _monai(pred, gt, spacing, tol)
        assert dice(pred, gt) == pytest.approx(ref_dice, abs=1e-6)
        assert normalized_surface_dice(pred, gt, spacing, tol) == pytest.approx(ref_nsd, abs=1e-6)


def test_matches_monai_when_touching_the_border():
    rng = np.random.default_rng(7)
    gt = np.zeros((30, 30), bool)
    gt[:12, :] = True  # touches three sides of the array
    pred = _blobs(rng, (30, 30))
    pred[:5, :] = True
    ref_dice, ref_nsd = _monai(pred, gt, (1.0, 1.0), 2.0)
    assert dice(pred, gt) == pytest.approx(ref_dice, abs=1e-6)
    assert normalized_surface_dice(pred, gt, (1.0, 1.0), 2.0) == pytest.approx(ref_nsd, abs=1e-6)
