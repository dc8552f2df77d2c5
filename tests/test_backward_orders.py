"""The two loop orders of the triton backward (rows outer, vocabulary outer) against float64.

Runs through TRITON_INTERPRET=1 on CPU (interpreter tiles 16 x 32 x 16). Budgets are tiny so that
each order takes several chunks / vocabulary blocks, including a ragged last one; shapes are not
multiples of any tile. The oracle is the float64 reference backend on the same rounded inputs.
"""
import pytest
import torch

import gift_fast.backends.triton_op as to
from gift_fast import linear_logprobs
from gift_fast.backends.triton_op import (BackwardPlan, backward_block_cols, backward_chunk_rows,
                                          dlogits_vocab_slice, plan_backward)
from gift_fast.kernels import dlogits, dot_precision
from helpers import assert_within, backend_rounding_bounds, linear_softmax_rounding_bounds

from helpers import dispatch_into_custom_ops

# (N, H, V, bias, temperature, softcap, ignored fraction, entropy gradient)
CASES = {
    "ragged": (21, 24, 67, False, 1.0, None, 0.0, False),
    "bias_softcap_entropy": (29, 24, 75, True, 0.7, 3.0, 0.3, True),
    "n1": (1, 19, 53, True, 1.0, None, 0.0, True),
}
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
    budget = max(N // 3, 1) * V * elt if order == "rows" else max(V // 3, 1) * N * elt
    monkeypatch.setattr(to, "BACKWARD_ORDER", order)
    monkeypatch.setattr(to, "BACKWARD_CHUNK_BYTES", budget)
    n_live = int((inputs[3] != -100).sum()) if not entropy else N
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
    monkeypatch.setattr(to, "BACKWARD_CHUNK_BYTES", 7 * 4 * (V if order == "rows" else N))
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
    monkeypatch.setattr(to, "BACKWARD_CHUNK_BYTES", 2000)
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


def test_plan_picks_the_order_with_less_scratch():
    # Few live rows against a large vocabulary: the vocab order (no [V, H] float32 dW).
    plan = plan_backward(8192, 8192, 151936, 4096, 2, budget=64 << 20)
    assert plan == BackwardPlan("vocab", 4096, plan.extra_bytes)
    assert plan.extra_bytes < 151936 * 4096 * 4
    # Many more live rows than vocabulary columns: the rows order's dW scratch is smaller.
    assert plan_backward(200_000, 200_000, 1000, 512, 2).order == "rows"
    # No dW wanted: the rows order needs no float32 accumulator at all.
    assert plan_backward(8192, 8192, 151936, 4096, 2, need_dw=False).order == "rows"
    with pytest.raises(ValueError, match="order"):
        plan_backward(10, 10, 10, 10, 4, order="columns")


def test_steps_respect_the_budget():
    for n, v, e, budget in [(8192, 151936, 2, 64 << 20), (37, 101, 4, 1000), (5, 7, 4, 1)]:
        cols = backward_block_cols(n, e, v, budget)
        rows = backward_chunk_rows(v, e, n, budget)
        assert 1 <= cols <= v and 1 <= rows <= n
        assert cols == 1 or n * cols * e <= budget
        assert rows == 1 or rows * v * e <= budget


def _one_ulp(half, ref):
    """One unit in the last place of ``half`` at |ref| (a rounding toward zero errs by less),
    down to the subnormal spacing."""
    fi = torch.finfo(half)
    return ref.abs() * fi.eps + fi.smallest_normal * fi.eps


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_split_accumulator_is_an_exact_float32_sum(half):
    """matmul with a split accumulator (16-bit high half + int16 low half) holds exactly the
    float32 sum the plain float32 accumulator holds; the last launch rounds it to 16 bits.
    float32 operands (the split is in the epilogue, not the dot)."""
    from gift_fast.kernels import matmul
    g = torch.Generator().manual_seed(11)
    M, K, N = 19, 21, 35
    parts = [(torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)) for _ in range(4)]
    ref = torch.empty(M, N)
    hi = torch.empty(M, N, dtype=half)
    lo = torch.empty(M, N, dtype=torch.int16)
    for i, (a, b) in enumerate(parts[:-1]):
        matmul(a, b, ref, accumulate=i > 0, dot_precision="ieee")
        matmul(a, b, hi, accumulate=i > 0, dot_precision="ieee", lo=lo, keep_lo=True)
    joined = ((hi.view(torch.int16).to(torch.int32) << 16) | (lo.to(torch.int32) & 0xFFFF))
    assert torch.equal(joined.view(torch.float32), ref)
    a, b = parts[-1]
    matmul(a, b, ref, accumulate=True, dot_precision="ieee")
    matmul(a, b, hi, accumulate=True, dot_precision="ieee", lo=lo, keep_lo=False)
    # 16-bit rounding of the float32 sum (the interpreter may round bf16 toward zero, a GPU
    # rounds to nearest).
    assert torch.all((hi.float() - ref).abs() <= _one_ulp(half, ref))
    with pytest.raises(ValueError, match="lo"):
        matmul(a, b, hi, accumulate=True, dot_precision="ieee", lo=lo[:, :3], keep_lo=True)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_vocab_order_with_split_dx_accumulator(half):
    """The 16-bit path of the vocab order (dX = high half in dX + int16 low half across blocks),
    driven with float32 operands so that the dot is exact: first, middle and last blocks (the
    last rounds to 16 bits) against the float32-accumulator path. (float16 and bfloat16 run the
    whole path end to end in test_order_matches_float64[vocab-ragged-*].)"""
    N, H, V = 17, 20, 70
    hidden, weight, b, targets, g, _ = _inputs(N, H, V, torch.float32, True, 0.0, seed=12)
    lse = torch.logsumexp(hidden @ weight.T + b, 1)
    args = (weight, b, targets, g, None, lse, None, 1.0, None, "ieee", 16)   # 5 blocks
    ref = torch.empty(N, H)
    to._vocab_outer(hidden, *args, ref, None, None, None)
    hi = torch.empty(N, H, dtype=half)
    to._vocab_outer(hidden, *args, hi, torch.empty(N, H, dtype=torch.int16), None, None)
    assert torch.all((hi.float() - ref).abs() <= _one_ulp(half, ref))
    expected = torch.autograd.functional.jacobian(
        lambda h: (torch.log_softmax(h @ weight.T + b, 1).gather(1, targets[:, None])[:, 0]
                   * g).sum(), hidden)
    # Both float32: the kernels from the given float32 lse, autograd through log_softmax; each
    # within the rounding bound of the exact gradient (the lse's own rounding included).
    bound = linear_softmax_rounding_bounds(hidden, weight, b, targets, g).d_hidden
    assert_within("dX", ref, expected, 2 * bound)


def test_memory_goal_of_the_chosen_plan():
    """16-bit, N=8192, H=4096, V=151936: the backward's scratch fits 2*N*H bytes + 64 MiB."""
    n, h, v = 8192, 4096, 151936
    plan = plan_backward(n, n, v, h, 2, budget=32 << 20)
    assert plan.order == "vocab" and plan.step == 2048
    assert plan.extra_bytes <= 2 * n * h + (64 << 20)
    # Some rows dead: a compact float32 accumulator (4 bytes/element) and the live rows of X.
    partial = plan_backward(n, n - 1, v, h, 2, budget=32 << 20)
    assert partial.extra_bytes > plan.extra_bytes + (n - 1) * h * 2


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
    """float16, every row live: the vocab order allocates no float32 [V, H] dW and no float32
    [N, H] dX (split accumulator); the rows order does allocate its float32 [V, H] dW (the spy
    sees it, so the vocab assertion can fail)."""
    N, H, V = 24, 16, 80
    hidden, weight, _, targets, g_logp, _ = _inputs(N, H, V, torch.float16, False, 0.0, seed=13)
    monkeypatch.setattr(to, "BACKWARD_ORDER", order)
    monkeypatch.setattr(to, "BACKWARD_CHUNK_BYTES", 24 * 2 * (V if order == "rows" else N))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = linear_logprobs(h, w, targets, backend="triton")
    with _Float32Spy() as spy:
        torch.autograd.grad((logp * g_logp).sum(), (h, w))
    big = [n for n in spy.sizes if n >= N * H]
    if order == "vocab":
        assert big == [], big
    else:       # (the interpreter may add copies of the kernel's float32 argument)
        assert big and set(big) == {V * H}, big
