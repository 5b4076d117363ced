"""MedCLIPSeg model: a frozen CLIP (BiomedCLIP layout) with probabilistic vision-language adapters and a
text-conditioned segmentation head.

Layout supported: open_clip CustomTextCLIP with a timm ViT image tower (`visual.trunk`) and a Hugging Face
BERT text tower (`text.transformer`), i.e. BiomedCLIP and the project's random test models.

How it runs (one forward pass)
1. the frozen image tower runs its first blocks (no adapter, no gradient needed);
2. the text tower runs through its own Hugging Face code (so its attention mask and pooling are exactly
   the library's); each of its layers is wrapped by `_TappedLayer`, which hands the layer's output to the
   model. From the first adapted layer on, the model then steps the image tower one block in lockstep and
   lets the pair's adapter exchange information both ways (image <- text and text <- image);
3. the image tower finishes (final norm, pooling, projection) and the head turns the patch tokens and the
   text embedding into a mask.
Nothing global is patched: the text layers of this model's private CLIP copy are wrapped in place, and a
wrapper with no tap set is a plain pass-through (the CLIP still encodes text as before).

Adapters (one per adapted layer pair, the last `layers` blocks, 10 by default as in the paper)
- both streams are layer-normed and projected into a shared bottleneck (768 -> 256 for ViT-B; other widths
  use the same 1/3 ratio unless `bottleneck` is given);
- bidirectional probabilistic cross-attention: queries from one stream, keys and values from the other,
  each key and value with a mean and a softplus variance; score = Q.K_mu/sqrt(C) - 2.35 sqrt(Q^2.K_var/C)
  (the key's mean similarity minus 2.35 of its standard deviations: uncertain keys get less attention);
  values are sampled with the reparameterisation trick in training and in stochastic inference passes;
- a learned gate sigmoid(g), g = 0 at the start, mixes the deterministic pathway (ordinary attention on the
  means) with the probabilistic one, as in the paper;
- the result goes back to the stream's width through an up-projection that starts at ZERO and is added to
  the stream (residual).

Why the zero up-projection (and not "gate = 0"): the issue asks that the untrained model equal the frozen
CLIP exactly, but sigmoid(0) = 0.5, so a sigmoid gate starting at g = 0 cannot switch the adapter off.
Keeping the paper's gate (it balances the two pathways) and starting the adapter's output projection at
zero gives an adapter whose contribution is exactly 0.0 until training moves it, so image and text
embeddings are bit-identical to the frozen CLIP's at initialisation (tested), while every adapter weight
still receives gradient from the first step on (through the up-projection, the way LoRA starts B = 0).

Head: patch tokens (after the tower's final norm) -> linear to the CLIP embedding width -> 14x14 grid ->
two learned 2x up-samplings (28, 56) -> per-pixel embeddings; the adapted text embedding goes through an
MLP to the same width; the per-pixel dot product (+ a learned bias) is the mask logit at 56x56, resized
bilinearly to the input size. The 14x14 projected patch embeddings also feed the patch-level contrastive loss.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MedCLIPSAMError

# the paper's penalty: keys lose 2.35 standard deviations of their similarity
VARIANCE_PENALTY = 2.35
# smallest value under the square root: keeps its gradient finite when a query or a variance is zero
_SQRT_EPS = 1e-12
# softplus(-2) = 0.13: variances start small next to the unit-scale means, so early training is stable
_VARIANCE_BIAS = -2.0
_LOGIT_BIAS = -2.0


def default_bottleneck(vision_width):
    """768 -> 256 as in the paper; other widths keep the ratio 1/3 (at least 16)."""
    return max(16, int(round(vision_width / 3)))


def default_heads(bottleneck):
    return max(1, bottleneck // 64)


# --------------------------------------------------------------------------------------------------
# probabilistic attention

def probabilistic_attention(q, k_mu, k_var, v_mu, v_var=None, mask=None, sample=False):
    """Attention whose keys and values are Gaussians (mean, variance), all [..., L, C].

    score = q.k_mu / sqrt(C) - 2.35 * sqrt((q*q).k_var / C); mask (bool, broadcast to [..., Lq, Lk]) is True
    where a key may be attended. With sample=True the values are drawn v_mu + sqrt(v_var) * eps (the
    reparameterisation trick), else their means are used. With zero variances this is scaled dot-product
    attention (the penalty is the same tiny constant for every key, which softmax ignores).
    """
    c = q.shape[-1]
    mean_score = q @ k_mu.transpose(-2, -1) / math.sqrt(c)
    spread = ((q * q) @ k_var.transpose(-2, -1) / c).clamp_min(_SQRT_EPS).sqrt()
    score = mean_score - VARIANCE_PENALTY * spread
    if mask is not None:
        score = score.masked_fill(~mask, float("-inf"))
    weights = score.softmax(dim=-1)
    values = v_mu
    if sample and v_var is not None:
        values = v_mu + v_var.sqrt() * torch.randn_like(v_mu)
    return weights @ values


class ProbabilisticCrossAttention(nn.Module):
    """Queries from `x`, Gaussian keys and values from `context`, gated mix of the deterministic and the
    probabilistic pathway: out = W_o((1 - sigmoid(g)) * attn(Q, K_mu, V_mu) + sigmoid(g) * prob_attn(...))."""

    def __init__(self, dim, heads=1):
        super().__init__()
        if dim % heads:
            raise MedCLIPSAMError(f"the adapter width {dim} is not divisible by its {heads} attention heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k_mu = nn.Linear(dim, dim)
        self.k_var = nn.Linear(dim, dim)
        self.v_mu = nn.Linear(dim, dim)
        self.v_var = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(1))  # sigmoid(0) = 0.5: both pathways equally at the start
        for layer in (self.k_var, self.v_var):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.constant_(layer.bias, _VARIANCE_BIAS)

    def _split(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)  # [B, heads, N, C]

    def forward(self, x, context, context_mask=None, sample=False):
        q = self._split(self.q(x))
        k_mu, v_mu = self._split(self.k_mu(context)), self._split(self.v_mu(context))
        k_var = self._split(F.softplus(self.k_var(context)))
        v_var = self._split(F.softplus(self.v_var(context)))
        mask = None if context_mask is None else context_mask[:, None, None, :]
        deterministic = F.scaled_dot_product_attention(q, k_mu, v_mu, attn_mask=mask)
        probabilistic = probabilistic_attention(q, k_mu, k_var, v_mu, v_var, mask, sample)
        g = torch.sigmoid(self.gate)
        mixed = (1 - g) * deterministic + g * probabilistic
        b, h, n, c = mixed.shape
        return self.out(mixed.transpose(1, 2).reshape(b, n, h * c))


class VisionLanguageAdapter(nn.Module):
    """One adapted layer pair: bottleneck both streams, cross-attend both ways, add back (zero at start)."""

    def __init__(self, vision_width, text_width, bottleneck, heads):
        super().__init__()
        self.norm_v, self.norm_t = nn.LayerNorm(vision_width), nn.LayerNorm(text_width)
        self.down_v, self.down_t = nn.Linear(vision_width, bottleneck), nn.Linear(text_width, bottleneck)
        self.image_from_text = ProbabilisticCrossAttention(bottleneck, heads)
        self.text_from_image = ProbabilisticCrossAttention(bottleneck, heads)
        self.up_v, self.up_t = nn.Linear(bottleneck, vision_width), nn.Linear(bottleneck, text_width)
        for up in (self.up_v, self.up_t):  # the adapter adds exactly 0 until trained (module docstring)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def forward(self, v, t, text_mask, sample=False):
        hv = self.down_v(self.norm_v(v))
        ht = self.down_t(self.norm_t(t))
        # each stream keeps its own bottleneck features and adds what it gathered from the other one, so
        # the adapter can also reshape a stream (a plain bottleneck adapter) and not only mix in the other
        dv = self.image_from_text(hv, ht, text_mask, sample)
        dt = self.text_from_image(ht, hv, None, sample)
        return v + self.up_v(F.gelu(hv + dv)), t + self.up_t(F.gelu(ht + dt))


# --------------------------------------------------------------------------------------------------
# head

def _up_block(c_in, c_out):
    groups = math.gcd(8, c_out)
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 2, stride=2), nn.GroupNorm(groups, c_out), nn.GELU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.GELU(),
    )


class SegmentationHead(nn.Module):
    """Patch tokens [B, N, W] + text embedding [B, E] -> mask logits [B, 1, 4G, 4G] (G = patch grid)."""

    def __init__(self, vision_width, embed_dim):
        super().__init__()
        e = embed_dim
        self.patch_proj = nn.Linear(vision_width, e)
        self.text_mlp = nn.Sequential(nn.Linear(e, e), nn.GELU(), nn.Linear(e, e))
        self.decoder = nn.Sequential(_up_block(e, max(8, e // 2)), _up_block(max(8, e // 2), max(8, e // 4)))
        self.pixel_proj = nn.Conv2d(max(8, e // 4), e, 1)
        # targets are mostly background: start at p = sigmoid(-2) = 0.12 rather than 0.5, so the first
        # steps learn where the target is instead of first pushing every pixel down
        self.bias = nn.Parameter(torch.full((1,), _LOGIT_BIAS))

    def forward(self, patch_tokens, text_embedding, grid):
        b, n, _ = patch_tokens.shape
        patches = self.patch_proj(patch_tokens)                       # [B, N, E]: also used by the contrastive loss
        text = F.normalize(self.text_mlp(text_embedding), dim=-1)     # [B, E]
        fmap = patches.transpose(1, 2).reshape(b, -1, grid, grid)
        pixels = self.pixel_proj(self.decoder(fmap))                  # [B, E, 4G, 4G]
        logits = torch.einsum("bchw,bc->bhw", pixels, text)[:, None] + self.bias
        return logits, patches, text


# --------------------------------------------------------------------------------------------------
# hooking into the text tower

class _Tap:
    """Holds the function the tapped text layers call; None outside a MedCLIPSeg forward pass."""

    fn = None


class _TappedLayer(nn.Module):
    """Wraps one Hugging Face encoder layer: calls it unchanged, then hands its output to the tap (if set)."""

    def __init__(self, layer, index, tap):
        super().__init__()
        self.layer = layer
        self.index = index
        self._tap = tap  # a plain object, not a module: no reference cycle in the module tree

    def forward(self, hidden_states, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        fn = self._tap.fn
        if fn is None:
            return out
        if isinstance(out, tuple):  # older transformers return (hidden_states, ...)
            return (fn(self.index, out[0]),) + tuple(out[1:])
        return fn(self.index, out)


def _text_layers(clip_model):
    text = getattr(clip_model, "text", None)
    encoder = getattr(getattr(text, "transformer", None), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise MedCLIPSAMError("MedCLIPSeg needs a CLIP with a Hugging Face (BERT-style) text tower, like BiomedCLIP")
    return encoder


def _vision_trunk(clip_model):
    trunk = getattr(getattr(clip_model, "visual", None), "trunk", None)
    if trunk is None or not hasattr(trunk, "blocks") or not hasattr(trunk, "patch_embed"):
        raise MedCLIPSAMError("MedCLIPSeg needs a CLIP with a timm ViT image tower, like BiomedCLIP")
    return trunk


def _embed_dim(clip_model):
    """Width of the joint image-text embedding (the last Linear of the image tower's projection head)."""
    linears = [m for m in clip_model.visual.head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise MedCLIPSAMError("MedCLIPSeg needs a CLIP whose image tower ends in a linear projection")
    return linears[-1].out_features


# --------------------------------------------------------------------------------------------------
# the model

class MedCLIPSeg(nn.Module):
    """Frozen CLIP + adapters + head. Give it a private CLIP copy (`load_clip(name, reuse=False)`): its
    text layers are wrapped in place and its parameters frozen.

    forward(images [B,3,S,S] normalised, token_ids [B,L], sample=None, samples=1) -> dict with
      logits [B*samples, 1, S, S], logits_low [.., 1, 4G, 4G], patches [.., N, E], text [.., E],
      image_embedding [.., D] and text_embedding [.., D] (the CLIP's own projected embeddings, adapted).
    sample: draw the adapters' values (default: in training mode); samples > 1 repeats each image that many
    times after the frozen prefix (stochastic inference: one prefix, many adapted passes), sample-major
    within each image (rows b*samples .. b*samples + samples - 1 belong to image b). prefix: the
    images' `vision_prefix` computed before (a cache), used instead of recomputing it.
    """

    def __init__(self, clip_model, layers=10, bottleneck=None, heads=None, pad_token_id=0):
        super().__init__()
        trunk = _vision_trunk(clip_model)
        encoder = _text_layers(clip_model)
        self.clip = clip_model
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()

        vision_width = trunk.embed_dim
        text_width = clip_model.text.config.hidden_size
        embed_dim = _embed_dim(clip_model)
        depth_v, depth_t = len(trunk.blocks), len(encoder.layer)
        self.layers = int(min(layers, depth_v, depth_t))  # the shallower tower bounds the adapted pairs
        if self.layers < 1:
            raise MedCLIPSAMError("MedCLIPSeg needs at least one adapted layer")
        self.bottleneck = int(bottleneck or default_bottleneck(vision_width))
        self.heads = int(heads or default_heads(self.bottleneck))
        self.first_vision = depth_v - self.layers       # adapted image blocks: first_vision .. depth_v - 1
        self.first_text = depth_t - self.layers         # paired in order with text layers first_text ..
        self.grid = trunk.patch_embed.grid_size[0]
        self.image_size = tuple(trunk.patch_embed.img_size)
        self.prefix_tokens = trunk.num_prefix_tokens
        self.pad_token_id = pad_token_id
        self.dims = {"vision_width": vision_width, "text_width": text_width, "embed_dim": embed_dim,
                     "layers": self.layers, "bottleneck": self.bottleneck, "heads": self.heads}

        self.adapters = nn.ModuleList(
            VisionLanguageAdapter(vision_width, text_width, self.bottleneck, self.heads) for _ in range(self.layers))
        self.head = SegmentationHead(vision_width, embed_dim)

        self._tap = _Tap()
        for j, layer in enumerate(list(encoder.layer)):
            if isinstance(layer, _TappedLayer):  # wrapped by an earlier MedCLIPSeg: it now answers to this one
                layer._tap = self._tap
            else:
                encoder.layer[j] = _TappedLayer(layer, j, self._tap)

    # the CLIP stays in eval mode (BERT dropout off): frozen means deterministic
    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()
        return self

    def trainable_state_dict(self):
        """Adapter and head weights only (what a trained MedCLIPSeg model folder stores)."""
        return {f"{name}.{k}": v for name in ("adapters", "head")
                for k, v in getattr(self, name).state_dict().items()}

    def load_trainable_state_dict(self, state):
        adapters = {k[len("adapters."):]: v for k, v in state.items() if k.startswith("adapters.")}
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        self.adapters.load_state_dict(adapters)
        self.head.load_state_dict(head)

    def trainable_parameters(self):
        return [p for p in list(self.adapters.parameters()) + list(self.head.parameters())]

    # -- image tower pieces (timm VisionTransformer.forward_features, step by step) -------------------
    def vision_prefix(self, images):
        """Tokens after the frozen, un-adapted image blocks (deterministic: may be cached per image)."""
        trunk = self.clip.visual.trunk
        x = trunk.patch_embed(images)
        x = trunk._pos_embed(x)
        x = trunk.patch_drop(x)
        x = trunk.norm_pre(x)
        for block in trunk.blocks[:self.first_vision]:
            x = block(x)
        return x

    def _vision_suffix(self, x):
        trunk = self.clip.visual.trunk
        tokens = trunk.norm(x)
        embedding = self.clip.visual.head(trunk.forward_head(tokens))
        return tokens, embedding

    def forward(self, images, token_ids, sample=None, samples=1, prefix=None):
        sample = self.training if sample is None else bool(sample)
        text_mask = token_ids != self.pad_token_id
        if prefix is not None:  # cached vision_prefix(images): images may then be None
            v = prefix
        else:
            with torch.no_grad():  # frozen and un-adapted: no graph needed
                v = self.vision_prefix(images)
        if samples > 1:
            v = v.repeat_interleave(samples, dim=0)
            token_ids = token_ids.repeat_interleave(samples, dim=0)
            text_mask = text_mask.repeat_interleave(samples, dim=0)
        blocks = self.clip.visual.trunk.blocks
        state = {"v": v}

        def step(j, t):
            k = j - self.first_text
            if k < 0:
                return t
            state["v"] = blocks[self.first_vision + k](state["v"])
            state["v"], t = self.adapters[k](state["v"], t, text_mask, sample)
            return t

        self._tap.fn = step
        try:
            text_embedding = self.clip.text(token_ids)
        finally:
            self._tap.fn = None
        tokens, image_embedding = self._vision_suffix(state["v"])
        logits_low, patches, text = self.head(tokens[:, self.prefix_tokens:], text_embedding, self.grid)
        size = images.shape[-2:] if images is not None else self.image_size
        logits = F.interpolate(logits_low, size=size, mode="bilinear", align_corners=False)
        return {"logits": logits, "logits_low": logits_low, "patches": patches, "text": text,
                "image_embedding": image_embedding, "text_embedding": text_embedding}


def count_parameters(modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def trainable_parameter_count(vision_width=768, text_width=768, embed_dim=512, layers=10, bottleneck=None,
                              heads=None):
    """Adapter + head parameters for a given architecture, without building the CLIP (meta device).

    Defaults: BiomedCLIP (ViT-B/16 width 768, PubMedBERT width 768, embedding 512, 10 adapted layers)."""
    bottleneck = int(bottleneck or default_bottleneck(vision_width))
    heads = int(heads or default_heads(bottleneck))
    with torch.device("meta"):
        adapters = [VisionLanguageAdapter(vision_width, text_width, bottleneck, heads) for _ in range(layers)]
        head = SegmentationHead(vision_width, embed_dim)
    return count_parameters(adapters + [head])
