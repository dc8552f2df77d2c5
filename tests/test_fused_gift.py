"""The triton two-phase GIFT op (forward kernel -> epilogue kernel -> backward) against the
composed path (torch-backend log-probs + functional epilogue) and a float64 reference.

Runs through TRITON_INTERPRET=1 on CPU, so shapes are small. Both paths accumulate in float32:
they may differ by the sum of their rounding bounds (tests/helpers.py: loss_rounding_bounds, from
the magnitudes of the inputs through the loss's own operations), elementwise for the gradients.
"""
import pytest
import torch

import gift_fast.functional as Fn
from gift_fast import linear_logprobs
from gift_fast.backends.triton_gift import fused_gift_loss
from helpers import assert_within, loss_rounding_bounds, rounding_bound


def _inputs(B, T, H, V, seed, uniform_first_group=False, G=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, :2] = -100                       # prompt tokens
    targets[min(3, B - 1), :] = -100            # an empty response
    anchor = torch.randn(B, T, generator=g) * 0.1 - 4.0
    rewards = torch.randn(B, generator=g)
    if uniform_first_group:
        rewards[:G] = 0.5
    return hidden, weight, targets, anchor, rewards


def _run(path, hidden, weight, targets, anchor, rewards, G, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    B, T, H = h.shape
    if path == "fused":
        cu = torch.arange(B + 1) * T
        loss, metrics = fused_gift_loss(
            h.reshape(-1, H), w, None, targets.reshape(-1), anchor.reshape(-1), rewards, cu, G,
            beta=kw.get("beta", 1.0), eps=1e-6, std=kw.get("std", "unbiased"),
            length_norm=kw.get("length_norm", 0.0),
            drop_uniform_groups=kw.get("drop_uniform_groups", False), temperature=1.0,
            softcap=None, ignore_index=-100, reduction=kw.get("reduction", "mean"))
    else:
        lp = linear_logprobs(h, w, targets, backend="torch")
        loss, metrics = Fn.gift_loss(lp, anchor, rewards, mask=targets != -100, group_size=G, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad, metrics


@pytest.mark.parametrize("kw", [
    dict(),
    dict(beta=0.7, std="biased", length_norm=1.0, reduction="sum"),
    dict(drop_uniform_groups=True, length_norm=0.5),
])
@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("G", [1, 4])
def test_fused_gift_matches_composed_path(kw, uniform, G):
    inputs = _inputs(8, 7, 24, 70, seed=G + 10 * uniform, uniform_first_group=uniform, G=G)
    fused = _run("fused", *inputs, G, **kw)
    composed = _run("composed", *inputs, G, **kw)
    hidden, weight, targets, anchor, rewards = inputs
    bounds = [loss_rounding_bounds(
        lambda lp: Fn.gift_loss(lp, anchor.double(), rewards.double(), mask=targets != -100,
                                group_size=G, **kw),
        backend, torch.float32, hidden, weight, None, targets) for backend in ("triton", "torch")]
    assert_within("loss", fused[0], composed[0], bounds[0].loss + bounds[1].loss)
    for name, a, b in zip(("d_hidden", "d_weight"), fused[1:3], composed[1:3]):
        limit = getattr(bounds[0].grads, name) + getattr(bounds[1].grads, name)
        assert_within(name, a, b, limit)
    for name, value in composed[3].items():
        limit = bounds[0].metrics[name] + bounds[1].metrics[name]
        assert_within(name, torch.as_tensor(float(fused[3][name])), value, limit)


def test_fused_gift_zero_spread_first_step_is_exactly_zero_residual():
    """pi_theta == pi_old: the anchor is the op's own no-grad output, so s = 0 exactly and z = 0."""
    hidden, weight, targets, _, rewards = _inputs(8, 6, 16, 40, seed=3)
    with torch.no_grad():
        anchor = linear_logprobs(hidden, weight, targets, backend="triton")
    loss, _, _, metrics = _run("fused", hidden, weight, targets, anchor, rewards, 4)
    assert float(metrics["z_abs_mean"]) == 0.0
    a = Fn.gift_loss(torch.zeros(8, 6), torch.zeros(8, 6), rewards, mask=targets != -100,
                     group_size=4)[0]
    # both evaluate mean(A^2) from the rewards in float32: within twice its rounding bound
    _, bound = rounding_bound(lambda: Fn.gift_loss(
        torch.zeros(8, 6, dtype=torch.float64), torch.zeros(8, 6, dtype=torch.float64),
        rewards.double(), mask=targets != -100, group_size=4)[0])
    assert_within("loss", loss, a, 2 * bound)


def test_fused_gift_skips_rows_without_gradient():
    """Prompt rows and the empty response get exactly zero hidden gradient."""
    hidden, weight, targets, anchor, rewards = _inputs(8, 7, 24, 70, seed=5)
    _, d_hidden, _, _ = _run("fused", hidden, weight, targets, anchor, rewards, 4)
    assert torch.all(d_hidden[:, :2] == 0) and torch.all(d_hidden[3] == 0)


def test_fused_gift_groups_of_one_are_trained():
    """G = 1 (authors' code): A = R/(1+eps), z = 0 in value, gradient 1/(1+eps) flows."""
    hidden, weight, targets, anchor, rewards = _inputs(8, 7, 24, 70, seed=5)
    loss, d_hidden, d_weight, metrics = _run("fused", hidden, weight, targets, anchor, rewards, 1)
    eps = 1e-6
    # z = 0 in value: the loss is mean(A^2), within the rounding bound of the GIFT epilogue
    zeros = torch.zeros(targets.shape, dtype=torch.float64)
    _, bound = rounding_bound(lambda: Fn.gift_loss(zeros, zeros, rewards.double(),
                                                   mask=targets != -100, group_size=1)[0])
    assert_within("loss", loss, ((rewards.double() / (1 + eps)) ** 2).mean(), bound)
    assert float(metrics["z_abs_mean"]) == 0.0
    assert torch.all(d_hidden[:, :2] == 0) and torch.all(d_hidden[3] == 0)
    live = [i for i in range(8) if i != 3]
    assert torch.all(d_hidden[live, 2:].abs().sum(-1) > 0) and d_weight.abs().max() > 0
