"""Saliency post-processing: CRF, KMeans, components, prompts, and the common entry point."""

import math

import numpy as np
import pytest
from scipy import ndimage

from MedCLIPSAMLib.errors import MedCLIPSAMError
from MedCLIPSAMLib.metrics import dice
from MedCLIPSAMLib.postprocess import POSTPROCESSORS, postprocess, threshold_mask
from MedCLIPSAMLib.postprocess.components import (
    fill_holes,
    keep_top_components,
    label_components,
    largest_component,
    remove_small_components,
)
from MedCLIPSAMLib.postprocess.crf import EPSILON, crf_refine, crf_unary
from MedCLIPSAMLib.postprocess.kmeans import kmeans_centres, kmeans_mask
from MedCLIPSAMLib.postprocess.prompts import (
    bounding_box,
    box_of_largest_component,
    boxes_per_component,
    points_inside,
)


def _phantom(seed=0, shape=(160, 200), centre=(80, 110), radius=35):
    """A bright disc on a noisy darker background, its true mask, and a blurred saliency blob on it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    image = np.clip(60 + 120 * disc + rng.normal(0, 12, shape), 0, 255).astype(np.uint8)
    sal = ndimage.gaussian_filter(disc.astype(float), 8)
    sal = (sal - sal.min()) / (sal.max() - sal.min())
    return image, disc, sal, rng


# ---- CRF ------------------------------------------------------------------------------------------------


def test_crf_unary_matches_the_formula_by_hand():
    tau = 1.05
    u = crf_unary(np.array([[0.0, 0.25], [0.5, 1.0]]), tau=tau)
    assert u.shape == (2, 4) and u.dtype == np.float32

    def sig(x):
        return 1 / (1 + math.exp(-x))

    for k, s in enumerate([0.0, 0.25, 0.5, 1.0]):
        u_bg = -math.log(1 - s + EPSILON) / (tau * sig(1 - s))
        u_fg = -math.log(s + EPSILON) / (tau * sig(s))
        assert u[0, k] == pytest.approx(u_bg, rel=1e-6, abs=1e-6)
        assert u[1, k] == pytest.approx(u_fg, rel=1e-6, abs=1e-6)
    # numbers worked out by hand: s = 0.5 gives log(2) / (1.05 * sigmoid(0.5)) for both labels
    assert u[0, 2] == u[1, 2] == pytest.approx(0.6931472 / (1.05 * 0.6224593), rel=1e-6)
    # s = 0: the foreground costs -log(1e-8) / (1.05 * 0.5) = 35.09..., the background nothing
    assert u[1, 0] == pytest.approx(18.420681 / 0.525, rel=1e-6) and u[0, 0] == pytest.approx(0, abs=1e-7)
    # s = 0.25: background log(1/0.75)/(1.05*sigmoid(0.75)), foreground log(4)/(1.05*sigmoid(0.25))
    assert u[0, 1] == pytest.approx(0.2876821 / (1.05 * 0.6791787), rel=1e-6)
    assert u[1, 1] == pytest.approx(1.3862944 / (1.05 * 0.5621765), rel=1e-6)


def test_crf_on_a_blurred_blob_recovers_the_disc():
    image, disc, sal, _ = _phantom()
    mask = crf_refine(sal, image)
    assert mask.dtype == bool and mask.shape == disc.shape
    assert dice(mask, disc) > 0.9


def test_crf_on_a_noisy_map_is_at_least_as_good_as_thresholding():
    for seed in range(3):
        image, disc, sal, rng = _phantom(seed)
        noisy = np.clip(sal + rng.normal(0, 0.25, sal.shape), 0, 1)
        d_crf = dice(crf_refine(noisy, image), disc)
        d_thr = dice(noisy > 0.5, disc)
        assert d_crf >= d_thr
        assert d_crf > 0.9


def test_crf_follows_the_image_edge_not_the_blur():
    # a saliency blob larger than the disc: the bilateral term on the image pulls the mask in
    image, disc, _, _ = _phantom()
    wide = ndimage.gaussian_filter(ndimage.binary_dilation(disc, iterations=6).astype(float), 3)
    d_crf = dice(crf_refine(wide, image), disc)
    assert d_crf > dice(wide > 0.5, disc)


def test_crf_input_checks():
    with pytest.raises(MedCLIPSAMError, match="same size"):
        crf_refine(np.zeros((10, 10)), np.zeros((10, 12), np.uint8))
    # a float image is stretched to uint8 rather than refused
    image, disc, sal, _ = _phantom()
    assert dice(crf_refine(sal, image.astype(np.float32) * 3.7), disc) > 0.9


# ---- KMeans ---------------------------------------------------------------------------------------------


def test_kmeans_two_levels_exact():
    s = np.full((40, 50), 0.1)
    s[10:20, 5:30] = 0.9
    s[30:35, 40:45] = 0.8
    expected = s > 0.5
    assert np.array_equal(kmeans_mask(s, resize_to=None), expected)
    assert np.array_equal(kmeans_mask(s), expected)  # fitted on the 256 resample, assigned at 40x50


def test_kmeans_centres_are_cluster_means():
    v = np.array([0.0, 0.1, 0.2, 0.7, 0.8, 0.9, 1.0])
    lo, hi = kmeans_centres(v)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.85)
    assert kmeans_centres(np.full(5, 0.3)) == (0.3, 0.3)
    assert not kmeans_mask(np.full((8, 8), 0.3)).any()


def test_kmeans_is_deterministic_and_separates_the_blob():
    _, disc, sal, rng = _phantom()
    noisy = np.clip(sal + rng.normal(0, 0.05, sal.shape), 0, 1)
    a, b = kmeans_mask(noisy), kmeans_mask(noisy)
    assert np.array_equal(a, b)
    assert dice(a, disc) > 0.9


# ---- components ------------------------------------------------------------------------------------------


def _three_blobs():
    m = np.zeros((30, 30), bool)
    m[2:12, 2:12] = True  # 100 px
    m[15:20, 15:27] = True  # 60 px
    m[25:28, 2:5] = True  # 9 px
    return m


def test_top_n_by_area_exact():
    m = _three_blobs()
    one = np.zeros_like(m)
    one[2:12, 2:12] = True
    two = one.copy()
    two[15:20, 15:27] = True
    assert np.array_equal(keep_top_components(m, 1), one)
    assert np.array_equal(largest_component(m), one)
    assert np.array_equal(keep_top_components(m, 2), two)
    assert np.array_equal(keep_top_components(m, None), m)
    assert np.array_equal(keep_top_components(m, 5), m)
    assert not keep_top_components(np.zeros((4, 4)), 1).any()


def test_top_n_by_summed_saliency():
    m = _three_blobs()
    sal = np.zeros(m.shape)
    sal[25:28, 2:5] = 50.0  # the small blob is the confident one
    small = np.zeros_like(m)
    small[25:28, 2:5] = True
    assert np.array_equal(keep_top_components(m, 1, saliency=sal), small)


def test_connectivity_default_is_full():
    diag = np.eye(5, dtype=bool)
    assert label_components(diag)[1] == 1
    assert label_components(diag, connectivity=1)[1] == 5


def test_fill_holes_exact_2d_and_per_slice():
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    full = np.zeros_like(ring)
    full[2:7, 2:7] = True
    assert np.array_equal(fill_holes(ring), full)
    # a tube open at both ends has no 3D hole, but each axial slice has one
    tube = np.stack([ring] * 4)
    assert np.array_equal(fill_holes(tube), tube)
    assert np.array_equal(fill_holes(tube, axis=0), np.stack([full] * 4))


def test_remove_small_components_3d_spacing_aware():
    m = np.zeros((10, 10, 10), bool)
    m[0:2, 0:2, 0:2] = True  # 8 voxels
    m[5:9, 5:9, 5:9] = True  # 64 voxels
    big = np.zeros_like(m)
    big[5:9, 5:9, 5:9] = True
    assert np.array_equal(remove_small_components(m, 10), big)  # voxels when no spacing
    assert np.array_equal(remove_small_components(m, 8), m)
    # 0.5 x 0.5 x 2 mm voxels are 0.5 mm^3: the small cube is 4 mm^3, the big one 32 mm^3
    assert np.array_equal(remove_small_components(m, 5.0, spacing=(0.5, 0.5, 2.0)), big)
    assert np.array_equal(remove_small_components(m, 4.0, spacing=(0.5, 0.5, 2.0)), m)
    assert not remove_small_components(m, 40.0, spacing=(0.5, 0.5, 2.0)).any()
    # 2D specks in pixels
    specks = _three_blobs()
    assert remove_small_components(specks, 10).sum() == 160


# ---- prompts ---------------------------------------------------------------------------------------------


def test_boxes_of_rectangles_are_exact():
    m = _three_blobs()
    # x = column, y = row; x1, y1 exclusive
    assert box_of_largest_component(m).tolist() == [2, 2, 12, 12]
    boxes = boxes_per_component(m)
    assert [b.tolist() for b in boxes] == [[2, 2, 12, 12], [15, 15, 27, 20], [2, 25, 5, 28]]
    assert [b.tolist() for b in boxes_per_component(m, top_n=2)] == [[2, 2, 12, 12], [15, 15, 27, 20]]
    assert bounding_box(m).tolist() == [2, 2, 27, 28]
    tall = np.zeros((50, 20), bool)
    tall[7:41, 3:4] = True  # one-pixel-wide column
    assert box_of_largest_component(tall).tolist() == [3, 7, 4, 41]


def test_empty_mask_prompts():
    z = np.zeros((8, 8), bool)
    assert box_of_largest_component(z) is None
    assert bounding_box(z) is None
    assert boxes_per_component(z) == []
    assert points_inside(z, 10) == (None, None)


def test_points_fall_inside_the_mask():
    _, disc, _, _ = _phantom()
    pts, labels = points_inside(disc, n=10, seed=3)
    assert pts.shape == (10, 2) and labels.tolist() == [1] * 10
    xs, ys = pts[:, 0].astype(int), pts[:, 1].astype(int)
    assert np.all(disc[ys, xs])
    assert len({(x, y) for x, y in zip(xs, ys)}) == 10  # distinct
    again, _ = points_inside(disc, n=10, seed=3)
    assert np.array_equal(pts, again)
    tiny = np.zeros((5, 5), bool)
    tiny[1, 3] = tiny[4, 0] = True
    few, lab = points_inside(tiny, n=10)
    assert sorted(map(tuple, few.astype(int).tolist())) == [(0, 4), (3, 1)] and len(lab) == 2


# ---- common entry point -------------------------------------------------------------------------------------


def test_postprocess_mixes_methods():
    image, disc, sal, rng = _phantom()
    assert set(POSTPROCESSORS) == {"crf", "kmeans", "threshold"}
    noisy = np.clip(sal + rng.normal(0, 0.2, sal.shape), 0, 1)
    for method in POSTPROCESSORS:
        mask = postprocess(noisy, image, method=method, top_n=1)
        assert mask.dtype == bool and mask.shape == disc.shape
        assert label_components(mask)[1] == 1  # top_n=1 leaves one component
        assert dice(mask, disc) > 0.9, method


def test_postprocess_resizes_a_model_map_to_the_image():
    image, disc, sal, _ = _phantom()
    from MedCLIPSAMLib.pipeline.preprocess import resize

    small = resize(sal, (56, 56), order=1)  # a low-resolution square map of a non-square image
    mask = postprocess(small, image, method="threshold")
    assert mask.shape == image.shape


def test_postprocess_threshold_top_n_and_holes():
    s = np.zeros((30, 30))
    s[_three_blobs()] = 0.9
    s[5, 5] = 0.0  # a hole in the largest blob
    exp = np.zeros((30, 30), bool)
    exp[2:12, 2:12] = True
    assert np.array_equal(postprocess(s, method="threshold", top_n=1), exp)
    with_hole = postprocess(s, method="threshold", top_n=1, fill_holes=False)
    assert not with_hole[5, 5] and with_hole.sum() == 99
    assert postprocess(s, method="threshold", top_n=None, min_size=10).sum() == 160
    assert np.array_equal(threshold_mask(s, threshold=0.95), np.zeros((30, 30), bool))


def test_postprocess_errors():
    with pytest.raises(MedCLIPSAMError, match="unknown post-processing"):
        postprocess(np.zeros((4, 4)), method="magic")
    with pytest.raises(MedCLIPSAMError, match="grayscale image"):
        postprocess(np.zeros((4, 4)), method="crf")


# body mask --------------------------------------------------------------------------------------------

def _gray8(image):
    from MedCLIPSAMLib.pipeline.preprocess import intensity_range, normalize_to_uint8

    return normalize_to_uint8(image, value_range=intensity_range(image))


@pytest.mark.parametrize("kind", ["mr", "ct"])
def test_body_mask_is_the_phantom_body_with_its_dark_insides(kind):
    """The body of MR heads and CT trunks, windowed as the pipeline windows them: every organ inside the
    head or body label, dark ones (ventricles, lungs) included, and no air beyond 2 pixels around it. (The
    thin rim of scalp or skin may be partly left out: at 1-2 pixels it blurs into the air.)"""
    from MedCLIPSAMLib.phantoms import make_image
    from MedCLIPSAMLib.postprocess.body import body_mask

    for seed in range(3):
        ph = make_image(kind, (128, 128), seed=seed)
        truth = ph.labels["head" if kind == "mr" else "body"] > 0
        body = body_mask(_gray8(ph.image))
        assert dice(body, truth) > 0.85, (kind, seed)
        assert not (body & ~ndimage.binary_dilation(truth, iterations=2)).any(), (kind, seed)
        for organ in (("brain", "ventricles") if kind == "mr" else ("left lung", "right lung", "liver")):
            inside = ph.labels[organ] > 0
            assert body[inside].all(), (kind, seed, organ)


def test_body_mask_keeps_everything_without_a_dark_surround():
    from MedCLIPSAMLib.postprocess.body import body_mask

    rng = np.random.default_rng(0)
    assert body_mask(np.full((64, 64), 120, np.uint8)).all()                      # flat
    assert body_mask(rng.integers(60, 200, (64, 64)).astype(np.uint8)).all()      # no near-black pixel
    assert body_mask(np.zeros((64, 64), np.uint8)).all()                          # all black


def test_pipeline_ignores_saliency_outside_the_body(tiny_clip):
    """With body_only (the default) a map that lights the air cannot make a mask there; off, it can."""
    from MedCLIPSAMLib.phantoms import make_image
    from MedCLIPSAMLib.pipeline.image import ImageSegmenter
    from MedCLIPSAMLib.pipeline.presets import get_preset

    ph = make_image("mr", (96, 96), seed=4)
    head = ph.labels["head"] > 0

    class AirLit(ImageSegmenter):
        def saliency_map(self, gray_uint8, text_embedding):  # what an untrained ViT often gives
            return (~head).astype(np.float32)

    masks = {}
    for on in (True, False):
        settings = get_preset("fast", ["sam=none", f"body_only={str(on).lower()}"])
        masks[on] = AirLit(tiny_clip, None, settings)(ph.image, "brain tumor").mask
    assert not (masks[True] & ~head).any()
    assert (masks[False] & ~head).sum() > 1000


def test_kmeans_inside_a_region_ignores_the_zeroed_outside():
    """A map at 0 outside the body, 0.6 over the body and 1 on a blob: fitted on every pixel, the zeros
    make the whole body foreground; fitted inside the body (region), the blob alone is."""
    yy, xx = np.mgrid[:96, :96]
    body = (yy - 48) ** 2 / 40 ** 2 + (xx - 48) ** 2 / 30 ** 2 < 1
    blob = (yy - 40) ** 2 + (xx - 55) ** 2 < 6 ** 2
    sal = np.where(body, 0.6, 0.0) + 0.4 * blob
    assert np.array_equal(kmeans_mask(sal, resize_to=None), body)
    assert np.array_equal(kmeans_mask(sal, resize_to=None, region=body), blob)
    assert np.array_equal(kmeans_mask(sal, region=body), blob)  # fitted on the 256 resample
    # postprocess: the saliency outside the region counts as zero and the mask stays inside it
    lit_air = np.where(body, sal, 1.0)
    for method in ("kmeans", "threshold", "crf"):
        gray = (200 * body).astype(np.uint8)
        mask = postprocess(lit_air, gray, method=method, top_n=0, fill_holes=False, region=body)
        assert not (mask & ~body).any(), method
    with pytest.raises(MedCLIPSAMError, match="region"):
        postprocess(sal, gray, method="kmeans", region=body[:50])
