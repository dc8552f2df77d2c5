"""linear_logprobs under torch.compile(fullgraph=True, dynamic=True): no graph break, no
recompilation across batch sizes, no host sync, values and gradients equal to eager.

Compiled with the ``aot_eager`` backend: it runs dynamo and AOTAutograd, which decide graph
breaks, recompilations and what runs in the graph, as inductor does, but skips inductor's C++
code generation, which took ~50 s for a one-line function on this 2-core CPU with a cold cache
(the custom ops are opaque to inductor anyway: their bodies are the same eager code on either
backend). One linear_logprobs case runs through inductor as well.
"""
import math

import pytest
import torch
import torch._dynamo

import gift_fast as gf
from gift_fast.backends import torch_chunked, triton_op
from gift_fast.backends.protocol import local_targets
from gift_fast.logprobs import linear_logprobs_bwd, linear_logprobs_fwd

from helpers import count_host_syncs

U32 = 2.0 ** -24          # float32 unit roundoff

CASES = [  # (return_entropy, temperature, softcap, bias)
    (False, 1.0, None, False),
    (True, 1.0, None, False),
    (True, 0.7, 3.0, True),
    (False, 1.3, 2.0, False),
]


def _gamma(k: int) -> float:
    """Error bound factor of a float32 sum of k products (Higham's gamma_k)."""
    return k * U32 / (1 - k * U32)


def _inputs(B, T=5, H=8, V=24, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_()
    weight = (0.5 * torch.randn(V, H, generator=g)).requires_grad_()
    b = (0.5 * torch.randn(V, generator=g)).requires_grad_() if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, :2] = -100                      # ignored rows: no gradient, skipped in eager
    c = torch.randn(B, T, generator=g)         # upstream gradient of logp
    d = torch.randn(B, T, generator=g)         # upstream gradient of the entropy
    return hidden, weight, b, targets, c, d


def _make_step(return_entropy, temperature, softcap, backend="torch"):
    """A training-step-like function; the scalar options are constants of it, as a model's
    config is (passed as arguments, dynamic=True would make floats symbolic inputs)."""
    def step(hidden, weight, bias, targets, c, d):
        out = gf.linear_logprobs(hidden, weight, targets, bias, temperature=temperature,
                                 softcap=softcap, return_entropy=return_entropy, backend=backend)
        if return_entropy:
            logp, ent = out
            return logp, ent, (c * logp).sum() + (d * ent).sum()
        return out, None, (c * out).sum()
    return step


def _grads(loss, hidden, weight, bias):
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    return torch.autograd.grad(loss, leaves)


def _grad_tolerances(hidden, weight, bias, c, d, temperature, softcap, return_entropy):
    """Worst-case float32 difference between two summation orders of the same backward.

    Eager drops the ignored rows before the GEMMs, the compiled graph runs them with zero
    dlogits, so BLAS may add the same products in another order. Per logit,
    |dz| <= (2|g| + 2|e| max|z|) / T with |z| <= max|logit| (the softcap factor is <= 1); dW
    sums N products |dz| |x|, dX sums V products |dz| |w|, db sums N values |dz|; each of the two
    results is within gamma_k of the exact sum.
    """
    with torch.no_grad():
        z = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
        if bias is not None:
            z = z + bias
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        zmax = (z / temperature).abs().max().item()
        emax = d.abs().max().item() if return_entropy else 0.0
        dz = (2 * c.abs().max().item() + 2 * emax * zmax) / temperature
        n, v = z.shape
        x = hidden.reshape(-1, hidden.shape[-1]).abs()
        tol_dx = 2 * _gamma(v) * dz * weight.abs().sum(0)               # [H], every row
        tol_dw = 2 * _gamma(n) * dz * x.sum(0)                          # [H], every column
        tols = [tol_dx.expand(hidden.shape), tol_dw.expand(weight.shape)]
        if bias is not None:
            tols.append(torch.full(bias.shape, 2 * _gamma(n) * n * dz))
    return tols


# One case also through inductor (7 s with a warm compile cache on a 2-core CPU, ~50 s cold).
@pytest.mark.parametrize("return_entropy,temperature,softcap,bias,backend,compiler",
                         [c + ("torch", "aot_eager") for c in CASES]
                         + [CASES[2] + ("triton", "aot_eager"), CASES[2] + ("torch", "inductor")])
def test_linear_logprobs_fullgraph_dynamic(return_entropy, temperature, softcap, bias, backend,
                                           compiler):
    torch._dynamo.reset()
    step = _make_step(return_entropy, temperature, softcap, backend)
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=compiler)
    counters = torch._dynamo.utils.counters
    counters.clear()
    for i, B in enumerate((2, 3, 5)):
        hidden, weight, b, targets, c, d = _inputs(B, bias=bias, seed=B)
        args = (hidden, weight, b, targets, c, d)
        want_logp, want_ent, want_loss = step(*args)
        want = _grads(want_loss, hidden, weight, b)
        # After the first batch size, any recompilation raises.
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            if i == 0:
                compiled(*args)                # compiles outside the sync count
            with count_host_syncs() as syncs:
                logp, ent, loss = compiled(*args)
                got = _grads(loss, hidden, weight, b)
        assert sum(syncs.values()) == 0, dict(syncs)
        # The forward runs the same kernels on the same rows: equal bit for bit.
        assert torch.equal(logp, want_logp)
        if return_entropy:
            assert torch.equal(ent, want_ent)
        tols = _grad_tolerances(hidden, weight, b, c, d, temperature, softcap, return_entropy)
        for name, g, w, tol in zip(("hidden", "weight", "bias"), got, want, tols):
            err = (g - w).abs()
            assert (err <= tol).all(), f"{name}: max err {err.max():.3g}, tol {tol.min():.3g}"
            # Ignored rows get exactly zero gradient on both paths.
            if name == "hidden":
                assert not g[:, :2].any()
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_target_check_stays_in_graph():
    """Out-of-range targets: eager raises the usual ValueError; the compiled graph keeps the
    check as an in-graph assert (RuntimeError, same wording) instead of a graph break."""
    torch._dynamo.reset()
    hidden, weight, _, targets, _, _ = _inputs(2)
    targets[0, 3] = weight.shape[0]
    fn = lambda h, w, t: gf.linear_logprobs(h, w, t, backend="torch")  # noqa: E731
    with pytest.raises(ValueError, match=r"targets: expected values in \[0, 24\)"):
        fn(hidden, weight, targets)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="targets: expected values in"):
        compiled(hidden, weight, targets)
    targets[0, 3] = 0
    compiled(hidden, weight, targets)      # the same graph passes on valid targets


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_uncompacted_backward_ignores_dead_rows(backend):
    """compact=False (compiled / captured backward) runs every row; a dead row (zero upstream
    gradient) adds exactly nothing, even when its hidden state and lse are NaN."""
    g = torch.Generator().manual_seed(1)
    N, H, V = 7, 8, 20
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    bias = torch.randn(V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    mod = torch_chunked if backend == "torch" else triton_op
    st = mod.stats(hidden, weight, bias, y, 0.8, 4.0, True)
    gl, e = torch.randn(N, generator=g), torch.randn(N, generator=g)
    dead = torch.tensor([0, 3, 4])
    gl[dead], e[dead] = 0.0, 0.0
    hidden[3] = float("nan")
    lse = st.lse.clone()
    lse[4] = float("nan")
    args = (hidden, weight, bias, y, lse, st.entropy, gl, e, 0.8, 4.0, True, True, True)
    ref = mod.grad(*args, compact=True)
    out = mod.grad(*args, compact=False)
    assert not out.d_hidden[dead].any()
    for a, b in zip(out, ref):
        assert torch.isfinite(a).all()
        # Same products, summed over 7 or 4 rows: within float32 rounding of a sum of |terms|
        # (|dz| < 2 (|g| + |e| 2 max|z|) / T <= 60 here, |x|, |w| < 5; bound 7 * 2^-24 * 7 *
        # 60 * 25 * 2 ~ 1e-2 is loose; the differences seen are ~1e-6).
        assert torch.allclose(a, b, rtol=0, atol=2 * _gamma(V) * 60 * 25 * V)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    g = torch.Generator().manual_seed(2)
    N, H, V = 6, 8, 20
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    bias = torch.randn(V, generator=g)
    t = torch.tensor([1, 2, -100, 4, 5, 19])
    act = t != -100
    y = local_targets(t, act)
    for want_entropy in (False, True):
        torch.library.opcheck(linear_logprobs_fwd, (hidden.requires_grad_(), weight, bias, y, act,
                                                    backend, 0.7, 3.0, want_entropy, True, None,
                                                    0, V))
        torch.library.opcheck(linear_logprobs_fwd, (hidden, weight.requires_grad_(), None, y, act,
                                                    backend, 1.0, None, want_entropy, False, None,
                                                    0, V))
    h, w, b = hidden.detach(), weight.detach(), bias.detach()
    _, ent, _, lse = linear_logprobs_fwd(h, w, b, y, act, backend, 0.7, 3.0, True, True, None,
                                          0, V)
    for compact in (True, False):
        torch.library.opcheck(linear_logprobs_bwd, (h, w, b, y, act, lse, ent, torch.randn(N),
                                                    torch.randn(N), backend, 0.7, 3.0, True, True,
                                                    True, None, compact))
        torch.library.opcheck(linear_logprobs_bwd, (h, w, None, y, act, lse, None, torch.randn(N),
                                                    None, backend, 1.0, None, True, False, False,
                                                    None, compact))


def _front_inputs(B, T=5, H=8, V=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_()
    weight = (0.5 * torch.randn(V, H, generator=g)).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, :2] = -100                      # prompt tokens
    anchor = -3 * torch.rand(B, T, generator=g)
    rewards = torch.rand(B, generator=g)
    return hidden, weight, targets, anchor, rewards


# Every loss front-end, on the composed path (linear_logprobs + the torch epilogue of
# gift_fast.functional), with temperature and softcap; batch sizes are even (pairs, groups of 2).
FRONTS = {
    "gift": lambda h, w, t, a, r, **kw: gf.gift_loss(
        h, w, t, a, r, group_size=2, temperature=0.8, backend="torch", **kw),
    "gift_uniform_drop": lambda h, w, t, a, r, **kw: gf.gift_loss(
        h, w, t, a, r, group_size=2, drop_uniform_groups=True, softcap=3.0, backend="torch", **kw),
    "grpo": lambda h, w, t, a, r, **kw: gf.grpo_loss(
        h, w, t, a, r - r.mean(), kl_ref_logps=a, beta=0.1, backend="torch", **kw),
    "dpo": lambda h, w, t, a, r, **kw: gf.dpo_loss(h, w, t, a, softcap=2.0, backend="torch", **kw),
    "ipo": lambda h, w, t, a, r, **kw: gf.ipo_loss(h, w, t, a, backend="torch", **kw),
    "simpo": lambda h, w, t, a, r, **kw: gf.simpo_loss(
        h, w, t, sft_weight=0.5, backend="torch", **kw),
    "rpo": lambda h, w, t, a, r, **kw: gf.rpo_loss(h, w, t, a, r, backend="torch", **kw),
    "una": lambda h, w, t, a, r, **kw: gf.una_loss(h, w, t, a, backend="torch", **kw),
    "fdiv_sft": lambda h, w, t, a, r, **kw: gf.fdiv_sft_loss(
        h, w, t, a, divergence="js", backend="torch", **kw),
    "dft": lambda h, w, t, a, r, **kw: gf.dft_loss(h, w, t, temperature=1.2, backend="torch",
                                                   **kw),
    "ift": lambda h, w, t, a, r, **kw: gf.ift_loss(h, w, t, backend="torch", **kw),
}


def _packed(B, T=5, H=8, V=24, seed=0):
    """The padded inputs of ``_front_inputs`` packed, sequence i keeping its first T - i % 3
    tokens (lengths differ), with their ``cu_seqlens``."""
    h, w, t, a, r = _front_inputs(B, T, H, V, seed)
    lengths = torch.tensor([T - i % 3 for i in range(B)])
    keep = torch.arange(T)[None, :] < lengths[:, None]
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    hp = h.detach()[keep].requires_grad_()
    return hp, w, t[keep], a[keep], r, {"cu_seqlens": cu}


# ift_loss takes the padded layout only.
@pytest.mark.parametrize("name,layout", [(n, lay) for n in sorted(FRONTS)
                                         for lay in ("padded", "packed")
                                         if not (n == "ift" and lay == "packed")])
def test_loss_front_end_fullgraph_dynamic(name, layout, monkeypatch):
    """Compiled loss, metrics and gradients equal eager bit for bit: the eager reference is run
    with the row compaction off (what the compiled backward does), so both run the same kernels
    on the same rows, and aot_eager runs the epilogue's aten ops unchanged."""
    fn = FRONTS[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    counters = torch._dynamo.utils.counters
    counters.clear()
    # Sizes whose pairs / groups number at least 2: torch specializes a dimension of size 0 or 1
    # at the first compile (a compile at B = 2 would recompile at B = 4: one pair, one group).
    for i, B in enumerate((4, 6, 8)):
        if layout == "packed":
            h, w, t, a, r, kw = _packed(B, seed=B)
        else:
            (h, w, t, a, r), kw = _front_inputs(B, seed=B), {}
        with monkeypatch.context() as m:
            m.setattr("gift_fast.logprobs._must_not_sync", lambda hidden: True)
            want_loss, want_metrics = fn(h, w, t, a, r, **kw)
            want = torch.autograd.grad(want_loss, (h, w))
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            if i == 0:
                compiled(h, w, t, a, r, **kw)
            with count_host_syncs() as syncs:
                loss, metrics = compiled(h, w, t, a, r, **kw)
                got = torch.autograd.grad(loss, (h, w))
        assert sum(syncs.values()) == 0, dict(syncs)
        assert torch.equal(loss, want_loss)
        assert metrics.keys() == want_metrics.keys()
        for k in metrics:
            assert torch.equal(metrics[k], want_metrics[k]), k
        for g, ref in zip(got, want):
            assert torch.equal(g, ref)
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_value_checks_of_the_epilogues():
    """Non-finite per-sequence advantages and bad cu_seqlens offsets: ValueError in eager, an
    in-graph assert (RuntimeError) in the compiled graph, which passes valid input."""
    h, w, t, a, r, kw = _packed(4, seed=4)
    fn = FRONTS["grpo"]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    compiled(h, w, t, a, r, **kw)
    bad_r = r.clone()
    bad_r[1] = float("nan")
    with pytest.raises(ValueError, match="advantages: expected finite values"):
        fn(h, w, t, a, bad_r, **kw)
    with pytest.raises(RuntimeError, match="advantages: expected finite values"):
        compiled(h, w, t, a, bad_r, **kw)
    bad_cu = kw["cu_seqlens"].clone()
    bad_cu[-1] += 1
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets"):
        fn(h, w, t, a, r, cu_seqlens=bad_cu)
    with pytest.raises(RuntimeError, match="cu_seqlens: expected non-decreasing offsets"):
        compiled(h, w, t, a, r, cu_seqlens=bad_cu)
