"""Click refinement (pipeline/clicks.py, pipeline/refine.py) with the real SAM2 classes.

The prompt that reaches SAM2's predictor is recorded (its predict and set_image wrapped, still called
through) and compared with pixels worked out by hand from each grid's layout: which index axis the view
shows down the rows / across the columns and whether it runs against the radiological direction.
Random weights say nothing about a click's quality: the tests check geometry and bookkeeping only. Where
a rule needs a known SAM2 answer (propagation reaching a corrected slice), the tiny model's mask decoder
is given weights that make its answer constant ("everything" / "nothing"), still the real classes.
"""

import copy

import numpy as np
import pytest

from MedCLIPSAMLib.errors import MedCLIPSAMError

sitk = pytest.importorskip("SimpleITK")
torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from MedCLIPSAMLib.pipeline.clicks import slice_prompt  # noqa: E402
from MedCLIPSAMLib.pipeline.refine import (  # noqa: E402
    CachedEncoder, RefinableSegment, Refiner, SliceStack, write_slices)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small SAM2 calls: on a CPU shared with other jobs a second thread spin-waits more than it helps
    (measured 3x slower with 2 threads under load here); restored for the rest of the suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rotation(deg_z, deg_x):
    a, b = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


# name: (size x,y,z; spacing; direction (columns = index axes in LPS); origin)
GRIDS = {
    "lps-anisotropic": ((12, 7, 5), (0.7, 1.3, 2.5), np.eye(3), (-3.0, 7.5, 20.0)),
    "ras-stored": ((10, 8, 4), (1.1, 0.9, 3.0), np.diag([-1.0, -1.0, 1.0]), (40.0, 30.0, -12.0)),
    # index x runs towards Superior, y towards Left, z towards Posterior
    "permuted": ((5, 11, 7), (2.0, 0.8, 1.2), np.array([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]]), (1.0, 2.0, 3.0)),
    "oblique": ((9, 13, 6), (0.8, 0.6, 2.0), rotation(25, 12), (-10.0, 5.0, 33.0)),
    # oblique with x towards (roughly) Right and z towards Inferior
    "oblique-flipped": ((9, 13, 6), (0.8, 0.6, 2.0), rotation(25, 12) @ np.diag([-1.0, 1, -1]), (4.0, -2.0, 9.0)),
}

# by hand, per (grid, view): (index axis stepped through, (index axis down the rows, flipped),
# (index axis across the columns, flipped)); radiological: axial rows -> Posterior, columns -> patient Left;
# coronal rows -> Inferior, columns -> Left; sagittal rows -> Inferior, columns -> Posterior
LAYOUT = {
    ("lps-anisotropic", "axial"): (2, (1, False), (0, False)),
    ("ras-stored", "axial"): (2, (1, True), (0, True)),          # y runs Anterior, x runs Right
    ("permuted", "axial"): (0, (2, False), (1, False)),
    ("permuted", "coronal"): (2, (0, True), (1, False)),          # rows go down = Inferior = -x
    ("oblique", "axial"): (2, (1, False), (0, False)),
    ("oblique", "sagittal"): (0, (2, True), (1, False)),
    ("oblique-flipped", "axial"): (2, (1, False), (0, True)),
}


def make_grid(name, marker=None):
    size, spacing, direction, origin = GRIDS[name]
    arr = np.zeros(tuple(reversed(size)), np.uint8)
    if marker is not None:
        arr[tuple(reversed(marker))] = 255  # uint8 volumes pass to SAM2 unchanged: 255 only here
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetDirection(np.asarray(direction, float).ravel().tolist())
    img.SetOrigin(origin)
    return img


def patient_point(img, index, frame):
    """Patient mm of a continuous index, from the grid's own numbers (origin + D (spacing * index))."""
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    lps = np.asarray(img.GetOrigin()) + d @ (np.asarray(img.GetSpacing()) * np.asarray(index, float))
    return lps * np.array([-1, -1, 1]) if frame == "RAS" else lps


def expected_pixel(img, name, view, index):
    """(slice, row, col, top, left) by hand from LAYOUT and pad-to-square's rule (odd pixel after)."""
    size = img.GetSize()
    k_axis, (r_axis, r_flip), (c_axis, c_flip) = LAYOUT[(name, view)]
    row = size[r_axis] - 1 - index[r_axis] if r_flip else index[r_axis]
    col = size[c_axis] - 1 - index[c_axis] if c_flip else index[c_axis]
    h, w = size[r_axis], size[c_axis]
    side = max(h, w)
    return index[k_axis], row, col, (side - h) // 2, (side - w) // 2


def constant_sam2(base, sign):
    """The tiny SAM2 with decoder weights that make every mask logit the same constant (sign +1: the whole
    square, -1: nothing): the decoder's output is hyper_in @ act(dc2(.) + conv_s0(.)), so zeroed conv_s0 and
    dc2 weights with dc2 bias 1 give a constant GELU(1) per channel, and zeroed hypernetwork output weights
    with bias `sign` give hyper_in = sign."""
    model = copy.deepcopy(base)
    dec = model.sam_mask_decoder
    with torch.no_grad():
        dec.conv_s0.weight.zero_()
        dec.conv_s0.bias.zero_()
        dc2 = dec.output_upscaling[3]
        dc2.weight.zero_()
        dc2.bias.fill_(1.0)
        for mlp in dec.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.fill_(float(sign))
    return model


@pytest.fixture(scope="module")
def everything_sam2(tiny_sam2):
    return constant_sam2(tiny_sam2, +1)


@pytest.fixture(scope="module")
def nothing_sam2(tiny_sam2):
    return constant_sam2(tiny_sam2, -1)


class Recorder:
    """Wraps a CachedEncoder's predictor: records predict's arguments (with the slice they were for) and
    the images given to set_image, then calls the real methods."""

    def __init__(self, encoder):
        self.calls, self.images, self.slice = [], [], None
        p = encoder.predictor
        predict, set_image, predictor_for = p.predict, p.set_image, encoder.predictor_for

        def rec_predict(**kw):
            self.calls.append(dict(kw, slice=self.slice))
            return predict(**kw)

        def rec_set_image(image):
            self.images.append((self.slice, np.array(image)))
            return set_image(image)

        def rec_predictor_for(k):
            self.slice = k
            return predictor_for(k)

        p.predict, p.set_image, encoder.predictor_for = rec_predict, rec_set_image, rec_predictor_for


def refiner_for(img, sam, view="axial"):
    stack = SliceStack(img, view)
    encoder = CachedEncoder(sam, stack, autocast=False)
    return Refiner(stack, encoder), Recorder(encoder)


CASES = [("lps-anisotropic", "axial", "LPS"), ("lps-anisotropic", "axial", "RAS"), ("ras-stored", "axial", "RAS"),
         ("permuted", "axial", "LPS"), ("permuted", "coronal", "RAS"), ("oblique", "axial", "RAS"),
         ("oblique", "sagittal", "LPS"), ("oblique-flipped", "axial", "RAS")]


@pytest.mark.parametrize("name,view,frame", CASES)
def test_a_click_reaches_sam2_on_its_voxel(tiny_sam2, name, view, frame):
    """A point near voxel (i, j, l) (a sub-voxel offset) reaches SAM2 at the pixel worked out by hand, and
    that pixel is where the voxel's marker is in the image SAM2 was given."""
    size = GRIDS[name][0]
    voxel = (size[0] // 3, size[1] - 2, size[2] // 2)
    img = make_grid(name, marker=voxel)
    refiner, rec = refiner_for(img, tiny_sam2, view)
    point = patient_point(img, np.add(voxel, (0.3, -0.4, 0.45)), frame)
    result = refiner.refine_points(None, positive=[point], frame=frame, propagate=False)

    k, row, col, top, left = expected_pixel(img, name, view, voxel)
    assert result.slice_index == k
    (call,) = rec.calls
    assert call["slice"] == k and call["box"] is None and call["mask_input"] is None
    np.testing.assert_array_equal(call["point_coords"], [[col + left, row + top]])
    np.testing.assert_array_equal(call["point_labels"], [1])
    ((encoded, image),) = rec.images
    assert encoded == k
    assert [tuple(p) for p in np.argwhere(image[..., 0] == 255)] == [(row + top, col + left)]


def test_box_and_negative_points_on_a_flipped_grid(tiny_sam2):
    name = "ras-stored"
    img = make_grid(name)
    refiner, rec = refiner_for(img, tiny_sam2)
    a, b, neg = (7, 1, 2), (2, 5, 2), (4, 3, 2)
    refiner.refine_points(None, box=[patient_point(img, a, "RAS"), patient_point(img, b, "RAS")],
                          positive=[patient_point(img, neg, "RAS")], negative=[patient_point(img, b, "RAS")],
                          frame="RAS", propagate=False)
    (call,) = rec.calls
    _, ra, ca, top, left = expected_pixel(img, name, "axial", a)
    _, rb, cb, _, _ = expected_pixel(img, name, "axial", b)
    _, rn, cn, _, _ = expected_pixel(img, name, "axial", neg)
    # both corner pixels inside, far edge exclusive (as postprocess.bounding_box makes boxes)
    np.testing.assert_array_equal(call["box"], [[min(ca, cb) + left, min(ra, rb) + top,
                                                 max(ca, cb) + 1 + left, max(ra, rb) + 1 + top]])
    np.testing.assert_array_equal(call["point_coords"], [[cn + left, rn + top], [cb + left, rb + top]])
    np.testing.assert_array_equal(call["point_labels"], [1, 0])


def test_current_mask_is_the_mask_prompt(tiny_sam2):
    """The segment's mask on the clicked slice reaches SAM2 as low-res logits in the displayed orientation:
    +10 where the interpolation only sees mask pixels, -10 where it only sees background."""
    name = "ras-stored"
    img = make_grid(name)
    refiner, rec = refiner_for(img, tiny_sam2)
    mask = np.zeros(tuple(reversed(GRIDS[name][0])), np.uint8)
    mask[2, 1:4, 2:6] = 1                       # z = 2, y in [1, 4), x in [2, 6)
    segment = RefinableSegment(mask.copy())
    refiner.refine_points(segment, positive=[patient_point(img, (3, 2, 2), "RAS")], frame="RAS", propagate=False)
    (call,) = rec.calls
    logits = call["mask_input"]
    assert logits.shape == (1, 256, 256)
    size = GRIDS[name][0]
    # display rows = 7 - y, cols = 9 - x (both flipped): rows [5, 7], cols [4, 7]; padded square 10 x 10, top 1
    _, _, _, top, left = expected_pixel(img, name, "axial", (0, 0, 0))
    rows = {size[1] - 1 - y + top for y in range(1, 4)}
    cols = {size[0] - 1 - x + left for x in range(2, 6)}
    side = max(size[0], size[1])
    centre = np.clip((np.arange(256) + 0.5) * side / 256 - 0.5, 0, side - 1)   # upsampling: no antialias
    lo = np.floor(centre).astype(int)
    both_in = lambda s: np.array([i in s and min(i + 1, side - 1) in s for i in lo])  # noqa: E731
    both_out = lambda s: np.array([i not in s and min(i + 1, side - 1) not in s for i in lo])  # noqa: E731
    inside = both_in(rows)[:, None] & both_in(cols)[None, :]
    outside = both_out(rows)[:, None] | both_out(cols)[None, :]
    assert inside.sum() > 100 and outside.sum() > 1000
    np.testing.assert_allclose(logits[0][inside], 10.0, atol=1e-4)
    np.testing.assert_allclose(logits[0][outside], -10.0, atol=1e-4)
    assert call["box"] is None and call["point_labels"].tolist() == [1]


def test_corrected_slices_are_never_overwritten(everything_sam2, nothing_sam2):
    img = make_grid("lps-anisotropic")          # 5 axial slices
    block = np.zeros((5, 7, 12), np.uint8)
    block[:, 2:5, 3:9] = 1
    segment = RefinableSegment(block.copy())
    nothing, _ = refiner_for(img, nothing_sam2)
    cleared = nothing.refine_points(segment, negative=[patient_point(img, (5, 3, 3), "LPS")], frame="LPS")
    assert set(cleared.changed) == {3} and not segment.mask[3].any()     # an empty result does not travel
    assert cleared.stops == {1: "object ended", -1: "object ended"}

    everything, rec = refiner_for(img, everything_sam2)
    result = everything.refine_points(segment, box=[patient_point(img, (1, 1, 1), "LPS"),
                                                    patient_point(img, (10, 6, 1), "LPS")], frame="LPS")
    assert result.stops == {1: "corrected slice 3", -1: "volume edge"}
    assert set(result.changed) == {0, 1, 2} and {c["slice"] for c in rec.calls} == {0, 1, 2}
    assert segment.mask[:3].all() and not segment.mask[3].any()
    np.testing.assert_array_equal(segment.mask[4], block[4])
    for k, plane in result.changed.items():
        np.testing.assert_array_equal(plane, segment.mask[k])
    assert segment.corrected == {("axial", 1), ("axial", 3)}
    # carried slices get their neighbour's box (+3 px margin) and mask: slice 0 from slice 1's full mask
    carried = [c for c in rec.calls if c["slice"] == 0][0]
    np.testing.assert_array_equal(carried["box"], [[0 - 3, 0 - 3 + 2, 12 + 3, 7 + 3 + 2]])  # padded 12 x 12, top 2
    assert carried["point_coords"] is None and carried["mask_input"] is not None

    # clicking a slice again keeps the other corrected slice; an unchanged neighbour ends the carry
    again = everything.refine_points(segment, positive=[patient_point(img, (6, 3, 4), "LPS")], frame="LPS")
    assert set(again.changed) == {4} and again.stops == {1: "volume edge", -1: "corrected slice 3"}
    assert not segment.mask[3].any()
    only = everything.refine_points(segment, positive=[patient_point(img, (6, 3, 2), "LPS")], frame="LPS",
                                    propagate=False)
    assert only.changed == {} and only.stops == {1: "this slice only", -1: "this slice only"}


def test_undo_restores_bit_for_bit(tiny_sam2, everything_sam2, nothing_sam2):
    name = "oblique"
    img = make_grid(name)
    original = (np.random.default_rng(3).random(tuple(reversed(GRIDS[name][0]))) > 0.6).astype(np.uint8) * 7
    segment = RefinableSegment(original.copy(), name="lesion", undo_depth=5)
    refiners = {id(sam): refiner_for(img, sam)[0] for sam in (tiny_sam2, everything_sam2, nothing_sam2)}
    normal = np.asarray(GRIDS[name][2])[:, 2] * np.array([-1, -1, 1])   # the volume's own axial view (RAS)
    snapshots = []
    for sam, point, propagate in ((everything_sam2, (4, 6, 2), True), (nothing_sam2, (4, 6, 4), True),
                                  (tiny_sam2, (2, 9, 1), False), (everything_sam2, (5, 5, 5), True)):
        snapshots.append((segment.mask.copy(), segment.corrected))
        refiners[id(sam)].refine_points(segment, positive=[patient_point(img, point, "RAS")], frame="RAS",
                                        plane_normal=normal, propagate=propagate)
    assert not np.array_equal(segment.mask, original)
    while snapshots:
        before, corrected = snapshots.pop()
        current = segment.mask.copy()
        axis, restored = segment.undo()
        assert axis == 0
        for k, plane in restored.items():
            np.testing.assert_array_equal(segment.mask[k], plane)
            assert not np.array_equal(current[k], plane)
        assert segment.mask.dtype == np.uint8 and np.array_equal(segment.mask, before)
        assert segment.corrected == corrected
    assert np.array_equal(segment.mask, original) and not segment.can_undo
    with pytest.raises(MedCLIPSAMError, match="nothing to undo for segment 'lesion'"):
        segment.undo()


def test_new_segment_from_a_box_only(everything_sam2):
    name = "permuted"
    img = make_grid(name)
    refiner, rec = refiner_for(img, everything_sam2)
    a, b = (2, 3, 1), (2, 8, 5)
    result = refiner.refine_points(None, box=[patient_point(img, a, "LPS"), patient_point(img, b, "LPS")],
                                   frame="LPS")
    first = rec.calls[0]
    k, ra, ca, top, left = expected_pixel(img, name, "axial", a)
    _, rb, cb, _, _ = expected_pixel(img, name, "axial", b)
    assert first["slice"] == k == 2 and first["point_coords"] is None and first["mask_input"] is None
    np.testing.assert_array_equal(first["box"], [[min(ca, cb) + left, min(ra, rb) + top,
                                                  max(ca, cb) + 1 + left, max(ra, rb) + 1 + top]])
    # the "everything" decoder fills the clicked slice, and the carry fills the rest (index x = 0..4)
    assert sorted(result.changed) == [0, 1, 2, 3, 4] and result.axis == 2
    assert result.segment.mask.all() and result.segment.corrected == {("axial", 2)}
    # changed planes are np.take planes: writing them into an empty mask rebuilds the segment
    rebuilt = np.zeros_like(result.segment.mask)
    write_slices(rebuilt, result.axis, result.changed)
    np.testing.assert_array_equal(rebuilt, result.segment.mask)


def _one_sentence(exc):
    msg = str(exc.value)
    assert "\n" not in msg and ". " not in msg and len(msg) < 300, msg
    return msg


@pytest.mark.parametrize("case", ["outside", "no-points", "two-slices", "oblique-view", "bad-frame",
                                  "negative-only-new"])
def test_bad_requests_are_one_sentence_and_change_nothing(tiny_sam2, case):
    name = "oblique"
    img = make_grid(name)
    refiner, rec = refiner_for(img, tiny_sam2)
    mask = np.zeros(tuple(reversed(GRIDS[name][0])), np.uint8)
    mask[2:4, 3:8, 2:6] = 1
    segment = RefinableSegment(mask.copy())
    inside = patient_point(img, (4, 6, 2), "RAS")
    kwargs = {"frame": "RAS"}
    seg = segment
    if case == "outside":  # half a voxel beyond the last slice
        kwargs["positive"] = [inside, patient_point(img, (4, 6, 5.6), "RAS")]
        match = r"outside the volume"
    elif case == "no-points":
        match = "at least one point or a box"
    elif case == "two-slices":  # a view not aligned with the volume: its points fall on several slices
        kwargs["positive"] = [inside, patient_point(img, (4, 6, 3), "RAS")]
        match = r"different axial slices \(2, 3\).*Red view"
    elif case == "oblique-view":  # one point, placed in a view 45 degrees off the volume's axial slices
        kwargs["positive"] = [inside]
        d = np.asarray(GRIDS[name][2])
        kwargs["plane_normal"] = (d[:, 1] + d[:, 2]) * np.array([-1, -1, 1])
        match = r"not aligned with the volume's axial slices.*Rotate to volume plane"
    elif case == "bad-frame":
        kwargs = {"positive": [inside], "frame": "IJK"}
        match = "unknown coordinate frame 'IJK'"
    else:
        kwargs["negative"] = [inside]
        seg = None
        match = "a box or at least one positive point"
    with pytest.raises(MedCLIPSAMError, match=match) as exc:
        refiner.refine_points(seg, **kwargs)
    msg = _one_sentence(exc)
    if case == "outside":  # named as given, in the caller's frame
        assert "(" + ", ".join(f"{v:.1f}" for v in kwargs["positive"][1]) + ") RAS" in msg
    assert rec.calls == [] and rec.images == []
    np.testing.assert_array_equal(segment.mask, mask)
    assert not segment.can_undo and segment.corrected == frozenset()


def test_slice_prompt_tilt_tolerance():
    """A view normal tilted so the view drifts less than half a slice over the volume's in-plane half-extent is
    accepted; one tilted further is refused (figures from the grid's numbers, not from clicks.py)."""
    img = make_grid("lps-anisotropic")     # x 12 * 0.7 mm, slices 2.5 mm apart
    p = patient_point(img, (5, 3, 2), "LPS")
    half = (12 - 1) / 2 * 0.7               # mm from the centre column to the outermost one
    ok = np.arctan(0.45 * 2.5 / half)       # drifts 0.45 slices there
    bad = np.arctan(0.55 * 2.5 / half)
    prompt = slice_prompt(img, "axial", positive=[p], frame="LPS", plane_normal=(np.sin(ok), 0, np.cos(ok)))
    assert prompt.slice_index == 2
    with pytest.raises(MedCLIPSAMError, match="not aligned"):
        slice_prompt(img, "axial", positive=[p], frame="LPS", plane_normal=(np.sin(bad), 0, np.cos(bad)))


@pytest.mark.parametrize("amp", [False, True])
def test_the_dense_positional_encoding_computed_once_changes_no_mask(tiny_sam2, amp):
    """DensePE: the prompt encoder's get_dense_pe reused across calls gives the same masks bit for bit
    (fp32 and bf16 autocast), and the model is left with its own method afterwards."""
    import contextlib

    img = make_grid("oblique", marker=(4, 6, 3))
    stack = SliceStack(img, "axial")
    refiner = Refiner(stack, CachedEncoder(tiny_sam2, stack, autocast=amp))
    refiner.logit_threshold = 0.0
    rng = np.random.default_rng(1)
    prompts = []
    for _ in range(3):
        prior = np.zeros(stack.view.shape[1:], bool)
        prior[2:6, 3:8] = True
        prompts.append((int(rng.integers(0, stack.view.count)), prior))
    once = [refiner._predict(k, box=np.array([[8, 9, 14, 15]], np.float32), prior=p) for k, p in prompts]
    first = refiner.dense_pe._value
    assert refiner._predict(0, box=np.array([[8, 9, 14, 15]], np.float32)) is not None
    assert refiner.dense_pe._value is first                                   # computed once
    assert "get_dense_pe" not in vars(tiny_sam2.sam_prompt_encoder)           # the model's own method again
    refiner.dense_pe.around = lambda encoder: contextlib.nullcontext()
    every = [refiner._predict(k, box=np.array([[8, 9, 14, 15]], np.float32), prior=p) for k, p in prompts]
    for a, b in zip(once, every):
        assert np.array_equal(a, b)
