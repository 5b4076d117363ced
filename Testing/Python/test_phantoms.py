"""MedCLIPSAMLib.phantoms: determinism, geometry, ground truth where the captions say, the CLI."""

import argparse
import json

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from MedCLIPSAMLib import phantoms as P  # noqa: E402
from MedCLIPSAMLib.errors import MedCLIPSAMError  # noqa: E402
from MedCLIPSAMLib.io import geometry_equal, read_segmentation, read_volume, slicing_axis  # noqa: E402

SMALL = dict(shape=(24, 40, 48), spacing=(1.1, 0.9, 3.0), origin=(-60.0, 35.5, -200.0))
FINER = dict(shape=(40, 64, 64), spacing=(1.0, 1.0, 1.5))  # for intensity checks on thin structures


def centroid_lps(image, mask):
    """Physical (LPS) centre of a z/y/x mask."""
    idx = np.argwhere(mask).mean(axis=0)[::-1]  # continuous index x, y, z
    return np.array(image.TransformContinuousIndexToPhysicalPoint(idx.tolist()))


def center_lps(image):
    return np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))


def test_same_seed_same_phantom_other_seed_other_phantom():
    a = P.make_volume("mr", seed=4, direction="oblique", **SMALL)
    b = P.make_volume("mr", seed=4, direction="oblique", **SMALL)
    c = P.make_volume("mr", seed=5, direction="oblique", **SMALL)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a.image), sitk.GetArrayFromImage(b.image))
    assert a.caption == b.caption and a.lesion == b.lesion
    for name in a.labels:
        np.testing.assert_array_equal(a.labels[name], b.labels[name])
    assert not np.array_equal(sitk.GetArrayFromImage(a.image), sitk.GetArrayFromImage(c.image))
    i1, i2 = P.make_image("ct", (64, 80), seed=9), P.make_image("ct", (64, 80), seed=9)
    np.testing.assert_array_equal(i1.image, i2.image)
    assert i1.captions == i2.captions


@pytest.mark.parametrize("direction", list(P.DIRECTIONS))
def test_volume_has_the_requested_grid_and_realistic_intensities(direction):
    ph = P.make_volume("ct", seed=2, direction=direction, **SMALL)
    img = ph.image
    assert img.GetSize() == (48, 40, 24)
    np.testing.assert_allclose(img.GetSpacing(), SMALL["spacing"])
    np.testing.assert_allclose(img.GetOrigin(), SMALL["origin"])
    np.testing.assert_allclose(img.GetDirection(), P.direction_preset(direction))
    assert img.GetPixelID() == sitk.sitkInt16
    hu = sitk.GetArrayFromImage(img).astype(float)
    assert all(m.shape == hu.shape and m.dtype == np.uint8 for m in ph.labels.values())
    assert -1024 <= hu.min() and hu.max() <= 1500
    assert np.median(hu[ph.labels["body"] == 0]) < -900                       # air
    assert np.median(hu[ph.labels["left lung"] > 0]) < -700                   # lung
    assert 20 < np.median(hu[(ph.labels["liver"] > 0) & (ph.labels["tumor"] == 0)]) < 110
    assert np.median(hu[ph.labels["spine"] > 0]) > 300                        # bone


def test_mr_is_positive_float_with_bright_white_matter_and_dark_csf():
    ph = P.make_volume("mr", seed=1, lesion=False, **FINER)
    mr = sitk.GetArrayFromImage(ph.image)
    assert ph.image.GetPixelID() == sitk.sitkFloat32 and mr.min() >= 0
    assert "tumor" not in ph.labels and ph.lesion is None and "no tumor" in ph.caption
    brain = np.median(mr[(ph.labels["brain"] > 0) & (ph.labels["ventricles"] == 0)])
    assert np.median(mr[ph.labels["ventricles"] > 0]) < 0.6 * brain
    assert np.median(mr[ph.labels["skull"] > 0]) < 0.5 * brain


@pytest.mark.parametrize("direction", ["lps", "ras", "oblique-flipped", "sagittal", "coronal"])
@pytest.mark.parametrize("kind,side", [("ct", "left"), ("ct", "right"), ("mr", "left"), ("mr", "right")])
def test_lesion_sits_on_the_patient_side_the_caption_names(direction, kind, side):
    ph = P.make_volume(kind, seed=11, direction=direction, lesion={"side": side}, **SMALL)
    tumor = ph.labels["tumor"] > 0
    assert tumor.any() and ph.lesion_side == side
    assert f"{side}" in ph.caption
    x_offset = (centroid_lps(ph.image, tumor) - center_lps(ph.image))[0]
    assert (x_offset > 0) == (side == "left")  # LPS: +x is the patient's left
    organ = ph.labels[ph.lesion.organ] > 0
    assert organ[tumor].all()  # the tumour lies inside its organ (and the organ's mask includes it)
    np.testing.assert_allclose(centroid_lps(ph.image, tumor), ph.lesion.center_lps, atol=3 * max(SMALL["spacing"]))


@pytest.mark.parametrize("direction", ["lps", "oblique", "sagittal"])
def test_anatomy_follows_patient_axes_on_any_grid(direction):
    ph = P.make_volume("ct", seed=3, direction=direction, lesion=False, **SMALL)
    c = {n: centroid_lps(ph.image, m > 0) for n, m in ph.labels.items() if m.any()}
    assert c["left kidney"][0] > c["right kidney"][0]         # patient left is +x
    assert c["liver"][0] < c["spleen"][0]                     # liver on the right, spleen on the left
    assert c["left lung"][2] > c["liver"][2]                  # lungs above the liver (+z superior)
    assert c["spine"][1] > c["liver"][1]                      # spine posterior (+y)


@pytest.mark.parametrize("vertical", ["upper", "lower"])
def test_upper_and_lower_mean_superior_and_inferior(vertical):
    ph = P.make_volume("ct", seed=8, direction="oblique", lesion={"organ": "liver", "vertical": vertical}, **SMALL)
    tumor = centroid_lps(ph.image, ph.labels["tumor"] > 0)
    liver = centroid_lps(ph.image, ph.labels["liver"] > 0)
    assert ph.lesion.vertical == vertical and f"{vertical} part of the liver" in ph.caption
    assert (tumor[2] > liver[2]) == (vertical == "upper")


def test_size_and_brightness_are_in_the_image_and_the_caption():
    sizes = {}
    for size in ("small", "large"):
        ph = P.make_volume("mr", seed=21, lesion={"size": size, "brightness": "bright"}, **FINER)
        mr = sitk.GetArrayFromImage(ph.image)
        tumor = ph.labels["tumor"] > 0
        rest = (ph.labels["brain"] > 0) & ~tumor
        assert np.median(mr[tumor]) > np.median(mr[rest]) and f"{size} bright" in ph.caption
        sizes[size] = tumor.sum()
    assert sizes["large"] > 3 * sizes["small"]
    dark = P.make_volume("ct", seed=5, lesion={"organ": "liver", "brightness": "dark", "size": "large"}, **FINER)
    hu = sitk.GetArrayFromImage(dark.image)
    liver = (dark.labels["liver"] > 0) & (dark.labels["tumor"] == 0)
    assert np.median(hu[dark.labels["tumor"] > 0]) < np.median(hu[liver]) - 20
    assert "dark" in dark.caption


def test_bad_phantom_options_are_clear_errors():
    with pytest.raises(MedCLIPSAMError, match="kind"):
        P.make_volume("pet")
    with pytest.raises(MedCLIPSAMError, match="unknown lesion option"):
        P.make_volume("ct", lesion={"colour": "red"}, **SMALL)
    with pytest.raises(MedCLIPSAMError, match="size must be one of"):
        P.make_volume("mr", lesion={"size": "huge"}, **SMALL)
    with pytest.raises(MedCLIPSAMError, match="organ"):
        P.make_volume("ct", lesion={"organ": "liver", "side": "left"}, **SMALL)
    with pytest.raises(MedCLIPSAMError, match="orthonormal"):
        P.make_volume("ct", direction=[1, 0, 0, 0, 2, 0, 0, 0, 1], **SMALL)
    with pytest.raises(MedCLIPSAMError, match="unknown direction"):
        P.make_volume("ct", direction="diagonal", **SMALL)


def test_label_map_is_exclusive_with_the_tumour_on_top():
    ph = P.make_volume("ct", seed=6, lesion={"organ": "liver"}, **SMALL)
    lab, names = ph.label_map()
    assert names == list(ph.labels) and names[-1] == "tumor"
    np.testing.assert_array_equal(lab == names.index("tumor") + 1, ph.labels["tumor"] > 0)
    assert set(np.unique(lab)) <= set(range(len(names) + 1))
    segments = ph.segments()
    assert [s["name"] for s in segments] == names and all(len(s["color"]) == 3 for s in segments)


def test_slice_captions_describe_what_each_slice_shows():
    ph = P.make_volume("mr", seed=2, direction="sagittal", lesion={"side": "left", "size": "large"}, **SMALL)
    tumor = ph.labels["tumor"] > 0
    for view in ("axial", "coronal", "sagittal"):
        axis = slicing_axis(ph.image, view)
        through = int(round(np.argwhere(tumor).mean(axis=0)[axis]))
        text = P.slice_caption(ph, through, view)
        assert text.startswith(f"a{'n' if view == 'axial' else ''} {view} MR slice")
        assert ph.lesion.word in text and "left hemisphere" in text
        empty = [k for k in range(tumor.shape[axis]) if not np.take(tumor, k, axis=axis).any()]
        assert "no tumor" in P.slice_caption(ph, next(k for k in empty if np.take(ph.labels["brain"], k, axis).any()),
                                             view)
    with pytest.raises(MedCLIPSAMError, match="out of range"):
        ph.slice_caption(10_000)
    ct = P.make_volume("ct", seed=2, lesion=False, **SMALL)
    captions = [ct.slice_caption(k) for k in range(ct.image.GetSize()[2])]
    assert any("lungs" in c for c in captions) and any("kidneys" in c for c in captions)


@pytest.mark.parametrize("kind", P.KINDS_2D)
@pytest.mark.parametrize("size", [(96, 160), (160, 96), (64, 64)])
def test_2d_images_any_aspect_without_stretching(kind, size):
    im = P.make_image(kind, size, seed=3)
    assert im.image.shape == size and im.image.dtype == np.float32
    assert all(m.shape == size for m in im.labels.values())
    assert im.labels["tumor"].any() and im.lesion is not None
    rows, cols = np.nonzero(im.labels["tumor"])
    on_left = cols.mean() > (size[1] - 1) / 2  # image right is the patient's left
    assert on_left == (im.lesion_side == "left")
    assert im.lesion_side in im.caption or im.lesion.organ in im.caption
    outline = "head" if kind == "mr" else "left lung" if kind == "xray" else "body"
    r, c = np.nonzero(im.labels[outline])
    extent = (r.max() - r.min(), c.max() - c.min())
    square = P.make_image(kind, (min(size),) * 2, seed=3)
    r2, c2 = np.nonzero(square.labels[outline])
    assert abs(extent[0] - (r2.max() - r2.min())) <= 2 and abs(extent[1] - (c2.max() - c2.min())) <= 2


def test_2d_captions_and_side():
    for seed in range(6):
        im = P.make_image("mr", (80, 120), seed=seed, lesion={"side": "right" if seed % 2 else "left"})
        cols = np.nonzero(im.labels["tumor"])[1]
        assert (cols.mean() > 59.5) == (im.lesion_side == "left")
        assert f"{im.lesion_side} hemisphere" in im.caption and im.caption.startswith("an axial MR slice")
    normal = P.make_image("ct", (64, 96), seed=1, lesion=False)
    assert "tumor" not in normal.labels and "no tumor" in normal.caption
    xray = P.make_image("xray", (128, 96), seed=0)
    assert 0.0 <= xray.image.min() and xray.image.max() <= 1.0
    lung = xray.labels["left lung"] > 0
    assert np.median(xray.image[lung]) < np.median(xray.image[~lung & (xray.image > 0.5)])  # lungs look dark


def test_cli_make_writes_volumes_segmentations_and_captions(tmp_path):
    from MedCLIPSAMLib.cli import phantoms as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["phantoms", "make", str(tmp_path / "out"), "--count", "2", "--kind", "both",
                              "--seed", "3", "--format", "nii.gz", "--shape", "12", "24", "28"])
    assert args.func(args) == 0
    meta = json.loads((tmp_path / "out" / "captions.json").read_text())
    assert [p["name"] for p in meta["phantoms"]] == ["ct_000", "ct_001", "mr_000", "mr_001"]
    for entry in meta["phantoms"]:
        volume = read_volume(tmp_path / "out" / entry["image"])
        segments, reference = read_segmentation(tmp_path / "out" / entry["segmentation"])
        assert geometry_equal(volume, reference)
        assert {s["name"] for s in segments} == set(entry["labels"])
        assert {s["name"]: int(s["mask"].sum()) for s in segments} == entry["labels"]
        assert entry["caption"] and len(entry["axial_slice_captions"]) == 12
        assert entry["lesion"]["side"] in entry["caption"] or entry["kind"] == "ct"
    # the second phantom of each kind has another grid
    a = read_volume(tmp_path / "out" / "ct_000.nii.gz")
    b = read_volume(tmp_path / "out" / "ct_001.nii.gz")
    assert not geometry_equal(a, b)
    assert [n for n in (tmp_path / "out").iterdir() if ".part" in n.name] == []
