"""Contrastive image-text losses: InfoNCE, HN-NCE and DHN-NCE (MedCLIP-SAM).

All three take a batch of B >= 2 matching pairs (row i of `image_features` belongs with row i of
`text_features`), L2-normalise both, form the similarity s_ij = v_i . t_j and the logits l_ij = s_ij / tau,
and return L = L_v2t + L_t2v (the sum of both directions, as the DHN-NCE paper writes it; the CLIP paper
averages them, a factor of 2 that the learning rate absorbs). With anchor i in direction v2t:

  InfoNCE    L_i = -log( exp(l_ii) / sum_j exp(l_ij) )                      positive in the denominator
  HN-NCE     L_i = -log( exp(l_ii) / (exp(l_ii) + sum_{j!=i} w_ij exp(l_ij)) )   hard negatives up-weighted
  DHN-NCE    L_i = -log( exp(l_ii) / sum_{j!=i} w_ij exp(l_ij) )             decoupled: positive left out

  w_ij = (B-1) exp(beta l_ij) / sum_{k!=i} exp(beta l_ik)    (mean weight 1; beta = 0 gives w = 1)

t2v is the same on the transposed logits with beta2. HN-NCE is Radenovic et al. (2023) with alpha = 1;
decoupling follows Yeh et al. (2022). Everything is evaluated in log space (log-sum-exp), in float32 with
autocast switched off, so bf16/fp16 training gets a stable loss and finite gradients. The released
MedCLIP-SAM code mis-broadcast the weights; this follows the paper's formula.

`temperature` is a float or a 0-d tensor (e.g. 1 / model.logit_scale.exp() to learn it).
`same` (optional [B, B] bool) marks pairs with identical captions: they are not negatives of each other and
leave every denominator (w_ij then averages 1 over the n_i remaining negatives, log(B-1) becomes log(n_i)).
With unique captions, or `same=None`, the formulas above are unchanged.
"""

import math
import zlib

import torch
import torch.distributed as dist


def _logits(image_features, text_features, temperature):
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(f"expected two [B, D] feature tensors of the same shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if image_features.shape[0] < 2:
        raise ValueError("a contrastive loss needs a batch of at least 2 pairs")
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        v = torch.nn.functional.normalize(image_features.float(), dim=-1)
        t = torch.nn.functional.normalize(text_features.float(), dim=-1)
        if torch.is_tensor(temperature):
            temperature = temperature.float()
        return (v @ t.T) / temperature


def _direction(logits, beta, positive_in_denominator, same=None):
    """Mean over anchors (rows) of -log(exp(l_ii) / denominator); see the module docstring.

    `same` [B, B] (bool, optional): pairs whose captions are identical. They are not negatives of each
    other, so they leave the denominator (and the hard-negative weights, which keep mean 1 over the
    negatives that remain). An anchor left with no negative is left out of the mean."""
    b = logits.shape[0]
    negatives = ~torch.eye(b, dtype=torch.bool, device=logits.device)
    if same is not None:
        negatives &= ~same
    count = negatives.sum(1)
    valid = count > 0
    if not valid.any():  # every caption in the batch is the same: nothing to contrast
        return logits.sum() * 0.0
    logits, negatives, count = logits[valid], negatives[valid], count[valid]
    positive = logits.gather(1, valid.nonzero()).squeeze(1)
    # masked_fill after scaling: beta * -inf would be nan when beta = 0
    if beta == 0:
        log_negatives = torch.logsumexp(logits.masked_fill(~negatives, float("-inf")), dim=1)
    else:
        # log sum_{j!=i} w_ij exp(l_ij) = log(n_i) + LSE_j((1+beta) l_ij) - LSE_k(beta l_ik), n_i negatives
        log_negatives = (count.float().log()
                         + torch.logsumexp((logits * (1 + beta)).masked_fill(~negatives, float("-inf")), 1)
                         - torch.logsumexp((logits * beta).masked_fill(~negatives, float("-inf")), 1))
    if positive_in_denominator:
        log_denominator = torch.logaddexp(positive, log_negatives)
    else:
        log_denominator = log_negatives
    return (log_denominator - positive).mean()


def _symmetric(image_features, text_features, temperature, beta1, beta2, positive_in_denominator, same=None):
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        logits = _logits(image_features, text_features, temperature)
        same_t = None if same is None else same.T
        return (_direction(logits, beta1, positive_in_denominator, same)
                + _direction(logits.T, beta2, positive_in_denominator, same_t))


def infonce_loss(image_features, text_features, temperature=0.6, decoupled=False, same=None):
    """Symmetric InfoNCE (the CLIP loss, summed over both directions).

    Each anchor's denominator holds its positive and all B-1 negatives; with `decoupled=True` the
    positive is left out of the denominator (decoupled contrastive learning), which is exactly
    `dhn_nce_loss` with beta1 = beta2 = 0.
    """
    return _symmetric(image_features, text_features, temperature, 0.0, 0.0, not decoupled, same)


def hn_nce_loss(image_features, text_features, temperature=0.6, beta1=0.15, beta2=0.15, same=None):
    """HN-NCE: InfoNCE whose negatives are re-weighted by w_ij (harder negatives count more); the positive
    stays in the denominator (not decoupled). beta1 weights image->text, beta2 text->image."""
    return _symmetric(image_features, text_features, temperature, beta1, beta2, True, same)


def dhn_nce_loss(image_features, text_features, temperature=0.6, beta1=0.15, beta2=0.15, same=None):
    """DHN-NCE (MedCLIP-SAM): hard-negative weighted and decoupled (the positive is not in the denominator).

    L = L_v2t + L_t2v with L_v2t = -1/B sum_i log( exp(v_i.t_i/tau) / sum_{j!=i} w_ij exp(v_i.t_j/tau) ),
    w_ij = (B-1) exp(beta1 v_i.t_j/tau) / sum_{k!=i} exp(beta1 v_i.t_k/tau); L_t2v likewise with beta2.
    Released settings: tau 0.6, beta1 = beta2 = 0.15. Note the loss can be negative (no positive term in
    the denominator), so compare its values across runs, not against zero.
    """
    return _symmetric(image_features, text_features, temperature, beta1, beta2, False, same)


LOSSES = {"dhn-nce": dhn_nce_loss, "infonce": infonce_loss, "hn-nce": hn_nce_loss}


def contrastive_loss(name, image_features, text_features, temperature=0.6, beta1=0.15, beta2=0.15, same=None):
    """Dispatch by CLI name; betas are ignored by InfoNCE. `same`: see _direction."""
    if name == "infonce":
        return infonce_loss(image_features, text_features, temperature, same=same)
    return LOSSES[name](image_features, text_features, temperature, beta1, beta2, same=same)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed gradient.

    Every rank computes the same global loss from the gathered features; the gradient of all ranks'
    losses with respect to this rank's features is the all-reduced sum, and DDP's averaging of the
    parameter gradients then gives exactly the single-process gradient of the global batch.
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def same_caption_matrix(captions, device=None):
    """[B, B] bool: the batch's captions (gathered over ranks, in rank order) that are identical."""
    ids = torch.tensor([zlib.crc32(c.encode("utf-8")) for c in captions], dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, ids)
        ids = torch.cat(parts)
    return ids[:, None] == ids[None, :]


def gather_features_with_grad(x):
    """Concatenate `x` [b, D] from all ranks (rank order) keeping the gradient path to the local slice.

    Identity when torch.distributed is not initialised or has one process. Every rank must pass the
    same number of rows (a DistributedSampler with drop_last does this).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)
