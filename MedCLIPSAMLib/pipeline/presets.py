"""Named settings for the zero-shot pipeline. Every field can be overridden (CLI: --set key=value).

v1: MedCLIP-SAM (MICCAI 2024): gScoreCAM (top 300 channels) -> dense CRF -> box of the largest component -> SAM.
v2: MedCLIP-SAMv2: M2IB -> KMeans (k=2) -> top-N components -> one box per component -> SAM.
fast: v2's prompts with GradCAM saliency (one backward pass) for quick looks on a CPU.
"""

import dataclasses
from dataclasses import dataclass, field

from ..errors import MedCLIPSAMError


@dataclass
class PipelineSettings:
    saliency: str = "gscorecam"          # gscorecam | m2ib | gradcam
    saliency_settings: dict = field(default_factory=dict)
    postprocess: str = "crf"             # crf | kmeans | threshold
    postprocess_settings: dict = field(default_factory=dict)
    top_n: int = 1                       # connected components kept from the coarse mask
    fill_holes: bool = True
    prompt_mode: str = "box"             # box (largest component) | boxes (one per component) | points
    n_points: int = 10
    sam: str = "sam"                     # sam | none (return the post-processed saliency mask)
    mask_threshold: float = 0.5          # on SAM's mask probability
    keep_largest: int = 1                # components kept from SAM's mask (0: all)
    ensemble: bool = True                # expand known targets to their sentence ensembles
    body_only: bool = True               # ignore saliency in the background around the body (postprocess/body.py)
    autocast: object = "auto"            # "auto": bf16 on CUDA and on CPUs with native bf16; true / false
    seed: int = 0

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# the default everywhere (command line, service API, library, Slicer panel): MedCLIP-SAMv2, the better
# method in its paper and the one the performance figures are for
DEFAULT_PRESET = "v2"

PRESETS = {
    "v1": PipelineSettings(saliency="gscorecam", saliency_settings={"topk": 300},
                           postprocess="crf", top_n=1, prompt_mode="box"),
    "v2": PipelineSettings(saliency="m2ib", saliency_settings={"beta": 1.0, "steps": 10, "batch_size": 10},
                           postprocess="kmeans", top_n=2, prompt_mode="boxes", keep_largest=2),
    "fast": PipelineSettings(saliency="gradcam", postprocess="kmeans", top_n=2, prompt_mode="boxes", keep_largest=2),
}

CHOICES = {"saliency": ("gscorecam", "m2ib", "gradcam"), "postprocess": ("crf", "kmeans", "threshold"),
           "prompt_mode": ("box", "boxes", "points"), "sam": ("sam", "none")}


def _parse_value(text):
    import json

    try:
        return json.loads(text)
    except ValueError:
        low = text.lower()
        return {"true": True, "false": False}.get(low, text)


def get_preset(name, overrides=()):
    """A copy of preset `name` with "key=value" overrides; nested keys like saliency_settings.topk=100 work."""
    if name not in PRESETS:
        raise MedCLIPSAMError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    settings = dataclasses.replace(PRESETS[name])
    settings.saliency_settings = dict(settings.saliency_settings)
    settings.postprocess_settings = dict(settings.postprocess_settings)
    fields = {f.name: f for f in dataclasses.fields(PipelineSettings)}
    for item in overrides or ():
        if "=" not in item:
            raise MedCLIPSAMError(f"a setting must look like key=value, got '{item}'")
        key, raw = (part.strip() for part in item.split("=", 1))
        value = _parse_value(raw)
        head, _, sub = key.partition(".")
        if head not in fields:
            raise MedCLIPSAMError(f"unknown setting '{head}'; settings are: {', '.join(fields)}")
        if sub:
            if head not in ("saliency_settings", "postprocess_settings"):
                raise MedCLIPSAMError(f"setting '{head}' has no sub-settings")
            getattr(settings, head)[sub] = value
            continue
        if head in CHOICES and value not in CHOICES[head]:
            raise MedCLIPSAMError(f"{head} must be one of {', '.join(CHOICES[head])}, got '{value}'")
        setattr(settings, head, value)
    return settings
