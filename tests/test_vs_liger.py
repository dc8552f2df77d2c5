"""DPO, SimPO and GRPO against Liger-Kernel's chunked losses on CPU (compiled=False: eager torch).

Both sides compute in float32 from the same float32 inputs and evaluate the same formulas: each is
within the rounding bound of the exact value that tests/helpers.py derives from the magnitudes of
the inputs (front_end_rounding_bounds), so the two are within twice that, elementwise for the
gradients w.r.t. hidden, weight and bias.
Conventions mapped: Liger takes ``(weight, input, target)`` for preference losses and builds
reference log-probs from ``ref_input``/``ref_weight``; we pass the same reference model's per-token
log-probs. Liger's GRPO takes an attention mask and valid token ids; we pass targets with
``ignore_index`` where the mask is 0.
"""
import pytest
import torch

import gift_fast as gf
from helpers import assert_within, backend_rounding_bounds, front_end_rounding_bounds

liger = pytest.importorskip("liger_kernel.chunked_loss")

V, H = 41, 16


def _data(B, T, seed, p_ignore=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g) * 0.8
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.1
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < p_ignore] = -100
    targets[:, 0] = torch.randint(0, V, (B,), generator=g)   # no empty response (Liger divides by it)
    return hidden, weight, bias, targets, g


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


def _close(ours, theirs, leaves_o, leaves_t, bound):
    assert_within("loss", ours, theirs, 2 * bound.loss)
    for name, a, b in zip(("d_hidden", "d_weight", "d_bias"), _grads(ours, leaves_o),
                          _grads(theirs, leaves_t)):
        assert_within(name, a, b, 2 * getattr(bound.grads, name))


def _leaves(*xs):
    return [x.clone().requires_grad_(True) for x in xs]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_vs_liger(beta):
    B, T = 6, 7
    h, w, b, t, g = _data(B, T, 1)
    ref_h = h + 0.1 * torch.randn(B, T, H, generator=g)
    ref_w = w + 0.1 * torch.randn(V, H, generator=g)
    with torch.no_grad():
        ref_lp = gf.linear_logprobs(ref_h, ref_w, t, backend="torch")
    lo = _leaves(h, w, b)
    ours, m = gf.dpo_loss(lo[0], lo[1], t, ref_lp, bias=lo[2], beta=beta, backend="torch")
    lt = _leaves(h, w, b)
    mod = liger.LigerFusedLinearDPOLoss(beta=beta, compiled=False, use_ref_model=True,
                                        compute_nll_loss=False, average_log_prob=False)
    theirs, aux = mod(lt[1], lt[0], t, lt[2], ref_h, ref_w, None)
    # Liger computes the reference log-probs itself: ours and theirs each within their bound
    ref_err = 2 * backend_rounding_bounds("torch", torch.float32, ref_h, ref_w, None, t).logp
    bound = front_end_rounding_bounds(
        lambda h_, w_, b_, backend: gf.dpo_loss(h_, w_, t, ref_lp, bias=b_, beta=beta,
                                                backend=backend),
        "torch", torch.float32, h, w, b, t, input_errors=[(ref_lp, ref_err.reshape(t.shape))])
    _close(ours, theirs, lo, lt, bound)


@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_vs_liger(sft_weight, label_smoothing):
    B, T = 4, 9
    h, w, b, t, _ = _data(B, T, 2)
    lo = _leaves(h, w, b)
    ours, _ = gf.simpo_loss(lo[0], lo[1], t, bias=lo[2], beta=2.0, gamma=1.0, sft_weight=sft_weight,
                            label_smoothing=label_smoothing, backend="torch")
    lt = _leaves(h, w, b)
    mod = liger.LigerFusedLinearSimPOLoss(beta=2.0, gamma=1.0, compiled=False,
                                          compute_nll_loss=sft_weight > 0, alpha=sft_weight,
                                          label_smoothing=label_smoothing)
    theirs, _ = mod(lt[1], lt[0], t, lt[2])
    bound = front_end_rounding_bounds(
        lambda h_, w_, b_, backend: gf.simpo_loss(
            h_, w_, t, bias=b_, beta=2.0, gamma=1.0, sft_weight=sft_weight,
            label_smoothing=label_smoothing, backend=backend), "torch", torch.float32, h, w, b, t)
    _close(ours, theirs, lo, lt, bound)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_vs_liger(loss_type, beta):
    B, T = 6, 8
    h, w, b, t, g = _data(B, T, 3)
    temperature = 0.9 if loss_type == "dapo" else 1.0
    mask = t != -100
    with torch.no_grad():
        cur = gf.linear_logprobs(h, w, t, b, temperature=temperature, backend="torch")
    old = torch.where(mask, cur + 0.3 * torch.randn(B, T, generator=g), 0.0)   # some ratios clipped
    ref = torch.where(mask, cur + 0.2 * torch.randn(B, T, generator=g), 0.0)
    adv = gf.group_advantages(torch.randn(B, generator=g), 3)
    lo = _leaves(h, w, b)
    ours, m = gf.grpo_loss(lo[0], lo[1], t, old, adv, bias=lo[2], kl_ref_logps=ref if beta else None,
                           beta=beta, loss_type=loss_type, max_completion_length=T + 2,
                           epsilon_high=0.28, temperature=temperature, backend="torch")
    lt = _leaves(h, w, b)
    mod = liger.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=beta != 0,
                                         epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                                         max_completion_length=T + 2, temperature=temperature)
    safe_t = torch.where(mask, t, 0)
    theirs, their_metrics = mod(lt[0], lt[1], safe_t, mask.long(), adv, lt[2],
                                ref_per_token_logps=ref if beta else None, old_per_token_logps=old)
    bound = front_end_rounding_bounds(
        lambda h_, w_, b_, backend: gf.grpo_loss(
            h_, w_, t, old, adv, bias=b_, kl_ref_logps=ref if beta else None, beta=beta,
            loss_type=loss_type, max_completion_length=T + 2, epsilon_high=0.28,
            temperature=temperature, backend=backend), "torch", torch.float32, h, w, b, t)
    _close(ours, theirs, lo, lt, bound)
    # metrics: Liger returns [kl] (when beta != 0) then clip ratio, both over active tokens
    clip = their_metrics[-1]
    assert_within("clip_fraction", m["clip_fraction"], clip.float(),
                  2 * bound.metrics["clip_fraction"])
    assert 0 < m["clip_fraction"].item() < 1
    if beta:
        assert_within("kl", m["kl"], their_metrics[0].float(), 2 * bound.metrics["kl"])
