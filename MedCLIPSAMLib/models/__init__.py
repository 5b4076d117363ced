"""Model registry, cache and loaders (CLIP via open_clip, SAM2 via sam2). Heavy imports happen inside functions."""

from .registry import DEFAULT_CLIP, DEFAULT_SAM2, RANDOM_MODELS, REGISTRY, get_entry  # noqa: F401


def load_clip(name="biomedclip", device="cpu", reuse=True):
    from .clip import load_clip as _load

    return _load(name, device, reuse)


def load_sam2(name="sam2.1-hiera-tiny", device="cpu", video=False):
    from .sam import load_sam2 as _load

    return _load(name, device, video)


def resolve_model_set(models):
    """--models: 'default', 'tiny-random', or 'CLIP,SAM2' -> (clip name, sam2 name)."""
    if models in (None, "", "default"):
        return DEFAULT_CLIP, DEFAULT_SAM2
    if models == "tiny-random":
        return "tiny-random", "tiny-random"
    if "," in models:
        clip, sam = (part.strip() for part in models.split(",", 1))
        return clip, sam
    entry = REGISTRY.get(models)
    if entry is not None:
        return (models, DEFAULT_SAM2) if entry.kind == "clip" else (DEFAULT_CLIP, models)
    return models, DEFAULT_SAM2
