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
    "una_scores": lambda h, w, t, a, r, **kw: gf.una_loss(
        h, w, t, a, kind="score_mse", scores=r, backend="torch", **kw),
    "kl": lambda h, w, t, a, r, **kw: gf.kl_loss(h, w, t, a, beta=0.5, backend="torch", **kw),
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
            m.setattr("gift_fast.logprobs.must_not_sync", lambda hidden: True)
            want_loss, want_metrics = fn(h, w, t, a, r, **kw)
            want = torch.autograd.grad(want_loss, (h, w))
        _compiled_loss_equals(compiled, (h, w, t, a, r), kw, (h, w), i == 0,
                              want_loss, want_metrics, want)
    assert counters["stats"]["unique_graphs"] == 1


def _aot_eager_without_data_dependent_shapes(found: list):
    """The aot_eager backend, recording every node of the dynamo graph whose value has a
    data-dependent (unbacked) size: such a size is read from the device, a host sync the Python
    spy of count_host_syncs cannot see (it happens inside the op, e.g. torch.unique)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if value is not None and free_unbacked_symbols(value):
                found.append(node.format_node())
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return backend


def _compile_fullgraph_dynamic(fn):
    """(compiled fn, list of data-dependent-size nodes it fills, dynamo counters), after a reset
    of dynamo and of its counters."""
    torch._dynamo.reset()
    data_dependent = []
    compiled = torch.compile(fn, fullgraph=True, dynamic=True,
                             backend=_aot_eager_without_data_dependent_shapes(data_dependent))
    counters = torch._dynamo.utils.counters
    counters.clear()
    return compiled, data_dependent, counters


def _compiled_loss_equals(compiled, args, kw, leaves, first, want_loss, want_metrics, want):
    """Runs ``compiled(*args, **kw)`` -> (loss, metrics) and its gradients w.r.t. ``leaves``
    (compiling at the first batch size, outside the sync count; after it any recompilation
    raises): no host sync, and loss, metrics and gradients equal ``want_*`` bit for bit.
    Returns (loss, gradients)."""
    with torch._dynamo.config.patch(error_on_recompile=not first):
        if first:
            compiled(*args, **kw)
        with count_host_syncs() as syncs:
            loss, metrics = compiled(*args, **kw)
            got = torch.autograd.grad(loss, leaves)
    assert sum(syncs.values()) == 0, dict(syncs)
    assert torch.equal(loss, want_loss)
    assert metrics.keys() == want_metrics.keys()
    for k in metrics:
        assert torch.equal(metrics[k], want_metrics[k]), (k, metrics[k], want_metrics[k])
    for g, ref in zip(got, want):
        assert torch.equal(g, ref)
    return loss, got


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


# --------------------------------------------------------------------------------------------
# The fused triton GIFT op (gift_fast::fused_gift_fwd) through the interpreter on CPU.
# --------------------------------------------------------------------------------------------

FUSED_GIFT_CASES = {  # name: (gift_loss options, bias, packed)
    "plain": (dict(), False, False),
    "drop_T_softcap_bias": (dict(drop_uniform_groups=True, temperature=0.8, softcap=3.0,
                                 length_norm=0.5), True, False),
    "sum_biased_packed": (dict(reduction="sum", std="biased", beta=0.7), False, True),
}


def _fused_gift_fn(opts, backend="triton"):
    # Groups of 3: a group of 2 has loss 0 whenever s and R are in the same order.
    def fn(h, w, b, t, a, r, **kw):
        return gf.gift_loss(h, w, t, a, r, group_size=3, bias=b, backend=backend, **opts, **kw)
    return fn


def _fused_gift_inputs(B, bias, packed, seed):
    # V = 30: no size of the first compile (B = 6, T = 5, H = 8, N = 24 packed) equals another,
    # which duck sizing would turn into a guard (and a recompile at the next batch size).
    if packed:
        h, w, t, a, r, kw = _packed(B, V=30, seed=seed)
    else:
        (h, w, t, a, r), kw = _front_inputs(B, V=30, seed=seed), {}
    r[:3] = 0.5                             # a group of equal rewards (dropped when asked)
    g = torch.Generator().manual_seed(seed + 100)
    b = (0.5 * torch.randn(w.shape[0], generator=g)).requires_grad_() if bias else None
    return h, w, b, t, a, r, kw


@pytest.mark.parametrize("case", sorted(FUSED_GIFT_CASES))
def test_fused_gift_fullgraph_dynamic(case, monkeypatch):
    """gift_loss on the triton backend (the fused two-phase op) compiles to one graph for three
    batch sizes with no host sync. Loss, metrics and gradients equal bit for bit the eager op run
    without row compaction (the same kernels on the same rows), and the default (compacting)
    eager op within the sum of both paths' rounding bounds from the float64 reference
    (front_end_rounding_bounds: the compaction changes only the order of the backward's sums)."""
    from helpers import assert_within, front_end_rounding_bounds
    opts, bias, packed = FUSED_GIFT_CASES[case]
    fn = _fused_gift_fn(opts)

    def composed(*args, **kwargs):
        raise AssertionError("gift_loss took the composed path, not the fused op")
    compiled, data_dependent, counters = _compile_fullgraph_dynamic(fn)
    for i, B in enumerate((6, 9, 12)):
        h, w, b, t, a, r, kw = _fused_gift_inputs(B, bias, packed, seed=B)
        leaves = [x for x in (h, w, b) if x is not None]
        with monkeypatch.context() as fused_only:
            fused_only.setattr("gift_fast.functional.gift_loss", composed)
            eager_loss, eager_metrics = fn(h, w, b, t, a, r, **kw)
            eager = torch.autograd.grad(eager_loss, leaves)
            with monkeypatch.context() as m:
                m.setattr("gift_fast.logprobs.must_not_sync", lambda hidden: True)
                want_loss, want_metrics = fn(h, w, b, t, a, r, **kw)
                want = torch.autograd.grad(want_loss, leaves)
            loss, got = _compiled_loss_equals(compiled, (h, w, b, t, a, r), kw, leaves, i == 0,
                                              want_loss, want_metrics, want)
        # Against the compacting eager op: both float32 paths are within their bounds of exact.
        bounds = front_end_rounding_bounds(
            lambda hh, ww, bb, backend: _fused_gift_fn(opts, backend)(
                hh, ww, bb, t, a.double(), r.double(), **kw),
            "triton", torch.float32, h, w, b, t)
        assert_within("loss", loss, eager_loss, 2 * bounds.loss)
        for name, g, ref in zip(("d_hidden", "d_weight", "d_bias"), got, eager):
            assert_within(name, g, ref, 2 * getattr(bounds.grads, name))
    assert counters["stats"]["unique_graphs"] == 1
    assert not data_dependent, data_dependent


def test_fused_gift_opcheck():
    from gift_fast.backends.triton_gift import fused_gift_fwd
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 4, 5, 8, 20
    hidden = torch.randn(B * T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    bias = torch.randn(V, generator=g)
    t = torch.randint(0, V, (B * T,), generator=g)
    t[::3] = -100
    act = t != -100
    y = local_targets(t, act)
    anchor = -3 * torch.rand(B * T, generator=g)
    rewards = torch.rand(B, generator=g)
    cu = torch.arange(B + 1) * T
    group_ptr = torch.arange(0, B + 1, 2)
    for b, drop, mean in ((None, False, True), (bias, True, False)):
        torch.library.opcheck(fused_gift_fwd, (
            hidden.clone().requires_grad_(), weight.clone().requires_grad_(), b, y, act, anchor,
            rewards, cu, group_ptr, 0.8, 3.0 if b is not None else None, 1.0, 1e-6, 0.5, True,
            drop, 2, mean))


@pytest.mark.parametrize("std,drop", [("unbiased", False), ("biased", True)])
def test_gift_group_ids_fullgraph_dynamic(std, drop, monkeypatch):
    """gift_loss with ``group_ids`` (any labels, groups not consecutive, sizes 1 to 3): the
    compiled graph builds the labels on the device with as many group slots as sequences (the
    number of distinct ids is data), one graph for three batch sizes, no host sync; loss,
    metrics and gradients equal eager, which counts the groups with torch.unique. No size in the
    graph is data-dependent (torch.unique's would be: dynamo captures it under fullgraph with an
    unbacked size, read from the device)."""
    def fn(h, w, t, a, r, ids):
        return gf.gift_loss(h, w, t, a, r, group_ids=ids, std=std, drop_uniform_groups=drop,
                            backend="torch")
    compiled, data_dependent, counters = _compile_fullgraph_dynamic(fn)
    for i, B in enumerate((4, 6, 8)):
        h, w, t, a, r = _front_inputs(B, seed=B)
        # Groups of one (40 at B = 4, 77), groups spread over the batch (25, 40 at B >= 6).
        ids = torch.tensor([40, 10, 10, 25, 40, 40, 77, 25][:B])
        r[2] = r[1]                              # the group labelled 10 has uniform rewards
        with monkeypatch.context() as m:
            m.setattr("gift_fast.logprobs.must_not_sync", lambda hidden: True)
            want_loss, want_metrics = fn(h, w, t, a, r, ids)
            want = torch.autograd.grad(want_loss, (h, w))
        _compiled_loss_equals(compiled, (h, w, t, a, r, ids), {}, (h, w), i == 0, want_loss,
                              want_metrics, want)
    assert counters["stats"]["unique_graphs"] == 1
    assert not data_dependent, data_dependent


def test_sorted_labels_match_unique():
    from gift_fast.sequences import _sorted_labels
    g = torch.Generator().manual_seed(5)
    for n in (1, 2, 7, 30):
        ids = torch.randint(-3, 4, (n,), generator=g)
        _, inverse = torch.unique(ids, return_inverse=True)
        assert torch.equal(_sorted_labels(ids), inverse)


# --------------------------------------------------------------------------------------------
# Vocabulary-parallel linear_logprobs compiled, 2 gloo ranks on CPU.
# --------------------------------------------------------------------------------------------

VP_SIZES = (17, 20)            # uneven shards of V = 37


def _vp_rank(rank, world, init_method, out_dir, backend):
    import json
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist
    from helpers import finish_rank, init_gloo
    init_gloo(rank, world, 120, init_method=init_method)
    group = dist.group.WORLD
    lo = sum(VP_SIZES[:rank])
    hi = lo + VP_SIZES[rank]

    def step(hidden, weight, targets, c, d):
        logp, ent = gf.linear_logprobs(hidden, weight, targets, temperature=0.9, softcap=4.0,
                                       return_entropy=True, backend=backend,
                                       vocab_parallel_group=group)
        return logp, ent, (c * logp).sum() + (d * ent).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    counters = torch._dynamo.utils.counters
    counters.clear()
    report = {"syncs": [], "equal": [], "recompiled": False}
    for i, B in enumerate((2, 3, 5)):
        hidden, weight, _, targets, c, d = _inputs(B, V=sum(VP_SIZES), seed=B)
        shard = weight.detach()[lo:hi].clone().requires_grad_()
        args = (hidden, shard, targets, c, d)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            if i == 0:        # the first call is compiled: the layout is checked at trace time
                compiled(*args)
            with count_host_syncs() as syncs:
                logp, ent, loss = compiled(*args)
                got = torch.autograd.grad(loss, (hidden, shard))
        import gift_fast.logprobs as op_layer
        saved = op_layer.must_not_sync
        op_layer.must_not_sync = lambda h: True          # eager without row compaction
        try:
            want_logp, want_ent, want_loss = step(*args)
            want = torch.autograd.grad(want_loss, (hidden, shard))
        finally:
            op_layer.must_not_sync = saved
        report["syncs"].append(dict(syncs))
        report["equal"].append([bool(torch.equal(logp, want_logp)),
                                bool(torch.equal(ent, want_ent))]
                               + [bool(torch.equal(g, w)) for g, w in zip(got, want)])
    report["graphs"] = counters["stats"]["unique_graphs"]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    finish_rank()


@pytest.mark.parametrize("backend", ["torch"])
def test_vocab_parallel_fullgraph_dynamic(backend, tmp_path):
    """linear_logprobs with vocab_parallel_group (2 gloo ranks, shards of 17 and 20 rows) under
    fullgraph/dynamic compile: the shard layout comes from weight.shape, checked once (here at
    trace time, the first call being compiled); one graph for three batch sizes, no host sync,
    values and gradients equal the eager sharded op bit for bit (run without row compaction)."""
    import json
    from helpers import rendezvous, spawn_and_wait
    spawn_and_wait(_vp_rank, (2, rendezvous(tmp_path), str(tmp_path), backend), nprocs=2,
                   timeout_s=300, what="compiled vocab-parallel ranks")
    for rank in range(2):
        report = json.load(open(tmp_path / f"rank{rank}.json"))
        assert all(sum(s.values()) == 0 for s in report["syncs"]), report["syncs"]
        assert all(all(e) for e in report["equal"]), report["equal"]
        assert report["graphs"] == 1


# --------------------------------------------------------------------------------------------
# CUDA: no sync in a training step, and a CUDA-graph capture of one (gpu marker: skipped here).
# --------------------------------------------------------------------------------------------

GPU_B, GPU_T, GPU_H, GPU_V, GPU_LR = 8, 6, 32, 100, 0.1
GPU_G = 4     # groups of 4: a group of 2 has loss 0 whenever s and R are in the same order


def _gpu_batch(seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(GPU_B, GPU_T, GPU_H, generator=g)
    targets = torch.randint(0, GPU_V, (GPU_B, GPU_T), generator=g)
    targets[:, :2] = -100                              # prompt tokens: rows with no gradient
    anchor = -3 * torch.rand(GPU_B, GPU_T, generator=g)
    rewards = torch.rand(GPU_B, generator=g)
    return [t.cuda() for t in (hidden, targets, anchor, rewards)]


def _gpu_head(seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = 0.3 * torch.randn(GPU_V, GPU_H, generator=g)
    head = torch.nn.Linear(GPU_H, GPU_V, bias=False, device="cuda")
    with torch.no_grad():
        head.weight.copy_(weight)
    return head, torch.optim.SGD(head.parameters(), lr=GPU_LR)


def _gift_forward(head, hidden, targets, anchor, rewards):
    return gf.gift_loss(hidden, head.weight, targets, anchor, rewards, group_size=GPU_G,
                        backend="triton")[0]


def _check_gift_step(loss, grad, weight_before, weight_after, batch):
    """One SGD step of the fused GIFT loss against an eager step on a copy of the head: loss
    and gradient within the sum of both float32 paths' rounding bounds from the float64
    reference (front_end_rounding_bounds, on CPU copies); the update is w - lr * grad, two
    roundings of at most U32 relative each."""
    from helpers import assert_within, front_end_rounding_bounds
    hidden, targets, anchor, rewards = batch
    ref_head, _ = _gpu_head()
    with torch.no_grad():
        ref_head.weight.copy_(weight_before)
    ref_loss = _gift_forward(ref_head, hidden, targets, anchor, rewards)
    ref_grad, = torch.autograd.grad(ref_loss, ref_head.weight)
    cpu = [t.detach().cpu() for t in (hidden, weight_before, targets, anchor, rewards)]
    h, w, t, a, r = cpu
    bounds = front_end_rounding_bounds(
        lambda hh, ww, bb, backend: gf.gift_loss(hh, ww, t, a.double(), r.double(),
                                                 group_size=GPU_G, backend=backend),
        "triton", torch.float32, h, w, None, t)
    assert_within("loss", loss.cpu(), ref_loss.detach().cpu(), 2 * bounds.loss)
    assert_within("d_weight", grad.cpu(), ref_grad.cpu(), 2 * bounds.grads.d_weight)
    want = weight_before - GPU_LR * grad
    limit = 2 * U32 * (weight_before.abs() + GPU_LR * grad.abs())
    assert ((weight_after - want).abs() <= limit).all()


@pytest.mark.gpu
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_cuda_compiled_training_step_has_no_sync(compiler):
    """A compiled fused-GIFT forward, its backward and an SGD step on a tiny linear head under
    torch.cuda.set_sync_debug_mode("error"): any host sync raises."""
    torch._dynamo.reset()
    head, opt = _gpu_head()
    forward = torch.compile(_gift_forward, fullgraph=True, dynamic=True, backend=compiler)
    warm = _gpu_batch(0)
    forward(head, *warm).backward()                 # compiles outside the sync check
    opt.zero_grad(set_to_none=True)
    batch = _gpu_batch(1)
    before = head.weight.detach().clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = forward(head, *batch)
        loss.backward()
        grad = head.weight.grad.detach().clone()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    _check_gift_step(loss.detach(), grad, before, head.weight.detach(), batch)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_of_a_training_step():
    """The eager fused-GIFT step (forward, backward, SGD step) captured in a CUDA graph with
    static inputs: inside the capture the value checks and the row compaction are skipped (no
    host read), and each replay on new data copied into the static inputs equals an eager step."""
    head, opt = _gpu_head()
    static = _gpu_batch(0)

    def step():
        loss = _gift_forward(head, *static)
        loss.backward()
        opt.step()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                  # warm-up: Triton compiles, allocator settles
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = step()
    for seed in (1, 2):
        batch = _gpu_batch(seed)
        for dst, src in zip(static, batch):
            dst.copy_(src)
        before = head.weight.detach().clone()
        graph.replay()
        torch.cuda.synchronize()
        # The captured backward writes .grad in place (the capture saw no earlier gradient).
        _check_gift_step(static_loss, head.weight.grad.detach().clone(), before,
                         head.weight.detach(), batch)
