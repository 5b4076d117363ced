"""The presets use the papers' own settings: each one pinned here to its source, as the pipeline really calls
the methods (the arguments each saliency / post-processing function receives in a run, defaults included),
and where a setting's meaning could drift (which block's output M2IB's bottleneck sits on), by behaviour.

Sources (public repositories of the authors, read for this test):
- MedCLIP-SAM v1, HealthX-Lab/MedCLIP-SAM:
  saliency_maps/visualize_cam.py: target_layer = clip_model.model.visual.trunk.blocks[11].norm2 (BiomedCLIP),
      --topk default 300 (gScoreCAM channels);
  crf/densecrf_sal.py: --tau 1.05, --epsilon 1e-8, addPairwiseGaussian(sxy=3 (--gaussian-sxy), compat=3),
      addPairwiseBilateral(sxy=60 (--bilateral-sxy), srgb=5 (--bilateral-srgb), compat=5), d.inference(1);
      unary n_energy = -log(1 - s + eps) / (tau * sigmoid(1 - s)), p_energy = -log(s + eps) / (tau * sigmoid(s)).
- MedCLIP-SAMv2, HealthX-Lab/MedCLIP-SAMv2:
  saliency_maps/scripts/iba.py: InformationBottleneck.initial_value = 5.0; IBAInterpreter(steps=10, lr=1,
      batch_size=10) (the noisy copies: image_t.expand(self.batch_size, ...)); Adam on alpha;
  saliency_maps/scripts/methods.py: vision_heatmap_iba(..., lr=1, train_steps=10); the bottleneck replaces
      vision_model layers[layer_idx] (extract_bert_layer) and its features are hidden_states[layer_idx + 1],
      i.e. the OUTPUT of 0-based block layer_idx;
  zeroshot_scripts/zeroshot_brain_tumors.sh: --vlayer 9 --vbeta 2.0 (DESIGN: beta 1 breast US, 2 brain MRI);
  postprocessing/postprocess_saliency_maps.py: KMeans(n_clusters=2) on the map resized to 256 x 256, the
      cluster with the higher centre is the foreground.
- DESIGN.md "Algorithms" (which records these): SAM's mask threshold 0.5; v1 box of the largest component.
"""

import functools
import inspect
import types

import numpy as np
import pytest
import torch

from MedCLIPSAMLib import postprocess as postprocess_module
from MedCLIPSAMLib.phantoms import make_image
from MedCLIPSAMLib.pipeline.image import ImageSegmenter
from MedCLIPSAMLib.pipeline.presets import get_preset
from MedCLIPSAMLib.pipeline.text import TextEmbeddings, make_prompt
from MedCLIPSAMLib.saliency import gscorecam as gscorecam_module
from MedCLIPSAMLib.saliency import m2ib as m2ib_module

V1_GSCORECAM = {"topk": 300, "layer": "visual.trunk.blocks[11].norm2"}
V1_CRF = {"tau": 1.05, "eps": 1e-8, "gaussian_sxy": 3, "gaussian_compat": 3, "bilateral_sxy": 60,
          "bilateral_srgb": 5, "bilateral_compat": 5, "iterations": 1}
V2_M2IB = {"block": 9, "beta": 1.0, "init_alpha": 5.0, "lr": 1.0, "steps": 10, "batch_size": 10}
V2_KMEANS = {"resize_to": 256}


def _blob_maps(clip, images, *args, **kwargs):
    """A saliency result without the cost of computing one: a bright disc per image (the arguments are the
    point of these tests; the real M2IB computation is checked on its own below)."""
    yy, xx = np.mgrid[:224, :224]
    disc = (((yy - 112) ** 2 + (xx - 112) ** 2) < 40 ** 2).astype(np.float32)
    return types.SimpleNamespace(maps=np.repeat(disc[None], images.shape[0] if images.ndim == 4 else 1, 0))


def _recording(monkeypatch, owner, name, calls, setitem=False, instead=None):
    """Replace owner.name (or owner[name]) by a wrapper recording the bound arguments, defaults applied;
    it then calls the original (or `instead`)."""
    original = owner[name] if setitem else getattr(owner, name)
    signature = inspect.signature(original)

    @functools.wraps(original)   # the same signature: method_settings() reads it
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append({k: v for k, v in bound.arguments.items() if k not in ("clip", "images", "text_embedding",
                                                                            "saliency", "image_gray", "region")})
        return (instead or original)(*args, **kwargs)

    if setitem:
        monkeypatch.setitem(owner, name, wrapper)
    else:
        monkeypatch.setattr(owner, name, wrapper)


def _run(tiny_clip, preset, overrides=()):
    image = make_image("mr", size=(48, 48), seed=0, lesion={"size": "large"}).image
    settings = get_preset(preset, ["sam=none", *overrides])
    ImageSegmenter(tiny_clip, None, settings, text=TextEmbeddings(tiny_clip, disk=False))(image, "brain tumor")


def _run_recording(tiny_clip, monkeypatch, preset, saliency_owner, saliency_name, postprocessor):
    """Run `preset` once, recording what its saliency method and postprocessor were called with."""
    saliency_calls, post_calls = [], []
    _recording(monkeypatch, saliency_owner, saliency_name, saliency_calls, instead=_blob_maps)
    _recording(monkeypatch, postprocess_module.POSTPROCESSORS, postprocessor, post_calls, setitem=True)
    _run(tiny_clip, preset)
    return saliency_calls, post_calls


def test_v1_runs_gscorecam_on_blocks_11_norm2_with_300_channels_and_the_papers_crf(tiny_clip, monkeypatch):
    saliency_calls, crf_calls = _run_recording(tiny_clip, monkeypatch, "v1", gscorecam_module, "run_gscorecam", "crf")
    assert len(saliency_calls) == 1 and len(crf_calls) == 1
    assert {k: saliency_calls[0][k] for k in V1_GSCORECAM} == V1_GSCORECAM
    assert {k: crf_calls[0][k] for k in V1_CRF} == V1_CRF
    settings = get_preset("v1")
    assert (settings.top_n, settings.prompt_mode, settings.mask_threshold) == (1, "box", 0.5)


def test_v2_runs_m2ib_on_block_9_with_the_released_optimiser_and_kmeans_k2(tiny_clip, monkeypatch):
    saliency_calls, kmeans_calls = _run_recording(tiny_clip, monkeypatch, "v2", m2ib_module, "run_m2ib", "kmeans")
    assert len(saliency_calls) == 1 and len(kmeans_calls) == 1
    assert {k: saliency_calls[0][k] for k in V2_M2IB} == V2_M2IB
    assert {k: kmeans_calls[0][k] for k in V2_KMEANS} == V2_KMEANS
    settings = get_preset("v2")
    assert (settings.prompt_mode, settings.mask_threshold) == ("boxes", 0.5)
    # brain MRI: the released brain-tumour script's beta, through the preset's own override
    assert get_preset("v2", ["saliency_settings.beta=2"]).saliency_settings["beta"] == 2


def test_m2ib_bottleneck_sits_on_the_output_of_block_9_starting_at_alpha_5(tiny_clip):
    """methods.py takes hidden_states[layer_idx + 1] (the output of 0-based block layer_idx) as the features
    the bottleneck masks. With 0 steps alpha stays at its initial value, so the returned KL per token and
    channel is a known function of those features: KL(sigmoid(5) * r, (1 - sigmoid(5))^2 || N(0, 1)) with
    r the block's output (standard noise statistics, mean 0 and var 1, as iba.py's estimator is set)."""
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32))
    text = TextEmbeddings(tiny_clip, disk=False)(make_prompt("brain tumor", False))
    captured = []
    block = tiny_clip.model.visual.trunk.blocks[9]
    handle = block.register_forward_hook(lambda module, args, output: captured.append(output.detach().clone()))
    try:
        with torch.no_grad():
            tiny_clip.model.encode_image(x)
    finally:
        handle.remove()
    result = m2ib_module.run_m2ib(tiny_clip, x, text, steps=0)
    lam = torch.sigmoid(torch.tensor(5.0))
    r = captured[0].float()
    expected = 0.5 * ((lam * r) ** 2 + (1 - lam) ** 2 - 1) - torch.log(1 - lam)
    torch.testing.assert_close(result.capacity, expected, rtol=1e-5, atol=1e-5)


def test_crf_unary_is_the_released_formula_with_tau_1_05():
    s = np.array([0.0, 0.1, 0.5, 0.9, 1.0])
    tau, eps = 1.05, 1e-8
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    expected = np.stack([-np.log(1 - s + eps) / (tau * sig(1 - s)), -np.log(s + eps) / (tau * sig(s))])
    np.testing.assert_allclose(postprocess_module.crf_unary(s), expected.astype(np.float32), rtol=1e-6)


def _two_means(values):
    """Exact 1D k=2 clustering by brute force: the split of the sorted values with the least squared error."""
    v = np.sort(np.asarray(values, np.float64))
    n, i = len(v), np.arange(1, len(v))
    c1, c2 = np.cumsum(v)[:-1], np.cumsum(v ** 2)[:-1]
    t1, t2 = v.sum(), (v ** 2).sum()
    cost = (c2 - c1 ** 2 / i) + ((t2 - c2) - (t1 - c1) ** 2 / (n - i))   # squared error of each split
    best = int(np.argmin(cost))
    return (v[best] + v[best + 1]) / 2   # a threshold between the two clusters


@pytest.mark.parametrize("kind", ["two blobs", "skewed"])
def test_kmeans_is_two_clusters_of_the_saliency_values_the_higher_one_foreground(kind):
    rng = np.random.default_rng(0)
    if kind == "two blobs":
        s = np.clip(np.where(rng.random((256, 256)) < 0.3, rng.normal(0.8, 0.05, (256, 256)),
                             rng.normal(0.2, 0.1, (256, 256))), 0, 1)
    else:  # one skewed (log-concave) spread of values: k-means has one optimum, reached only when converged
        s = rng.beta(2.0, 5.0, (256, 256))
    cut = _two_means(s.ravel())
    np.testing.assert_array_equal(postprocess_module.kmeans_mask(s), s > cut)
