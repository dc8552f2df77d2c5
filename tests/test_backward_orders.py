"""The two loop orders of the triton backward (rows outer, vocabulary outer) against float64.

Runs through TRITON_INTERPRET=1 on CPU (interpreter tiles 16 x 32 x 16). Budgets are tiny so that
each order takes several chunks / vocabulary blocks, including a ragged last one; shapes are not
multiples of any tile. The oracle is the float64 reference backend on the same rounded inputs.
"""
import pytest
import torch

import gift_fast.backends.triton_op as to
import gift_fast.logprobs as op
from gift_fast import linear_logprobs
from gift_fast.backends import plan as planner
from gift_fast.backends.blas import mm_into
from gift_fast.backends.triton_op import dlogits_vocab_slice, plan_backward
from gift_fast.kernels import dlogits, dot_precision
from helpers import assert_within, backend_rounding_bounds, gamma, linear_softmax_rounding_bounds

from helpers import dispatch_into_custom_ops

# (N, H, V, bias, temperature, softcap, ignored fraction, entropy gradient)
CASES = {
    "ragged": (21, 24, 67, False, 1.0, None, 0.0, False),
    "bias_softcap_entropy": (29, 24, 75, True, 0.7, 3.0, 0.3, True),
    "n1": (1, 19, 53, True, 1.0, None, 0.0, True),
}


def _budget_for(order, step, N, n_live, V, H, elt, need_db=True):
    """The memory budget whose widest step of ``order`` is ``step`` (the planner's own cost)."""
    return planner.recompute_extra_bytes(order, step, N, n_live, V, H, elt, True, True, need_db)


# Results are checked elementwise against rounding bounds derived from the magnitudes of the
# inputs (tests/helpers.py), not against a per-dtype tolerance.


def _inputs(N, H, V, dtype, bias, ignored, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.25).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignored] = -100
    return hidden, weight, b, targets, torch.randn(N, generator=g), torch.randn(N, generator=g)


def _grads(backend, hidden, weight, b, targets, g_logp, g_ent, entropy, **kw):
    leaves = [t.clone().requires_grad_()
              for t in (hidden, weight) + ((b,) if b is not None else ())]
    logp, ent = linear_logprobs(leaves[0], leaves[1], targets, leaves[2] if b is not None else None,
                                return_entropy=True, backend=backend,
                                reference_dtype=torch.float64, **kw)
    loss = (logp * g_logp.to(logp.dtype)).sum()
    if entropy:
        loss = loss + (ent * g_ent.to(ent.dtype)).sum()
    return torch.autograd.grad(loss, leaves)




@pytest.mark.parametrize("case, dtype", [(c, torch.float32) for c in CASES]
                         + [(c, half) for c in ("bias_softcap_entropy", "ragged")
                            for half in (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("order", ["rows", "vocab"])
def test_order_matches_float64(order, dtype, case, monkeypatch):
    N, H, V, bias, temperature, softcap, ignored, entropy = CASES[case]
    inputs = _inputs(N, H, V, dtype, bias, ignored, seed=len(case))
    elt = torch.empty((), dtype=dtype).element_size()
    # About a third of the rows (or columns) per step: several steps, the last one ragged.
    n_live = int((inputs[3] != -100).sum())          # ignored rows get no g and no e
    step = max(n_live // 3, 1) if order == "rows" else max(V // 3, 1)
    monkeypatch.setattr(to, "BACKWARD_ORDER", order)
    monkeypatch.setattr(planner, "_process_budget",
                        _budget_for(order, step, N, n_live, V, H, elt, bias))
    plan = plan_backward(N, n_live, V, H, elt, need_db=bias)
    assert plan.order == order
    assert (-(-n_live // plan.step) if order == "rows" else -(-V // plan.step)) >= 2 or N == 1
    kw = dict(temperature=temperature, softcap=softcap)
    ref = _grads("reference", *inputs, entropy, **kw)
    out = _grads("triton", *inputs, entropy, **kw)
    hidden, weight, b, targets, g_logp, g_ent = inputs
    bound = backend_rounding_bounds("triton", dtype, hidden, weight, b, targets, g_logp,
                                    g_ent if entropy else None, **kw)
    for name, a, r, leaf in zip(("d_hidden", "d_weight", "d_bias"), out, ref, inputs):
        assert a.dtype == leaf.dtype, f"{name} came back in {a.dtype}"
        assert_within(name, a, r, getattr(bound, name))


@pytest.mark.parametrize("order", ["rows", "vocab"])
def test_order_partial_rows_and_grad_subsets(order, monkeypatch):
    """Only some rows live (prompt tokens); hidden-only and weight-only gradients."""
    N, H, V = 23, 18, 57
    hidden, weight, b, targets, g_logp, _ = _inputs(N, H, V, torch.float32, True, 0.0, seed=4)
    g_logp[::3] = 0.0                                     # dead rows: never reach a GEMM
    monkeypatch.setattr(to, "BACKWARD_ORDER", order)
    n_live = N - len(range(0, N, 3))
    monkeypatch.setattr(planner, "_process_budget", _budget_for(order, 7, N, n_live, V, H, 4))
    for need in [(True, False, False), (False, True, True), (True, True, True)]:
        leaves = [t.clone().requires_grad_(r) for t, r in zip((hidden, weight, b), need)]
        outs = {}
        for backend in ("reference", "triton"):
            logp = linear_logprobs(*leaves[:2], targets, leaves[2], backend=backend,
                                   reference_dtype=torch.float64)
            wanted = [t for t in leaves if t.requires_grad]
            outs[backend] = torch.autograd.grad((logp * g_logp).sum(), wanted)
        bound = backend_rounding_bounds("triton", torch.float32, hidden, weight, b, targets,
                                        g_logp)
        names = [n for n, r in zip(("d_hidden", "d_weight", "d_bias"), need) if r]
        for name, a, r in zip(names, outs["triton"], outs["reference"]):
            assert_within(f"{name} of {need}", a, r, getattr(bound, name))
        if need[0]:
            dead = outs["triton"][0][::3]
            assert torch.all(dead == 0)


@pytest.mark.parametrize("order", ["rows", "vocab"])
def test_order_is_deterministic(order, monkeypatch):
    hidden, weight, b, targets, g_logp, _ = _inputs(19, 20, 45, torch.float32, True, 0.2, seed=6)
    monkeypatch.setattr(to, "BACKWARD_ORDER", order)
    n_live = int((targets != -100).sum())
    monkeypatch.setattr(planner, "_process_budget",
                        _budget_for(order, 5, 19, n_live, 45, 20, 4))
    first = _grads("triton", hidden, weight, b, targets, g_logp, g_logp, False)
    second = _grads("triton", hidden, weight, b, targets, g_logp, g_logp, False)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_dlogits_vocab_slices_tile_the_full_dlogits():
    """D over the whole vocabulary equals the concatenation of D over slices (targets inside and
    outside each slice, ignored rows, bias, softcap, entropy gradient)."""
    N, H, V = 13, 24, 90
    hidden, weight, b, targets, g, e = _inputs(N, H, V, torch.float32, True, 0.0, seed=8)
    y = targets.clone()
    y[2] = -1
    g[2] = e[2] = 0.0
    lse = torch.logsumexp((3.0 * torch.tanh((hidden @ weight.T + b) / 3.0)) / 0.9, 1)
    ent = torch.rand(N)
    prec = dot_precision(hidden.dtype)
    full = torch.empty(N, V)
    dlogits(hidden, weight, b, y, g, e, lse, ent, 0.9, 3.0, full, prec)
    bounds = [0, 17, 32, 61, 90]
    parts = [dlogits_vocab_slice(hidden, weight, b, y, g, e, lse, ent, v0, v1, 0.9, 3.0,
                                 torch.empty(N, v1 - v0), prec)
             for v0, v1 in zip(bounds[:-1], bounds[1:])]
    # Each D element is within the logit-gradient rounding bound of the exact one (given lse
    # and entropy are exact inputs here), whichever tile it was computed in: twice that apart.
    bound = linear_softmax_rounding_bounds(hidden, weight, b, y, g, e, 0.9, 3.0,
                                           given_lse=lse, given_entropy=ent).dlogits
    assert_within("D", torch.cat(parts, 1), full, 2 * bound)
    assert full.abs().sum() > 0


def test_plan_picks_the_order_with_fewer_launches_within_the_budget():
    # 16-bit, N=8192, H=4096, V=151936 (the goal shape): the vocab order's float32 dX
    # sum (4 N H bytes) fits 4 N H + 128 MiB where the rows order's float32 dW (4 V H) does not.
    n, h, v = 8192, 4096, 151936
    budget = 4 * n * h + (128 << 20)
    plan = plan_backward(n, n, v, h, 2, budget=budget)
    assert plan.kind == "recompute" and plan.order == "vocab" and plan.gemm_eq == 4
    assert plan.step >= 2048 and plan.step % planner.ALIGN == 0
    assert plan.extra_bytes <= budget
    # One step wider would not fit: the widest blocks the budget allows.
    assert planner.recompute_extra_bytes("vocab", plan.step + planner.ALIGN, n, n, v, h, 2) > budget
    # Many more live rows than vocabulary columns, both orders in one launch: the rows order's
    # scratch (D, a small float32 dW) is less than the vocab order's float32 dX sum.
    assert plan_backward(200_000, 200_000, 1000, 512, 2, budget=1 << 30).order == "rows"
    with pytest.raises(ValueError, match="order"):
        plan_backward(10, 10, 10, 10, 4, order="columns")


def test_too_small_a_budget_names_the_minimum():
    n, h, v = 8192, 4096, 151936
    with pytest.raises(planner.BudgetTooSmall, match="minimum is") as err:
        plan_backward(n, n, v, h, 2, budget=64 << 20)
    least = err.value.minimum
    assert least > 64 << 20
    assert plan_backward(n, n, v, h, 2, budget=least).extra_bytes <= least
    with pytest.raises(planner.BudgetTooSmall):
        plan_backward(n, n, v, h, 2, budget=least - 1)


@pytest.mark.parametrize("n, n_live, v, h, e, budget", [
    (8192, 8192, 151936, 4096, 2, 300 << 20), (8192, 5000, 151936, 4096, 2, 1 << 30),
    (37, 37, 101, 16, 4, 6000), (37, 20, 101, 16, 4, 6000), (5, 5, 7, 3, 4, 1000)])
def test_steps_respect_the_budget(n, n_live, v, h, e, budget):
    for order in ("rows", "vocab"):
        try:
            plan = plan_backward(n, n_live, v, h, e, order=order, budget=budget)
        except planner.BudgetTooSmall:
            continue
        assert 1 <= plan.step <= (v if order == "vocab" else n_live)
        assert plan.extra_bytes == planner.recompute_extra_bytes(order, plan.step, n, n_live,
                                                                 v, h, e)
        assert plan.extra_bytes <= budget


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_mm_into_sums_16_bit_products_in_float32(half):
    """The plain GEMMs of the backward: 16-bit operands, a float32 sum across calls (the
    vocab order's dX) and a 16-bit output rounded once (dW), against float64."""
    g = torch.Generator().manual_seed(11)
    M, K, N = 19, 21, 35
    parts = [(torch.randn(M, K, generator=g).to(half), torch.randn(K, N, generator=g).to(half))
             for _ in range(3)]
    out = torch.empty(M, N)
    for i, (a, b) in enumerate(parts):
        mm_into(out, a, b, accumulate=i > 0)
    exact = sum(a.double() @ b.double() for a, b in parts)
    size = sum(a.double().abs() @ b.double().abs() for a, b in parts)
    # Products of 16-bit values are exact in float32; a sum of 3K terms in float32 errs by at
    # most gamma(3K) times the sum of their magnitudes, in any order.
    assert_within("float32 sum", out, exact, gamma(3 * K) * size)
    one = torch.empty(M, N, dtype=half)
    a, b = parts[0]
    mm_into(one, a, b)
    ref = a.double() @ b.double()
    # The float32 sum of K terms errs by err32 = gamma(K) sum|terms|; rounding it to 16 bits
    # (to nearest) adds u16 = eps/2 of its magnitude, at most |ref| + err32.
    err32 = gamma(K) * (a.double().abs() @ b.double().abs())
    u16 = torch.finfo(half).eps / 2
    bound = err32 + u16 * (ref.abs() + err32)
    assert_within("16-bit output", one, ref, bound)
    with pytest.raises(TypeError, match="out"):
        mm_into(torch.empty(M, N, dtype=torch.float64), a, b)


class _Float32Spy(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element counts of the float32 tensors any aten op produces (inside the
    library's custom ops too)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = dispatch_into_custom_ops(self, func, args, kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.sizes.append(t.numel())
        return out


@pytest.mark.parametrize("order", ["rows", "vocab"])
def test_float16_scratch_of_each_order(order, monkeypatch):
    """float16, every row live: the vocab order allocates a float32 [N, H] dX sum and no
    float32 [V, H] dW; the rows order allocates its float32 [V, H] dW and no [N, H] float32."""
    N, H, V = 24, 16, 80
    hidden, weight, _, targets, g_logp, _ = _inputs(N, H, V, torch.float16, False, 0.0, seed=13)
    monkeypatch.setattr(to, "BACKWARD_ORDER", order)
    monkeypatch.setattr(planner, "_process_budget",
                        _budget_for(order, 4 if order == "rows" else 8, N, N, V, H, 2, False))
    # The recompute plan's orders: this budget would also hold the keep plan's 2-byte logits.
    monkeypatch.setattr(op, "KEEP_ENABLED", False)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = linear_logprobs(h, w, targets, backend="triton")
    with _Float32Spy() as spy:
        torch.autograd.grad((logp * g_logp).sum(), (h, w))
    big = [n for n in spy.sizes if n >= N * H]
    # Steps of 4 rows / 8 columns keep the float32 copies of the operands of mm_into on CPU
    # (its stand-in for cuBLAS out_dtype) below N * H elements. (The interpreter may add
    # copies of the kernels' float32 arguments.)
    assert big and set(big) == ({N * H} if order == "vocab" else {V * H}), big
