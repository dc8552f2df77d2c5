"""The torch backend's two functions, ``chunked_forward`` and ``chunked_backward``, against a
float64 oracle written from docs/losses.md ("The shared core"), with tiles much smaller than the
shapes (several row blocks, several vocabulary tiles, a partial last tile), and their contract
for vocabulary shards: a target outside [0, V) on an active row has no one-hot term, and
statistics from outside (global lse and entropy over shards) give this shard's part of the
gradients.
"""
import math

import pytest
import torch

import gift_fast.backends.torch_chunked as tc
from helpers import U32, assert_within, gamma, linear_softmax_rounding_bounds, unit_roundoff

IGNORE = -100


def _inputs(N, H, V, dtype, seed, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / H ** 0.25).to(dtype)
    b = torch.randn(V, generator=gen).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::5] = IGNORE
    targets[1::7] = V + 3          # active, target not a column of this weight
    targets[2::11] = -1            # idem, below 0 (not the ignore index)
    g = torch.randn(N, generator=gen, dtype=torch.float64)
    g[3::6] = 0.0                  # rows with zero upstream gradient are skipped
    e = torch.randn(N, generator=gen, dtype=torch.float64)
    return hidden, weight, b, targets, g, e


def _oracle(hidden, weight, bias, targets, g, e, temperature, softcap):
    """float64, materialised: statistics and the gradients of sum g*logp + e*H (docs/losses.md,
    "The shared core").

    logp of a row whose target is outside [0, V) is -lse (no target term), so its gradient is
    -g * p, as chunked_backward documents."""
    h = hidden.detach().double().clone().requires_grad_()
    w = weight.detach().double().clone().requires_grad_()
    b = bias.detach().double().clone().requires_grad_() if bias is not None else None
    raw = h @ w.T + (b if b is not None else 0.0)
    z = softcap * torch.tanh(raw / softcap) if softcap is not None else raw
    z = z / temperature
    lse = torch.logsumexp(z, 1)
    logp_all = z - lse[:, None]
    ent = -(logp_all.exp() * logp_all).sum(1)
    V = weight.shape[0]
    active = targets != IGNORE
    in_vocab = active & (targets >= 0) & (targets < V)
    zt = z.gather(1, torch.where(in_vocab, targets, 0)[:, None]).squeeze(1)
    zt = torch.where(in_vocab, zt, torch.zeros_like(zt))
    obj = torch.where(active, g * (zt - lse) + e * ent, torch.zeros_like(lse)).sum()
    grads = torch.autograd.grad(obj, [t for t in (h, w, b) if t is not None])
    zd = z.detach()
    stats = dict(lse=lse.detach(), max_logit=zd.max(1).values, argmax=zd.argmax(1),
                 entropy=torch.where(active, ent.detach(), torch.zeros_like(lse)),
                 target_logit=zt.detach(),
                 logp=torch.where(in_vocab, (zt - lse).detach(), torch.zeros_like(lse)))
    return stats, grads


def _bounds(hidden, weight, b, targets, g, e, temperature, softcap):
    """Rounding bounds (tests/helpers.py) for this backend's result against the float64 oracle:
    float32 accumulation for float32 and bfloat16 inputs (bf16 values are exact in float32; the
    gradients are rounded to bf16 at the end), and for float64 inputs twice the float64 bound
    (the oracle rounds too). The exp argument floor makes every probability at least e^floor."""
    acc = tc.accumulation_dtype(hidden.dtype)
    sides = 2 if acc == torch.float64 else 1
    bd = linear_softmax_rounding_bounds(hidden, weight, b, targets, g, e, temperature, softcap,
                                        IGNORE, u=unit_roundoff(acc),
                                        out_dtype=hidden.dtype if hidden.dtype != acc else None,
                                        p_floor=math.exp(tc.EXP_FLOOR[acc]))
    return type(bd)(*(None if t is None else sides * t for t in bd))


@pytest.fixture
def small_tiles(monkeypatch):
    """Row blocks of 4 and vocabulary tiles of 7 columns: every loop runs many times."""
    monkeypatch.setattr(tc, "ROW_BLOCK", 4)
    return 4 * 7


FLAGS = [  # temperature, softcap, bias
    (1.0, None, False),
    (0.7, 2.5, True),
    (1.3, None, True),
]


@pytest.mark.parametrize("temperature,softcap,bias", FLAGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_forward_and_backward_match_float64_oracle(small_tiles, dtype, temperature, softcap, bias):
    N, H, V = 23, 13, 37
    hidden, weight, b, targets, g, e = _inputs(N, H, V, dtype, seed=1, bias=bias)
    want, want_grads = _oracle(hidden, weight, b, targets, g, e, temperature, softcap)
    st = tc.chunked_forward(hidden, weight, b, targets, temperature, softcap, IGNORE,
                            want_entropy=True, want_argmax=True, chunk_elements=small_tiles)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bound = _bounds(hidden, weight, b, targets, g, e, temperature, softcap)
    for name in ("lse", "max_logit", "entropy", "target_logit", "logp"):
        assert getattr(st, name).dtype == acc, name
        assert_within(name, getattr(st, name), want[name], getattr(bound, name))
    assert torch.equal(st.argmax, want["argmax"])
    grads = tc.chunked_backward(hidden, weight, b, targets, st.lse, st.entropy, g.to(acc),
                                e.to(acc), temperature, softcap, IGNORE,
                                chunk_elements=small_tiles)
    leaves = (hidden, weight, b)
    for name, got, ref, leaf in zip(("d_hidden", "d_weight", "d_bias"), grads, want_grads + (None,),
                                    leaves):
        if leaf is None:
            assert got is None
            continue
        assert got.dtype == leaf.dtype, name
        assert_within(name, got, ref, getattr(bound, name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_far_below_the_max_are_exact_enough(small_tiles, dtype):
    """Logit spreads of hundreds of nats (a peaked LLM at low temperature): exp's argument is
    clamped at EXP_FLOOR (CPU speed), which must not move any statistic or gradient."""
    N, H, V = 11, 6, 41
    hidden, weight, b, targets, g, e = _inputs(N, H, V, dtype, seed=3)
    weight = weight * 100.0          # logits spread over a thousand nats
    temperature = 0.5
    want, want_grads = _oracle(hidden, weight, b, targets, g, e, temperature, None)
    z = (hidden.double() @ weight.double().T + b.double()) / temperature
    assert (want["lse"][:, None] - z).max() > 1000   # below both dtypes' EXP_FLOOR
    st = tc.chunked_forward(hidden, weight, b, targets, temperature, None, IGNORE,
                            want_entropy=True, chunk_elements=small_tiles)
    # Each float32 logit carries up to gamma(H+1) (|x|.|W_v| + |b_v|) / T of rounding (about
    # 1e-3 here), which depends on the BLAS kernel's summation order (it differs between CPUs).
    # It moves p by p dz and reaches dX through |W| ~ 100 and 1/T = 2: helpers.py derives the
    # bounds from these magnitudes, elementwise, for the statistics and the gradients alike.
    bound = _bounds(hidden, weight, b, targets, g, e, temperature, None)
    for name in ("lse", "entropy", "logp"):
        assert_within(name, getattr(st, name), want[name], getattr(bound, name))
    grads = tc.chunked_backward(hidden, weight, b, targets, st.lse, st.entropy, g.to(dtype),
                                e.to(dtype), temperature, None, IGNORE, chunk_elements=small_tiles)
    for name, got, ref in zip(("d_hidden", "d_weight", "d_bias"), grads, want_grads):
        assert_within(name, got, ref, getattr(bound, name))


def test_backward_skips_dead_rows_and_needs_entropy_for_e(small_tiles):
    hidden, weight, b, targets, g, e = _inputs(9, 5, 20, torch.float32, seed=2)
    st = tc.chunked_forward(hidden, weight, b, targets, 1.0, None, IGNORE, True,
                            chunk_elements=small_tiles)
    g = torch.zeros(9)
    g[4] = 1.0
    d_hidden, _, _ = tc.chunked_backward(hidden, weight, b, targets, st.lse, None, g, None, 1.0,
                                         None, IGNORE, chunk_elements=small_tiles)
    assert (d_hidden.abs().sum(1) != 0).tolist() == [i == 4 and targets[4] != IGNORE
                                                     for i in range(9)]
    with pytest.raises(ValueError, match="entropy"):
        tc.chunked_backward(hidden, weight, b, targets, st.lse, None, g, g, 1.0, None, IGNORE)


def test_argmax_ties_take_the_lowest_index_across_tiles(small_tiles):
    H, V = 3, 30
    weight = torch.zeros(V, H)
    weight[[5, 12, 26]] = torch.tensor([1.0, 0.0, 0.0])     # three equal maxima in three tiles
    hidden = torch.tensor([[2.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    st = tc.chunked_forward(hidden, weight, None, torch.tensor([0, 0]), 1.0, None, IGNORE,
                            False, True, chunk_elements=small_tiles)
    assert st.argmax.tolist() == [5, 0]


def test_vocabulary_shards_with_global_statistics_equal_the_whole(small_tiles):
    """Emulates a vocabulary-parallel lm_head in one process: uneven shards, each sees targets
    shifted into its own columns (others fall outside [0, V_shard)); lse and entropy combined
    over shards; backward per shard with the global statistics; d_hidden summed, d_weight and
    d_bias concatenated: the same as the whole weight."""
    N, H, V = 17, 6, 37
    temperature, softcap = 0.9, 3.0
    hidden, weight, b, targets, g, e = _inputs(N, H, V, torch.float64, seed=3)
    targets[1::7] = 4                  # only ignored rows and real ids here
    targets[2::11] = 30
    whole = tc.chunked_forward(hidden, weight, b, targets, temperature, softcap, IGNORE, True,
                               chunk_elements=small_tiles)
    bounds = [(0, 10), (10, 25), (25, 37)]
    local = []
    for lo, hi in bounds:
        t_local = torch.where(targets == IGNORE, targets, targets - lo)
        local.append((t_local, tc.chunked_forward(hidden, weight[lo:hi], b[lo:hi], t_local,
                                                  temperature, softcap, IGNORE, True,
                                                  chunk_elements=small_tiles)))
    lses = torch.stack([s.lse for _, s in local])
    lse = torch.logsumexp(lses, 0)
    # E[z] = sum_r exp(lse_r - lse) (lse_r - H_r); H = lse - E[z] (entropy 0 on ignored rows is
    # fine: their gradient is never computed).
    mean_z = sum(torch.exp(s.lse - lse) * (s.lse - s.entropy) for _, s in local)
    entropy = torch.where(targets != IGNORE, lse - mean_z, torch.zeros_like(lse))
    target_logit = sum(s.target_logit for _, s in local)
    torch.testing.assert_close(lse, whole.lse)
    torch.testing.assert_close(entropy, whole.entropy)
    torch.testing.assert_close(torch.where(targets != IGNORE, target_logit - lse, 0 * lse),
                               whole.logp)
    full = tc.chunked_backward(hidden, weight, b, targets, whole.lse, whole.entropy, g, e,
                               temperature, softcap, IGNORE, chunk_elements=small_tiles)
    parts = [tc.chunked_backward(hidden, weight[lo:hi], b[lo:hi], t_local, lse, entropy, g, e,
                                 temperature, softcap, IGNORE, chunk_elements=small_tiles)
             for (lo, hi), (t_local, _) in zip(bounds, local)]
    torch.testing.assert_close(sum(p[0] for p in parts), full[0])
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), full[1])
    torch.testing.assert_close(torch.cat([p[2] for p in parts]), full[2])


def test_tile_shape_is_bounded_whatever_n_and_v():
    for n, v in [(1, 1), (3, 100_000), (100_000, 7), (8192, 151936)]:
        rows, cols = tc.tile_shape(n, v)
        assert 1 <= rows <= min(n, tc.ROW_BLOCK) and 1 <= cols <= v
        assert rows * cols <= tc.CHUNK_ELEMENTS


def test_rounding_bound_covers_the_worst_case_logit_rounding():
    """The d_hidden bound of the far-below case (helpers.py) against the exact first-order worst
    case of logit rounding alone: the forward (lse, entropy) and the backward (which recomputes
    the logits of the live rows only, a GEMM of another shape) round each logit independently,
    by up to gamma(H+1) (|x|.|W_v| + |b_v|) / T. That worst case exceeds 1e-5 x max|dX| (the
    old tolerance, which a 2-core EPYC exceeded with 0.0755) and stays within the bound."""
    N, H, V, T = 11, 6, 41, 0.5
    hidden, weight, b, targets, g, e = _inputs(N, H, V, torch.float32, seed=3)
    weight = weight * 100.0
    bound = _bounds(hidden, weight, b, targets, g, e, T, None).d_hidden
    x, w, bb = hidden.double(), weight.double(), b.double()
    z0 = (x @ w.T + bb) / T
    dz = gamma(H + 1) * (x.abs() @ w.abs().T + bb.abs()) / T + 4 * U32 * z0.abs()
    active = targets != IGNORE
    in_vocab = active & (targets >= 0) & (targets < V)
    onehot = torch.zeros(N, V, dtype=torch.float64)
    onehot[in_vocab, targets[in_vocab]] = 1.0
    gg, ee = torch.where(active, g, 0.0), torch.where(active, e, 0.0)

    def d_hidden(z_bwd, z_fwd):
        lse = torch.logsumexp(z_fwd, 1, keepdim=True)
        mu = (torch.exp(z_fwd - lse) * z_fwd).sum(1, keepdim=True)
        p = torch.exp(z_bwd - lse)
        return ((p * (-gg[:, None] - ee[:, None] * (z_bwd - mu)) + gg[:, None] * onehot) / T) @ w

    jac = torch.autograd.functional.jacobian(d_hidden, (z0, z0))
    worst = sum(torch.einsum("nkv,nv->nk", torch.stack([j[n, :, n] for n in range(N)]).abs(), dz)
                for j in jac)
    assert worst.max() > 1e-5 * _oracle(hidden, weight, b, targets, g, e, T, None)[1][0].abs().max()
    assert torch.all(worst <= bound)
