"""Random-weight models of the real architectures, written to disk in the real checkpoint layouts.

They are loaded back through the same loaders as downloaded weights, so tests and benchmarks exercise the
real loading code. Their outputs are meaningless: only for tests, smoke runs and speed measurements.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..runtime import owned_prefix, remove_stale
from . import cache
from .builders import build_open_clip, instantiate_sam2, sam2_package_config

# bump when the layout or architecture of a random model changes, so stale cached copies are not reused
FORMAT = 2

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# words that the shipped prompt ensembles and phantom captions use; anything else falls back to characters
WORDS = """a an the of in on at with and or no not is are this that image slice scan axial coronal sagittal
ct mr mri x-ray xray ultrasound chest abdomen head brain skull ventricle ventricles tumor tumour lesion mass
liver kidney kidneys spleen lung lungs heart breast bone body left right upper lower small large bright dark
round irregular nodule cyst region organ hemisphere field medical radiology showing shows visible normal
abnormal enhancing""".split()
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,-'()/:;")


def _vocab(size=None):
    tokens = SPECIAL_TOKENS + CHARS + ["##" + c for c in CHARS[:36]] + WORDS
    tokens = list(dict.fromkeys(tokens))
    if size:  # pad to the real vocabulary size so the embedding matrix has the real shape
        tokens += [f"[unused{i}]" for i in range(size - len(tokens))]
    return tokens


CLIP_SIZES = {
    # timm vision tower, BERT text tower, joint embedding width
    "tiny": dict(timm="vit_tiny_patch16_224", embed=64,
                 bert=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
                 vocab=None, pooler="mean_pooler"),
    # BiomedCLIP: ViT-B/16 + PubMedBERT-base (vocab 30522), embed 512, CLS pooling as released.
    # The tiny text tower mean-pools: from random weights its CLS token gives near-identical embeddings for
    # all captions (2 layers do not move it far), and contrastive training then cannot separate them.
    "base": dict(timm="vit_base_patch16_224", embed=512,
                 bert=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
                 vocab=30522, pooler="cls_last_hidden_state_pooler"),
}
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def write_clip_config(folder, timm_model, embed_dim, context_length=256, pooler="cls_last_hidden_state_pooler"):
    """open_clip_config.json laid out like BiomedCLIP's, with the text tower in the folder's text/ subfolder."""
    config = {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {"timm_model_name": timm_model, "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": 224},
            "text_cfg": {"hf_model_name": "text", "hf_tokenizer_name": "text", "hf_proj_type": "mlp",
                         "hf_pooler_type": pooler, "context_length": context_length},
        },
        "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD},
    }
    Path(folder, "open_clip_config.json").write_text(json.dumps(config, indent=2))


def build_random_clip(folder, size="tiny", seed=0):
    """Write a random CLIP of the BiomedCLIP architecture (size 'tiny' or 'base') into `folder`."""
    import torch
    from transformers import BertConfig

    spec = CLIP_SIZES[size]
    folder = Path(folder)
    (folder / "text").mkdir(parents=True, exist_ok=True)
    vocab = _vocab(spec["vocab"])
    (folder / "text" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "text" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 256}))
    BertConfig(vocab_size=len(vocab), max_position_embeddings=512, **spec["bert"]).save_pretrained(folder / "text")
    write_clip_config(folder, spec["timm"], spec["embed"], pooler=spec["pooler"])
    torch.manual_seed(seed)
    model, _ = build_open_clip(folder, weights=None)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    files = ["open_clip_config.json", "open_clip_pytorch_model.bin", "text/config.json", "text/vocab.txt",
             "text/tokenizer_config.json"]
    cache.record_files(folder, {f: None for f in files}, source=f"random:{size}:seed{seed}",
                       extra={"name": f"random-clip-{size}", "random": True})
    return folder


SAM2_VARIANTS = {
    "tiny-shrunk": "configs/sam2.1/sam2.1_hiera_t.yaml",   # real SAM2 classes, a few blocks, narrow trunk
    "sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "medsam2": "medsam2",   # the registry entry's config, overrides and file name (the real download's layout)
}


def build_random_sam2(folder, variant="tiny-shrunk", seed=0):
    """Write a random SAM2 (config.yaml + model.pt as {"model": state_dict}) into `folder`."""
    import torch
    from omegaconf import OmegaConf

    if variant == "medsam2":
        return _build_random_medsam2(folder, seed)
    cfg = sam2_package_config(SAM2_VARIANTS[variant])
    if variant == "tiny-shrunk":
        trunk = cfg.model.image_encoder.trunk
        trunk.embed_dim, trunk.stages, trunk.global_att_blocks = 16, [1, 1, 2, 1], [3]
        cfg.model.image_encoder.neck.backbone_channel_list = [128, 64, 32, 16]
        cfg.model.memory_attention.num_layers = 1
        cfg.model.memory_attention.layer.dim_feedforward = 256
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    torch.manual_seed(seed)
    model = instantiate_sam2(cfg)
    torch.save({"model": model.state_dict()}, folder / "model.pt")
    cache.record_files(folder, {"config.yaml": None, "model.pt": None}, source=f"random:{variant}:seed{seed}",
                       extra={"name": f"random-sam2-{variant}", "random": True})
    return folder


def _build_random_medsam2(folder, seed):
    """MedSAM2 laid out as downloaded: only MedSAM2_latest.pt ({"model": state_dict}, as sam2's trainer saves
    it), no config: the loader builds it from the registry entry (SAM 2.1 tiny at 512), as for the real file."""
    import torch

    from .registry import get_entry

    entry = get_entry("medsam2")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = instantiate_sam2(sam2_package_config(entry.sam2_config), overrides=entry.sam2_overrides)
    torch.save({"model": model.state_dict()}, folder / entry.sam2_checkpoint)
    cache.record_files(folder, {entry.sam2_checkpoint: None}, source=f"random:medsam2:seed{seed}",
                       extra={"name": "random-medsam2", "random": True})
    return folder


def ensure_random(kind, variant, seed=0):
    """Return the cached folder of a random model, building it once (atomically) if needed."""
    import torch

    folder = cache.home() / "random" / f"{kind}-{variant}-seed{seed}-v{FORMAT}"
    if (folder / cache.MANIFEST).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(folder.parent, folder.name + ".")  # a build a killed process left unfinished
    tmp = Path(tempfile.mkdtemp(prefix=owned_prefix(folder.name + "."), dir=folder.parent))
    try:
        # fork_rng: building seeds torch; a caller's seeded run must not depend on whether this ran first
        with torch.random.fork_rng(devices=[]):
            (build_random_clip if kind == "clip" else build_random_sam2)(tmp, variant, seed)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
