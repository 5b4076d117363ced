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
"""

import math

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


def _direction(logits, beta, positive_in_denominator):
    """Mean over anchors (rows) of -log(exp(l_ii) / denominator); see the module docstring."""
    b = logits.shape[0]
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=logits.device)
    positive = logits.diagonal()
    # masked_fill after scaling: beta * -inf would be nan when beta = 0
    neg = logits.masked_fill(~off_diagonal, float("-inf"))
    if beta == 0:
        log_negatives = torch.logsumexp(neg, dim=1)
    else:
        # log sum_{j!=i} w_ij exp(l_ij) = log(B-1) + LSE_j((1+beta) l_ij) - LSE_k(beta l_ik)
        log_negatives = (math.log(b - 1)
                         + torch.logsumexp((logits * (1 + beta)).masked_fill(~off_diagonal, float("-inf")), 1)
                         - torch.logsumexp((logits * beta).masked_fill(~off_diagonal, float("-inf")), 1))
    if positive_in_denominator:
        log_denominator = torch.logaddexp(positive, log_negatives)
    else:
        log_denominator = log_negatives
    return (log_denominator - positive).mean()


def _symmetric(image_features, text_features, temperature, beta1, beta2, positive_in_denominator):
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        logits = _logits(image_features, text_features, temperature)
        return (_direction(logits, beta1, positive_in_denominator)
                + _direction(logits.T, beta2, positive_in_denominator))


def infonce_loss(image_features, text_features, temperature=0.6, decoupled=False):
    """Symmetric InfoNCE (the CLIP loss, summed over both directions).

    Each anchor's denominator holds its positive and all B-1 negatives; with `decoupled=True` the
    positive is left out of the denominator (decoupled contrastive learning), which is exactly
    `dhn_nce_loss` with beta1 = beta2 = 0.
    """
    return _symmetric(image_features, text_features, temperature, 0.0, 0.0, not decoupled)


def hn_nce_loss(image_features, text_features, temperature=0.6, beta1=0.15, beta2=0.15):
    """HN-NCE: InfoNCE whose negatives are re-weighted by w_ij (harder negatives count more); the positive
    stays in the denominator (not decoupled). beta1 weights image->text, beta2 text->image."""
    return _symmetric(image_features, text_features, temperature, beta1, beta2, True)


def dhn_nce_loss(image_features, text_features, temperature=0.6, beta1=0.15, beta2=0.15):
    """DHN-NCE (MedCLIP-SAM): hard-negative weighted and decoupled (the positive is not in the denominator).

    L = L_v2t + L_t2v with L_v2t = -1/B sum_i log( exp(v_i.t_i/tau) / sum_{j!=i} w_ij exp(v_i.t_j/tau) ),
    w_ij = (B-1) exp(beta1 v_i.t_j/tau) / sum_{k!=i} exp(beta1 v_i.t_k/tau); L_t2v likewise with beta2.
    Released settings: tau 0.6, beta1 = beta2 = 0.15. Note the loss can be negative (no positive term in
    the denominator), so compare its values across runs, not against zero.
    """
    return _symmetric(image_features, text_features, temperature, beta1, beta2, False)


LOSSES = {"dhn-nce": dhn_nce_loss, "infonce": infonce_loss, "hn-nce": hn_nce_loss}


def contrastive_loss(name, image_features, text_features, temperature=0.6, beta1=0.15, beta2=0.15):
    """Dispatch by CLI name; betas are ignored by InfoNCE."""
    if name == "infonce":
        return infonce_loss(image_features, text_features, temperature)
    return LOSSES[name](image_features, text_features, temperature, beta1, beta2)


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


def gather_features_with_grad(x):
    """Concatenate `x` [b, D] from all ranks (rank order) keeping the gradient path to the local slice.

    Identity when torch.distributed is not initialised or has one process. Every rank must pass the
    same number of rows (a DistributedSampler with drop_last does this).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)
