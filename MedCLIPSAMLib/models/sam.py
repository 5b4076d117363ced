"""Loading SAM2 models (SAM 2.1, MedSAM2, random test models) with the sam2 package's own classes.

A SAM2 folder holds the checkpoint ({"model": state_dict}) and, for non-registry models, a `config.yaml`
(the sam2 hydra config). Registry models take their config from the sam2 package. The config is
instantiated directly (no hydra search path), so a config outside the package works too.
"""

import warnings
from pathlib import Path

from ..errors import MedCLIPSAMError
from ..runtime import log
from . import cache, random_models
from .builders import instantiate_sam2, sam2_package_config
from .no_init import build_without_init
from .registry import get_entry

RANDOM_SAM2 = {
    "tiny-random": "tiny-shrunk",
    "random-sam2.1-hiera-tiny": "sam2.1_hiera_t",
    "random-sam2.1-hiera-base-plus": "sam2.1_hiera_b+",
    "random-medsam2": "medsam2",
}


def resolve_sam2(name):
    """(config, checkpoint path, overrides, is_random) for a registry name, random name or folder."""
    from omegaconf import OmegaConf

    from .download import how_to_get, required_files

    if RANDOM_SAM2.get(name) == "medsam2":  # the real download's layout: config from the registry entry
        entry = get_entry("medsam2", kind="sam2")
        folder = random_models.ensure_random("sam2", "medsam2")
        cache.verify(folder, [entry.sam2_checkpoint], name)
        return (sam2_package_config(entry.sam2_config), folder / entry.sam2_checkpoint, entry.sam2_overrides, True)
    if name in RANDOM_SAM2:
        folder = random_models.ensure_random("sam2", RANDOM_SAM2[name])
        cache.verify(folder, ["config.yaml", "model.pt"], name)
        return OmegaConf.load(folder / "config.yaml"), folder / "model.pt", (), True
    path = Path(str(name)).expanduser()
    if path.is_dir():
        configs = sorted(path.glob("*.yaml"))
        checkpoints = sorted(list(path.glob("*.pt")) + list(path.glob("*.pth")))
        if not configs or not checkpoints:
            raise MedCLIPSAMError(f"the SAM2 folder '{path}' needs one .yaml config and one .pt checkpoint")
        manifest = cache.read_manifest(path)
        if manifest is not None:
            cache.verify(path, [configs[0].name, checkpoints[0].name], str(path))
        else:
            log.warning("no checksum manifest in '%s': loading it without a checksum check", path)
        return OmegaConf.load(configs[0]), checkpoints[0], (), bool(manifest and manifest.get("random"))
    entry = get_entry(name, kind="sam2")
    folder = cache.model_dir(entry.name)
    cache.verify(folder, required_files(entry), entry.name, how_to_get(entry))
    return sam2_package_config(entry.sam2_config), folder / entry.sam2_checkpoint, entry.sam2_overrides, False


def load_sam2(name="sam2.1-hiera-tiny", device="cpu", video=False):
    """A SAM2 model (sam2's SAM2Base, or SAM2VideoPredictor with video=True) with verified weights, in eval mode."""
    import torch

    cfg, checkpoint, overrides, is_random = resolve_sam2(name)
    # every weight comes from the checkpoint (checked below): skip the random init that it overwrites
    model = build_without_init(lambda: instantiate_sam2(cfg, video=video, overrides=overrides), device, log)
    if model is None:
        model = instantiate_sam2(cfg, video=video, overrides=overrides)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state["model"] if isinstance(state, dict) and "model" in state else state
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as exc:
        raise MedCLIPSAMError(f"cannot read the SAM2 checkpoint '{checkpoint}': {str(exc).splitlines()[0][:200]}") from exc
    if missing or unexpected:  # never return a model with uninitialised weights
        raise MedCLIPSAMError(f"the SAM2 checkpoint '{checkpoint}' does not match its config "
                              f"({len(missing)} missing, {len(unexpected)} unexpected weights)")
    if is_random:
        log.warning("SAM2 model '%s' has RANDOM weights: its masks are meaningless", name)
    model.medclipsam_is_random = is_random
    return model.to(device).eval()


def image_predictor(model):
    """sam2's SAM2ImagePredictor, with feature sizes matched to the model's input size (MedSAM2 runs at 512)."""
    with warnings.catch_warnings():
        # sam2 scripts its transforms with torch.jit.script, which torch deprecates: sam2's to fix, not ours
        warnings.filterwarnings("ignore", r"`torch\.jit\.script` is", FutureWarning)
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        predictor = SAM2ImagePredictor(model)
    size = model.image_size
    predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    return predictor
