"""The named models MedCLIPSAMLib can load: where each comes from, which files it needs, its licence.

Checksums are not typed in here. A hub entry names its repository and revision; on first download the
cache records the commit the revision resolved to and each file's sha256 as published by the hub (the
LFS metadata of that commit), and every later load is checked against that record (see cache.py).
"""

from dataclasses import dataclass, field

from ..errors import MedCLIPSAMError


@dataclass(frozen=True)
class HubFiles:
    repo: str                 # Hugging Face repository id
    files: tuple              # file names inside the repository
    revision: str = "main"    # resolved to a commit and recorded in the cache manifest on download
    subfolder: str = ""       # where the files go inside the model's cache folder


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str                 # "clip" or "sam2"
    description: str
    licence: str
    approx_size_mb: int
    sources: tuple = ()       # HubFiles, downloaded in order
    sam2_config: str = ""     # SAM2: config inside the sam2 package (configs/sam2.1/...)
    sam2_checkpoint: str = "" # SAM2: checkpoint file name in the folder
    sam2_overrides: tuple = field(default_factory=tuple)  # "key.path=value" applied to the config
    homepage: str = ""


BIOMEDCLIP_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDBERT_REPO = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"


def _sam21(name, size, cfg, ckpt, mb, desc):
    return ModelEntry(
        name=name, kind="sam2", description=desc, licence="Apache-2.0", approx_size_mb=mb,
        sources=(HubFiles(f"facebook/sam2.1-hiera-{size}", (ckpt,)),),
        sam2_config=f"configs/sam2.1/{cfg}.yaml", sam2_checkpoint=ckpt,
        homepage=f"https://huggingface.co/facebook/sam2.1-hiera-{size}",
    )


REGISTRY = {
    "biomedclip": ModelEntry(
        name="biomedclip", kind="clip",
        description="BiomedCLIP ViT-B/16 + PubMedBERT (224 px, context 256, embed 512)",
        licence="MIT", approx_size_mb=784,
        sources=(
            HubFiles(BIOMEDCLIP_REPO, ("open_clip_config.json", "open_clip_pytorch_model.bin")),
            # the hub config names its text tower by this repository: its config and tokenizer files are
            # needed too, or offline loading fails later
            HubFiles(BIOMEDBERT_REPO, ("config.json", "vocab.txt", "tokenizer_config.json"), subfolder="text"),
        ),
        homepage=f"https://huggingface.co/{BIOMEDCLIP_REPO}",
    ),
    "sam2.1-hiera-tiny": _sam21("sam2.1-hiera-tiny", "tiny", "sam2.1_hiera_t", "sam2.1_hiera_tiny.pt", 156,
                                "SAM 2.1 Hiera tiny (39M parameters)"),
    "sam2.1-hiera-small": _sam21("sam2.1-hiera-small", "small", "sam2.1_hiera_s", "sam2.1_hiera_small.pt", 184,
                                 "SAM 2.1 Hiera small (46M parameters)"),
    "sam2.1-hiera-base-plus": _sam21("sam2.1-hiera-base-plus", "base-plus", "sam2.1_hiera_b+",
                                     "sam2.1_hiera_base_plus.pt", 324, "SAM 2.1 Hiera base+ (81M parameters)"),
    "sam2.1-hiera-large": _sam21("sam2.1-hiera-large", "large", "sam2.1_hiera_l", "sam2.1_hiera_large.pt", 898,
                                 "SAM 2.1 Hiera large (224M parameters)"),
    "medsam2": ModelEntry(
        name="medsam2", kind="sam2",
        description="MedSAM2: SAM 2.1 Hiera tiny fine-tuned on 3D medical images and videos (512 px)",
        licence="Apache-2.0", approx_size_mb=156,
        sources=(HubFiles("wanglab/MedSAM2", ("MedSAM2_latest.pt",)),),
        sam2_config="configs/sam2.1/sam2.1_hiera_t.yaml", sam2_checkpoint="MedSAM2_latest.pt",
        # MedSAM2 runs SAM 2.1 tiny at 512 px (its released config sam2.1_hiera_t512)
        sam2_overrides=("image_size=512",
                        "memory_attention.layer.self_attention.feat_sizes=[32,32]",
                        "memory_attention.layer.cross_attention.feat_sizes=[32,32]"),
        homepage="https://huggingface.co/wanglab/MedSAM2",
    ),
}

# Models built locally with random weights (real architectures; meaningless output): tests, benchmarks.
RANDOM_MODELS = {
    "tiny-random": "small random CLIP (ViT-tiny/16 + 2-layer BERT) and a shrunk SAM2 Hiera; for tests only",
    "random-biomedclip": "the full BiomedCLIP architecture with random weights; for benchmarks only",
    "random-sam2.1-hiera-tiny": "the SAM 2.1 Hiera tiny architecture with random weights; for benchmarks only",
    "random-sam2.1-hiera-base-plus": "the SAM 2.1 Hiera base+ architecture with random weights; for benchmarks only",
    "random-medsam2": "MedSAM2 (SAM 2.1 Hiera tiny at 512) with random weights, in the real file layout; for "
                      "benchmarks only",
}

DEFAULT_CLIP = "biomedclip"
# MedSAM2 (SAM 2.1 tiny fine-tuned on 3D medical images, 512 px): a quarter of the 1024 px encoder's pixels
# (benchmarks/cpu_minute.py) and, in its paper, more accurate on CT / MRI / PET than SAM 2.1 at 1024.
# SAM 2.1 at 1024 stays one flag away: --models sam2.1-hiera-tiny (benchmarks/README.md, cpu_minute.py).
DEFAULT_SAM2 = "medsam2"


def get_entry(name, kind=None):
    entry = REGISTRY.get(name)
    if entry is None:
        known = ", ".join(sorted(REGISTRY) + sorted(RANDOM_MODELS))
        raise MedCLIPSAMError(f"unknown model '{name}'; known models: {known} (or a local folder)")
    if kind and entry.kind != kind:
        raise MedCLIPSAMError(f"model '{name}' is a {entry.kind} model, not a {kind} model")
    return entry
