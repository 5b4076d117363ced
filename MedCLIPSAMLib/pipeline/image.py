"""One 2D image (or one slice of a volume) from a text prompt: the zero-shot MedCLIP-SAM pipeline.

gray image -> uint8 -> pad to square -> CLIP input -> saliency (224x224) -> back onto the image's pixels
-> zero outside the body (body_only) -> post-process (CRF / KMeans, components) -> coarse mask -> SAM2
prompts -> SAM2 on the padded square -> back onto the image's pixels.
"""

from dataclasses import dataclass, field

import numpy as np

from ..errors import MedCLIPSAMError
from ..postprocess import postprocess
from ..postprocess.body import body_mask
from ..runtime import autocast
from .preprocess import normalize_to_uint8, pad_to_square, to_rgb, unpad
from .presence import absent_reason, presence_lead
from .presets import DEFAULT_PRESET, PipelineSettings
from .sam_refine import make_prompts, predict_mask, shift_prompts
from .text import TextEmbeddings, make_prompt


@dataclass
class ImageResult:
    mask: np.ndarray            # final bool mask, HxW
    saliency: np.ndarray        # float map in [0, 1], HxW
    coarse_mask: np.ndarray     # post-processed saliency mask, HxW
    prompts: dict               # SAM prompts in the image's pixel coordinates (boxes / points / labels)
    sentences: tuple = field(default_factory=tuple)
    probability: np.ndarray = None  # SAM's mask probability, HxW (None when SAM did not run)
    absent: str = None              # why the target counted as absent (then everything is empty)


def clip_input(clip, gray8):
    """The CLIP image-encoder input [3,H,W] of a uint8 image (padded to square, as everywhere)."""
    return clip.preprocess_array(to_rgb(pad_to_square(gray8)[0]))


def to_gray(image):
    """HxW or HxWx3/4 array -> HxW (luminance for colour images)."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] in (3, 4):
        a = a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if a.ndim != 2:
        raise MedCLIPSAMError(f"expected a 2D image (grayscale or RGB), got an array of shape {np.asarray(image).shape}")
    return a


class ImageSegmenter:
    """Holds the models and the text-embedding cache; call it on images (or slices) with a prompt."""

    def __init__(self, clip, sam_model=None, settings=None, text=None, predictor=None):
        """text, predictor: a session's shared TextEmbeddings and (caching) SAM2 image predictor."""
        self.clip = clip
        self.settings = settings or PipelineSettings()
        self.text = text or TextEmbeddings(clip)
        self._predictor = predictor
        self.sam_model = sam_model
        if self.settings.sam == "sam" and sam_model is None:
            raise MedCLIPSAMError("the SAM stage needs a SAM2 model; pass one or use sam='none'")

    @property
    def predictor(self):
        if self._predictor is None:
            from ..models.sam import image_predictor

            self._predictor = image_predictor(self.sam_model)
        return self._predictor

    def saliency_map(self, gray_uint8, text_embedding):
        """Saliency of the text on the image, on the image's own pixels (HxW, [0, 1])."""
        return self.saliency_maps([gray_uint8], text_embedding)[0]

    def saliency_maps(self, grays8, text_embedding):
        """Saliency of the text on several uint8 images (e.g. a volume's key slices), each on its own pixels.
        The methods in saliency.BATCHED_METHODS (M2IB: its Adam steps then run once for all images) get one
        batched call, equal to image by image up to float rounding; the others run image by image."""
        import torch

        from .. import saliency

        s = self.settings
        padded = [pad_to_square(g) for g in grays8]
        inputs = [self.clip.preprocess_array(to_rgb(square)) for square, _ in padded]
        kw = dict(autocast=s.autocast, **s.saliency_settings)
        if len(inputs) > 1 and s.saliency in saliency.BATCHED_METHODS:
            maps = saliency.compute_saliency_batch(s.saliency, self.clip, torch.stack(inputs), text_embedding, **kw)
        else:
            maps = [saliency.compute_saliency(s.saliency, self.clip, x, text_embedding, **kw) for x in inputs]
        return [np.clip(unpad(np.asarray(m, np.float32), pad), 0.0, 1.0) for m, (_, pad) in zip(maps, padded)]

    def __call__(self, image, prompt, value_range=None, absent_margin=None):
        """Segment `prompt` (text or a Prompt) in a 2D image. value_range fixes the intensity window
        (one window for all slices of a volume); otherwise it is chosen from the image. With absent_margin
        set and a prompt that has absent sentences, an image that matches one of them better (presence.py)
        gives an empty result (the volume driver decides presence itself, over all slices)."""
        s = self.settings
        prompt = make_prompt(prompt, s.ensemble) if isinstance(prompt, str) or prompt is None else prompt
        gray = to_gray(image)
        if not np.isfinite(gray).all():
            raise MedCLIPSAMError("the image contains NaN or infinite values")
        gray8 = gray if gray.dtype == np.uint8 and value_range is None else normalize_to_uint8(gray, value_range=value_range)
        if absent_margin is not None and prompt.absent:
            reason = self.absent_reason(gray8, prompt, absent_margin)
            if reason:
                empty = np.zeros(gray8.shape, bool)
                return ImageResult(empty, np.zeros(gray8.shape, np.float32), empty,
                                   {"boxes": None, "points": None, "labels": None}, prompt.sentences, absent=reason)
        return self.segment_from_saliency(gray8, prompt, self.saliency_map(gray8, self.text(prompt)))

    def segment_from_saliency(self, gray8, prompt, saliency):
        """The rest of the pipeline once a uint8 image (a Prompt's) has its saliency map: body mask,
        post-processing, prompts, SAM2."""
        s = self.settings
        region = None
        if s.body_only:
            region = body_mask(gray8)
            saliency = np.where(region, saliency, 0.0).astype(np.float32)
        coarse = postprocess(saliency, gray8, method=s.postprocess, top_n=s.top_n, fill_holes=s.fill_holes,
                             region=region, **s.postprocess_settings)
        prompts = make_prompts(coarse, s, saliency)
        if s.sam == "none":
            return ImageResult(coarse, saliency, coarse, prompts, prompt.sentences)
        mask, probability = self.refine(gray8, prompts)
        if mask is None:
            mask = np.zeros_like(coarse)
        return ImageResult(mask, saliency, coarse, prompts, prompt.sentences, probability)

    def absent_reason(self, gray8, prompt, margin):
        """None when the image matches the prompt better than its absent sentences by more than margin."""
        import torch

        x = clip_input(self.clip, gray8)[None]
        with torch.no_grad(), autocast(self.clip.device, self.settings.autocast):
            feats = self.clip.encode_image(x).float().cpu()
        lead = presence_lead(feats, prompt, self.text)
        return absent_reason(feats, prompt, self.text, lead, margin) if lead[0] <= margin else None

    def refine(self, gray8, prompts):
        """SAM2 on the padded square of the image, prompts shifted into it; (mask, probability) cropped back."""
        import torch

        if prompts["boxes"] is None and prompts["points"] is None:
            return None, None
        square, pad = pad_to_square(gray8)
        with torch.inference_mode(), autocast(self.clip.device, self.settings.autocast):
            self.predictor.set_image(to_rgb(square))
            mask, probability = predict_mask(self.predictor, shift_prompts(prompts, pad.left, pad.top),
                                             self.settings.mask_threshold, self.settings.keep_largest)
        return unpad(mask, pad), unpad(probability, pad)


def segment_image(image, prompt, clip="biomedclip", sam="sam2.1-hiera-tiny", preset=DEFAULT_PRESET, overrides=(), device="cpu"):
    """Convenience: load models by name, segment one 2D image, return an ImageResult (mask, saliency, prompts)."""
    from ..models import load_clip, load_sam2
    from .presets import get_preset

    settings = get_preset(preset, overrides)
    clip_bundle = load_clip(clip, device) if isinstance(clip, str) else clip
    sam_model = None
    if settings.sam == "sam":
        sam_model = load_sam2(sam, device) if isinstance(sam, str) else sam
    return ImageSegmenter(clip_bundle, sam_model, settings)(image, prompt)
