"""A segmentation session: models loaded once, per-volume caches reused across prompts and requests.

What is cached (one byte budget, least recently used evicted first):
- "clip":   the CLIP embeddings of a volume's slices, per slicing axis and intensity window (the gate);
- "sam2":   SAM2 image encodings, per volume and slice image (looked up by the pixels handed to
            set_image, so key slices, carried slices and a later refine click on the same slice all hit);
            stored in bf16 where half precision is used on the device;
- "result": the result of an identical request (same volume, prompts, preset, settings and options).
Text embeddings are kept per sentence ensemble for the session's life (2 KB each).

`medclipsam segment` and `segment-batch` segment through a Session too, so there is one way to segment;
the service (MedCLIPSAMLib/service) keeps one Session for its whole life.

Refinement (points / boxes on one slice) reuses the encodings: `session.predictor(volume_id)` is a SAM2
image predictor whose set_image() on a slice's padded square is a cache hit once that slice was encoded;
`session.refine()` / `session.undo()` (session_refine.py) correct segments keyed (volume id, segment id).
"""

import dataclasses
import hashlib
import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from ..errors import MedCLIPSAMError
from ..models.registry import DEFAULT_CLIP, DEFAULT_SAM2
from ..progress import null_progress
from .presets import DEFAULT_PRESET
from ..runtime import log

DEFAULT_CACHE_BYTES = 2 * 1024**3
AXES = ("axial", "coronal", "sagittal")


# -- what to segment -------------------------------------------------------------------------------
@dataclass
class SegmentRequest:
    """A segmentation request: the options of `medclipsam segment` (same names), from the CLI or JSON."""
    prompts: list
    preset: str = DEFAULT_PRESET
    overrides: list = field(default_factory=list)   # "key=value" preset settings
    sam: str = None                                 # "sam" | "none" | None (the preset's)
    no_ensemble: bool = False
    seed: int = 0
    axis: str = "axial"
    mode: str = "auto"
    window: str = None                              # a CT window name or "LEVEL,WIDTH"
    no_gate: bool = False
    gate_min_similarity: float = None
    absent_if: list = None                          # once for every prompt, or once per prompt
    absent_margin: float = 0.0
    key_slices: int = 3
    min_size_mm3: float = 10.0
    uncertainty: bool = False
    saliency: bool = False                          # keep each slice's saliency map (--saliency-output)

    def settings(self):
        from .presets import get_preset

        overrides = list(self.overrides or [])
        if self.sam:
            overrides.append(f"sam={self.sam}")
        if self.no_ensemble:
            overrides.append("ensemble=false")
        overrides.append(f"seed={int(self.seed)}")
        return get_preset(self.preset, overrides)

    def make_prompts(self, ensemble=True):
        """The prompts with their absent sentences: one absent_if for all, or one per prompt."""
        from .text import make_prompt

        if not self.prompts:
            raise MedCLIPSAMError("no prompt was given; say what to segment, e.g. 'brain tumor'")
        absent = list(self.absent_if or [])
        if len(absent) == 1:
            absent = absent * len(self.prompts)
        elif absent and len(absent) != len(self.prompts):
            raise MedCLIPSAMError(f"--absent-if was given {len(absent)} times for {len(self.prompts)} prompts: "
                                  "give it once (for every prompt) or once per --prompt")
        prompts = [make_prompt(p, ensemble, absent[i] if absent else None) for i, p in enumerate(self.prompts)]
        if len({p.text for p in prompts}) != len(prompts):
            raise MedCLIPSAMError("the same prompt was given twice")
        return prompts

    def options(self):
        from .volume import MODES, VolumeOptions

        if self.axis not in AXES:
            raise MedCLIPSAMError(f"unknown axis '{self.axis}'; choose one of {', '.join(AXES)}")
        if self.mode not in MODES:
            raise MedCLIPSAMError(f"unknown mode '{self.mode}'; choose one of {', '.join(MODES)}")
        if int(self.key_slices) < 1:
            raise MedCLIPSAMError("key_slices must be at least 1")
        return VolumeOptions(axis=self.axis, mode=self.mode, window=parse_window(self.window), gate=not self.no_gate,
                             key_slices=int(self.key_slices), min_size_mm3=float(self.min_size_mm3),
                             gate_min_similarity=self.gate_min_similarity, absent_margin=float(self.absent_margin),
                             uncertainty=bool(self.uncertainty), saliency=bool(self.saliency))

    def validate(self):
        """Every cheap check, before a job is queued or a model loads; returns (prompts, settings, options)."""
        settings = self.settings()
        return self.make_prompts(settings.ensemble), settings, self.options()


def parse_window(text):
    """None, a window name, or 'LEVEL,WIDTH' -> (level, width), checked now (a known name; finite
    numbers, a positive width) so that a bad window is refused before any work."""
    import math

    from ..imageops import window_range

    if not text:
        return None
    if "," not in str(text):
        window_range(str(text))                    # an unknown name: its sentence
        return str(text)
    try:
        level, width = (float(v) for v in str(text).split(","))
    except ValueError:
        raise MedCLIPSAMError(f"a window must be a name or LEVEL,WIDTH (two numbers), got '{text}'") from None
    if not (math.isfinite(level) and math.isfinite(width) and abs(level) <= 1e6 and 0 < width <= 1e6):
        raise MedCLIPSAMError(f"a window's level and width must be finite, the width positive (at most 1e6), "
                              f"got '{text}'")
    return (level, width)


def pick_axis(image, axis):
    """A single-slice volume (an X-ray or ultrasound frame) is sliced across its one-voxel axis."""
    from ..io import slicing_axis

    size = list(reversed(image.GetSize()))
    if 1 not in size:
        return axis
    flat = size.index(1)
    return next(view for view in AXES if slicing_axis(image, view) == flat)


# -- the byte-budgeted cache -------------------------------------------------------------------------
class ByteLRU:
    """Entries keyed (kind, volume id, ...) with their size in bytes; the least recently used go first
    when a new entry would pass the budget. An entry larger than the whole budget is not kept."""

    def __init__(self, budget):
        self.budget = int(budget)
        self.used = 0
        self._entries = OrderedDict()   # key -> (value, nbytes)
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key, value, nbytes):
        with self._lock:
            if key in self._entries:
                self.used -= self._entries.pop(key)[1]
            if nbytes > self.budget:
                return
            while self._entries and self.used + nbytes > self.budget:
                self.used -= self._entries.popitem(last=False)[1][1]
            self._entries[key] = (value, int(nbytes))
            self.used += int(nbytes)

    def drop_volume(self, volume_id):
        with self._lock:
            for key in [k for k in self._entries if k[1] == volume_id]:
                self.used -= self._entries.pop(key)[1]

    def stats(self):
        with self._lock:
            kinds = {}
            for key, (_, nbytes) in self._entries.items():
                k = kinds.setdefault(key[0], {"entries": 0, "bytes": 0})
                k["entries"] += 1
                k["bytes"] += nbytes
            return {"budget_bytes": self.budget, "used_bytes": self.used, "entries": len(self._entries),
                    "hits": self.hits, "misses": self.misses, "by_kind": kinds}


def _tensor_bytes(t):
    return t.numel() * t.element_size()


# -- SAM2 encodings ----------------------------------------------------------------------------------
class CachedPredictor:
    """A SAM2ImagePredictor whose set_image() first looks the image up in the session's cache.

    Fresh encodings are stored (in `storage_dtype` when given) and then restored from the stored copy, so a
    hit and a miss hand the decoder exactly the same numbers: results do not depend on the cache's state."""

    def __init__(self, predictor, cache, storage_dtype=None):
        self._predictor = predictor
        self._cache = cache
        self._storage_dtype = storage_dtype
        self.volume_id = None           # the volume whose slices are being encoded (set by the session)

    def __getattr__(self, name):        # predict(), model, ... of the wrapped predictor
        return getattr(self._predictor, name)

    def set_image(self, image):
        import numpy as np
        import torch

        image = np.ascontiguousarray(image)
        digest = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest()
        from ..models.cpu_runtime import encoder_runtime

        key = ("sam2", self.volume_id, digest, image.shape, torch.is_autocast_enabled(self._predictor.device.type),
               encoder_runtime(self._predictor.model))   # OpenVINO's features are not PyTorch's to the bit
        entry = self._cache.get(key)
        if entry is None:
            self._predictor.set_image(image)
            feats = self._predictor._features
            tensors = [feats["image_embed"], *feats["high_res_feats"]]
            dtypes = [t.dtype for t in tensors]
            stored = [t.to(self._storage_dtype) if self._storage_dtype else t for t in tensors]
            entry = (stored, dtypes, self._predictor._orig_hw[0])
            self._cache.put(key, entry, sum(_tensor_bytes(t) for t in stored))
        stored, dtypes, hw = entry
        tensors = [t.to(d) for t, d in zip(stored, dtypes)]
        p = self._predictor
        p.reset_predictor()
        p._features = {"image_embed": tensors[0], "high_res_feats": tensors[1:]}
        p._orig_hw = [hw]
        p._is_image_set = True


# -- the per-volume handle the volume driver sees ---------------------------------------------------------
class VolumeCache:
    """What VolumeSegmenter reuses for one volume: the session's text embeddings and SAM2 predictor, and
    the slice embeddings stored under this volume."""

    def __init__(self, session, volume_id):
        self.session, self.volume_id = session, volume_id
        self.text = session.text
        self.predictor = session.predictor(volume_id) if session.sam_model is not None else None

    def slice_embeddings(self, key, compute):
        full = ("clip", self.volume_id, key)
        value = self.session.cache.get(full)
        if value is None:
            value = compute()
            self.session.cache.put(full, value, value[0].nbytes + _tensor_bytes(value[1]))
        return value


# -- the session -------------------------------------------------------------------------------------
class Session:
    """Models loaded once; volumes registered by id; segment() reuses everything it can.

    One segmentation runs at a time (a lock): the models are shared and SAM2's predictor holds state."""

    def __init__(self, clip=DEFAULT_CLIP, sam=DEFAULT_SAM2, device="auto", cache_bytes=DEFAULT_CACHE_BYTES,
                 video=None, max_volumes=8, progress=None):
        from ..models import load_clip, load_sam2
        from ..runtime import half_precision_helps, select_device
        from .text import TextEmbeddings
        from .volume import resolve_mode

        progress = progress or null_progress()
        self.device = select_device(device) if isinstance(device, str) else device
        self.clip_name, self.sam_name = str(clip), (str(sam) if sam else None)
        progress.stage("load", 2, "loading models")
        self.clip = load_clip(clip, self.device)
        progress.advance(1)
        if video is None:   # the video predictor is the SAM2 model too; load it where propagate is the default
            video = resolve_mode("auto", self.device) == "propagate"
        self.sam_model = load_sam2(sam, self.device, video=video) if sam else None
        progress.advance(1)
        self.random = self.clip.is_random or bool(getattr(self.sam_model, "medclipsam_is_random", False))
        self.text = TextEmbeddings(self.clip)
        self.cache = ByteLRU(cache_bytes)
        self.max_volumes = int(max_volumes)
        self._storage_dtype = None
        if half_precision_helps(self.device):
            import torch

            self._storage_dtype = torch.bfloat16
        self._predictor = None
        self._volumes = OrderedDict()        # id -> SimpleITK image, least recently used first
        self._volumes_lock = threading.Lock()
        self._run_lock = threading.Lock()
        from .session_refine import SegmentStore

        self.segments = SegmentStore()       # segments being refined, keyed (volume id, segment id)

    # -- volumes ---------------------------------------------------------------------------------
    def add_volume(self, image):
        """Register a 3D SimpleITK image; returns its id. Past max_volumes the least recently used one is
        forgotten (with its cache entries)."""
        if image.GetDimension() != 3:
            raise MedCLIPSAMError(f"expected a 3D volume, got a {image.GetDimension()}D image")
        volume_id = uuid.uuid4().hex[:16]
        with self._volumes_lock:
            self._volumes[volume_id] = image
            old = list(self._volumes)[: max(0, len(self._volumes) - self.max_volumes)]
        for v in old:
            log.info("forgetting volume %s (more than %d volumes held)", v, self.max_volumes)
            self.forget(v)
        return volume_id

    def volume(self, volume_id):
        with self._volumes_lock:
            if volume_id not in self._volumes:
                raise MedCLIPSAMError(f"unknown volume '{volume_id}': it was never uploaded or was forgotten")
            self._volumes.move_to_end(volume_id)
            return self._volumes[volume_id]

    def forget(self, volume_id):
        """Drop a volume and everything cached for it; True if it was held."""
        with self._volumes_lock:
            held = self._volumes.pop(volume_id, None) is not None
        self.cache.drop_volume(volume_id)
        self.segments.drop_volume(volume_id)
        return held

    def volume_ids(self):
        with self._volumes_lock:
            return list(self._volumes)

    # -- models ----------------------------------------------------------------------------------
    def predictor(self, volume_id):
        """The SAM2 image predictor whose encodings are cached under `volume_id` (refinement uses it too)."""
        if self._predictor is None:
            from ..models.sam import image_predictor

            self._predictor = CachedPredictor(image_predictor(self.sam_model), self.cache, self._storage_dtype)
        self._predictor.volume_id = volume_id
        return self._predictor

    # -- segmentation ----------------------------------------------------------------------------
    def segment(self, volume_id, prompts, settings, options, progress=None):
        """Segment the prompts in a registered volume: a VolumeResult (shared with the result cache: do not
        modify it). `prompts` are Prompt objects or text; settings a PipelineSettings; options VolumeOptions."""
        from ..runtime import seed_everything
        from .text import make_prompt
        from .volume import VolumeSegmenter

        progress = progress or null_progress()
        image = self.volume(volume_id)
        prompts = [make_prompt(p, settings.ensemble) if isinstance(p, str) else p for p in prompts]
        options = dataclasses.replace(options, axis=pick_axis(image, options.axis))
        if settings.sam == "sam" and self.sam_model is None:
            raise MedCLIPSAMError("this session has no SAM2 model; use sam='none'")
        key = ("result", volume_id, _fingerprint(prompts, settings, options))
        with self._run_lock:
            cached = self.cache.get(key)
            if cached is not None:
                self.segments.remember_result(volume_id, cached)
                return cached
            seed_everything(settings.seed)
            cache = VolumeCache(self, volume_id)
            segmenter = VolumeSegmenter(self.clip, self.sam_model, settings, options, progress, cache=cache)
            result = segmenter(image, prompts)
            nbytes = sum(s["mask"].nbytes for s in result.segments)
            nbytes += result.uncertainty.nbytes if result.uncertainty is not None else 0
            nbytes += sum(m.nbytes for m in result.saliency or ())
            self.cache.put(key, result, nbytes)
            self.segments.remember_result(volume_id, result)
            return result

    def encode_ahead(self, volume_id, settings, options, near, should_stop):
        """Idle time: SAM2-encode the slices of a volume that no prompt has carried yet, nearest to slice
        `near` first, the way the carry encodes them (the axis and window of `options`), so that the next
        prompt's carry and a click on any slice find their encodings cached. One slice per hold of the run
        lock: a segmentation or a click waits at most one encoding. Stops when should_stop() says so, or
        before the cache would have to evict anything to make room. Returns the number of slices encoded."""
        import time

        from .volume import VolumeSegmenter

        if settings.sam != "sam" or self.sam_model is None:
            return 0
        image = self.volume(volume_id)
        options = dataclasses.replace(options, axis=pick_axis(image, options.axis))
        start, encoded, entry_bytes = time.perf_counter(), 0, 0
        with self._run_lock:
            segmenter = VolumeSegmenter(self.clip, self.sam_model, settings, options, cache=VolumeCache(self, volume_id))
            if segmenter.mode != "carry":   # the video predictor encodes its own frames
                return 0
            segmenter._prepare(image)
        for k in sorted(range(segmenter.view.count), key=lambda k: (abs(k - near), k)):
            if should_stop() or self.cache.used + entry_bytes > self.cache.budget:
                break
            with self._run_lock:
                if volume_id not in self.volume_ids():   # forgotten meanwhile
                    break
                before = (self.cache.used, self.cache.misses)
                self.predictor(volume_id)                 # a click on another volume may have moved it
                if segmenter.encode_slice(k) and self.cache.misses > before[1]:
                    encoded += 1
                    entry_bytes = max(entry_bytes, self.cache.used - before[0])
        if encoded:
            log.info("encoded %d more slices of volume %s for SAM2 ahead of the next request (%.1f s)",
                     encoded, volume_id, time.perf_counter() - start)
        return encoded

    # -- refinement (session_refine.py) ----------------------------------------------------------
    def refine(self, volume_id, segment_id, **request):
        """Clicks / a box on one slice of a segment -> refine.RefineResult (changed slices only); see
        session_refine.refine for the request's fields."""
        from .session_refine import refine

        if isinstance(request.get("window"), str):
            request["window"] = parse_window(request["window"])
        return refine(self, volume_id, segment_id, **request)

    def undo(self, volume_id, segment_id):
        """Undo a segment's last refine step: (numpy axis, {slice: restored plane})."""
        from .session_refine import undo

        return undo(self, volume_id, segment_id)

    def info(self):
        return {"device": str(self.device), "clip": self.clip_name, "sam": self.sam_name, "random": self.random,
                "volumes": len(self.volume_ids()), "cache": self.cache.stats(),
                "sam2_storage": str(self._storage_dtype or "as computed").replace("torch.", "")}


def _fingerprint(prompts, settings, options):
    """A stable text of everything that decides a result."""
    data = {"prompts": [dataclasses.asdict(p) for p in prompts], "settings": dataclasses.asdict(settings),
            "options": dataclasses.asdict(options)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
