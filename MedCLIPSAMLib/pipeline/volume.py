"""The 3D driver: a volume and text prompts in, one mask per prompt out, on the input's exact grid.

For each prompt:
 1. slices are taken along the patient axis asked for (slices.py), one intensity window for the volume;
 2. presence gate: every slice is embedded once (batched CLIP image encoder, shared by all prompts) and
    scored against the prompt; only slices that can hold the target go on. When the prompt carries
    "absent" sentences (what a slice without the target looks like, e.g. "a normal brain MRI"), the target
    counts as absent, and its segment stays empty, unless on some slice one of the prompt's sentences is
    closer than every absent sentence (CLIP zero-shot classification between the two sets);
 3. depending on the mode:
    - "per-slice" (the papers): every kept slice gets saliency + post-processing + SAM2;
    - "propagate": a few key slices get the full 2D pipeline, then SAM2's video predictor carries their
      masks up and down the kept range from in-memory frames;
    - "carry": the same key slices, then each next slice gets SAM2's image predictor with the box of its
      neighbour's mask (cheaper than the video predictor on a CPU);
 4. 3D clean-up: holes filled per slice, specks below a size in mm^3 removed, and only the connected
    components that meet a key slice's mask kept.
"""

from dataclasses import dataclass, field

import numpy as np

from ..errors import MedCLIPSAMError
from ..postprocess import bounding_box
from ..postprocess.components import fill_holes, keep_top_components, remove_small_components
from ..progress import null_progress
from ..runtime import autocast, log
from .image import ImageSegmenter, clip_input
from .preprocess import intensity_range, normalize_to_uint8, pad_to_square, to_rgb, unpad
from .sam_refine import predict_mask
from .slices import SliceView
from .presence import absent_reason, presence_lead, winning_absent
from .text import make_prompt

MODES = ("auto", "per-slice", "propagate", "carry")


@dataclass
class VolumeOptions:
    axis: str = "axial"
    mode: str = "auto"                 # auto: propagate on a GPU, carry on a CPU (see benchmarks/)
    window: object = None              # CT window name or (level, width); None: chosen from the data
    gate: bool = True                  # run the expensive stages only on slices that can hold the target
    gate_threshold: float = 0.5        # on the slice scores rescaled to [0, 1] within the volume
    gate_margin: int = 1               # slices added on each side of the kept range
    gate_min_similarity: float = None  # absolute slice-prompt cosine below which a slice cannot hold the
                                       # target (lets an absent target give an empty segment; needs a
                                       # value calibrated on the real model, so off by default)
    absent_margin: float = 0.0         # presence test (prompts with absent sentences): by how much the
                                       # prompt's best sentence must beat the best absent sentence
    key_slices: int = 3                # slices that get the full 2D pipeline in propagate / carry modes
    min_size_mm3: float = 10.0         # 3D specks smaller than this are dropped
    box_margin: int = 3                # pixels added around a carried box
    batch_size: int = 16               # slices per CLIP image-encoder batch
    uncertainty: bool = False
    saliency: bool = False             # keep each prompt's saliency maps as a volume (VolumeResult.saliency)


@dataclass
class VolumeResult:
    segments: list                                  # [{"name", "mask" (z,y,x uint8), "color", "terminology"}]
    uncertainty: np.ndarray = None                  # float32 (z,y,x) or None
    report: list = field(default_factory=list)      # per prompt: the numbers the driver used and its decision
    saliency: list = None                           # per prompt: float32 (z,y,x) in [0, 1], 0 on slices
                                                    # without a map (options.saliency), else None
    runtime: dict = None                            # runtime.runtime_summary(): threads, wait policy, precision


def resolve_mode(mode, device):
    if mode not in MODES:
        raise MedCLIPSAMError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    return "propagate" if str(device).startswith("cuda") else "carry"


class VolumeSegmenter:
    def __init__(self, clip, sam_model, settings, options=None, progress=None, cache=None):
        """cache: a session's VolumeCache (pipeline/session.py) whose text embeddings, SAM2 predictor and
        slice embeddings are reused; None computes everything here."""
        self.clip = clip
        self.sam_model = sam_model
        self.settings = settings
        self.options = options or VolumeOptions()
        self.progress = progress or null_progress()
        self.cache = cache
        self.segmenter = ImageSegmenter(clip, sam_model, settings, text=cache and cache.text,
                                        predictor=cache and cache.predictor)
        self.mode = resolve_mode(self.options.mode, clip.device)
        if settings.sam == "none":
            self.mode = "per-slice"  # without SAM there is nothing to propagate with
        if self.mode == "propagate" and not hasattr(sam_model, "propagate_in_video"):
            raise MedCLIPSAMError("propagate mode needs SAM2 loaded as a video predictor (load_sam2(..., video=True))")

    # -- shared per-volume work -----------------------------------------------------------------------
    def _prepare(self, image):
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise MedCLIPSAMError(f"expected a 3D volume, got a {image.GetDimension()}D image")
        self.image = image
        self.volume = sitk.GetArrayViewFromImage(image)   # a view: no copy of the voxels
        self.view = SliceView(image, self.options.axis)
        sample = self.volume[tuple(slice(None, None, max(1, n // 64)) for n in self.volume.shape)]
        if np.issubdtype(self.volume.dtype, np.floating) and not np.isfinite(self.volume).all():
            raise MedCLIPSAMError("the volume contains NaN or infinite voxels")
        self.value_range = intensity_range(sample, window=self.options.window)
        if self.value_range is None:  # uint8 volume: keep its values
            self.value_range = (0.0, 255.0)
        self._slice_embeddings = None

    def gray8(self, k):
        return normalize_to_uint8(self.view.get(self.volume, k), value_range=self.value_range)

    def slice_embeddings(self):
        """(indices of non-empty slices, their L2-normalised CLIP image embeddings): one batched pass."""
        if self._slice_embeddings is None:
            key = (self.options.axis, self.value_range, self.options.batch_size, self.settings.autocast)
            compute = self._embed_slices
            self._slice_embeddings = self.cache.slice_embeddings(key, compute) if self.cache else compute()
        return self._slice_embeddings

    def _embed_slices(self):
        import torch

        n, bs = self.view.count, self.options.batch_size
        self.progress.stage("gate", n, "scoring slices against the prompts")
        indices, features = [], []
        for start in range(0, n, bs):
            batch, ids = [], []
            for k in range(start, min(n, start + bs)):
                g = self.gray8(k)
                if g.max() == g.min():  # blank slice (air, padding): cannot hold anything
                    continue
                batch.append(clip_input(self.clip, g))
                ids.append(k)
            if batch:
                with torch.no_grad(), autocast(self.clip.device, self.settings.autocast):
                    features.append(self.clip.encode_image(torch.stack(batch)).cpu())
                indices += ids
            self.progress.advance(min(bs, n - start))
        feats = torch.cat(features) if features else torch.zeros((0, 1))
        return np.array(indices, dtype=int), feats

    # -- one prompt -------------------------------------------------------------------------------
    def gate(self, text_embedding, prompt):
        """(kept slice indices, scores of all candidate slices, candidate indices, reason, lead over the
        absent sentences per candidate or None, the absent sentence that won or None)."""
        indices, feats = self.slice_embeddings()
        if len(indices) == 0:
            return indices, np.zeros(0), indices, "the volume has no non-blank slice", None, None
        scores = self._cosines(feats, text_embedding)
        lead = self.presence_lead(feats, prompt) if prompt.absent else None
        if lead is not None and float(lead.max()) <= self.options.absent_margin:
            reason = absent_reason(feats, prompt, self.segmenter.text, lead, self.options.absent_margin)
            winner = winning_absent(feats, prompt, self.segmenter.text, lead)
            return indices[:0], scores, indices, reason, lead, winner
        if not self.options.gate or len(indices) == 1:
            return indices, scores, indices, "gating off" if not self.options.gate else "single slice", lead, None
        floor = self.options.gate_min_similarity
        if floor is not None and float(scores.max()) < floor:
            return indices[:0], scores, indices, f"no slice reaches the minimum similarity {floor:.3f}", lead, None
        lo, hi = float(scores.min()), float(scores.max())
        if hi - lo < 1e-6:
            return indices, scores, indices, "all slices score the same", lead, None
        keep = (scores - lo) / (hi - lo) >= self.options.gate_threshold
        if floor is not None:
            keep &= scores >= floor
        kept = self._with_neighbours(indices[keep]) & set(indices.tolist())
        reason = (f"slice-prompt similarity at least {self.options.gate_threshold:.2f} of the volume's range "
                  f"(+{self.options.gate_margin} neighbours)")
        if lead is not None:  # and near a slice that matches the prompt better than its absent sentences
            kept &= self._with_neighbours(indices[lead > self.options.absent_margin])
            reason += ", near a slice that matches the prompt better than its absent sentences"
        return np.array(sorted(kept), dtype=int), scores, indices, reason, lead, None

    def _with_neighbours(self, ks):
        """The slices and gate_margin neighbours on each side (the target's edges score lower than its
        middle)."""
        out = set()
        for k in ks.tolist():
            out.update(range(k - self.options.gate_margin, k + self.options.gate_margin + 1))
        return out

    @staticmethod
    def _cosines(feats, text_embedding):
        return (feats.float() @ text_embedding.float().cpu()).numpy()

    def presence_lead(self, feats, prompt):
        """Per slice: the prompt's lead over its absent sentences (presence.py)."""
        return presence_lead(feats, prompt, self.segmenter.text)

    def segment_prompt(self, prompt, labels, uncertainty):
        """Fill `labels` (z,y,x uint8) for one prompt; returns a report dict with the numbers used: the
        scored slices and their similarity and lead, the slices kept, the key slices, the slices that got a
        saliency map (their maps in self.saliency_maps), and the decision."""
        # a stage of its own: the per-stage progress shows what the text tower costs (or the disk cache saves)
        self.progress.stage("text", 1, f"embedding the sentences of '{prompt.text}'")
        emb = self.segmenter.text(prompt)
        if prompt.absent:
            self.segmenter.text.sentences(prompt.sentences + prompt.absent)  # the presence test's, in one batch
        self.progress.advance(1)
        kept, scores, candidates, reason, lead, winner = self.gate(emb, prompt)
        self.saliency_maps = {}
        report = {"prompt": prompt.text, "sentences": list(prompt.sentences), "absent": list(prompt.absent),
                  "axis": self.view.view, "slices": self.view.count, "scored": candidates.tolist(),
                  "similarity": [float(v) for v in scores],
                  "lead": None if lead is None else [float(v) for v in lead],
                  "kept": int(len(kept)), "kept_slices": kept.tolist(), "key_slices": [], "saliency_slices": [],
                  "reason": reason, "absent_winner": winner, "mode": self.mode}
        log.info("'%s': %d of %d slices kept (%s); mode %s", prompt.text, len(kept), self.view.count, reason, self.mode)
        if len(kept) == 0:
            return self._decide(report, labels)
        order = np.argsort(-scores)
        kept_set = set(kept.tolist())
        ranked = [int(candidates[i]) for i in order if candidates[i] in kept_set]
        if self.mode == "per-slice":
            found = set(self._per_slice(prompt, kept, labels, uncertainty))
            # the clean-up keeps components that meet the best-scoring slices' masks, not every mask found
            keys = [k for k in ranked if k in found][: max(1, self.options.key_slices)]
        else:
            keys = self._key_slices(prompt, ranked, labels, uncertainty)
            if keys:
                lo, hi = int(kept.min()), int(kept.max())
                if self.mode == "propagate":
                    self._propagate(keys, lo, hi, labels, uncertainty)
                else:
                    self._carry(keys, lo, hi, labels, uncertainty)
        report["key_slices"] = sorted(int(k) for k in keys)
        report["saliency_slices"] = sorted(self.saliency_maps)
        self._cleanup(labels, keys)
        return self._decide(report, labels)

    def _decide(self, report, labels):
        """The outcome: voxels, volume, slices with mask, and found / not found with the reason why."""
        voxels = int(np.count_nonzero(labels))
        other = tuple(a for a in range(3) if a != self.view.axis)
        report["voxels"] = voxels
        report["volume_ml"] = voxels * float(np.prod(self.image.GetSpacing())) / 1000.0
        report["mask_slices"] = np.flatnonzero(np.any(labels, axis=other)).tolist() if voxels else []
        report["found"] = voxels > 0
        if voxels or not report["kept"]:
            report["why"] = report["reason"]  # found: how the slices were chosen; not found: why none was kept
        elif not report["key_slices"]:
            report["why"] = f"the saliency and SAM gave no mask on the {len(report['saliency_slices'])} slices tried"
        else:
            report["why"] = (f"the 3D clean-up removed every component (each under {self.options.min_size_mm3:g} "
                             "mm^3 or not meeting a key slice's mask)")
        return report

    def _keep_saliency(self, k, result):
        """Remember the map a slice got (only the slice numbers when the maps are not asked for)."""
        self.saliency_maps[int(k)] = result.saliency if self.options.saliency else None

    def _store(self, k, result_mask, probability, labels, uncertainty):
        self.view.put(labels, k, result_mask.astype(np.uint8))
        if uncertainty is not None and probability is not None:
            p = np.clip(probability, 1e-6, 1 - 1e-6)
            self.view.put(uncertainty, k, (-(p * np.log2(p) + (1 - p) * np.log2(1 - p))).astype(np.float32))

    def _per_slice(self, prompt, kept, labels, uncertainty):
        self.progress.stage("segment", len(kept), f"segmenting '{prompt.text}' slice by slice")
        keys = []
        for k in kept:
            result = self.segmenter(self.gray8(int(k)), prompt)
            self._keep_saliency(k, result)
            prob = result.probability if result.probability is not None else result.saliency
            self._store(int(k), result.mask, prob, labels, uncertainty)
            if result.mask.any():
                keys.append(int(k))
            self.progress.advance(1, f"slice {int(k)}")
        return keys

    def _key_slices(self, prompt, ranked, labels, uncertainty):
        """The full 2D pipeline on the best-scoring slices; returns {slice: mask} of those with a mask."""
        wanted = ranked[: max(1, self.options.key_slices)]
        self.progress.stage("key-slices", len(wanted), f"saliency + SAM on key slices for '{prompt.text}'")
        grays = [self.gray8(k) for k in wanted]
        # one batched saliency call for all key slices (M2IB fits them together), then the rest per slice
        maps = self.segmenter.saliency_maps(grays, self.segmenter.text(prompt))
        keys = {}
        for k, gray8, saliency in zip(wanted, grays, maps):
            result = self.segmenter.segment_from_saliency(gray8, prompt, saliency)
            self._keep_saliency(k, result)
            if result.mask.any():
                keys[k] = result.mask
                self._store(k, result.mask, result.probability, labels, uncertainty)
            self.progress.advance(1, f"slice {k}")
        return keys

    def _carry(self, keys, lo, hi, labels, uncertainty):
        """From each key slice outwards: SAM2 image predictor on the next slice, prompted with the box of
        the previous slice's mask; stops where the mask vanishes or at the end of the kept range."""
        import torch

        predictor = self.segmenter.predictor
        s = self.settings
        todo = {k for k in range(lo, hi + 1)} - set(keys)
        self.progress.stage("propagate", len(todo), "carrying masks through the stack")
        for start in sorted(keys, key=lambda k: -keys[k].sum()):
            for step in (1, -1):
                prev, k = keys[start], start + step
                while lo <= k <= hi and k in todo:
                    box = bounding_box(prev)
                    m = self.options.box_margin
                    with torch.inference_mode(), autocast(self.clip.device, s.autocast):
                        pad = self._set_sam_image(self.gray8(k))
                        box = np.array([box[0] - m + pad.left, box[1] - m + pad.top, box[2] + m + pad.left,
                                        box[3] + m + pad.top], np.float32)
                        mask, prob = predict_mask(predictor, {"boxes": box[None], "points": None, "labels": None},
                                                  s.mask_threshold, s.keep_largest)
                    mask, prob = unpad(mask, pad), unpad(prob, pad)
                    todo.discard(k)
                    self.progress.advance(1, f"slice {k}")
                    if not mask.any():
                        break
                    self._store(k, mask, prob, labels, uncertainty)
                    prev, k = mask, k + step

    def encode_slice(self, k):
        """SAM2-encode slice k exactly as the carry hands it to set_image (same window, padding and
        precision), so that with a session's cached predictor a later carry or click on it is a cache hit.
        False for a blank slice (nothing to encode). Needs _prepare(image) first."""
        import torch

        g = self.gray8(k)
        if g.max() == g.min():
            return False
        with torch.inference_mode(), autocast(self.clip.device, self.settings.autocast):
            self._set_sam_image(g)
        return True

    def _set_sam_image(self, gray8):
        """Give a slice to SAM2's image predictor as a padded RGB square; returns the padding. The carry and
        encode_slice both come here (inside inference mode and the settings' autocast): an encoding made
        ahead has the key the carry looks up."""
        square, pad = pad_to_square(gray8)
        self.segmenter.predictor.set_image(to_rgb(square))
        return pad

    def _propagate(self, keys, lo, hi, labels, uncertainty):
        """SAM2 video predictor over slices lo..hi, conditioned on the key slices' masks."""
        from .video import propagate_masks

        frames = [k for k in range(lo, hi + 1)]
        self.progress.stage("propagate", len(frames), "SAM2 video propagation through the stack")
        with autocast(self.clip.device, self.settings.autocast):
            results = list(propagate_masks(self.sam_model, self, frames, keys, self.settings.mask_threshold,
                                           progress=self.progress))
        for k, mask, prob in results:
            if k not in keys:
                self._store(k, mask, prob, labels, uncertainty)

    def _cleanup(self, labels, keys):
        spacing = tuple(reversed(self.image.GetSpacing()))
        labels[...] = clean_volume_mask(labels, self.view.axis, spacing, self.options.min_size_mm3, keys,
                                        self.settings.keep_largest)

    # -- all prompts ------------------------------------------------------------------------------
    def __call__(self, image, prompts):
        from ..models.cpu_runtime import accelerate_sam_encoder
        from ..runtime import runtime_line, runtime_summary

        self._prepare(image)
        runtime = runtime_summary(self.clip.device, self.settings.autocast)
        if self.settings.sam != "none" and getattr(self.sam_model, "image_encoder", None) is not None:
            runtime["cpu_runtime"] = accelerate_sam_encoder(self.sam_model, self.clip.device,
                                                            self.settings.cpu_runtime, runtime["precision"]["sam"])
        log.info(runtime_line(runtime))
        prompts = [make_prompt(p, self.settings.ensemble) if isinstance(p, str) else p for p in prompts]
        names = [p.text for p in prompts]
        if len(set(names)) != len(names):
            raise MedCLIPSAMError("the same prompt was given twice")
        shape = self.volume.shape
        uncertainty = np.zeros(shape, np.float32) if self.options.uncertainty else None
        segments, reports, saliency = [], [], [] if self.options.saliency else None
        for prompt in prompts:
            labels = np.zeros(shape, np.uint8)
            per_prompt_unc = np.zeros(shape, np.float32) if uncertainty is not None else None
            report = self.segment_prompt(prompt, labels, per_prompt_unc)
            report["mean_uncertainty"] = None
            if uncertainty is not None:
                if report["voxels"]:
                    report["mean_uncertainty"] = float(per_prompt_unc[labels > 0].mean())
                np.maximum(uncertainty, per_prompt_unc, out=uncertainty)
            if saliency is not None:
                volume = np.zeros(shape, np.float32)
                for k, plane in self.saliency_maps.items():
                    self.view.put(volume, k, plane)  # back onto the slice's own voxels
                saliency.append(volume)
            reports.append(report)
            segments.append({"name": prompt.text, "mask": labels, "color": prompt.color,
                             "terminology": prompt.terminology})
        return VolumeResult(segments, uncertainty, reports, saliency, runtime)


def clean_volume_mask(mask, axis, spacing, min_size_mm3, keys=(), keep_largest=0, crop=True):
    """A prompt's 3D mask (z,y,x) cleaned: holes filled slice by slice along `axis`, components under
    min_size_mm3 dropped, then the components that meet a key slice's mask kept (the prompt's own evidence;
    `keys` are slice indices along `axis`), or without keys the `keep_largest` largest. Returns bool.

    crop: work on the mask's bounding box plus one voxel, with the same result (every component lies
    inside, and background on the box's edge reaches the border either way). On the whole of a 512x512x300
    volume the int32 component labels (315 MB each) and bool copies took 1 GB."""
    from scipy import ndimage

    out = np.zeros(mask.shape, bool)
    box = []
    for axis_ in range(mask.ndim):  # projections: no volume-sized temporary
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis_)))
        if hit.size == 0:
            return out
        box.append(slice(max(0, hit[0] - 1), min(mask.shape[axis_], hit[-1] + 2)) if crop else slice(None))
    box = tuple(box)
    sub = fill_holes(mask[box] > 0, axis=axis)
    sub = remove_small_components(sub, min_size_mm3, spacing)
    if len(keys):
        components, n = ndimage.label(sub)
        support = np.zeros(n + 1, bool)
        start, stop, _ = box[axis].indices(mask.shape[axis])  # key slice k is slice k - start of the box
        for k in keys:
            if start <= k < stop:
                support[np.unique(np.take(components, k - start, axis=axis))] = True
        support[0] = False
        if support.any():
            sub = support[components]
    elif keep_largest:
        sub = keep_top_components(sub, keep_largest)
    out[box] = sub
    return out
