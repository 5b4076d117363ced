"""Loading a CLIP model (BiomedCLIP or compatible open_clip model) from a verified local folder.

A CLIP folder holds `open_clip_config.json`, the weights (`open_clip_pytorch_model.bin` or
`open_clip_model.safetensors`), and the text tower's `config.json`, `vocab.txt` and `tokenizer_config.json`
(in `text/` or beside the config). builders.build_open_clip points the hub config's text tower at the
local copy, so loading never touches the network.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MedCLIPSAMError
from ..runtime import log
from . import cache, random_models
from .builders import build_open_clip, weights_file
from .registry import RANDOM_MODELS, get_entry

@dataclass
class ClipBundle:
    model: object
    tokenizer: object
    name: str
    folder: Path
    is_random: bool
    device: object
    image_size: int = 224
    mean: tuple = field(default_factory=tuple)
    std: tuple = field(default_factory=tuple)

    def tokenize(self, texts):
        return self.tokenizer(list(texts)).to(self.device)

    def encode_text(self, texts):
        """L2-normalised text embeddings [N, D] (no gradient)."""
        import torch

        with torch.no_grad():
            features = self.model.encode_text(self.tokenize(texts))
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def encode_image(self, images, grad=False):
        """L2-normalised image embeddings [B, D] of normalised [B,3,224,224] tensors."""
        import torch

        from .clip_image import image_embeddings

        with torch.set_grad_enabled(grad):
            # the last block for the pooled token alone where that is exact (clip_image.py)
            features = image_embeddings(self, images.to(self.device))
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def preprocess_array(self, rgb):
        """A square uint8 HxWx3 (or HxW) array -> normalised [3,224,224] float tensor (bicubic, like open_clip)."""
        import numpy as np
        import torch
        from PIL import Image

        img = Image.fromarray(np.asarray(rgb, dtype=np.uint8)).convert("RGB")
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


_loaded = {}


def resolve_clip_folder(name):
    """(folder, is_random) for a registry name, a random model name or a folder path; verifies checksums."""
    from .download import how_to_get, required_files

    if name in ("tiny-random", "random-biomedclip"):
        folder = random_models.ensure_random("clip", "tiny" if name == "tiny-random" else "base")
        cache.verify(folder, ["open_clip_config.json", "open_clip_pytorch_model.bin"], name)
        return folder, True
    path = Path(str(name)).expanduser()
    if path.is_dir():
        manifest = cache.read_manifest(path)
        weights = weights_file(path)
        if manifest is not None and weights is not None:
            cache.verify(path, [weights.name], str(path))
        else:
            log.warning("no checksum manifest in '%s': loading its weights without a checksum check", path)
        return path, bool(manifest and manifest.get("random"))
    if name in RANDOM_MODELS or (path.suffix or "/" in str(name)):
        raise MedCLIPSAMError(f"'{name}' is not a CLIP model name or an existing folder")
    entry = get_entry(name, kind="clip")
    folder = cache.model_dir(entry.name)
    cache.verify(folder, required_files(entry), entry.name, how_to_get(entry))
    return folder, False


def load_clip(name="biomedclip", device="cpu", reuse=True):
    """Load a CLIP model by registry name ('biomedclip'), random name ('tiny-random', 'random-biomedclip')
    or folder path. With reuse=True the same loaded model is returned for the same name and device (do not
    train it; pass reuse=False for a private copy)."""
    import torch

    device = torch.device(device)
    key = (str(name), str(device))
    if reuse and key in _loaded:
        return _loaded[key]
    folder, is_random = resolve_clip_folder(name)
    model, tokenizer = build_open_clip(folder, device=device)
    config = json.loads((Path(folder) / "open_clip_config.json").read_text())
    pre = config.get("preprocess_cfg", {})
    visual = getattr(model, "visual", None)
    size = getattr(visual, "image_size", (224, 224))
    bundle = ClipBundle(model=model, tokenizer=tokenizer, name=str(name), folder=Path(folder), is_random=is_random,
                        device=device, image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
                        mean=tuple(pre.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                        std=tuple(pre.get("std", (0.26862954, 0.26130258, 0.27577711))))
    if is_random:
        log.warning("CLIP model '%s' has RANDOM weights: its saliency maps and masks are meaningless", name)
    if reuse:
        _loaded[key] = bundle
    return bundle
