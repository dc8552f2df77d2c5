"""Fused front-ends (hidden states + lm_head weight) against the float64 spec implementation.

The reference materialises float64 logits from the SAME (possibly half-precision) hidden/weight
values and differentiates the float64 spec loss (tests/reference_losses.py). The loss and the
gradients w.r.t. hidden, weight (and bias) are checked, elementwise, against the front-end's
rounding bounds (tests/helpers.py: front_end_rounding_bounds, from the magnitudes of the inputs).
"""
import zlib

import pytest
import torch

import gift_fast as gf
import gift_fast.functional as Fn
from helpers import (assert_within, backend_rounding_bounds, front_end_rounding_bounds,
                     rounding_bound)
from tests import reference_losses as R

F64 = torch.float64
V, H = 37, 16


def _data(B, T, dtype, seed, bias=False, p_ignore=0.3, empty=()):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g) * 0.8).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    ign = torch.rand(B, T, generator=g) < p_ignore
    for i in empty:
        ign[i] = True
    targets[ign] = -100
    # anchor / reference / old policy: a perturbed model's log-probs, float32, no grad
    with torch.no_grad():
        w2 = weight.float() + 0.3 * torch.randn(V, H, generator=g)
        anchor = R.logprobs64(hidden.float(), w2, targets).float()
    rewards = torch.randn(B, generator=g)
    return hidden, weight, b, targets, anchor, rewards


def _compare(front, ref_fn, B, T, dtype, backend, seed, bias=False, empty=()):
    hidden, weight, b, targets, anchor, rewards = _data(B, T, dtype, seed, bias, empty=empty)
    leaves = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
    if bias:
        leaves.append(b.clone().requires_grad_(True))
    loss, metrics = front(leaves[0], leaves[1], targets, leaves[2] if bias else None, anchor,
                          rewards, backend)
    assert loss.dtype == torch.float32
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in metrics.values())
    got = torch.autograd.grad(loss, leaves)
    ref_leaves = [x.detach().to(F64).requires_grad_(True) for x in leaves]
    lp64 = R.logprobs64(ref_leaves[0], ref_leaves[1], targets, ref_leaves[2] if bias else None)
    ref_loss = ref_fn(lp64, targets != -100, anchor.to(F64), rewards.to(F64))
    want = torch.autograd.grad(ref_loss, ref_leaves)
    bound = front_end_rounding_bounds(
        lambda h_, w_, b_, backend: front(h_, w_, targets, b_, anchor, rewards, backend),
        backend, dtype, hidden, weight, b, targets)
    assert_within("loss", loss, ref_loss, bound.loss)
    for name, g_, w_ in zip(("d_hidden", "d_weight", "d_bias"), got, want):
        assert g_.dtype == dtype, name
        assert_within(name, g_, w_, getattr(bound.grads, name))
    return loss, metrics


def _sp(lp, mask):
    return R.split_padded(lp, mask)


G = 3
LOSSES = {
    "gift": (
        lambda h, w, t, b, an, r, be: gf.gift_loss(h, w, t, an, r, group_size=G, bias=b, backend=be),
        lambda lp, m, an, r: R.gift(_sp(lp, m), _sp(an, m), r, R.groups_of(lp.shape[0], G)),
    ),
    "gift_diffstats_mean": (
        lambda h, w, t, b, an, r, be: gf.gift_loss(h, w, t, an, r, group_size=G, bias=b, backend=be,
                                                   detach_stats=False, length_norm=1.0, beta=0.5),
        lambda lp, m, an, r: R.gift(_sp(lp, m), _sp(an, m), r, R.groups_of(lp.shape[0], G),
                                    detach_stats=False, p=1.0, beta=0.5),
    ),
    "grpo_dapo_kl": (
        lambda h, w, t, b, an, r, be: gf.grpo_loss(h, w, t, an, gf.group_advantages(r, G), bias=b,
                                                   kl_ref_logps=an * 1.1, beta=0.04, backend=be),
        lambda lp, m, an, r: R.grpo(_sp(lp, m), _sp(an, m), R.group_adv(r, G), _sp(an * 1.1, m),
                                    beta=0.04),
    ),
    "grpo_grpo": (
        lambda h, w, t, b, an, r, be: gf.grpo_loss(h, w, t, an, gf.group_advantages(r, G), bias=b,
                                                   loss_type="grpo", backend=be),
        lambda lp, m, an, r: R.grpo(_sp(lp, m), _sp(an, m), R.group_adv(r, G), loss_type="grpo"),
    ),
    "dpo": (
        lambda h, w, t, b, an, r, be: gf.dpo_loss(h, w, t, an, bias=b, backend=be),
        lambda lp, m, an, r: R.dpo(_sp(lp, m), _sp(an, m)),
    ),
    "ipo": (
        lambda h, w, t, b, an, r, be: gf.ipo_loss(h, w, t, an, bias=b, backend=be),
        lambda lp, m, an, r: R.ipo(_sp(lp, m), _sp(an, m)),
    ),
    "simpo": (
        lambda h, w, t, b, an, r, be: gf.simpo_loss(h, w, t, bias=b, sft_weight=0.2, backend=be),
        lambda lp, m, an, r: R.simpo(_sp(lp, m), sft_weight=0.2),
    ),
    "rpo_bwd_kl": (
        lambda h, w, t, b, an, r, be: gf.rpo_loss(h, w, t, an, r, kind="bwd_kl", bias=b, backend=be),
        lambda lp, m, an, r: R.rpo_pairwise(_sp(lp, m), _sp(an, m), r, "bwd_kl"),
    ),
    "rpo_sq_multi": (
        lambda h, w, t, b, an, r, be: gf.rpo_loss(h, w, t, an, r, kind="sq", group_size=G, bias=b,
                                                  backend=be),
        lambda lp, m, an, r: R.rpo_multi(_sp(lp, m), _sp(an, m), r, R.groups_of(lp.shape[0], G), "sq"),
    ),
    "una_bce": (
        lambda h, w, t, b, an, r, be: gf.una_loss(h, w, t, an, kind="binary_bce", beta=0.3, bias=b,
                                                  backend=be),
        lambda lp, m, an, r: R.una(_sp(lp, m), _sp(an, m), "binary_bce", beta=0.3),
    ),
    "fdiv_js": (
        lambda h, w, t, b, an, r, be: gf.fdiv_sft_loss(h, w, t, an, divergence="js", beta=0.5,
                                                       bias=b, backend=be),
        lambda lp, m, an, r: R.fdiv(_sp(lp, m), _sp(an, m), "js", 0.5),
    ),
    "dft": (
        lambda h, w, t, b, an, r, be: gf.dft_loss(h, w, t, bias=b, backend=be),
        lambda lp, m, an, r: R.dft(_sp(lp, m)),
    ),
    "ift": (
        lambda h, w, t, b, an, r, be: gf.ift_loss(h, w, t, bias=b, backend=be),
        lambda lp, m, an, r: R.ift(lp, m),
    ),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fused_float32(name, backend):
    front, ref = LOSSES[name]
    _compare(front, ref, 6, 7, torch.float32, backend, seed=zlib.crc32(name.encode()) % 1000, bias=True, empty=(1,))


@pytest.mark.parametrize("name", ["gift", "grpo_dapo_kl", "dpo", "simpo", "fdiv_js", "ift"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_half_precision_torch_backend(name, dtype):
    front, ref = LOSSES[name]
    _compare(front, ref, 6, 5, dtype, "torch", seed=7)


def test_fused_single_sequence_groups_and_odd_shapes():
    # N = 1 sequence of one token, G = 1
    h, w, b, t, an, r = _data(1, 1, torch.float32, 3, p_ignore=0.0)
    loss, m = gf.gift_loss(h.requires_grad_(True), w, t, an, r, group_size=1, backend="torch")
    # z = 0 in value for a group of one: the loss is A^2 = (r / (1 + eps))^2, within the
    # rounding bound of the GIFT epilogue that computes it
    zero = torch.zeros(1, 1, dtype=F64)
    _, bound = rounding_bound(lambda: Fn.gift_loss(zero, zero, r.double(), group_size=1)[0])
    assert_within("loss", loss, (r[0].double() / (1 + 1e-6)) ** 2, bound)
    loss.backward()
    assert h.grad.abs().max() > 0                       # a group of one is trained (authors' code)
    for fn in (lambda: gf.dft_loss(h, w, t, backend="torch"),
               lambda: gf.fdiv_sft_loss(h, w, t, backend="torch"),
               lambda: gf.ift_loss(h, w, t, backend="torch")):
        val, _ = fn()
        assert torch.isfinite(val)


def test_fused_packed_equals_padded():
    B, T = 6, 7
    h, w, b, t, an, r = _data(B, T, torch.float32, 11, bias=True, empty=(2,))
    mask = t != -100
    cu = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])
    hp, tp, ap = h[mask], t[mask], an[mask]
    for fn in (
        lambda H_, T_, A_, **k: gf.gift_loss(H_, w, T_, A_, r, group_size=3, bias=b, backend="torch", **k),
        lambda H_, T_, A_, **k: gf.grpo_loss(H_, w, T_, A_, r, loss_type="grpo", bias=b,
                                             backend="torch", **k),
        lambda H_, T_, A_, **k: gf.dpo_loss(H_, w, T_, A_, bias=b, backend="torch", **k),
        lambda H_, T_, A_, **k: gf.rpo_loss(H_, w, T_, A_, r, kind="fwd_kl", bias=b, backend="torch", **k),
        lambda H_, T_, A_, **k: gf.una_loss(H_, w, T_, A_, kind="score_mse", scores=r.sigmoid(),
                                            bias=b, backend="torch", **k),
    ):
        padded, _ = fn(h, t, an)
        packed, _ = fn(hp, tp, ap, cu_seqlens=cu)
        # the same values in two layouts: each within the loss's rounding bound of the exact one
        bound = front_end_rounding_bounds(lambda h_, w_, b_, backend: fn(h_, t, an), "torch",
                                          torch.float32, h, w, b, t).loss
        assert_within("loss", packed, padded, 2 * bound)


def test_fused_equals_functional_on_linear_logprobs():
    """Form (b) == form (a) applied to gift_fast.linear_logprobs, bit for bit (same backend)."""
    h, w, b, t, an, r = _data(6, 5, torch.float32, 12, bias=True)
    lp = gf.linear_logprobs(h, w, t, b, backend="torch")
    m = t != -100
    pairs = [
        (gf.gift_loss(h, w, t, an, r, group_size=3, bias=b, backend="torch"),
         Fn.gift_loss(lp, an, r, mask=m, group_size=3)),
        (gf.grpo_loss(h, w, t, an, r, bias=b, backend="torch"), Fn.grpo_loss(lp, an, r, mask=m)),
        (gf.simpo_loss(h, w, t, bias=b, backend="torch"), Fn.simpo_loss(lp, mask=m)),
        (gf.ift_loss(h, w, t, bias=b, backend="torch"), Fn.ift_loss(lp, mask=m)),
    ]
    for (l1, m1), (l2, m2) in pairs:
        assert torch.equal(l1, l2)
        assert m1.keys() == m2.keys()


def test_gift_metrics_and_uniform_group_drop():
    h, w, b, t, an, r = _data(9, 4, torch.float32, 13)
    r[3:6] = 1.0
    loss, m = gf.gift_loss(h, w, t, an, r, group_size=3, backend="torch")
    assert set(m) >= {"adv_mean", "z_mean", "correlation", "uniform_reward_frac", "implicit_std"}
    assert m["uniform_reward_frac"].item() == pytest.approx(1 / 3)
    hh = h.clone().requires_grad_(True)
    loss_d, md = gf.gift_loss(hh, w, t, an, r, group_size=3, backend="torch", drop_uniform_groups=True)
    loss_d.backward()
    assert torch.all(hh.grad[3:6] == 0) and hh.grad[:3].abs().max() > 0
    assert md["loss_groups"].item() == 2


def test_gift_first_step_after_rollout():
    """anchor = the policy's own log-probs from the same backend: s == 0 exactly, z == 0."""
    h, w, b, t, an, r = _data(6, 5, torch.float32, 14)
    with torch.no_grad():
        anchor = gf.linear_logprobs(h, w, t, backend="torch")
    hh = h.clone().requires_grad_(True)
    loss, m = gf.gift_loss(hh, w, t, anchor, r, group_size=3, backend="torch")
    A = R.group_adv(r, 3, eps=1e-6)
    # s == 0 exactly (z_abs_mean below): the loss is mean(A^2) of the rewards, within the
    # rounding bound of the GIFT epilogue at s = 0
    zeros = torch.zeros(t.shape, dtype=F64)
    _, bound = rounding_bound(lambda: Fn.gift_loss(zeros, zeros, r.double(), mask=t != -100,
                                                   group_size=3)[0])
    assert_within("loss", loss, (A ** 2).mean(), bound)
    assert m["z_abs_mean"].item() == 0.0
    loss.backward()
    assert torch.isfinite(hh.grad).all() and hh.grad.abs().max() > 1e3   # the 1/eps gradient


def test_front_end_bad_inputs():
    h, w, b, t, an, r = _data(6, 4, torch.float32, 15)
    with pytest.raises(ValueError, match="group_size"):
        gf.gift_loss(h, w, t, an, r, group_size=4, backend="torch")
    with pytest.raises(ValueError, match="targets"):
        gf.gift_loss(h, w, t[:, :3], an, r, group_size=3, backend="torch")
    with pytest.raises(ValueError, match="anchor_logps"):
        gf.gift_loss(h, w, t, an[:, :3], r, group_size=3, backend="torch")
    with pytest.raises(ValueError, match="rewards"):
        gf.gift_loss(h, w, t, an, r[:4], group_size=3, backend="torch")
    with pytest.raises(ValueError, match="rewards: expected finite"):
        gf.gift_loss(h, w, t, an, torch.tensor([0, 1, float("nan"), 0, 1, 2.0]), group_size=3,
                     backend="torch")
    with pytest.raises(ValueError, match="hidden"):
        gf.gift_loss(h[0], w, t[0], an[0], r, group_size=3, backend="torch")
    with pytest.raises(ValueError, match="even number"):
        gf.dpo_loss(h[:5], w, t[:5], an[:5], backend="torch")
    with pytest.raises(ValueError, match="kind"):
        gf.rpo_loss(h, w, t, an, r, kind="l2", backend="torch")
    with pytest.raises(ValueError, match="kind"):
        gf.una_loss(h, w, t, an, kind="foo", backend="torch")
    with pytest.raises(ValueError, match="divergence"):
        gf.fdiv_sft_loss(h, w, t, divergence="chi", backend="torch")
    with pytest.raises(ValueError, match="weight"):
        gf.dft_loss(h, w[:, :3], t, backend="torch")


def test_ift_helpers():
    B, T = 2, 6
    h, w, b, t, an, r = _data(B, T, torch.float32, 16, p_ignore=0.0)
    emb = torch.nn.Embedding(V, H)
    input_ids = torch.randint(0, V, (B, T))
    labels = input_ids.clone()
    labels[:, :2] = -100
    greedy = gf.ift_greedy_predictions(h, w, backend="torch")
    # no near-tie: the top two logits are further apart than twice their rounding bound, so the
    # argmax is the same on any CPU
    top2 = (h.double() @ w.double().T).topk(2, -1).values
    dz = backend_rounding_bounds("torch", torch.float32, h, w, None, None).max_logit
    assert torch.all((top2[..., 0] - top2[..., 1]).reshape(-1) > 2 * dz)
    torch.testing.assert_close(greedy, (h @ w.T).argmax(-1))
    mixed = gf.ift_mixed_embeddings(input_ids, labels, greedy, emb, lam=0.2)
    e = emb.weight
    torch.testing.assert_close(mixed[:, :2], e[input_ids[:, :2]])            # prompt untouched
    e64 = e.detach().double()
    expect = 0.8 * e64[input_ids[:, 2:]] + 0.2 * e64[greedy[:, 1:-1]]         # y_hat_t = argmax z_{t-1}
    _, bound = rounding_bound(lambda: gf.ift_mixed_embeddings(input_ids, labels, greedy, e64,
                                                              lam=0.2))
    assert_within("mixed", mixed[:, 2:], expect, bound[:, 2:])
    torch.testing.assert_close(gf.ift_mixed_embeddings(input_ids, labels, greedy, e, lam=0.0),
                               e[input_ids])


# ----------------------------------------------------------------- triton backend (smoke / GPU)

def _triton_available():
    try:
        import gift_fast.backends.triton_op  # noqa: F401
        return True
    except Exception:
        return False


needs_triton = pytest.mark.skipif(not _triton_available(),
                                  reason="gift_fast.backends.triton_op does not import")


@needs_triton
@pytest.mark.parametrize("name", ["gift", "grpo_dapo_kl", "dpo", "rpo_bwd_kl", "una_bce", "fdiv_js",
                                  "dft", "ift"])
def test_triton_backend_smoke(name):
    """One small case per family through the Triton kernels (interpreter on CPU), float32."""
    front, ref = LOSSES[name]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        _compare(front, ref, 6, 3, torch.float32, "triton", seed=21)
    else:
        pytest.skip("covered by the gpu-marked tests")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(LOSSES))
def test_triton_bf16_gpu(name):
    front, ref = LOSSES[name]
    B, T = 8, 64
    h, w, b, t, an, r = _data(B, T, torch.bfloat16, 31, bias=False)
    h, w, t, an, r = (x.cuda() for x in (h, w, t, an, r))
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, _ = front(hh, ww, t, None, an, r, "triton")
    got = torch.autograd.grad(loss, (hh, ww))
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    ref_loss = ref(R.logprobs64(h64, w64, t), t != -100, an.double(), r.double())
    want = torch.autograd.grad(ref_loss, (h64, w64))
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=5e-2, atol=5e-2)
    for g_, w_ in zip(got, want):
        assert ((g_.double() - w_).abs().max() / w_.abs().max().clamp_min(1e-6)) < 8e-2
