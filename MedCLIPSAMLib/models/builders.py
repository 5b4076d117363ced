"""Building the networks from a folder or a config: open_clip for CLIP, the sam2 package for SAM2.

The loaders (clip.py, sam.py) resolve a name to a verified folder and call these; random_models.py calls
them to write random checkpoints. Keeping the builders here lets both sides import them without a circle.
"""

import json
import logging
import os
import shutil
from pathlib import Path

from ..errors import MedCLIPSAMError
from ..runtime import log, scratch_folder
from .no_init import build_without_init

WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TEXT_FILES = ("config.json", "vocab.txt", "tokenizer_config.json")


def find_text_file(folder, name):
    """A text tower file of a CLIP folder, in text/ or beside the config; None if absent."""
    for candidate in (folder / name, folder / "text" / name):
        if candidate.is_file():
            return candidate
    return None


def weights_file(folder):
    for name in WEIGHT_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def build_open_clip(folder, weights="auto", device="cpu"):
    """Create the open_clip model described by `folder` and load its weights (weights_only, no pickles).

    Returns (model, tokenizer). weights=None builds random weights (used to write random checkpoints).
    """
    import open_clip

    folder = Path(folder)
    config_path = folder / "open_clip_config.json"
    if not config_path.is_file():
        raise MedCLIPSAMError(f"'{folder}' is not a CLIP model folder: open_clip_config.json is missing")
    if weights == "auto":
        weights = weights_file(folder)
        if weights is None:
            raise MedCLIPSAMError(f"the CLIP folder '{folder}' has no weights ({' or '.join(WEIGHT_FILES)})")
    config = json.loads(config_path.read_text())
    text_cfg = config.get("model_cfg", {}).get("text_cfg", {})
    # open_clip reads the config from a folder, and the hub config names the text tower by a hub repo:
    # a scratch copy points it at the local files (a killed process's copy is removed by the next load)
    with scratch_folder() as runtime:
        if "hf_model_name" in text_cfg:
            for name in TEXT_FILES:
                src = find_text_file(folder, name)
                if src is None:
                    raise MedCLIPSAMError(f"the CLIP folder '{folder}' lacks the text tower file {name} (in text/)")
                shutil.copy(src, runtime / name)
            # the text tower's config and tokenizer now live in the runtime folder itself
            text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(runtime)
        (runtime / "open_clip_config.json").write_text(json.dumps(config))
        # open_clip warns on the root logger that the runtime folder has no weights: they are loaded below
        logging.disable(logging.WARNING)
        try:
            model = None
            if weights is not None:  # every weight comes from the checkpoint: skip the random init
                # device=None: create_model's model.to() then leaves the meta parameters alone
                model = build_without_init(
                    lambda: open_clip.create_model(f"local-dir:{runtime}", pretrained_text=False, device=None),
                    device, log)
            if model is None:
                model = open_clip.create_model(f"local-dir:{runtime}", pretrained_text=False, device=device)
            tokenizer = open_clip.get_tokenizer(f"local-dir:{runtime}")
        finally:
            logging.disable(logging.NOTSET)
    if weights is not None:
        try:  # strict: a model built without init must get every parameter and persistent buffer from here
            open_clip.load_checkpoint(model, str(weights), weights_only=True, device=device)
        except Exception as exc:  # unpickling / shape errors: the file is not a checkpoint of this model
            raise MedCLIPSAMError(f"cannot load CLIP weights from '{weights}': {str(exc).splitlines()[0][:200]}") from exc
    model.eval()
    return model.to(device), tokenizer


# the same mask post-processing that sam2.build_sam applies by default
_POSTPROCESSING = {
    "sam_mask_decoder_extra_args.dynamic_multimask_via_stability": True,
    "sam_mask_decoder_extra_args.dynamic_multimask_stability_delta": 0.05,
    "sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh": 0.98,
}


def sam2_package_config(rel):
    """A config shipped inside the sam2 package (e.g. configs/sam2.1/sam2.1_hiera_t.yaml)."""
    import sam2
    from omegaconf import OmegaConf

    return OmegaConf.load(os.path.join(sam2.__path__[0], rel))


def instantiate_sam2(cfg, video=False, overrides=()):
    """Build the SAM2 module a config describes (image model, or the video predictor with video=True)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = cfg.copy()
    for key, value in _POSTPROCESSING.items():
        OmegaConf.update(cfg, f"model.{key}", value, force_add=True)
    for item in overrides:
        key, value = item.split("=", 1)
        OmegaConf.update(cfg, f"model.{key}", OmegaConf.create({"v": _yaml_value(value)}).v, force_add=True)
    if video:
        cfg.model._target_ = "sam2.sam2_video_predictor.SAM2VideoPredictor"
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model, _recursive_=True)


def _yaml_value(text):
    import yaml

    return yaml.safe_load(text)

