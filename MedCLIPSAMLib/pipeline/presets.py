"""Named settings for the zero-shot pipeline. Every field can be overridden (CLI: --set key=value).

v1: MedCLIP-SAM (MICCAI 2024): gScoreCAM (top 300 channels) -> dense CRF -> box of the largest component -> SAM.
v2: MedCLIP-SAMv2: M2IB -> KMeans (k=2) -> top-N components -> one box per component -> SAM.
fast: v2's prompts with GradCAM saliency (one backward pass) for quick looks on a CPU.
"""

import dataclasses
import json
import math
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
    cpu_runtime: str = "torch"           # torch | openvino (SAM2's image encoder on a CPU: models/cpu_runtime.py)
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
           "prompt_mode": ("box", "boxes", "points"), "sam": ("sam", "none"), "autocast": ("auto", True, False),
           "cpu_runtime": ("torch", "openvino")}
# the numbers a setting may take (inclusive); every number must also be finite
RANGES = {"top_n": (0, 64), "n_points": (1, 1000), "mask_threshold": (0.0, 1.0), "keep_largest": (0, 64),
          "seed": (0, 2**31 - 1)}
SUB_RANGE = (0, 10**9)         # sub-settings (iterations, steps, sizes, scales): non-negative


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
    given = set()                      # (head, key) of the sub-settings the overrides set
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
            given.add((head, sub))
            continue
        if head in CHOICES:
            if not any(value == c and type(value) is type(c) for c in CHOICES[head]):   # True is not 1 here
                raise MedCLIPSAMError(f"{head} must be one of {', '.join(map(_text, CHOICES[head]))}, got '{raw}'")
        else:
            value = _typed(head, value, getattr(PRESETS["v1"], head), RANGES.get(head))
            if isinstance(value, dict):
                given.update((head, key) for key in value)
        setattr(settings, head, value)
    _check_sub_settings(settings, given)
    return settings


def _text(value):
    return str(value).lower() if isinstance(value, bool) else str(value)


def _typed(name, value, default, bounds=None):
    """`value` checked against the type of the setting's `default` (and its bounds): a wrong type is a
    sentence now, not a TypeError in the middle of a job."""
    if isinstance(default, bool):
        kind, ok = "true or false", isinstance(value, bool)
    elif isinstance(default, int):
        kind, ok = "a whole number", isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        kind, ok = "a number", isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif isinstance(default, str):
        kind, ok = "text", isinstance(value, str)
    elif isinstance(default, dict):
        kind, ok = "a JSON object", isinstance(value, dict)
    else:   # no default to go by: any finite scalar
        kind = "a number, text, true or false"
        number = isinstance(value, (int, float)) and math.isfinite(value)
        ok = value is None or isinstance(value, (str, bool)) or number
    if not ok:
        raise MedCLIPSAMError(f"setting '{name}' must be {kind}, got {json.dumps(value)[:60]}")
    if bounds and not isinstance(value, (bool, str, dict)) and value is not None:
        low, high = bounds
        if not low <= value <= high:
            raise MedCLIPSAMError(f"setting '{name}' must lie in {low}..{high}, got {value}")
    return float(value) if isinstance(default, float) else value


def _check_sub_settings(settings, given):
    """saliency_settings / postprocess_settings: names the chosen method takes, values of their types.
    A preset's own sub-settings for another method (v2's M2IB steps after saliency=gscorecam) are dropped;
    one the overrides `given` name is refused."""
    import inspect

    from ..postprocess import POSTPROCESSORS, postprocess
    from ..saliency import method_settings

    known = {"saliency_settings": dict(method_settings(settings.saliency))}
    known["saliency_settings"].pop("autocast")     # the top-level autocast setting
    params = list(inspect.signature(POSTPROCESSORS[settings.postprocess]).parameters.values())[2:]
    params += [p for p in inspect.signature(postprocess).parameters.values() if p.name in ("rank_by", "min_size")]
    known["postprocess_settings"] = {p.name: p.default for p in params if p.name != "region"}
    for head, method in (("saliency_settings", settings.saliency), ("postprocess_settings", settings.postprocess)):
        values = getattr(settings, head)
        for key, value in list(values.items()):
            if key not in known[head] and (head, key) not in given:
                del values[key]
                continue
            if key not in known[head]:
                raise MedCLIPSAMError(f"{method} has no setting '{key}'; its settings are: {', '.join(known[head])}")
            values[key] = _typed(f"{head}.{key}", value, known[head][key], SUB_RANGE)
