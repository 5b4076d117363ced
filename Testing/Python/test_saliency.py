"""Saliency (gScoreCAM, GradCAM, M2IB) on the tiny random CLIP: checked against pytorch-grad-cam, against
their own formulas, and on a constructed model where the text-image signal sits in a known quadrant."""

import copy
import dataclasses
import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from MedCLIPSAMLib.errors import MedCLIPSAMError  # noqa: E402
from MedCLIPSAMLib.saliency import SALIENCY_METHODS, compute_saliency, compute_saliency_batch  # noqa: E402

NORM2 = "visual.trunk.blocks[11].norm2"
# cheap settings for the runs that only check shapes and prompt dependence
# (M2IB keeps its 10 steps: its first steps shrink every gate alike, the text shows in the later ones)
FAST = {"gscorecam": {"topk": 8, "batch_size": 16}, "gradcam": {}, "m2ib": {"steps": 10, "batch_size": 2}}


def _text(clip, seed):
    """A random unit text embedding (the tiny model's text tower is random too: a sentence is no better)."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(clip.model.visual.head.proj.out_features, generator=g), dim=0)


def _smooth_image(clip):
    """A smooth random picture (colour blobs, not pixel noise) as the normalised CLIP input."""
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    return clip.preprocess_array(np.asarray(Image.fromarray(small).resize((224, 224), Image.BILINEAR)))


@pytest.fixture(scope="module")
def image(tiny_clip):
    return _smooth_image(tiny_clip)


def _grid_reshape(tokens):
    side = int((tokens.shape[1] - 1) ** 0.5)
    return tokens[:, 1:, :].reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


class _LogitModel(torch.nn.Module):
    """The CLIP image tower with CLIP's image-text logit as its only output, for pytorch-grad-cam."""

    def __init__(self, clip, text):
        super().__init__()
        self.clip_model, self.text = clip.model, text
        self.scale = float(clip.model.logit_scale.detach().exp())

    def forward(self, x):
        return (self.scale * F.normalize(self.clip_model.encode_image(x), dim=-1) @ self.text)[:, None]


@pytest.fixture(scope="module")
def small_clip(tiny_clip):
    """The tiny CLIP with its position embeddings resampled to 64 px (timm's set_input_size): same
    blocks, layers and weights, 4x4 patches, so the 2 x 192 masked forwards of the ScoreCAM check stay
    affordable on a 2-core CPU."""
    model = copy.deepcopy(tiny_clip.model)
    model.visual.set_input_size(64)
    return dataclasses.replace(tiny_clip, model=model, image_size=64)


@pytest.fixture(scope="module")
def small_image(small_clip):
    return _smooth_image(small_clip)


@pytest.fixture(scope="module")
def full_gscorecam(small_clip, small_image):
    from MedCLIPSAMLib.saliency.gscorecam import run_gscorecam

    image = small_image
    text = _text(small_clip, 1)
    return image, text, run_gscorecam(small_clip, image, text, topk=10_000, batch_size=64)


def test_gscorecam_all_channels_equals_pytorch_grad_cam_scorecam(small_clip, full_gscorecam):
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    image, text, ours = full_gscorecam
    width = small_clip.model.visual.trunk.embed_dim
    assert ours.channels.shape == (1, width)  # topk clamped to the layer width
    layer = small_clip.model.visual.trunk.blocks[11].norm2
    with ScoreCAM(_LogitModel(small_clip, text), [layer], reshape_transform=_grid_reshape) as cam:
        cam.batch_size = 64
        reference = cam(image[None], targets=[ClassifierOutputTarget(0)])[0]
    assert ours.maps.shape == (1, 64, 64) and ours.maps.dtype == np.float32
    assert reference.std() > 0.05  # a real map, not an empty one
    np.testing.assert_allclose(ours.maps[0], reference, atol=1e-5)


def _mean_gradient_by_hand(clip, image, text, layer):
    """The paper's channel ranking computed here, not by the library: the gradient of CLIP's image-text
    logit with respect to the layer's output tokens, averaged over the tokens -> [C]."""
    store = {}

    def keep(module, inputs, output):
        output.retain_grad()
        store["tokens"] = output

    handle = layer.register_forward_hook(keep)
    try:
        x = image[None].clone().requires_grad_(True)
        _LogitModel(clip, text)(x).sum().backward()
    finally:
        handle.remove()
        clip.model.zero_grad(set_to_none=True)
    return store["tokens"].grad[0].mean(dim=0)


def test_gscorecam_topk_equals_full_formula_restricted_to_kept_channels(small_clip, full_gscorecam):
    from MedCLIPSAMLib.saliency.common import minmax, upsample
    from MedCLIPSAMLib.saliency.gscorecam import run_gscorecam

    image, text, full = full_gscorecam
    k = 24
    small = run_gscorecam(small_clip, image, text, topk=k, batch_size=64)
    # the ranking is the mean gradient over the layer's tokens; at norm2 of the last block only the CLS
    # token has a gradient, and it must not be zero (or the top k would be arbitrary)
    by_hand = _mean_gradient_by_hand(small_clip, image, text, small_clip.model.visual.trunk.blocks[11].norm2)
    assert by_hand.abs().max() > 0
    torch.testing.assert_close(small.ranking[0], by_hand, rtol=1e-4, atol=1e-7)
    expected_channels = by_hand.topk(k).indices  # the largest mean gradients: the channels that raise the logit
    # the test can tell the paper's ranking from the likely slips (lowest or largest absolute gradient)
    for wrong in (-by_hand, by_hand.abs()):
        assert set(wrong.topk(k).indices.tolist()) != set(expected_channels.tolist())
    assert torch.equal(small.channels[0], expected_channels)
    # full formula (all channels scored once) with a channel mask: dropped channels get zero weight
    scores = torch.zeros(full.ranking.shape[1])
    scores[full.channels[0]] = full.scores[0]
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[expected_channels] = True
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=0)
    cam = torch.relu((weights[:, None, None] * full.activations[0]).sum(0))
    expected = minmax(upsample(cam[None, None], image.shape[-2:])[:, 0])[0].numpy()
    np.testing.assert_allclose(small.maps[0], expected, atol=1e-5)
    assert np.abs(small.maps[0] - full.maps[0]).max() > 1e-3  # dropping channels did change the map


def test_gscorecam_bf16_scoring_close_to_fp32(small_clip, small_image):
    from MedCLIPSAMLib.saliency.gscorecam import run_gscorecam

    text = _text(small_clip, 1)
    fp32 = run_gscorecam(small_clip, small_image, text, topk=16, batch_size=16)
    bf16 = run_gscorecam(small_clip, small_image, text, topk=16, batch_size=16, autocast=True)
    assert torch.equal(fp32.channels, bf16.channels)  # the ranking pass stays fp32
    assert np.corrcoef(fp32.maps[0].ravel(), bf16.maps[0].ravel())[0, 1] > 0.9


def test_gradcam_equals_pytorch_grad_cam(tiny_clip, image):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from MedCLIPSAMLib.saliency.gradcam import gradcam

    text = _text(tiny_clip, 2)
    ours = gradcam(tiny_clip, image, text)
    layer = tiny_clip.model.visual.trunk.blocks[11].norm1
    try:
        with GradCAM(_LogitModel(tiny_clip, text), [layer], reshape_transform=_grid_reshape) as cam:
            reference = cam(image[None], targets=[ClassifierOutputTarget(0)])[0]
    finally:
        tiny_clip.model.zero_grad(set_to_none=True)  # pytorch-grad-cam backpropagates into the weights
    assert reference.std() > 0.05
    np.testing.assert_allclose(ours[0], reference, atol=1e-5)
    # at norm2 of the last block the patch tokens get no gradient (CLS pooling): GradCAM is empty there
    assert np.all(gradcam(tiny_clip, image, text, layer=NORM2) == 0)


def test_m2ib_capacity_is_the_closed_form_kl():
    """KL(N(lambda r, (1 - lambda)^2) || N(0, 1)) = 0.5 (lambda^2 r^2 + (1 - lambda)^2 - 1) - log(1 - lambda),
    r = (x - mean) / std, checked on values worked out by hand and against torch.distributions."""
    from MedCLIPSAMLib.saliency.m2ib import capacity

    # alpha 0 -> lambda 1/2; x 2, mean 0, std 1 -> r 2: 0.5 (1 + 1/4 - 1) + log 2 = 0.125 + 0.693147 = 0.818147
    # alpha 0, x 3, mean 1, std 2 -> r 1: 0.5 (1/4 + 1/4 - 1) + log 2 = -0.25 + 0.693147 = 0.443147
    # alpha log 3 -> lambda 3/4; x 2, mean 0, std 1: 0.5 (9/4 + 1/16 - 1) + log 4 = 0.65625 + 1.386294 = 2.042544
    alpha = torch.tensor([[[0.0, 0.0, float(np.log(3.0))]]])
    feats = torch.tensor([[[2.0, 3.0, 2.0]]])
    mean = torch.tensor([[[0.0, 1.0, 0.0]]])
    std = torch.tensor([[[1.0, 2.0, 1.0]]])
    torch.testing.assert_close(capacity(alpha, feats, mean, std), torch.tensor([[[0.818147, 0.443147, 2.042544]]]),
                               rtol=0, atol=1e-5)
    # and on random values, against the Gaussian KL of torch.distributions
    g = torch.Generator().manual_seed(0)
    alpha, feats = torch.randn(2, 5, 7, generator=g) * 3, torch.randn(2, 5, 7, generator=g) * 4
    mean, std = torch.randn(2, 1, 7, generator=g), torch.rand(2, 1, 7, generator=g) + 0.5
    lam = torch.sigmoid(alpha)
    q = torch.distributions.Normal(lam * (feats - mean) / std, 1 - lam)
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(capacity(alpha, feats, mean, std), expected, rtol=1e-4, atol=1e-5)


def test_m2ib_loss_decreases_and_cached_prefix_equals_full_recomputation(small_clip, small_image):
    from MedCLIPSAMLib.saliency.m2ib import run_m2ib

    clip, image = small_clip, small_image  # all 12 blocks, bottleneck on block 9, 64 px for time
    text = _text(clip, 3)
    settings = dict(steps=3, batch_size=2, seed=7)
    cached = run_m2ib(clip, image, text, **settings)
    full = run_m2ib(clip, image, text, recompute_prefix=True, **settings)
    losses = cached.loss_history[:, 0]
    assert losses.shape == (3,) and np.all(np.diff(losses) < 0), losses
    np.testing.assert_allclose(cached.loss_history, full.loss_history, atol=1e-4)
    np.testing.assert_allclose(cached.maps, full.maps, atol=1e-4)
    assert cached.maps.std() > 0.05
    # the seed fixes the noise: the same seed gives the same map
    np.testing.assert_array_equal(run_m2ib(clip, image, text, **settings).maps, cached.maps)


def _quadrant_readout_clip(clip):
    """A copy of the tiny CLIP whose pooling reads the final tokens of two quadrants only: the first half
    of the channels from the mean over the top-left 7x7 patches, the second half from the bottom-right.
    Returns (clip copy, the readout function, half the width)."""
    model = copy.deepcopy(clip.model)
    trunk = model.visual.trunk
    cells = torch.zeros(14, 14, dtype=torch.bool)
    top_left, bottom_right = cells.clone(), cells.clone()
    top_left[:7, :7] = True
    bottom_right[7:, 7:] = True
    half = trunk.embed_dim // 2

    def readout(self, x, pre_logits=False):
        patches = x[:, self.num_prefix_tokens:]
        a = patches[:, top_left.flatten()].mean(1)
        b = patches[:, bottom_right.flatten()].mean(1)
        return torch.cat([a[:, :half], b[:, half:]], dim=1)

    trunk.forward_head = types.MethodType(readout, trunk)
    return dataclasses.replace(clip, model=model), readout, half


def test_m2ib_map_follows_the_text_to_its_quadrant(tiny_clip):
    """Two identical bright squares (top-left, bottom-right) on a flat background; a constructed model
    reads the top-left quadrant into one half of its features and the bottom-right into the other; each
    text is the embedding direction of one half. Image and model are the same for both texts and the two
    squares look alike, so a map that follows the image alone cannot pass for both texts: each map must
    land on its own text's quadrant."""
    from MedCLIPSAMLib.models.hooks import hooked
    from MedCLIPSAMLib.saliency.m2ib import run_m2ib

    clip, readout, half = _quadrant_readout_clip(tiny_clip)
    gray = np.full((224, 224), 60, np.uint8)
    gray[24:88, 24:88] = 230
    gray[136:200, 136:200] = 230
    image = clip.preprocess_array(np.stack([gray] * 3, -1))
    with torch.no_grad(), hooked(clip.model.visual.trunk.norm) as store:
        clip.model.encode_image(image[None])
        pooled = readout(clip.model.visual.trunk, store[0])
        only_tl, only_br = pooled.clone(), pooled.clone()
        only_tl[:, half:] = 0
        only_br[:, :half] = 0
        texts = F.normalize(clip.model.visual.head(torch.cat([only_tl, only_br])), dim=-1)
    # the method's settings (10 Adam steps at lr 1, beta 1, N(0,1) noise) with 5 noisy copies, not 10, for time
    result = run_m2ib(clip, torch.stack([image, image]), texts, batch_size=5)
    for maps, (mine, other) in zip(result.maps, [((0, 0), (1, 1)), ((1, 1), (0, 0))]):
        mass = maps.reshape(2, 112, 2, 112).sum(axis=(1, 3)) / maps.sum()
        assert mass[mine] == mass.max() and mass[mine] > 1.3 * mass[other], mass.round(3)
    # 10 Adam steps lower the loss of both images
    assert np.all(result.loss_history[-1] < result.loss_history[0] - 1.0), result.loss_history


@pytest.mark.parametrize("method", sorted(SALIENCY_METHODS))
def test_saliency_depends_on_the_prompt_and_maps_are_valid(tiny_clip, image, method):
    # the same image twice in one batch, one random prompt embedding each
    texts = torch.stack([_text(tiny_clip, 11), _text(tiny_clip, 12)])
    first, second = compute_saliency_batch(method, tiny_clip, torch.stack([image, image]), texts, **FAST[method])
    for saliency in (first, second):
        assert saliency.shape == (224, 224) and saliency.dtype == np.float32
        assert np.isfinite(saliency).all() and saliency.min() >= 0 and saliency.max() <= 1
        assert saliency.max() == pytest.approx(1.0)
    assert np.abs(first - second).mean() > 0.03, method


@pytest.mark.parametrize("method", sorted(SALIENCY_METHODS))
def test_constant_images_give_valid_maps(tiny_clip, method):
    # a blank slice: the tokens differ only by their position embeddings; the map must stay finite
    blank = tiny_clip.preprocess_array(np.full((224, 224, 3), 128, np.uint8))
    settings = dict(FAST[method], steps=2) if method == "m2ib" else FAST[method]
    maps = compute_saliency_batch(method, tiny_clip, torch.stack([blank, torch.zeros_like(blank)]),
                                  _text(tiny_clip, 5), **settings)
    assert maps.shape == (2, 224, 224) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1


def test_batch_equals_single_images_and_hooks_are_removed(tiny_clip, small_clip, small_image):
    clip, image = small_clip, small_image
    text = _text(clip, 4)
    other = torch.flip(image, dims=[-1])
    batch = compute_saliency_batch("gradcam", clip, torch.stack([image, other]), text)
    np.testing.assert_allclose(batch[1], compute_saliency("gradcam", clip, other, text), atol=1e-5)
    # each image draws its own noise from the seed: alone or in a batch, the same map
    m2ib_batch = compute_saliency_batch("m2ib", clip, torch.stack([image, other]), text, steps=3, batch_size=2)
    m2ib_one = compute_saliency("m2ib", clip, other, text, steps=3, batch_size=2)
    np.testing.assert_allclose(m2ib_batch[1], m2ib_one, atol=1e-4)
    # callers may run in inference mode: the gradient-based methods still work there
    with torch.inference_mode():
        np.testing.assert_allclose(compute_saliency("gradcam", clip, other, text), batch[1], atol=1e-5)
    for model in (tiny_clip.model, clip.model):
        for module in model.modules():
            assert not module._forward_hooks and not module._forward_pre_hooks


def test_errors_and_lazy_import(tiny_clip, image):
    text = _text(tiny_clip, 4)
    with pytest.raises(MedCLIPSAMError, match="unknown saliency method"):
        compute_saliency("lime", tiny_clip, image, text)
    with pytest.raises(MedCLIPSAMError, match="unknown gscorecam setting"):
        compute_saliency("gscorecam", tiny_clip, image, text, top_k=3)
    with pytest.raises(MedCLIPSAMError, match="one \\[3,H,W\\] image"):
        compute_saliency("gradcam", tiny_clip, image[None], text)
    with pytest.raises(MedCLIPSAMError, match="no layer"):
        compute_saliency("gradcam", tiny_clip, image, text, layer="visual.trunk.blocks[40].norm1")
    code = "import sys, MedCLIPSAMLib.saliency as s; assert 'torch' not in sys.modules and s.SALIENCY_METHODS"
    subprocess.run([sys.executable, "-c", code], check=True)
