"""Refinement inside a Session: clicks on a segment of a volume the session holds, on its cached encodings.

- `SessionEncoder` is refine.py's SliceEncoder over the session's SAM2 cache: predictor_for(k) hands the
  session's CachedPredictor slice k's padded square, so a slice the segmentation (or an earlier click)
  already encoded costs only the mask decoder. It hits the segmentation's own entries when the slices are
  prepared the same way: same slicing axis and intensity window (the job's `window`), same autocast.
- `SegmentStore` keeps the segments being refined, keyed (volume id, segment id): each a RefinableSegment
  (its mask, the slices the user corrected, its undo steps). The starting mask of a request is the one
  the client sends (the segment as it is now, perhaps edited in the Segment Editor), else the one already
  held, else the session's last result for a segment of that name, else nothing (a new segment from a
  box or points).
Every check (points on the volume, a mask of the right size, ...) runs before anything is changed.
"""

import base64
import threading

import numpy as np

from ..errors import MedCLIPSAMError


def pack_bits(mask):
    """A bool / 0-1 array -> base64 text of np.packbits of its C-order values (what the service sends)."""
    return base64.b64encode(np.packbits(np.asarray(mask, bool).ravel()).tobytes()).decode("ascii")


def unpack_bits(text, shape, what="mask"):
    """The inverse of pack_bits onto `shape` (uint8 0/1); one sentence when the text does not fit."""
    try:
        data = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise MedCLIPSAMError(f"the {what} is not base64 text (np.packbits of the voxels, C order)") from None
    n = int(np.prod(shape))
    if len(data) != (n + 7) // 8:
        raise MedCLIPSAMError(f"the {what} has {len(data)} bytes of packed bits; a {'x'.join(map(str, shape))} "
                              f"mask needs {(n + 7) // 8}")
    return np.unpackbits(np.frombuffer(data, np.uint8), count=n).reshape(shape)


class SessionEncoder:
    """SliceEncoder over the session's SAM2 cache (see the module docstring). Use under the session's lock."""

    def __init__(self, session, volume_id, stack, autocast="auto"):
        self.session, self.volume_id, self.stack, self.autocast = session, volume_id, stack, autocast

    def predictor_for(self, k):
        import torch

        from ..runtime import autocast
        from .preprocess import pad_to_square, to_rgb

        predictor = self.session.predictor(self.volume_id)
        square, _ = pad_to_square(self.stack.gray8(k))
        # the autocast state is part of the cache key: the segmentation encoded under the same setting
        with torch.inference_mode(), autocast(predictor.device, self.autocast):
            predictor.set_image(to_rgb(square))
        return predictor


class SegmentStore:
    """The segments being refined, keyed (volume id, segment id)."""

    def __init__(self, undo_depth=10):
        self.undo_depth = undo_depth
        self._segments = {}
        self._last_results = {}         # volume id -> the last VolumeResult segmented in it
        self._lock = threading.Lock()

    def remember_result(self, volume_id, result):
        with self._lock:
            self._last_results[volume_id] = result

    def drop_volume(self, volume_id):
        with self._lock:
            self._last_results.pop(volume_id, None)
            for key in [k for k in self._segments if k[0] == volume_id]:
                del self._segments[key]

    def get(self, volume_id, segment_id):
        with self._lock:
            return self._segments.get((volume_id, segment_id))

    def starting(self, volume_id, segment_id, shape, mask=None):
        """The RefinableSegment a request starts from (not yet stored), or None for a new segment."""
        from .refine import RefinableSegment

        held = self.get(volume_id, segment_id)
        if mask is not None:
            mask = np.asarray(mask, np.uint8)
            if mask.shape != tuple(shape):
                raise MedCLIPSAMError(f"the segment's mask {mask.shape} is not on the volume's grid {tuple(shape)}")
            if held is None:
                return RefinableSegment(mask.copy(), segment_id, self.undo_depth)
            return held
        if held is not None:
            return held
        with self._lock:
            last = self._last_results.get(volume_id)
        for s in getattr(last, "segments", None) or ():
            if s.get("name") == segment_id and np.shape(s["mask"]) == tuple(shape):
                return RefinableSegment((np.asarray(s["mask"]) != 0).astype(np.uint8), segment_id, self.undo_depth)
        return None

    def store(self, volume_id, segment_id, segment):
        segment.name = segment_id
        with self._lock:
            self._segments[(volume_id, segment_id)] = segment


def refine(session, volume_id, segment_id, positive=(), negative=(), box=None, frame="RAS", axis="axial",
           propagate=True, mask=None, window=None, autocast="auto", plane_normal=None, max_distance=None):
    """One refine request on a session's volume: a refine.RefineResult (changed slices only). `window`: None,
    a window name or (level, width), as session.parse_window gives it (Session.refine parses it)."""
    from ..io.geometry import VIEW_ROWS
    from .clicks import slice_prompt
    from .refine import Refiner, SliceStack

    if session.sam_model is None:
        raise MedCLIPSAMError("this session has no SAM2 model, which refinement needs")
    if axis not in VIEW_ROWS:
        raise MedCLIPSAMError(f"unknown axis '{axis}'; choose one of axial, coronal, sagittal")
    if not segment_id:
        raise MedCLIPSAMError("a refine request needs the id of the segment it corrects")
    image = session.volume(volume_id)
    stack = SliceStack(image, axis, window)
    # every check before anything changes: the prompt, then the starting mask
    prompt = slice_prompt(image, axis, positive, negative, box, frame, plane_normal, slice_view=stack.view)
    if mask is not None and not isinstance(mask, np.ndarray):
        mask = unpack_bits(mask, stack.view.shape, "segment's mask")
    store = session.segments
    with session._run_lock:
        segment = store.starting(volume_id, segment_id, stack.view.shape, mask)
        if segment is None and prompt.box is None and len(prompt.positive) == 0:
            raise MedCLIPSAMError(f"segment '{segment_id}' is new here: a new segment needs a box or at least "
                                  "one positive point")
        refiner = Refiner(stack, SessionEncoder(session, volume_id, stack, autocast), undo_depth=store.undo_depth)
        if segment is not None and mask is not None and not np.array_equal(segment.mask, mask):
            # the client's segment differs from ours (edited meanwhile): start from the client's; an earlier
            # undo step still restores the planes it saved
            candidate = segment
            before = candidate.mask
            candidate.mask = mask.copy()
            try:
                result = refiner.refine(candidate, prompt, propagate, max_distance)
            except Exception:
                candidate.mask = before
                raise
        else:
            result = refiner.refine(segment, prompt, propagate, max_distance)
        store.store(volume_id, segment_id, result.segment)
        return result


def undo(session, volume_id, segment_id):
    """Undo the last refine step of a segment: (numpy axis, {slice: restored plane})."""
    session.volume(volume_id)                   # a forgotten volume: its sentence first
    with session._run_lock:
        segment = session.segments.get(volume_id, segment_id)
        if segment is None:
            raise MedCLIPSAMError(f"segment '{segment_id}' has not been refined on this volume; nothing to undo")
        return segment.undo()
