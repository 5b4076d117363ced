"""Contrastive losses against plain per-sample loops of their formulas."""

import math

import pytest
import torch

from MedCLIPSAMLib.training.losses import (
    contrastive_loss, dhn_nce_loss, gather_features_with_grad, hn_nce_loss, infonce_loss, same_caption_matrix,
)


def _normalised_rows(x):
    rows = x.double().tolist()
    out = []
    for r in rows:
        n = math.sqrt(sum(a * a for a in r))
        out.append([a / n for a in r])
    return out


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _loop_direction(anchors, others, tau, beta, positive_in_denominator, weighted, captions=None):
    """-1/B sum_i log(exp(a_i.o_i/tau) / denominator_i), written out term by term. With `captions`, the
    negatives of i are the pairs whose caption differs from i's, and anchors with none are skipped."""
    b = len(anchors)
    total, anchors_used = 0.0, 0
    for i in range(b):
        negatives = [j for j in range(b) if j != i and (captions is None or captions[j] != captions[i])]
        if not negatives:
            continue
        pos = math.exp(_dot(anchors[i], others[i]) / tau)
        if weighted:
            z = sum(math.exp(beta * _dot(anchors[i], others[k]) / tau) for k in negatives)
        den = 0.0
        for j in negatives:
            w = len(negatives) * math.exp(beta * _dot(anchors[i], others[j]) / tau) / z if weighted else 1.0
            den += w * math.exp(_dot(anchors[i], others[j]) / tau)
        if positive_in_denominator:
            den += pos
        total += -math.log(pos / den)
        anchors_used += 1
    return total / anchors_used


def _loop_loss(v, t, tau, beta1, beta2, positive_in_denominator, weighted, captions=None):
    v, t = _normalised_rows(v), _normalised_rows(t)
    return (_loop_direction(v, t, tau, beta1, positive_in_denominator, weighted, captions)
            + _loop_direction(t, v, tau, beta2, positive_in_denominator, weighted, captions))


CASES = [(2, 0.6, 0.15, 0.15), (3, 0.6, 0.15, 0.15), (8, 0.6, 0.15, 0.15), (16, 0.07, 0.5, 0.1),
         (5, 1.0, 0.0, 0.3), (12, 0.3, 1.0, 2.0)]


@pytest.mark.parametrize("b,tau,beta1,beta2", CASES)
def test_dhn_nce_matches_loop(b, tau, beta1, beta2):
    g = torch.Generator().manual_seed(b)
    v, t = torch.randn(b, 10, generator=g) * 3, torch.randn(b, 10, generator=g)
    t = t + 0.5 * v  # correlated pairs, as after some training
    got = dhn_nce_loss(v, t, temperature=tau, beta1=beta1, beta2=beta2).item()
    want = _loop_loss(v, t, tau, beta1, beta2, positive_in_denominator=False, weighted=True)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("b,tau,beta1,beta2", CASES)
def test_hn_nce_matches_loop(b, tau, beta1, beta2):
    g = torch.Generator().manual_seed(100 + b)
    v, t = torch.randn(b, 7, generator=g), torch.randn(b, 7, generator=g)
    got = hn_nce_loss(v, t, temperature=tau, beta1=beta1, beta2=beta2).item()
    want = _loop_loss(v, t, tau, beta1, beta2, positive_in_denominator=True, weighted=True)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("b,tau", [(2, 0.6), (6, 0.1), (16, 1.0)])
def test_infonce_matches_loop_and_cross_entropy(b, tau):
    g = torch.Generator().manual_seed(200 + b)
    v, t = torch.randn(b, 9, generator=g), torch.randn(b, 9, generator=g)
    got = infonce_loss(v, t, temperature=tau).item()
    assert got == pytest.approx(_loop_loss(v, t, tau, 0, 0, True, False), rel=1e-5, abs=1e-5)
    # the familiar CLIP form: cross-entropy over the logits in both directions
    logits = torch.nn.functional.normalize(v) @ torch.nn.functional.normalize(t).T / tau
    labels = torch.arange(b)
    ce = torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
    assert got == pytest.approx(ce.item(), rel=1e-5)
    decoupled = infonce_loss(v, t, temperature=tau, decoupled=True).item()
    assert decoupled == pytest.approx(_loop_loss(v, t, tau, 0, 0, False, False), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name,in_denominator,weighted", [("dhn-nce", False, True), ("hn-nce", True, True),
                                                         ("infonce", True, False)])
def test_identical_captions_are_not_negatives(name, in_denominator, weighted):
    """Pairs with the same caption leave each other's denominators; the caption that occurs once in the
    batch keeps all its negatives, and unique captions give exactly the unmasked loss."""
    captions = ["no tumor", "left tumor", "no tumor", "right tumor", "left tumor", "no tumor", "small cyst"]
    g = torch.Generator().manual_seed(7)
    v, t = torch.randn(7, 6, generator=g), torch.randn(7, 6, generator=g)
    same = same_caption_matrix(captions)
    assert same.shape == (7, 7) and same.diagonal().all() and same[0, 2] and same[0, 5] and not same[0, 1]
    beta1, beta2 = (0.3, 0.1) if weighted else (0.0, 0.0)
    got = contrastive_loss(name, v, t, 0.2, beta1, beta2, same=same).item()
    want = _loop_loss(v, t, 0.2, beta1, beta2, in_denominator, weighted, captions)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    plain = contrastive_loss(name, v, t, 0.2, beta1, beta2).item()
    assert got != pytest.approx(plain, rel=1e-3)
    unique = same_caption_matrix([str(i) for i in range(7)])
    assert contrastive_loss(name, v, t, 0.2, beta1, beta2, same=unique).item() == pytest.approx(plain, rel=1e-6)


def test_batch_of_one_caption_gives_zero_loss_with_a_gradient_path():
    v = torch.randn(4, 5, requires_grad=True)
    loss = dhn_nce_loss(v, torch.randn(4, 5), same=same_caption_matrix(["normal"] * 4))
    loss.backward()
    assert loss.item() == 0.0 and v.grad is not None and torch.all(v.grad == 0)


def test_dhn_nce_with_zero_betas_is_decoupled_infonce():
    g = torch.Generator().manual_seed(3)
    v, t = torch.randn(11, 16, generator=g), torch.randn(11, 16, generator=g)
    a = dhn_nce_loss(v, t, temperature=0.6, beta1=0.0, beta2=0.0)
    b = infonce_loss(v, t, temperature=0.6, decoupled=True)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_scale_invariant_and_stable_at_tiny_temperature():
    g = torch.Generator().manual_seed(4)
    v, t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    # inputs are L2-normalised inside
    assert dhn_nce_loss(v * 1000, t * 0.001).item() == pytest.approx(dhn_nce_loss(v, t).item(), rel=1e-5)
    # exp(1/0.001) overflows float32: log-sum-exp keeps it finite
    for fn in (dhn_nce_loss, hn_nce_loss, infonce_loss):
        assert torch.isfinite(fn(v, t, temperature=1e-3))


def test_learnable_temperature_gets_gradient():
    g = torch.Generator().manual_seed(5)
    v, t = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    dhn_nce_loss(v, t, temperature=1 / log_scale.exp()).backward()
    assert log_scale.grad is not None and torch.isfinite(log_scale.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_autocast_gradients_finite(dtype):
    g = torch.Generator().manual_seed(6)
    layer = torch.nn.Linear(32, 16)
    x, y = torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g)
    with torch.autocast("cpu", dtype=dtype):
        v, t = layer(x), layer(y)
        assert v.dtype == dtype
        losses = [fn(v, t, temperature=0.05) for fn in (dhn_nce_loss, hn_nce_loss, infonce_loss)]
    for loss in losses:
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    sum(losses).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    # and the value is close to the float32 one
    ref = dhn_nce_loss(layer(x), layer(y), temperature=0.05)
    assert losses[0].item() == pytest.approx(ref.item(), rel=0.05, abs=0.05)


def test_batch_of_one_is_rejected_and_gather_is_identity_without_ddp():
    with pytest.raises(ValueError):
        dhn_nce_loss(torch.randn(1, 4), torch.randn(1, 4))
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_features_with_grad(x) is x
