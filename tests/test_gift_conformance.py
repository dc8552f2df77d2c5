"""gift_loss with default settings against the GIFT authors' algorithm (tests/gift_authors_reference).

Float64, same inputs: loss and gradient agree to 1e-12, groups of one included (the authors' code
trains them: A = R/(1+eps), z = (s - sg(s))/(1+eps)). Uniform-reward groups use rewards whose
float64 mean is exact (1.0, 0.5), so the authors' A is exactly 0 there too; the float32 rounding
noise of their mean on other values is shown in test_uniform_group_noise_is_authors_not_ours.
Layout as verl makes it: prefix response masks (every response has >= 1 token), uids in any order.
"""
import pytest
import torch

import gift_fast
import gift_fast.functional as Fn
from helpers import assert_within, front_end_rounding_bounds
from tests import reference_losses as R
from tests.gift_authors_reference import authors_advantage, authors_gift

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-13)


def verl_batch(group_sizes, T, seed, dtype=F64, uniform_groups=()):
    """Interleaved groups (uids not consecutive), prefix masks, rewards, log-probs."""
    g = torch.Generator().manual_seed(seed)
    labels = [k for k, n in enumerate(group_sizes) for _ in range(n)]
    perm = torch.randperm(len(labels), generator=g).tolist()
    labels = [labels[i] for i in perm]
    B = len(labels)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    logps = (old + 0.2 * torch.randn(B, T, generator=g, dtype=F64)) * mask
    old = old * mask
    rewards = torch.randn(B, generator=g, dtype=F64)
    for k, value in uniform_groups:
        rewards[torch.tensor(labels) == k] = value
    return (logps.to(dtype).requires_grad_(True), old.to(dtype), mask, rewards.to(dtype),
            labels)


CASES = [
    dict(group_sizes=[4, 4, 4], uniform=()),
    dict(group_sizes=[8, 1, 3, 1, 5], uniform=((2, 1.0),)),        # groups of one + a uniform group
    dict(group_sizes=[1, 1, 1], uniform=()),                       # every group a group of one
    dict(group_sizes=[2, 7, 1, 16], uniform=((0, 0.5), (3, 1.0))),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c["group_sizes"])))
def test_functional_gift_equals_authors(case):
    logps, old, mask, rewards, labels = verl_batch(case["group_sizes"], 9, seed=sum(case["group_sizes"]),
                                                   uniform_groups=case["uniform"])
    ref = authors_gift(logps, old, rewards, mask.to(F64), labels)
    ours, _ = Fn.gift_loss(logps, old, rewards, mask=mask, group_ids=torch.tensor(labels))
    torch.testing.assert_close(ours, ref, **TOL)
    g_ref, = torch.autograd.grad(ref, logps)
    g_ours, = torch.autograd.grad(ours, logps)
    torch.testing.assert_close(g_ours, g_ref, **TOL)
    assert g_ours.abs().max() > 0


def test_groups_of_one_are_trained_like_the_authors():
    """G = 1 only: the gradient is -2 beta A / (N (1 + eps)) on every response token, not 0."""
    logps, old, mask, rewards, labels = verl_batch([1] * 5, 6, seed=3)
    ours, _ = Fn.gift_loss(logps, old, rewards, mask=mask, group_size=1, beta=0.5)
    ref = authors_gift(logps, old, rewards, mask.to(F64), labels, beta=0.5)
    torch.testing.assert_close(ours, ref, **TOL)
    g, = torch.autograd.grad(ours, logps)
    expect = (-2 * 0.5 * (rewards / (1 + 1e-6)) / (5 * (1 + 1e-6)))[:, None] * mask
    torch.testing.assert_close(g, expect, **TOL)


@pytest.mark.parametrize("layout", ["group_size", "group_ids"])
def test_fused_torch_path_equals_authors(layout):
    """hidden + lm_head weight -> gift_loss (torch backend, float64) vs the authors' loss on
    float64 log-probs from materialised logits; gradients w.r.t. hidden and weight."""
    g = torch.Generator().manual_seed(11)
    B, T, H, V, G = 6, 5, 12, 37, 3
    hidden = torch.randn(B, T, H, generator=g, dtype=F64, requires_grad=True)
    weight = (torch.randn(V, H, generator=g, dtype=F64) * 0.4).requires_grad_(True)
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    targets = torch.where(mask, torch.randint(0, V, (B, T), generator=g), torch.full((B, T), -100))
    with torch.no_grad():
        old = R.logprobs64(hidden, weight + 0.05 * torch.randn(V, H, generator=g, dtype=F64), targets)
    rewards = torch.randn(B, generator=g, dtype=F64)
    if layout == "group_size":
        kw, labels = dict(group_size=G), [i // G for i in range(B)]
    else:
        labels = [0, 1, 0, 2, 1, 0]                                # group 2 is a group of one
        kw = dict(group_ids=torch.tensor(labels))
    ours, _ = gift_fast.gift_loss(hidden, weight, targets, old, rewards, backend="torch", **kw)
    ref = authors_gift(R.logprobs64(hidden, weight, targets), old, rewards, mask.to(F64), labels)
    torch.testing.assert_close(ours, ref, **TOL)
    for ga, gb in zip(torch.autograd.grad(ours, (hidden, weight)),
                      torch.autograd.grad(ref, (hidden, weight))):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("G", [1, 3])
def test_triton_path_equals_authors(G):
    """The triton two-phase op (interpreter on CPU, float32) against the authors in float64."""
    g = torch.Generator().manual_seed(5 + G)
    B, T, H, V = 6, 5, 16, 40
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    lengths = torch.tensor([5, 2, 3, 1, 4, 5])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    targets = torch.where(mask, torch.randint(0, V, (B, T), generator=g), torch.full((B, T), -100))
    old = (R.logprobs64(hidden, weight, targets) + 0.1 * torch.randn(B, T, generator=g, dtype=F64)
           * mask).float()
    rewards = torch.randn(B, generator=g)
    h = hidden.clone().requires_grad_(True)
    ours, _ = gift_fast.gift_loss(h, weight, targets, old, rewards, group_size=G, backend="triton")
    ours.backward()
    h64 = hidden.to(F64).requires_grad_(True)
    ref = authors_gift(R.logprobs64(h64, weight, targets), old.to(F64), rewards.to(F64),
                       mask.to(F64), [i // G for i in range(B)])
    ref.backward()
    bound = front_end_rounding_bounds(
        lambda h_, w_, b_, backend: gift_fast.gift_loss(h_, w_, targets, old, rewards,
                                                        group_size=G, backend=backend),
        "triton", torch.float32, hidden, weight, None, targets)
    assert_within("loss", ours, ref, bound.loss)
    assert_within("d_hidden", h.grad, h64.grad, bound.grads.d_hidden)
    assert h.grad[mask].abs().sum(-1).min() > 0                     # every response token trained


def test_uniform_group_noise_is_authors_not_ours():
    """Equal float32 rewards: the authors' torch.mean / torch.std leave rounding noise that the
    division by (std + eps) turns into an advantage of order 1e-2; ours is exactly 0."""
    rewards = torch.full((8, 1), 0.9)
    mask = torch.ones(8, 1)
    theirs = authors_advantage(rewards, mask, ["u"] * 8)
    assert theirs.abs().max() > 1e-3                       # e.g. -0.056 with torch 2.13 on CPU
    logps = torch.zeros(8, 1, requires_grad=True)
    _, m = Fn.gift_loss(logps, torch.zeros(8, 1), rewards[:, 0], group_size=8)
    assert m["adv_mean"].item() == 0.0 and m["uniform_reward_frac"].item() == 1.0
