"""CLIP image embeddings without the work that pooling throws away.

BiomedCLIP's image tower is a timm ViT with 'token' pooling: of the last block's output only the CLS token
reaches the projection. So the last block needs attention for that one query (keys and values still come
from every token) and its MLP for that one token: about a sixth of a full block. On ViT-B/16 (12 blocks)
that is about 7% of an image embedding and, for M2IB (which runs only blocks 10 and 11 at each step, with
a backward pass), about 40% of its fitting. The result equals the full forward up to rounding
(Testing/Python/test_clip_image.py compares them); other architectures take the full path.
"""

import torch
import torch.nn.functional as F

from .hooks import hooked, run_until


def pools_first_token(trunk, block):
    """True when the trunk keeps only token 0 of `block`'s output (its last block): timm's own
    VisionTransformer with 'token' pooling and its own readout (not replaced on the instance), and the
    block is timm's standard pre-norm Block with standard Attention, in eval mode (no dropout, no
    stochastic depth)."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return (type(trunk) is VisionTransformer and trunk.global_pool == "token" and trunk.attn_pool is None
            and not {"forward_head", "pool", "forward_features"} & set(vars(trunk))
            and type(block) is Block and type(block.attn) is Attention and not block.training
            and block is trunk.blocks[-1])


def first_token_attention(attn, h):
    """timm Attention's output for token 0 only ([B,1,C]) from the normed tokens h [B,N,C]."""
    batch, count, _ = h.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    width = heads * head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :1], weight[:width], None if bias is None else bias[:width])
    kv = F.linear(h, weight[width:], None if bias is None else bias[width:])
    q = q.reshape(batch, 1, heads, head_dim).transpose(1, 2)
    k, v = kv.reshape(batch, count, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, as timm's both paths
    out = attn.norm(out.transpose(1, 2).reshape(batch, 1, width))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(h[:, :1]).sigmoid()
    return attn.proj_drop(attn.proj(out))


def first_token_block(block, tokens):
    """timm Block's output for token 0 only ([B,1,C]); mirrors Block.forward."""
    x = tokens[:, :1] + block.drop_path1(block.ls1(first_token_attention(block.attn, block.norm1(tokens))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def encode_from_block(clip, tokens, start):
    """Image embeddings (unnormalised) from the tokens entering block `start`: the rest of the blocks (the
    last one for the pooled token only where that is exact), the final norm, timm's pooling and open_clip's
    projection head. Mirrors TimmModel.forward -> VisionTransformer.forward_features / forward_head."""
    visual = clip.model.visual
    trunk = visual.trunk
    for block in trunk.blocks[start:]:
        tokens = first_token_block(block, tokens) if pools_first_token(trunk, block) else block(tokens)
    tokens = trunk.norm(tokens)
    return visual.head(trunk.forward_head(tokens))


def image_embeddings(clip, images):
    """Unnormalised image embeddings [B,D] of normalised images [B,3,H,W], like open_clip's
    model.encode_image, with the last block computed for the pooled token only where that is exact."""
    visual = clip.model.visual
    trunk = getattr(visual, "trunk", None)
    blocks = getattr(trunk, "blocks", None)
    if not blocks or not hasattr(visual, "head") or not pools_first_token(trunk, blocks[-1]):
        return clip.model.encode_image(images)
    with hooked(blocks[-1], stop=True, before=True) as store:  # the tokens entering the last block
        run_until(clip.model.encode_image, images)
    return encode_from_block(clip, store[0], len(blocks) - 1)
