"""Correcting a segment with clicks: points and/or a box on one slice -> SAM2 -> carried to the neighbours.

One request (a `clicks.SlicePrompt`, or points in patient space through `Refiner.refine_points`):
 1. the clicked slice k: SAM2's image predictor on k's cached encoding, prompted with the points, the box
    and the segment's current mask on k as a dense mask prompt (low-res logits, `mask_logits`); the result
    replaces the mask on k and k counts as corrected by the user from then on;
 2. propagation ("Propagate"; off for "This slice only"): from k outwards, each next slice j gets the
    image predictor with the box of its neighbour's new mask and that mask as the mask prompt, as the
    pipeline's carry mode does (volume.py). A direction stops where the prediction is empty (the object
    ends; j is left as it was), where the prediction equals j's mask (the change has died out), at a
    slice the user corrected (never overwritten) or at the volume's edge;
 3. only the slices whose mask changed come back ({slice: new plane}), and their previous planes go on the
    segment's undo stack (several steps deep; undo restores them bit for bit).
Without a segment, the same request creates one from a box or positive points alone (no text).

Encodings come from a `SliceEncoder`: anything with `predictor_for(k)` returning a SAM2ImagePredictor
whose image is slice k's padded square (and `autocast`, the setting it encoded under). `CachedEncoder`
is the plain one (an LRU of the predictor's features within a byte budget); the segmentation session
provides its own over its per-volume cache. Masks are (z, y, x) arrays on the volume's grid; changed
planes are given as `np.take(mask, k, axis)` (the volume's orientation, not the display's), so a client
writes them back with `write_slices` without knowing the view's layout.

The quality of a click depends on SAM2's weights; the tests here use random weights and check geometry,
bookkeeping and the never-overwrite / undo rules, not quality.
"""

import contextlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import MedCLIPSAMError
from ..postprocess import bounding_box
from .clicks import SlicePrompt, slice_prompt
from .preprocess import intensity_range, normalize_to_uint8, pad_to_square, to_rgb, unpad
from .slices import SliceView


class SliceStack:
    """A volume's slices along one patient axis as the pipeline sees them (uint8, one intensity window).

    The same preparation as VolumeSegmenter._prepare, whose prepared instances also fit wherever a
    stack is wanted (attributes image, view, gray8)."""

    def __init__(self, image, axis="axial", window=None):
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise MedCLIPSAMError(f"expected a 3D volume, got a {image.GetDimension()}D image")
        self.image = image
        self.volume = sitk.GetArrayViewFromImage(image)
        self.view = SliceView(image, axis)
        sample = self.volume[tuple(slice(None, None, max(1, n // 64)) for n in self.volume.shape)]
        if np.issubdtype(self.volume.dtype, np.floating) and not np.isfinite(self.volume).all():
            raise MedCLIPSAMError("the volume contains NaN or infinite voxels")
        self.value_range = intensity_range(sample, window=window) or (0.0, 255.0)

    def gray8(self, k):
        return normalize_to_uint8(self.view.get(self.volume, k), value_range=self.value_range)


def slice_pad(view):
    """The PadInfo of the view's slices in SAM2's square (all slices of a view share it)."""
    h, w = (view.shape[a] for a in (view.row_axis, view.col_axis))
    return pad_to_square(np.zeros((h, w), np.uint8))[1]


class SliceEncoder(Protocol):
    """What refinement needs from an encoding cache (the session implements it over its own cache)."""

    autocast: object        # the autocast setting the encodings were made under (the decoder runs under it)

    def predictor_for(self, k: int):
        """A SAM2ImagePredictor whose image is slice k's padded square (pad_to_square(stack.gray8(k)))."""


class CachedEncoder:
    """SliceEncoder: SAM2 image encodings of a stack's slices, kept in an LRU within `max_bytes`.

    predictor_for(k) returns the one predictor with slice k set: valid until the next call."""

    def __init__(self, sam_model, stack, autocast="auto", max_bytes=1 << 30):
        from ..models.sam import image_predictor

        self.predictor = image_predictor(sam_model)
        self.stack = stack
        self.autocast = autocast
        self.max_bytes = max_bytes
        self._cache = OrderedDict()      # slice -> (features, orig_hw, bytes)
        self.bytes = 0
        self.hits = self.misses = 0

    def encoded(self, k):
        return k in self._cache

    def predictor_for(self, k):
        import torch

        from ..runtime import autocast

        p = self.predictor
        if k in self._cache:
            self._cache.move_to_end(k)
            feats, hw, _ = self._cache[k]
            # the state set_image leaves behind (sam2 1.1.0 SAM2ImagePredictor), restored without the encoder
            p._features, p._orig_hw, p._is_image_set = feats, [hw], True
            self.hits += 1
            return p
        self.misses += 1
        square, _ = pad_to_square(self.stack.gray8(k))
        with torch.inference_mode(), autocast(p.device, self.autocast):
            p.set_image(to_rgb(square))
        feats = p._features
        size = sum(t.numel() * t.element_size() for t in [feats["image_embed"], *feats["high_res_feats"]])
        self._cache[k] = (feats, tuple(p._orig_hw[0]), size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._cache) > 1:
            _, (_, _, freed) = self._cache.popitem(last=False)
            self.bytes -= freed
        return p


def mask_logits(plane, pad, size):
    """SAM2's dense mask prompt (1 x H x W low-res logits) for a bool mask on a slice's displayed pixels.

    As SAM2 turns a mask into logits itself (SAM2Base._use_mask_as_output): +10 inside, -10 outside (the
    padding is outside), resized by antialiased bilinear interpolation to the prompt encoder's mask size
    (256 x 256 for a 1024 model; the shape SAM2ImagePredictor.predict documents for mask_input)."""
    import torch
    import torch.nn.functional as F

    padded = np.zeros((pad.side, pad.side), np.float32)
    padded[pad.top:pad.top + pad.height, pad.left:pad.left + pad.width] = plane
    t = torch.from_numpy(padded)[None, None] * 20.0 - 10.0
    low = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return low[0].numpy()


def write_slices(mask, axis, planes):
    """Write {slice: plane} (planes as np.take(mask, k, axis) gives them) into a (z, y, x) mask, in place."""
    for k, plane in planes.items():
        index = [slice(None)] * 3
        index[axis] = k
        mask[tuple(index)] = plane


class DensePE:
    """The prompt encoder's dense positional encoding (get_dense_pe), computed once per model, device, dtype
    and autocast state instead of on every decoder call: it depends on none of the prompts, so the masks are
    bit for bit the same (Testing/Python/test_refine.py), and one propagation step is about a fifth faster
    on CPU (benchmarks/results/refine_decoder_cpu.json). Used only around the Refiner's own calls."""

    def __init__(self):
        self._key = self._value = None

    @contextlib.contextmanager
    def around(self, prompt_encoder):
        import torch

        if "get_dense_pe" in vars(prompt_encoder):      # someone else replaced it: leave it alone
            yield
            return
        g = prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        key = (id(prompt_encoder), g.device, g.dtype, g._version, torch.is_autocast_enabled(g.device.type),
               torch.get_autocast_dtype(g.device.type) if hasattr(torch, "get_autocast_dtype") else None)
        if key != self._key:
            self._key, self._value = key, prompt_encoder.get_dense_pe()
        value = self._value
        prompt_encoder.get_dense_pe = lambda: value
        try:
            yield
        finally:
            del prompt_encoder.get_dense_pe


@dataclass
class UndoStep:
    axis: int
    previous: dict          # slice -> plane before the step (np.take orientation, exact copies)
    corrected: frozenset    # the segment's corrected slices before the step


class RefinableSegment:
    """One segment being corrected: its (z, y, x) mask (owned; refine and undo change it in place), the
    slices the user corrected ({(view, slice)}, never overwritten by propagation) and its undo steps."""

    def __init__(self, mask, name=None, undo_depth=10):
        self.mask = np.asarray(mask)
        if self.mask.ndim != 3:
            raise MedCLIPSAMError(f"a segment mask must be 3D (z, y, x), got shape {self.mask.shape}")
        self.name = name
        self.corrected = frozenset()
        self.history = deque(maxlen=undo_depth)

    @property
    def can_undo(self):
        return len(self.history) > 0

    def undo(self):
        """Undo the last step: returns (numpy axis, {slice: restored plane}), the slices it changed."""
        if not self.history:
            raise MedCLIPSAMError(f"nothing to undo for segment '{self.name or 'unnamed'}'")
        step = self.history.pop()
        write_slices(self.mask, step.axis, step.previous)
        self.corrected = step.corrected
        return step.axis, {k: plane.copy() for k, plane in step.previous.items()}


@dataclass
class RefineResult:
    segment: RefinableSegment
    axis: int                    # numpy axis of the slices in `changed`
    slice_index: int             # the clicked slice
    changed: dict                # slice -> new plane (np.take(segment.mask, k, axis)), changed slices only
    stops: dict = field(default_factory=dict)   # +1 / -1 -> why propagation stopped that way


class Refiner:
    """Refines segments of one stack (a volume along one axis) from clicks, on an encoder's encodings."""

    def __init__(self, stack, encoder: SliceEncoder, mask_threshold=0.5, box_margin=3, undo_depth=10):
        self.stack = stack
        self.view = stack.view
        self.encoder = encoder
        self.pad = slice_pad(self.view)
        self.logit_threshold = float(np.log(mask_threshold / (1 - mask_threshold)))
        self.box_margin = box_margin
        self.undo_depth = undo_depth
        self.dense_pe = DensePE()

    def new_segment(self, name=None):
        return RefinableSegment(np.zeros(self.view.shape, np.uint8), name, self.undo_depth)

    def refine_points(self, segment, positive=(), negative=(), box=None, frame="RAS", plane_normal=None,
                      propagate=True, max_distance=None):
        """refine() with points and box corners in patient mm (`frame` RAS or LPS; see clicks.py)."""
        prompt = slice_prompt(self.stack.image, self.view.view, positive, negative, box, frame, plane_normal,
                              slice_view=self.view)
        return self.refine(segment, prompt, propagate, max_distance)

    def refine(self, segment, prompt: SlicePrompt, propagate=True, max_distance=None):
        """Apply one request; segment None creates a new one (from a box or positive points)."""
        sv = self.view
        if prompt.view != sv.view:
            raise MedCLIPSAMError(f"the clicks were mapped to {prompt.view} slices but this volume is sliced "
                                  f"{sv.view}; map them with the same view")
        if not prompt.has_points and prompt.box is None:
            raise MedCLIPSAMError("a refine request needs at least one point or a box; nothing was changed")
        if segment is None:
            if prompt.box is None and len(prompt.positive) == 0:
                raise MedCLIPSAMError("a new segment needs a box or at least one positive point")
            segment = self.new_segment()
        if segment.mask.shape != sv.shape:
            raise MedCLIPSAMError(f"the segment's mask {segment.mask.shape} is not on this volume's grid {sv.shape}")
        k = prompt.slice_index
        new = {k: self._predict_clicked(k, prompt, sv.get(segment.mask, k) != 0)}
        corrected = segment.corrected | {(sv.view, k)}
        stops = {}
        for step in (1, -1):
            stops[step] = (self._carry(segment, new, k, step, corrected, max_distance) if propagate
                           else "this slice only")
        # bookkeeping: only slices that really change; their old planes (exact copies) for undo
        axis, previous, changed = sv.axis, {}, {}
        for j, plane in sorted(new.items()):
            old = np.take(segment.mask, j, axis=axis)
            if np.array_equal(sv.get(segment.mask, j) != 0, plane):
                continue
            previous[j] = old.copy()
            sv.put(segment.mask, j, plane.astype(segment.mask.dtype))
            changed[j] = np.take(segment.mask, j, axis=axis).copy()
        segment.history.append(UndoStep(axis, previous, segment.corrected))
        segment.corrected = frozenset(corrected)
        return RefineResult(segment, axis, k, changed, stops)

    # -- SAM2 calls ------------------------------------------------------------------------------------
    def _predict(self, k, points=None, labels=None, box=None, prior=None, multimask=False):
        import torch

        from ..runtime import autocast

        predictor = self.encoder.predictor_for(k)
        mask_input = None
        if prior is not None and prior.any():
            mask_input = mask_logits(prior, self.pad, predictor.model.sam_prompt_encoder.mask_input_size)
        with torch.inference_mode(), autocast(predictor.device, getattr(self.encoder, "autocast", False)), \
                self.dense_pe.around(predictor.model.sam_prompt_encoder):
            masks, scores, _ = predictor.predict(point_coords=points, point_labels=labels, box=box,
                                                 mask_input=mask_input, multimask_output=multimask,
                                                 return_logits=True)
        logits = np.asarray(masks[int(np.argmax(scores))] if multimask else masks[0], np.float32)
        return unpad(logits > self.logit_threshold, self.pad)

    def _predict_clicked(self, k, prompt, current):
        p = prompt.sam_prompts(self.pad)
        # one click alone is ambiguous: SAM's advice is three candidates and the best-scored one
        single = p["boxes"] is None and len(p["points"]) == 1 and not current.any()
        return self._predict(k, p["points"], p["labels"], p["boxes"], current, multimask=single)

    def _carry(self, segment, new, start, step, corrected, max_distance):
        """Carry the new mask of `start` to its neighbours in one direction; fills `new`, returns why it stopped."""
        sv, m = self.view, self.box_margin
        prev, j = new[start], start + step
        while True:
            if not prev.any():
                return "object ended"
            if not 0 <= j < sv.count:
                return "volume edge"
            if (sv.view, j) in corrected:
                return f"corrected slice {j}"
            if max_distance is not None and abs(j - start) > max_distance:
                return "distance limit"
            x0, y0, x1, y1 = bounding_box(prev)
            box = np.array([x0 - m + self.pad.left, y0 - m + self.pad.top, x1 + m + self.pad.left,
                            y1 + m + self.pad.top], np.float32)
            pred = self._predict(j, box=box[None], prior=prev)
            if not pred.any():
                return "object ended"
            if np.array_equal(pred, sv.get(segment.mask, j) != 0):
                return "unchanged"
            new[j] = pred
            prev, j = pred, j + step
