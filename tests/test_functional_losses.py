"""Epilogues of gift_fast.functional against the float64 spec implementation (tests/reference_losses).

Values and gradients w.r.t. the per-token log-probs in float64 must agree to 1e-10 (relative) /
1e-12 (absolute); float32 / float16 inputs to the float32-accumulation tolerance stated per test.
torch.autograd.gradcheck runs on every epilogue in float64.
"""

import pytest
import torch

import gift_fast.functional as Fn
from helpers import assert_within, rounding_bound
from tests import reference_losses as R

F64 = torch.float64
TOL64 = dict(rtol=1e-10, atol=1e-12)


def make_batch(B, T, seed, p_ignore=0.3, empty=(), dtype=F64):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, T, generator=g, dtype=F64) * 3).to(dtype)
    mask = torch.rand(B, T, generator=g) > p_ignore
    for i in empty:
        mask[i] = False
    logps = torch.where(mask, logps, torch.zeros((), dtype=dtype))
    anchor = (logps.to(F64) + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).to(dtype)
    anchor = torch.where(mask, anchor, torch.zeros((), dtype=dtype))
    rewards = torch.randn(B, generator=g, dtype=F64).to(dtype)
    return logps.requires_grad_(True), anchor, mask, rewards


def grads(loss, x):
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    return g


def check_pair(ours, ref, x, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(ours.to(F64), ref.to(F64), rtol=rtol, atol=atol)
    torch.testing.assert_close(grads(ours, x).to(F64), grads(ref, x).to(F64), rtol=rtol,
                               atol=atol)


# ------------------------------------------------------------------------------------ GIFT

GIFT_CASES = [
    dict(),
    dict(std="biased"),
    dict(detach_stats=False),
    dict(length_norm=1.0),
    dict(length_norm=0.5, beta=0.5, eps=1e-3),
    dict(drop_uniform_groups=True),
    dict(reduction="sum"),
]


@pytest.mark.parametrize("opts", GIFT_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_gift_matches_spec(opts):
    B, T, G = 12, 7, 4
    logps, anchor, mask, rewards = make_batch(B, T, seed=1, empty=(5,))
    rewards[4:8] = 1.0                                   # one uniform-reward group
    ours, metrics = Fn.gift_loss(logps, anchor, rewards, mask=mask, group_size=G, **opts)
    ref = R.gift(R.split_padded(logps, mask), R.split_padded(anchor, mask), rewards,
                 R.groups_of(B, G), beta=opts.get("beta", 1.0), eps=opts.get("eps", 1e-6),
                 unbiased=opts.get("std", "unbiased") == "unbiased",
                 detach_stats=opts.get("detach_stats", True), p=opts.get("length_norm", 0.0),
                 drop_uniform=opts.get("drop_uniform_groups", False),
                 reduction=opts.get("reduction", "mean"))
    check_pair(ours, ref, logps)
    assert metrics["uniform_reward_frac"].item() == pytest.approx(1 / 3)
    for v in metrics.values():
        assert v.dim() == 0 and not v.requires_grad


def test_gift_group_ids_and_packed_equal_padded():
    B, T = 9, 6
    logps, anchor, mask, rewards = make_batch(B, T, seed=2)
    gid = torch.tensor([2, 0, 1, 2, 0, 1, 2, 0, 1])
    ours, _ = Fn.gift_loss(logps, anchor, rewards, mask=mask, group_ids=gid)
    ref = R.gift(R.split_padded(logps, mask), R.split_padded(anchor, mask), rewards,
                 R.groups_of(B, group_ids=gid))
    check_pair(ours, ref, logps)
    # packed: drop the ignored rows and describe the sequences with cu_seqlens
    lens = mask.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    packed_lp = logps[mask]
    packed, _ = Fn.gift_loss(packed_lp, anchor[mask], rewards, cu_seqlens=cu, group_ids=gid)
    torch.testing.assert_close(packed, ours, **TOL64)


def test_gift_uniform_rewards_implicit_pull():
    """All rewards equal: A = 0 and the loss is beta^2 mean z^2, pulling s to the group mean."""
    B, T = 6, 5
    logps, anchor, mask, _ = make_batch(B, T, seed=3, p_ignore=0.0)
    rewards = torch.full((B,), 0.7, dtype=F64)
    loss, m = Fn.gift_loss(logps, anchor, rewards, mask=mask, group_size=3, beta=0.5)
    assert m["adv_mean"].item() == 0.0
    assert m["uniform_reward_frac"].item() == 1.0
    s = ((logps - anchor) * mask).sum(1).detach()
    z = []
    for k in range(0, B, 3):
        g = s[k:k + 3]
        z.append((g - g.mean()) / (g.std() + 1e-6))
    z = torch.cat(z)
    torch.testing.assert_close(loss, (0.25 * z ** 2).mean(), **TOL64)
    gs = grads(loss, logps)[:, 0]           # gradient on the first token of each sequence
    # detached stats: dL/ds_i = 2 beta^2 z_i / (N (sigma + eps)) -> same sign as z (pull to mean)
    assert torch.all(torch.sign(gs) == torch.sign(z))


def test_gift_zero_implicit_spread_first_step():
    """pi_theta == pi_old: s = 0 exactly, z = 0, gradient carries 1/eps (docs/losses.md, GIFT)."""
    B, T, G, beta, eps = 8, 5, 4, 1.0, 1e-6
    logps, _, mask, rewards = make_batch(B, T, seed=4, empty=(2,))
    anchor = logps.detach().clone()
    loss, m = Fn.gift_loss(logps, anchor, rewards, mask=mask, group_size=G, beta=beta, eps=eps)
    A = R.group_adv(rewards, G, eps=eps)
    torch.testing.assert_close(loss, (A ** 2).mean(), **TOL64)
    assert m["z_mean"].item() == 0.0 and m["z_abs_mean"].item() == 0.0
    g = grads(loss, logps)
    expect = (-2 * beta * A / (B * eps))[:, None] * mask
    torch.testing.assert_close(g, expect, rtol=1e-9, atol=1e-6)
    assert g.abs().max() > 1e4      # the 1/eps scale is real


def test_gift_group_of_one_and_empty_responses():
    B, T = 5, 4
    logps, anchor, mask, rewards = make_batch(B, T, seed=5, empty=(0, 3))
    eps, beta = 1e-6, 0.7
    ours, m = Fn.gift_loss(logps, anchor, rewards, mask=mask, group_size=1, beta=beta, eps=eps)
    # G = 1 (authors' code): A = R/(1+eps), z = (s - sg(s))/(1+eps) = 0 with gradient 1/(1+eps)
    A = rewards / (1 + eps)
    torch.testing.assert_close(ours, (A ** 2).mean(), **TOL64)
    assert m["z_abs_mean"].item() == 0.0
    expect = (-2 * beta * A / (B * (1 + eps)))[:, None] * mask
    torch.testing.assert_close(grads(ours, logps), expect, **TOL64)
    assert grads(ours, logps)[1].abs().min() > 0              # the sequence is trained
    check_pair(ours, R.gift(R.split_padded(logps, mask), R.split_padded(anchor, mask), rewards,
                            R.groups_of(B, 1), beta=beta, eps=eps), logps)
    for detach in (True, False):                             # G = 1 stats are constants either way
        o, _ = Fn.gift_loss(logps, anchor, rewards, mask=mask, group_size=1, beta=beta, eps=eps,
                            detach_stats=detach)
        torch.testing.assert_close(grads(o, logps), expect, **TOL64)
    ours2, _ = Fn.gift_loss(logps, anchor, rewards, mask=mask, group_ids=torch.tensor([0, 1, 1, 2, 2]))
    ref2 = R.gift(R.split_padded(logps, mask), R.split_padded(anchor, mask), rewards,
                  R.groups_of(B, group_ids=[0, 1, 1, 2, 2]))
    check_pair(ours2, ref2, logps)


def test_gift_differentiable_stats_correlation_identity():
    """detach_stats=False, eps -> 0: group loss = ((G - 1)/N)(1 + beta^2 - 2 beta rho_g)."""
    B, T, G, beta = 10, 6, 5, 0.7
    logps, anchor, mask, rewards = make_batch(B, T, seed=6, p_ignore=0.1)
    loss, m = Fn.gift_loss(logps, anchor, rewards, mask=mask, group_size=G, beta=beta, eps=0.0,
                           detach_stats=False)
    s = ((logps - anchor) * mask).sum(1).detach()
    expect = 0.0
    rhos = []
    for k in range(0, B, G):
        rho = torch.corrcoef(torch.stack([s[k:k + G], rewards[k:k + G]]))[0, 1]
        rhos.append(rho)
        expect += (G - 1) / B * (1 + beta ** 2 - 2 * beta * rho)
    torch.testing.assert_close(loss.detach(), torch.as_tensor(expect, dtype=F64), rtol=1e-9, atol=1e-12)
    assert m["correlation"].item() == pytest.approx(float(sum(rhos) / len(rhos)), rel=1e-5)


def test_gift_float32_and_float16_inputs_accumulate_in_float32():
    B, T = 8, 33
    logps, anchor, mask, rewards = make_batch(B, T, seed=7)
    ref, _ = Fn.gift_loss(logps, anchor, rewards, mask=mask, group_size=4)
    for dt in (torch.float32, torch.float16):
        lp = logps.detach().to(dt).requires_grad_(True)
        an = anchor.to(dt).float()          # 16-bit values; anchors must be float32 or float64
        ours, _ = Fn.gift_loss(lp, an, rewards.to(dt), mask=mask, group_size=4)
        assert ours.dtype == torch.float32
        # same quantised inputs in float64: only the float32 accumulation differs (its bound)
        q, bound = rounding_bound(lambda: Fn.gift_loss(
            lp.detach().to(F64), an.to(F64), rewards.to(dt).to(F64), mask=mask, group_size=4)[0])
        assert_within("loss", ours, q, bound)
        assert grads(ours, lp).dtype == dt


# ------------------------------------------------------------------------------------ GRPO

@pytest.mark.parametrize("loss_type", Fn.GRPO_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_matches_spec(loss_type, beta):
    B, T = 6, 9
    logps, old, mask, rewards = make_batch(B, T, seed=10, empty=(1,))
    ref_lp = torch.where(mask, logps.detach() + 0.2 * torch.randn(B, T, dtype=F64), 0.0)
    adv = Fn.group_advantages(rewards, 3)
    ours, m = Fn.grpo_loss(logps, old, adv, mask=mask, kl_ref_logps=ref_lp, beta=beta,
                           loss_type=loss_type, epsilon_high=0.28)
    ref = R.grpo(R.split_padded(logps, mask), R.split_padded(old, mask), adv,
                 R.split_padded(ref_lp, mask), beta=beta, eh=0.28, loss_type=loss_type, max_len=T)
    check_pair(ours, ref, logps)
    assert 0 < m["clip_fraction"].item() < 1
    assert m["kl"].item() > 0


def test_grpo_num_items_and_per_token_advantages_and_packed():
    B, T = 4, 5
    logps, old, mask, rewards = make_batch(B, T, seed=11)
    adv = torch.randn(B, dtype=F64)
    ours, _ = Fn.grpo_loss(logps, old, adv, mask=mask, num_items_in_batch=50)
    ref = R.grpo(R.split_padded(logps, mask), R.split_padded(old, mask), adv, num_items=50)
    check_pair(ours, ref, logps)
    tok, _ = Fn.grpo_loss(logps, old, adv[:, None].expand(B, T), mask=mask, num_items_in_batch=50)
    torch.testing.assert_close(tok, ours, **TOL64)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])
    for lt in Fn.GRPO_LOSS_TYPES:
        pad, _ = Fn.grpo_loss(logps, old, adv, mask=mask, loss_type=lt, max_completion_length=T)
        pk, _ = Fn.grpo_loss(logps[mask], old[mask], adv, cu_seqlens=cu, loss_type=lt,
                             max_completion_length=T)
        torch.testing.assert_close(pk, pad, **TOL64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages(scale):
    r = torch.randn(12, dtype=torch.float32)
    r[3:6] = 2.0
    ours = Fn.group_advantages(r, 3, scale=scale)
    _, bound = rounding_bound(lambda: Fn.group_advantages(r.double(), 3, scale=scale))
    assert_within("advantages", ours, R.group_adv(r, 3, scale), bound)
    assert torch.all(ours[3:6] == 0)


# ------------------------------------------------------------------------ pairwise losses

def test_dpo_ipo_simpo_match_spec():
    B, T = 6, 7
    logps, ref, mask, _ = make_batch(B, T, seed=20, empty=(4,))
    seqs, refs = R.split_padded(logps, mask), R.split_padded(ref, mask)
    for ls in (0.0, 0.1):
        ours, m = Fn.dpo_loss(logps, ref, mask=mask, beta=0.3, label_smoothing=ls)
        check_pair(ours, R.dpo(seqs, refs, beta=0.3, ls=ls), logps)
    for ln in (True, False):
        ours, _ = Fn.ipo_loss(logps, ref, mask=mask, beta=0.2, length_norm=float(ln))
        check_pair(ours, R.ipo(seqs, refs, beta=0.2, length_normalized=ln), logps)
    for sw in (0.0, 0.5):
        ours, m = Fn.simpo_loss(logps, mask=mask, sft_weight=sw)
        check_pair(ours, R.simpo(seqs, sft_weight=sw), logps)
    assert set(m) >= {"reward_margin", "reward_accuracy"}


@pytest.mark.parametrize("kind", Fn.RPO_KINDS)
def test_rpo_pairwise_and_multi(kind):
    B, T = 8, 6
    logps, ref, mask, rewards = make_batch(B, T, seed=21, empty=(2,))
    seqs, refs = R.split_padded(logps, mask), R.split_padded(ref, mask)
    ours, _ = Fn.rpo_loss(logps, ref, rewards, mask=mask, kind=kind, beta=0.5)
    check_pair(ours, R.rpo_pairwise(seqs, refs, rewards, kind, beta=0.5), logps)
    multi, _ = Fn.rpo_loss(logps, ref, rewards, mask=mask, kind=kind, beta=0.5, group_size=4)
    check_pair(multi, R.rpo_multi(seqs, refs, rewards, R.groups_of(B, 4), kind, beta=0.5), logps)
    # K = 2 multi-response on the same pairs (group_ids pair k with k + B/2) equals the pairwise
    # form up to the constant factor 4 (sq) or 1 (KLs)
    P = B // 2
    gid = torch.arange(B) % P
    k2, _ = Fn.rpo_loss(logps, ref, rewards, mask=mask, kind=kind, beta=0.5, group_ids=gid)
    factor = 4.0 if kind == "sq" else 1.0
    check_pair(factor * k2, ours, logps)


@pytest.mark.parametrize("kind", Fn.UNA_KINDS)
def test_una_matches_spec(kind):
    B, T = 6, 5
    logps, anchor, mask, _ = make_batch(B, T, seed=22)
    seqs, ans = R.split_padded(logps, mask), R.split_padded(anchor, mask)
    scores = torch.rand(B, dtype=F64) if kind == "score_mse" else None
    ours, _ = Fn.una_loss(logps, anchor, mask=mask, kind=kind, scores=scores, beta=0.7)
    check_pair(ours, R.una(seqs, ans, kind, scores=scores, beta=0.7), logps)
    ours_d, _ = Fn.una_loss(logps, anchor, mask=mask, kind=kind, scores=scores)
    check_pair(ours_d, R.una(seqs, ans, kind, scores=scores), logps)
    if kind.startswith("binary"):
        labels = torch.tensor([1, 0, 0, 1, 1, 0.0], dtype=F64)
        ours_l, _ = Fn.una_loss(logps, anchor, mask=mask, kind=kind, labels=labels)
        check_pair(ours_l, R.una(seqs, ans, kind, labels=labels), logps)


def test_una_pairwise_equals_dpo():
    logps, anchor, mask, _ = make_batch(4, 5, seed=23)
    u, _ = Fn.una_loss(logps, anchor, mask=mask, beta=0.1)
    d, _ = Fn.dpo_loss(logps, anchor, mask=mask, beta=0.1)
    torch.testing.assert_close(u, d, **TOL64)


# ----------------------------------------------------------------------- token-local losses

@pytest.mark.parametrize("div", Fn.DIVERGENCES)
def test_fdiv_sft_matches_spec(div):
    B, T = 4, 7
    logps, ref, mask, _ = make_batch(B, T, seed=30)
    # large beta so that some u fall below the hellinger / js domain edges
    ref = torch.where(mask, ref + torch.linspace(-4, 4, B * T, dtype=F64).view(B, T), 0.0)
    for beta in (0.1, 2.0):
        ours, _ = Fn.fdiv_sft_loss(logps, ref, mask=mask, divergence=div, beta=beta)
        check_pair(ours, R.fdiv(R.split_padded(logps, mask), R.split_padded(ref, mask), div, beta),
                   logps)
    # at pi == pi_ref every divergence has the SFT gradient
    nll, _ = Fn.fdiv_sft_loss(logps, None, mask=mask, divergence="tv")
    same, _ = Fn.fdiv_sft_loss(logps, logps.detach(), mask=mask, divergence=div)
    torch.testing.assert_close(grads(same, logps), grads(nll, logps), **TOL64)


def test_dft_matches_spec():
    logps, _, mask, _ = make_batch(5, 6, seed=31, empty=(2,))
    ours, _ = Fn.dft_loss(logps, mask=mask)
    check_pair(ours, R.dft(R.split_padded(logps, mask)), logps)


@pytest.mark.parametrize("gamma", [0.95, 0.5, 0.0])
def test_ift_matches_spec(gamma):
    B, T = 3, 11
    logps, _, mask, _ = make_batch(B, T, seed=32)
    mask[:, :3] = False                     # prompt
    logps = torch.where(mask, logps, 0.0).detach().requires_grad_(True)
    ours, _ = Fn.ift_loss(logps, mask=mask, gamma=gamma)
    check_pair(ours, R.ift(logps, mask, gamma), logps)


def test_ift_gamma0_is_sft_and_long_sequences_are_finite():
    logps, _, mask, _ = make_batch(3, 9, seed=33)
    ours, _ = Fn.ift_loss(logps, mask=mask, gamma=0.0)
    sft = (-(logps * mask).sum(1) / mask.sum(1)).mean()
    check_pair(ours, sft, logps)
    long_lp = -torch.rand(2, 3000, dtype=torch.float32)
    c = long_lp[:, :]
    w = Fn.discounted_suffix_sum(c.double(), 0.999)
    ref = torch.zeros_like(w)
    acc = torch.zeros(2, dtype=F64)
    for t in range(2999, -1, -1):
        acc = c[:, t].double() + 0.999 * acc
        ref[:, t] = acc
    torch.testing.assert_close(w, ref, rtol=1e-9, atol=1e-9)
    loss, _ = Fn.ift_loss(long_lp.requires_grad_(True), gamma=0.95)
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------------- gradcheck

def _gc(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_every_epilogue():
    torch.manual_seed(40)
    B, T = 6, 4
    lp, an, mask, rw = make_batch(B, T, seed=40, p_ignore=0.2)
    lp = lp.detach().requires_grad_(True)
    # epilogues with deliberately detached terms (GIFT's default detached statistics, DFT's
    # sg(p)) are not the derivative of their own value: their gradients are checked against the
    # closed forms of docs/losses.md in test_detached_gradients_closed_form instead.
    _gc(lambda x: Fn.gift_loss(x, an, rw, mask=mask, group_size=3, detach_stats=False)[0], lp)
    _gc(lambda x: Fn.gift_loss(x, an, rw, mask=mask, group_size=3, detach_stats=False, std="biased",
                               length_norm=1.0, eps=1e-3)[0], lp)
    _gc(lambda x: Fn.grpo_loss(x, an, rw, mask=mask, kl_ref_logps=an, beta=0.1, loss_type="grpo")[0], lp)
    _gc(lambda x: Fn.grpo_loss(x, an, rw, mask=mask, kl_ref_logps=an, beta=0.1)[0], lp)
    _gc(lambda x: Fn.dpo_loss(x, an, mask=mask, label_smoothing=0.1)[0], lp)
    _gc(lambda x: Fn.ipo_loss(x, an, mask=mask)[0], lp)
    _gc(lambda x: Fn.simpo_loss(x, mask=mask, sft_weight=0.3)[0], lp)
    for kind in Fn.RPO_KINDS:
        _gc(lambda x: Fn.rpo_loss(x, an, rw, mask=mask, kind=kind)[0], lp)
        _gc(lambda x: Fn.rpo_loss(x, an, rw, mask=mask, kind=kind, group_size=3)[0], lp)
    for kind in Fn.UNA_KINDS:
        sc = torch.rand(B, dtype=F64)
        _gc(lambda x: Fn.una_loss(x, an, mask=mask, kind=kind, scores=sc, beta=0.5)[0], lp)
    for div in Fn.DIVERGENCES:
        _gc(lambda x: Fn.fdiv_sft_loss(x, an, mask=mask, divergence=div, beta=0.5)[0], lp)
    _gc(lambda x: Fn.ift_loss(x, mask=mask)[0], lp)


def test_detached_gradients_closed_form():
    B, T, G, beta, eps = 9, 5, 3, 0.8, 1e-3
    lp, an, mask, rw = make_batch(B, T, seed=41, p_ignore=0.2)
    loss, _ = Fn.gift_loss(lp, an, rw, mask=mask, group_size=G, beta=beta, eps=eps)
    s = ((lp - an) * mask).sum(1).detach()
    A = R.group_adv(rw, G, eps=eps)
    sig = s.view(-1, G).std(1).repeat_interleave(G)
    z = (s - s.view(-1, G).mean(1).repeat_interleave(G)) / (sig + eps)
    ds = -2 * beta * (A - beta * z) / (B * (sig + eps))          # docs/losses.md, GIFT
    torch.testing.assert_close(grads(loss, lp), ds[:, None] * mask, **TOL64)
    dft, _ = Fn.dft_loss(lp, mask=mask)
    torch.testing.assert_close(grads(dft, lp), -torch.exp(lp.detach()) * mask / mask.sum(), **TOL64)


# ------------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_clear_errors():
    lp, an, mask, rw = make_batch(6, 4, seed=50)
    with pytest.raises(ValueError, match="group_size"):
        Fn.gift_loss(lp, an, rw, mask=mask, group_size=4)
    with pytest.raises(ValueError, match="anchor_logps"):
        Fn.gift_loss(lp, an[:, :3], rw, mask=mask, group_size=3)
    with pytest.raises(ValueError, match="rewards"):
        Fn.gift_loss(lp, an, rw[:5], mask=mask, group_size=3)
    bad = rw.clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match="rewards: expected finite"):
        Fn.gift_loss(lp, an, bad, mask=mask, group_size=3)
    bad[2] = float("inf")
    with pytest.raises(ValueError, match="rewards: expected finite"):
        Fn.rpo_loss(lp, an, bad, mask=mask)
    with pytest.raises(ValueError, match="even number"):
        Fn.dpo_loss(lp[:5], an[:5], mask=mask[:5])
    with pytest.raises(ValueError, match="even number"):
        Fn.simpo_loss(lp[:3])
    with pytest.raises(ValueError, match="kind"):
        Fn.rpo_loss(lp, an, rw, kind="kl")
    with pytest.raises(ValueError, match="kind"):
        Fn.una_loss(lp, an, kind="mse")
    with pytest.raises(ValueError, match="divergence"):
        Fn.fdiv_sft_loss(lp, an, divergence="chi2")
    with pytest.raises(ValueError, match="loss_type"):
        Fn.grpo_loss(lp, an, rw, loss_type="ppo")
    with pytest.raises(ValueError, match="kl_ref_logps"):
        Fn.grpo_loss(lp, an, rw, beta=0.1)
    with pytest.raises(ValueError, match="scores"):
        Fn.una_loss(lp, an, kind="score_mse")
    with pytest.raises(ValueError, match="cu_seqlens"):
        Fn.gift_loss(lp[mask], an[mask], rw, cu_seqlens=torch.tensor([0, 1, 2]), group_size=1)
    with pytest.raises(ValueError, match="group_ids"):
        Fn.gift_loss(lp, an, rw, group_ids=torch.tensor([0, 1]))


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_una_scores_outside_unit_interval(bad):
    """Scores and labels must lie in [0, 1] (NaN included): a ValueError in eager mode, a
    RuntimeError from the device-side assert inside a compiled graph (no graph break)."""
    lp = -torch.rand(4, 3)
    scores = torch.tensor([0.2, bad, 0.9, 0.5])
    message = r"scores: expected (values in \[0, 1\]|finite values)"   # NaN: the finite check
    with pytest.raises(ValueError, match=message):
        Fn.una_loss(lp, kind="score_mse", scores=scores)
    compiled = torch.compile(lambda lp, s: Fn.una_loss(lp, kind="score_mse", scores=s)[0],
                             fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=message):
        compiled(lp, scores)
    assert torch.isfinite(compiled(lp, scores.nan_to_num(0.5).clamp(0, 1)))
