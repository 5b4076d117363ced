"""Text-conditioned saliency on a CLIP image: (image, text embedding) -> 224x224 map in [0, 1].

    compute_saliency(method, clip, image, text_embedding, **settings) -> HxW float32
    compute_saliency_batch(method, clip, images, text_embedding, **settings) -> BxHxW float32

`clip` is a models.ClipBundle; `image` the normalised [3,224,224] tensor from ClipBundle.preprocess_array
(the pipeline pads to square first); `text_embedding` an L2-normalised [D] tensor (a prompt ensemble's
mean, computed once by the caller); a batch may also get one text per image ([B,D]). Methods:

    gscorecam  MedCLIP-SAM v1 (gscorecam.py): topk=300, batch_size=64 (GPU) / 16 (CPU), autocast, layer, scale
    m2ib       MedCLIP-SAMv2 (m2ib.py): beta=1, steps=10, lr=1, batch_size=10 noisy copies, init_alpha=5,
               block=9, noise_stats="standard", recompute_prefix=False, autocast, seed=0
    gradcam    baseline (gradcam.py): layer, autocast

A map with no signal at all (flat before min-max) comes back as zeros. torch loads only when a map is
computed, so importing this package stays instant.
"""

import importlib
import inspect

from ..errors import MedCLIPSAMError

_SOURCES = {"gscorecam": ("gscorecam", "gscorecam"), "m2ib": ("m2ib", "m2ib"), "gradcam": ("gradcam", "gradcam")}


def _implementation(method):
    """The batch function behind a method name (imports its module, and torch, on first use)."""
    if method not in _SOURCES:
        raise MedCLIPSAMError(f"unknown saliency method '{method}'; choose one of {', '.join(_SOURCES)}")
    module, name = _SOURCES[method]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def _lazy(method):
    def run(clip, images, text_embedding, **settings):
        return _implementation(method)(clip, images, text_embedding, **settings)

    run.__name__ = method
    run.__doc__ = f"{method} maps [B,H,W] of normalised images [B,3,H,W] (imports its module on first call)."
    return run


# Methods the pipeline batches when it has several images (a volume's key slices). Every method treats
# the images of a batch independently, so a batch equals one-by-one up to float rounding (another GEMM
# blocking: GradCAM ~1e-6; M2IB fp32 up to ~1e-4 after 10 Adam steps on ViT-B, bf16 bit for bit, see
# benchmarks/key_slices.py). Only M2IB gains from it: its steps run on 10 noisy copies per image, too few
# to fill a CPU. gScoreCAM already scores masked images 16 at a time and GradCAM is one pass: they stay
# image by image, bit for bit what a single image gets.
BATCHED_METHODS = ("m2ib",)

# name -> batch function (clip, images [B,3,H,W], text_embedding, **settings) -> np.ndarray [B,H,W]
SALIENCY_METHODS = {name: _lazy(name) for name in _SOURCES}


def method_settings(method):
    """The settings a method accepts, with their defaults."""
    impl = _implementation(method)
    if impl.__name__ in ("gscorecam", "m2ib"):  # thin wrappers: the settings live on run_<name>
        impl = getattr(importlib.import_module(impl.__module__), f"run_{impl.__name__}")
    params = list(inspect.signature(impl).parameters.values())[3:]
    return {p.name: p.default for p in params}


def compute_saliency_batch(method, clip, images, text_embedding, **settings):
    """Saliency maps [B,H,W] (float32 numpy in [0,1], H, W of the input, 224 for CLIP) of normalised images
    [B,3,H,W] for a [D] (or [B,D]) text embedding. Unknown settings are a MedCLIPSAMError."""
    known = method_settings(method)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise MedCLIPSAMError(f"unknown {method} setting(s) {', '.join(unknown)}; settings are: {', '.join(known)}")
    return _implementation(method)(clip, images, text_embedding, **settings)


def compute_saliency(method, clip, image, text_embedding, **settings):
    """Saliency map [H,W] (float32 numpy in [0,1]) of one normalised image [3,H,W]."""
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) != 3:
        raise MedCLIPSAMError(f"compute_saliency takes one [3,H,W] image, got shape {shape}")
    return compute_saliency_batch(method, clip, image, text_embedding, **settings)[0]
