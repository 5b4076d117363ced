"""The rows of the table: which pipeline settings and which CLIP each stage runs with.

Zero-shot rows use the project's presets (MedCLIPSAMLib/pipeline/presets.py) with the papers' per-data-set
settings from the MedCLIP-SAMv2 repository's zeroshot_scripts/ (M2IB beta 1 for breast, 2 for brain; one
component and one mask for tumours; two components and two masks for lungs: its '--num-contours 2' and
'--multicontour'). Those per-data-set settings are v2's; the v1 preset runs as it is.

The ablation rows map MedCLIP-SAMv2's ablation onto presets and flags:
  saliency        M2IB map > 0.3 (the released post-processing's threshold), every component, no SAM
  +dhn-nce        the same with the DHN-NCE fine-tuned CLIP (only with --finetuned-clip)
  +postprocess    KMeans (k=2) instead of the threshold, every component, no SAM
  +components     KMeans + the data set's top-N components, holes filled, no SAM (--sam none)
  +sam            the full v2 zero-shot pipeline (the zero-shot-v2 row)
  +weak           weak supervision on the zero-shot pseudo-labels (the weak-v2 row)
From +dhn-nce on, the rows use the fine-tuned CLIP when one is given, else the pretrained one (the table
says which).
"""

from dataclasses import dataclass

from MedCLIPSAMLib.errors import MedCLIPSAMError
from MedCLIPSAMLib.pipeline.presets import get_preset

# the MedCLIP-SAMv2 zeroshot_scripts' settings per data set (v2 only)
V2_SETTINGS = {
    "busi": ["saliency_settings.beta=1.0", "top_n=1", "keep_largest=1", "prompt_mode=boxes"],
    "brain": ["saliency_settings.beta=2.0", "top_n=1", "keep_largest=1", "prompt_mode=boxes"],
    "covidqu": ["top_n=2", "keep_largest=2", "prompt_mode=boxes"],
    "lungct": ["top_n=2", "keep_largest=2", "prompt_mode=boxes"],
    "msd": [],
}
WEAK_THRESHOLD = {"v1": 0.5, "v2": 0.2}   # v2: the ensemble mean's foreground threshold (DESIGN.md)


@dataclass
class Stage:
    name: str            # the row's name (and the key into published.py)
    kind: str            # zero-shot | weak
    settings: object     # PipelineSettings (weak: those of the zero-shot stage that made its pseudo-labels)
    finetuned: bool      # runs with the fine-tuned CLIP
    description: str


def plan(dataset, preset, weak=False, ablation=False, finetuned=False, overrides=()):
    """The stages to run, in table order. overrides: the user's "key=value" settings, applied after the
    data set's and before each ablation row's own."""

    def zero_shot_settings(dataset, preset, extra=()):
        base = list(V2_SETTINGS.get(dataset, [])) if preset == "v2" else []
        return get_preset(preset, base + list(overrides) + list(extra))

    zs = zero_shot_settings(dataset, preset)
    stages = [Stage(f"zero-shot-{preset}", "zero-shot", zs, finetuned, f"zero-shot, preset {preset}")]
    if weak:
        stages.append(Stage(f"weak-{preset}", "weak", zs, finetuned,
                            f"weak supervision on the zero-shot-{preset} pseudo-labels"))
    if not ablation:
        return stages
    if preset != "v2":
        raise MedCLIPSAMError("the ablation rows are MedCLIP-SAMv2's: use --preset v2")
    threshold = ["postprocess=threshold", "postprocess_settings.threshold=0.3", "top_n=0", "fill_holes=false",
                 "sam=none"]
    rows = [Stage("ablation:saliency", "zero-shot", zero_shot_settings(dataset, "v2", threshold), False,
                  "M2IB saliency > 0.3, pretrained CLIP")]
    if finetuned:
        rows.append(Stage("ablation:+dhn-nce", "zero-shot", zero_shot_settings(dataset, "v2", threshold), True,
                          "M2IB saliency > 0.3, DHN-NCE fine-tuned CLIP"))
    rows += [
        Stage("ablation:+postprocess", "zero-shot",
              zero_shot_settings(dataset, "v2", ["top_n=0", "fill_holes=false", "sam=none"]), finetuned,
              "+ KMeans, every component, no SAM"),
        Stage("ablation:+components", "zero-shot", zero_shot_settings(dataset, "v2", ["sam=none"]), finetuned,
              "+ top-N connected components, no SAM"),
        Stage("ablation:+sam", "zero-shot", zs, finetuned, "+ SAM (= zero-shot-v2)"),
        Stage("ablation:+weak", "weak", zs, finetuned, "+ weak supervision (= weak-v2)"),
    ]
    return stages + rows
