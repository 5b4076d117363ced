"""The image embedding's last block run for the pooled token only (models/clip_image.py) equals the full
forward, is taken where it is exact and nowhere else."""

import copy
import dataclasses
import types

import pytest
import torch

from MedCLIPSAMLib.models.clip_image import (encode_from_block, first_token_attention, first_token_block,
                                             image_embeddings, pools_first_token)


def _images(clip, n=3, seed=0):
    return torch.randn(n, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(seed))


def _last_block_forwards(clip):
    """A list that gets one entry each time the last block's own forward runs, and the hook's handle."""
    calls = []
    handle = clip.model.visual.trunk.blocks[-1].register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_image_embeddings_equal_the_full_forward_and_skip_the_full_last_block(tiny_clip):
    clip = tiny_clip
    trunk = clip.model.visual.trunk
    assert pools_first_token(trunk, trunk.blocks[-1])
    x = _images(clip)
    calls, handle = _last_block_forwards(clip)
    try:
        with torch.no_grad():
            fast = image_embeddings(clip, x)
            assert calls == []  # the last block's full forward did not run
            full = clip.model.encode_image(x)
    finally:
        handle.remove()
    assert calls == [1]
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    # the bundle's embeddings go the same way and stay L2-normalised
    torch.testing.assert_close(clip.encode_image(x), torch.nn.functional.normalize(full, dim=-1), rtol=1e-5, atol=1e-5)


def test_encode_from_block_equals_the_full_forward_from_any_block(tiny_clip):
    clip = tiny_clip
    trunk = clip.model.visual.trunk
    x = _images(clip, n=2, seed=1)
    with torch.no_grad():
        full = clip.model.encode_image(x)
        for start in (0, len(trunk.blocks) - 1, len(trunk.blocks)):
            store = []
            handle = (trunk.blocks[start].register_forward_pre_hook(lambda m, a: store.append(a[0]))
                      if start < len(trunk.blocks) else trunk.norm.register_forward_pre_hook(lambda m, a: store.append(a[0])))
            try:
                clip.model.encode_image(x)
            finally:
                handle.remove()
            torch.testing.assert_close(encode_from_block(clip, store[0], start), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [dict(qkv_bias=True), dict(qkv_bias=False, qk_norm=True, scale_attn_norm=True),
                                     dict(qkv_bias=True, init_values=0.1)], ids=["bias", "norms", "layer-scale"])
def test_first_token_block_equals_token_zero_of_the_block(options):
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(dim=48, num_heads=4, **options).eval()
    tokens = torch.randn(2, 17, 48)
    with torch.no_grad():
        torch.testing.assert_close(first_token_block(block, tokens), block(tokens)[:, :1], rtol=1e-5, atol=1e-6)


def test_first_token_attention_with_a_gated_attention():
    from timm.layers import Attention

    torch.manual_seed(1)
    attn = Attention(48, num_heads=6, qkv_bias=True, gated=True).eval()
    h = torch.randn(3, 10, 48)
    with torch.no_grad():
        torch.testing.assert_close(first_token_attention(attn, h), attn(h)[:, :1], rtol=1e-5, atol=1e-6)


def test_full_forward_where_the_shortcut_would_not_be_exact(tiny_clip):
    """A replaced readout (it reads patch tokens), another pooling, or training mode: the full forward."""
    x = _images(tiny_clip, n=2, seed=2)

    readout_model = copy.deepcopy(tiny_clip.model)
    trunk = readout_model.visual.trunk
    trunk.forward_head = types.MethodType(lambda self, t, pre_logits=False: t[:, 1:].mean(1), trunk)
    avg_model = copy.deepcopy(tiny_clip.model)
    avg_model.visual.trunk.global_pool = "avg"
    train_model = copy.deepcopy(tiny_clip.model).train()
    for model in (readout_model, avg_model, train_model):
        clip = dataclasses.replace(tiny_clip, model=model)
        assert not pools_first_token(model.visual.trunk, model.visual.trunk.blocks[-1])
        calls, handle = _last_block_forwards(clip)
        try:
            with torch.no_grad():
                torch.manual_seed(3)
                out = image_embeddings(clip, x)
                torch.manual_seed(3)
                assert torch.equal(out, model.encode_image(x))
        finally:
            handle.remove()
        assert calls == [1, 1]


def test_the_shortcut_in_bf16_matches_the_full_bf16_forward(tiny_clip):
    """Under the CPU's bf16 autocast (the default where the CPU has native bf16) the shortcut stays within
    bf16 rounding of the full forward in bf16."""
    from MedCLIPSAMLib.runtime import autocast

    x = _images(tiny_clip, n=4, seed=4)
    with torch.no_grad(), autocast(torch.device("cpu"), True):
        fast = image_embeddings(tiny_clip, x).float()
        full = tiny_clip.model.encode_image(x).float()
    cos = torch.nn.functional.cosine_similarity(fast, full, dim=-1)
    assert float(cos.min()) > 0.9999, cos
