"""The memory-budget plans of the token-local one-pass op (gift_fast/backends/token_local.py) on
both backends, against float64: one stream chunk of every row, many chunks, the recompute
fallback; N = 1, V below one tile, odd shapes, ignored rows, bias / softcap / temperature,
float32 and float16; gradients w.r.t. hidden, weight and bias. The memory test: no [N, V]
tensor unless the plan stores logits, and then the budget holds. The error of a budget too
small for any plan.

Bounds: loss_rounding_bounds (tests/helpers.py) of the backend, derived from the magnitudes of
the inputs through linear_logprobs, the loss epilogue and the backward; the stream plan forms
the same float32 logits and sums over the same dimensions (any order), so the bound covers it.
"""
import pytest
import torch

import gift_fast.functional as Fn
from gift_fast import fdiv_sft_loss, grpo_loss, linear_logprobs
from gift_fast.backends import plan as planner
from gift_fast.backends.protocol import get_backend
from gift_fast.backends.token_local import logit_store
from gift_fast.backends.triton_token_local import one_pass_token_local
from helpers import U32, LargestAllocation, assert_within, gamma, loss_rounding_bounds

# (B, T, H, V, bias, temperature, softcap, ignored rows per sequence)
SHAPES = {
    "odd": (3, 7, 19, 53, True, 0.8, 5.0, 2),
    "n1_small_vocab": (1, 1, 16, 20, False, 1.0, None, 0),
    "wide_vocab": (1, 5, 8, 400, True, 1.0, None, 1),
    "tall": (2, 40, 8, 72, True, 1.0, 3.0, 3),
}
BACKENDS = ["torch", "triton"]


def _inputs(shape, dtype, seed):
    B, T, H, V, bias, temperature, softcap, ignored = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, :ignored] = -100
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2 - 3.0
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return hidden, weight, b, targets, old, adv, dict(temperature=temperature, softcap=softcap)


def _grpo(lp, mask, old, adv):
    return Fn.grpo_loss(lp, old.to(lp.dtype), adv.to(lp.dtype), mask=mask, beta=0.0)


def _stream_cost(backend, dtype, N, V, H, rows, need_db, dw_sum=""):
    """The stream plan's budget for chunks of ``rows`` rows (dW summed as ``dw_sum`` says;
    default: float32 past one chunk of 16-bit GEMMs), as the op computes it."""
    module = get_backend(backend)
    elt = torch.empty((), dtype=module.stream_dtypes(dtype)[1]).element_size()
    return (module.stream_fixed_bytes(N, V, H, dtype, True)
            + planner.stored_logits_bytes(rows, V, H, elt, -(-N // rows), True, need_db, N,
                                          logit_store(module, V, H, dtype, 'cpu'), dw_sum))


def _sixteen_bit_gemms(backend, dtype):
    return get_backend(backend).stream_dtypes(dtype)[1] != torch.float32


def _budget(kind, backend, dtype, N, V, H, need_db):
    """(budget, the plan's expected (kind, step, dw_sum) or None for the recompute plan)."""
    if kind == "one":
        return _stream_cost(backend, dtype, N, V, H, N, need_db, "once"), ("stream", N, "once")
    if kind == "chunks" and not _sixteen_bit_gemms(backend, dtype):
        # float32 GEMMs sum dW in the float32 gradient: any number of chunks.
        return (_stream_cost(backend, dtype, N, V, H, 2, need_db),
                ("stream", min(2, N), "gemm" if N > 2 else "once"))
    if kind == "chunks":
        # 16-bit GEMMs: a float32 dW sum holds for at most 2 chunks.
        rows = -(-N // planner.FLOAT32_SUM_MAX_CHUNKS)
        return (_stream_cost(backend, dtype, N, V, H, rows, need_db, "float32"),
                ("stream", rows, "float32"))
    if kind == "chunks_in_dtype":
        # Below the float32 sum's 2 chunks: dW summed in the weight dtype, at most 4 chunks.
        rows = -(-N // planner.GEMM_DTYPE_SUM_MAX_CHUNKS)
        return (_stream_cost(backend, dtype, N, V, H, rows, need_db, "gemm"),
                ("stream", rows, "gemm"))
    # Below the stream's minimum (one row of logits), above the recompute's.
    return _stream_cost(backend, dtype, N, V, H, 1, need_db) - 1, None


CASES = ([(s, be, torch.float32, k) for s in SHAPES for be in BACKENDS
          for k in ("one", "chunks")]
         + [("wide_vocab", be, torch.float32, "recompute") for be in BACKENDS]
         + [("odd", "torch", torch.float16, k) for k in ("one", "chunks")]
         # triton's 16-bit stored logits (float16 z - tile max), one chunk and both dW sums of
         # 16-bit rows: a float32 sum (2 chunks; "tall": the sum is smaller than half the rows'
         # logits) and a sum in the weight dtype (4 chunks)
         + [(s, "triton", d, k) for d in (torch.float16, torch.bfloat16)
            for s, kinds in (("odd", ("one", "chunks_in_dtype")),
                             ("wide_vocab", ("one", "chunks_in_dtype")),
                             ("tall", ("one", "chunks", "chunks_in_dtype")))
            for k in kinds]
         + [("n1_small_vocab", "triton", torch.bfloat16, "one")])


@pytest.mark.parametrize("shape, backend, dtype, kind", CASES)
def test_token_local_plans_match_float64(shape, backend, dtype, kind):
    hidden, weight, b, targets, old, adv, kw = _inputs(shape, dtype, seed=len(shape))
    B, T, H = hidden.shape
    V, N = weight.shape[0], B * T
    elt = get_backend(backend).stream_dtypes(dtype)[1]
    budget, want = _budget(kind, backend, dtype, N, V, H, b is not None)
    module = get_backend(backend)
    plan = planner.plan_token_local(
        N, V, H, torch.empty((), dtype=elt).element_size(), True, True, b is not None,
        budget=budget, fixed_bytes=module.stream_fixed_bytes(N, V, H, dtype, True),
        recompute_minimum=module.recompute_minimum(N, V, H, dtype, True, kw["softcap"]),
        store=logit_store(module, V, H, dtype, 'cpu'))
    if want:
        assert (plan.kind, plan.step, plan.dw_sum) == want
    else:
        assert plan.kind == "recompute" and plan.gemm_eq == 4
        if backend == "triton":
            assert -(-V // plan.step) >= 2          # several vocabulary blocks

    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if b is not None else ())]
    mask = targets != -100
    with planner.use_memory_budget(budget):
        loss, metrics = one_pass_token_local(
            leaves[0].reshape(N, H), leaves[1], leaves[2] if b is not None else None,
            targets.reshape(N), lambda lp: _grpo(lp.reshape(B, T), mask, old, adv),
            ignore_index=-100, backend=backend, **kw)
    (loss * 1.5).backward()

    exact = [t.detach().double().requires_grad_() for t in leaves]
    lp = linear_logprobs(exact[0], exact[1], targets, exact[2] if b is not None else None,
                         backend="reference", reference_dtype=torch.float64, **kw)
    loss64, metrics64 = _grpo(lp, mask, old, adv)
    grads64 = torch.autograd.grad(loss64 * 1.5, exact)
    # The triton backend's 16-bit inputs: stored float16 logits (z - tile max) in the backward,
    # and dW rounded to the weight dtype once more per chunk past the first when summed in it.
    sixteen = backend == "triton" and dtype != torch.float32
    grad_kw = dict(stored_logits=torch.float16 if sixteen else None,
                   dw_roundings=-(-N // plan.step) - 1 if plan.dw_sum == "gemm" and sixteen
                   else 0)
    bounds = loss_rounding_bounds(lambda x: _grpo(x, mask, old, adv), backend, dtype, hidden,
                                  weight, b, targets, **kw, **grad_kw)
    assert_within("loss", loss.detach(), loss64.detach(), bounds.loss)
    for k in metrics64:
        if k in bounds.metrics:
            assert_within(k, torch.as_tensor(metrics[k]).double(), metrics64[k].detach(),
                          bounds.metrics[k])
    # The backward scales the gradients, already in the leaves' dtype, by 1.5 in place: the
    # bound of the gradient of loss * 1.5, plus that multiplication's own rounding in 16 bits:
    # u16 of the result (at most |g64| + the bound; g64 is already the gradient of loss * 1.5),
    # or half the subnormal spacing (smallest_normal * u16) below the normal range.
    u_out = torch.finfo(dtype).eps / 2 if dtype != torch.float32 else 0.0
    tiny = torch.finfo(dtype).smallest_normal * u_out
    # The triton backend stores D in 16 bits: an element below the normal range errs by up to
    # ``tiny`` (absolute; the helper's bound is relative only), through dX = D @ W (sum over V
    # of |W|), dW = D.T @ X (sum over rows of |X|) and db (N terms), times the 1.5 scale.
    d_tiny = {"d_hidden": 0.0, "d_weight": 0.0, "d_bias": 0.0}
    if backend == "triton" and dtype != torch.float32:
        x_abs = hidden.double().abs().reshape(N, H)
        d_tiny = {"d_hidden": 1.5 * tiny * weight.double().abs().sum(0).expand(N, H),
                  "d_weight": 1.5 * tiny * x_abs.sum(0).expand(V, H),
                  "d_bias": 1.5 * tiny * N}
    for name, leaf, g64 in zip(("d_hidden", "d_weight", "d_bias"), leaves, grads64):
        assert leaf.grad.dtype == leaf.dtype
        extra = torch.as_tensor(d_tiny[name], dtype=torch.float64)
        bound = (1.5 * getattr(bounds.grads, name).reshape(g64.shape)
                 + (extra.reshape(g64.shape) if extra.dim() else extra))
        assert_within(name, leaf.grad.reshape(g64.shape), g64,
                      bound + u_out * (g64.abs() + bound) + tiny)
    # Ignored rows get exactly zero.
    assert torch.all(leaves[0].grad[~mask] == 0)


@pytest.mark.parametrize("dtype, kind", [(torch.float32, "one"), (torch.float32, "chunks"),
                                         (torch.float16, "one")])
def test_torch_stream_in_small_row_blocks_matches_float64(monkeypatch, dtype, kind):
    """The torch stream's row blocks (stream_logits) at 2 rows of V = 53, 21 rows: ten blocks
    and a partial one per chunk of every row; blocks of one chunk of 2 rows. Same bounds."""
    from gift_fast.backends import torch_chunked
    monkeypatch.setattr(torch_chunked, "STREAM_BLOCK_ELEMENTS", 2 * SHAPES["odd"][3])
    test_token_local_plans_match_float64("odd", "torch", dtype, kind)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_n_by_v_tensor_unless_the_plan_stores_logits(backend):
    """Chunks of 4 rows: no floating tensor of N x V elements (or more than the stream's
    buffers); one chunk of every row: the stored logits are [N, V] and the op's allocations stay
    within the budget."""
    N, H, V = 40, 16, 96
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    old = torch.full((N,), -3.0)
    adv = torch.ones(1)

    def run(budget):
        with planner.use_memory_budget(budget), LargestAllocation() as spy:
            loss, _ = grpo_loss(hidden[None], weight, targets[None], old[None], adv,
                                backend=backend)
            loss.backward()
        return spy.largest

    chunked = _stream_cost(backend, torch.float32, N, V, H, 4, False)
    # The stream's buffers: 4 x V logits (D in place), a 4 x H masked chunk of X; the
    # gradients are N x H and V x H; the torch backend's tile holds at most 4 x V elements.
    assert run(chunked) <= max(4 * V, V * H, N * H) < N * V
    whole = _stream_cost(backend, torch.float32, N, V, H, N, False)
    assert run(whole) == N * V                       # the stored logits, inside the budget
    assert N * V * 4 <= whole


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_stream_stores_two_bytes_and_no_n_by_v_tensor(dtype):
    """triton, 16-bit inputs: the stored logits are one [rows, W] buffer of the input dtype, W =
    V + a float32 shift per shift_columns (2 elements each), both padded to 16: chunks of 10 rows
    allocate nothing of N x V elements; one chunk of every row allocates exactly that buffer,
    2 bytes per element, within the budget (no float32 [N, V] tensor)."""
    from gift_fast.backends import triton_op
    N, H, V = 40, 16, 96
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    old, adv = torch.full((N,), -3.0), torch.ones(1)
    width = -(-V // 16) * 16 + -(-2 * -(-V // triton_op._shift_cols(dtype, hidden)) // 16) * 16

    def run(budget):
        with planner.use_memory_budget(budget), LargestAllocation() as spy:
            loss, _ = grpo_loss(hidden[None], weight, targets[None], old[None], adv,
                                backend="triton")
            loss.backward()
        return spy.largest

    chunked = _stream_cost("triton", dtype, N, V, H, 10, False, "gemm")      # 4 chunks
    assert run(chunked) <= max(10 * width, V * H, N * H) < N * V
    whole = _stream_cost("triton", dtype, N, V, H, N, False, "once")
    assert run(whole) == N * width
    assert N * width * 2 <= whole < N * V * 4


def test_budget_too_small_names_the_minimum():
    N, H, V = 6, 8, 50
    hidden = torch.randn(1, N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets = torch.randint(0, V, (1, N))
    with planner.use_memory_budget(16), pytest.raises(planner.BudgetTooSmall,
                                                      match=r"the minimum is \d+ bytes") as err:
        fdiv_sft_loss(hidden, weight, targets, backend="torch")
    least = err.value.minimum
    with planner.use_memory_budget(least):             # the named minimum is enough
        loss, _ = fdiv_sft_loss(hidden, weight, targets, backend="torch")
    loss.backward()
    assert torch.isfinite(hidden.grad).all()


def test_memory_budget_defaults_and_validation(monkeypatch):
    monkeypatch.setattr(planner, "_process_budget", None)
    monkeypatch.delenv("GIFT_FAST_MEMORY_BUDGET", raising=False)
    assert planner.memory_budget(torch.device("cpu")) == planner.CPU_BUDGET
    monkeypatch.setenv("GIFT_FAST_MEMORY_BUDGET", "12345")
    assert planner.memory_budget(torch.device("cpu")) == 12345
    planner.set_memory_budget(777)
    try:
        assert planner.memory_budget() == 777
        with planner.use_memory_budget(99):
            assert planner.memory_budget() == 99
            assert planner.memory_budget(budget=5) == 5          # per call wins
        assert planner.memory_budget() == 777
    finally:
        planner.set_memory_budget(None)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="memory_budget"):
            planner.set_memory_budget(bad)


def test_token_local_plan_prefers_the_stream_and_falls_back():
    n, h, v = 8192, 4096, 151936
    # bf16 at the goal shape with float32 stored logits (D apart): within 2 GiB plus a
    # float32 dW sum no 2 chunks fit, so dW is summed in bf16 (at most 4 chunks).
    plan = planner.plan_token_local(n, v, h, 2, budget=(2 << 30) + 4 * v * h)
    assert plan.kind == "stream" and plan.gemm_eq == 3 and 128 <= plan.step < n
    assert plan.step % planner.ALIGN == 0 and plan.extra_bytes <= (2 << 30) + 4 * v * h
    assert plan.dw_sum == "gemm" and -(-n // plan.step) <= planner.GEMM_DTYPE_SUM_MAX_CHUNKS
    # triton's 16-bit store (2 bytes + a float32 shift per 64 columns): 2 chunks within 2 GiB
    # (dW in bf16), one chunk within 4 GiB; at 4 x N the float32 dW sum (2.32 GiB) is smaller
    # than half the rows' logits: 2 chunks with it within 7.5 GiB, in bf16 within 5 GiB.
    store = planner.LogitStore(2, 64, 16)
    p2 = planner.plan_token_local(n, v, h, 2, budget=2 << 30, store=store)
    assert (p2.kind, -(-n // p2.step), p2.dw_sum) == ("stream", 2, "gemm")
    p4 = planner.plan_token_local(n, v, h, 2, budget=4 << 30, store=store)
    assert (p4.kind, p4.step, p4.dw_sum) == ("stream", n, "once")
    p7 = planner.plan_token_local(4 * n, v, h, 2, budget=15 << 29, store=store)
    assert (p7.kind, -(-4 * n // p7.step), p7.dw_sum) == ("stream", 2, "float32")
    p5 = planner.plan_token_local(4 * n, v, h, 2, budget=5 << 30, store=store)
    assert (p5.kind, -(-4 * n // p5.step), p5.dw_sum) == ("stream", 2, "gemm")
    # Too small for 4 chunks of 16-bit rows: the recompute plan, not a fifth chunk.
    p_re = planner.plan_token_local(n, v, h, 2, budget=n * v // 2, store=store)
    assert p_re.kind == "recompute"
    # float32: no dW sum (the gradient is float32), D in place.
    plan32 = planner.plan_token_local(n, v, h, 4, budget=2 << 30)
    assert plan32.kind == "stream" and plan32.step >= 512
    # A budget below a single row of logits but above the recompute's minimum: 4 GEMM-eq.
    fallback = planner.plan_token_local(n, v, h, 4, budget=v * 4)
    assert fallback.kind == "recompute" and fallback.gemm_eq == 4


def test_storing_logits_keeps_the_tiles_and_the_bits():
    """The stream plan's forward (logits stored) runs the tiles of the statistics-only forward on
    every target, so a row's log-prob has the same bits in both (the anchor pass of a loss that
    streams matches its policy pass)."""
    from gift_fast.backends import triton_op
    from gift_fast.kernels.logprob_forward import forward_config
    from gift_fast.compile_targets import ALL_ARCHS
    from gift_fast.kernels.target import INTERPRETER, target_of
    tiles = ("BLOCK_N", "BLOCK_V", "BLOCK_H", "v_per_split")
    for target in (INTERPRETER, *(target_of(a) for a in ALL_ARCHS)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for aligned in (True, False):
                a = forward_config(151936, 4096, dtype, target, aligned)
                b = forward_config(151936, 4096, dtype, target, aligned, store_logits=True)
                assert {k: a[k] for k in tiles} == {k: b[k] for k in tiles}
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(13, 24, generator=g), torch.randn(75, 24, generator=g)
    b, y = torch.randn(75, generator=g), torch.randint(0, 75, (13,), generator=g)
    st = triton_op.stats(x, w, b, y, 0.7, 4.0, want_entropy=False)
    z = torch.empty(13, 75)
    lse, target_logit = triton_op.stream_logits(x, w, b, y, 0.7, 4.0, z)
    assert torch.equal(lse, st.lse) and torch.equal(target_logit, st.target_logit)
    # The stored logits are the transformed logits: the float32 sum of H + 1 terms errs by
    # gamma(H + 1) sum|terms|, which softcap (slope <= 1) passes on; its tanh, computed as
    # 1 - 2 / (exp(2u) + 1) with exp within 2 ulp, adds at most 8u of c; the division by T and
    # the multiplication by c one rounding each (u |z|).
    ref = (4.0 * torch.tanh((x.double() @ w.double().T + b.double()) / 4.0)) / 0.7
    size = x.double().abs() @ w.double().abs().T + b.double().abs()
    bound = (gamma(25) * size + 8 * U32 * 4.0) / 0.7 + 2 * U32 * ref.abs()
    assert_within("stored logits", z, ref, bound)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_stream_confident_rows_match_float64(softcap):
    """Rows whose target holds nearly all the mass (p_t > 1 - 1e-4): the torch stream
    stores p - onehot (p_t - 1 cancels) and applies r = -g / T to the GEMMs' [rows, H] operands.
    Bound: loss_rounding_bounds (tests/helpers.py, steps 2 and 4). The torch stream's p_v =
    e^(z_v - m) / s: the shift rounds by u |z_v - m| <= u |z_v - lse| (inside dz'_v, m being
    the max); exp 4u; s, a plain sum of V such terms, within gamma(V + 3) relative; the division
    u; then the softcap slope's product u, r = g * (-1 / T) 2u and its product with a row of dX
    or of X u: relative error <= dz'_v + sum_w p_w dz'_w + gamma(V + 3) + 9u. The bound allows
    dz'_v + dlse + 8u with dlse >= sum_w p_w dz'_w + gamma(6V + 4), and gamma(6V + 4) -
    gamma(V + 3) >= u. p_t - 1 rounds once relative to its result: the (u + dlogits_u) |G|
    term."""
    N, H, V = 7, 8, 50
    g = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(H, H, generator=g, dtype=torch.float64))
    hidden = (3.0 * q[:N]).float()[None]              # orthogonal rows: no cross-talk below
    weight = torch.randn(V, H, generator=g) * 0.3
    targets = torch.arange(N)[None] * 3
    x = hidden[0]
    weight[targets[0]] = 25.0 * x / (x * x).sum(1, keepdim=True)     # raw z_t = 25 on every row
    old = torch.full((1, N), -1e-3, dtype=torch.float64)
    adv = torch.tensor([0.7], dtype=torch.float64)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    mask = torch.ones(1, N, dtype=torch.bool)
    fn = lambda lp: _grpo(lp.reshape(1, N), mask, old, adv)  # noqa: E731
    with planner.use_memory_budget(_stream_cost("torch", torch.float32, N, V, H, N, False)):
        loss, _ = one_pass_token_local(leaves[0].reshape(N, H), leaves[1], None, targets.reshape(N),
                                       fn, ignore_index=-100, backend="torch", softcap=softcap,
                                       temperature=0.9)
    loss.backward()
    exact = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    lp = linear_logprobs(exact[0], exact[1], targets, softcap=softcap, temperature=0.9,
                         backend="reference", reference_dtype=torch.float64)
    assert (lp.detach() > -1e-4).all()              # the case under test: p_t near 1
    grads64 = torch.autograd.grad(fn(lp)[0], exact)
    bounds = loss_rounding_bounds(fn, "torch", torch.float32, hidden, weight, None, targets,
                                  temperature=0.9, softcap=softcap)
    for name, leaf, g64 in zip(("d_hidden", "d_weight"), leaves, grads64):
        assert_within(name, leaf.grad.reshape(g64.shape), g64,
                      getattr(bounds.grads, name).reshape(g64.shape))


@pytest.mark.parametrize("kind", ["one", "chunks"])
def test_stream_dead_rows_with_non_finite_hidden_add_exactly_zero(kind):
    """An ignored row whose hidden state is NaN or inf: its dX row is exactly 0 and dW / db are
    those of the same call with that row zeroed (the row scale -g / T is 0 there, and 0 * NaN
    is not 0, so the stream zeroes the row's stored values and X's row itself)."""
    hidden, weight, b, targets, old, adv, kw = _inputs("odd", torch.float32, seed=3)
    B, T, H = hidden.shape
    V, N = weight.shape[0], B * T
    bad = hidden.clone()
    bad[0, 0, 0], bad[1, 1, 2] = float("nan"), float("inf")          # both ignored rows
    assert (targets[0, 0] == -100) and (targets[1, 1] == -100)
    clean = hidden.clone()
    clean[0, 0], clean[1, 1] = 0.0, 0.0
    mask = targets != -100
    budget, _ = _budget(kind, "torch", torch.float32, N, V, H, True)

    def run(h):
        leaves = [t.clone().requires_grad_() for t in (h, weight, b)]
        with planner.use_memory_budget(budget):
            loss, _ = one_pass_token_local(
                leaves[0].reshape(N, H), leaves[1], leaves[2], targets.reshape(N),
                lambda lp: _grpo(lp.reshape(B, T), mask, old, adv), ignore_index=-100,
                backend="torch", **kw)
        loss.backward()
        return loss.detach(), [t.grad for t in leaves]

    loss_bad, grads_bad = run(bad)
    loss_clean, grads_clean = run(clean)
    assert torch.equal(loss_bad, loss_clean)
    assert torch.all(grads_bad[0][0, 0] == 0) and torch.all(grads_bad[0][1, 1] == 0)
    for a, c in zip(grads_bad, grads_clean):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_store_keeps_the_bits_and_the_shifted_logits(dtype):
    """16-bit inputs: the forward that stores float16 z - tile max (and the float32 maxima) gives
    the statistics-only forward's bits, and the stored logits read back as z within the bound of
    helpers.py (step 4, ``stored_logits``) on top of the float32 logits' own."""
    from gift_fast.backends import triton_op
    g = torch.Generator().manual_seed(6)
    N, H, V = 13, 24, 75                          # V not a multiple of the tile (32 or 64)
    x = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 2.0).to(dtype)
    b = torch.randn(V, generator=g).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[3] = -1
    st = triton_op.stats(x, w, b, y, 0.7, None, want_entropy=False)
    z = triton_op.stream_buffer(N, V, dtype, x.device)
    lse, target_logit = triton_op.stream_logits(x, w, b, y, 0.7, None, z)
    assert torch.equal(lse, st.lse) and torch.equal(target_logit, st.target_logit)
    cols = triton_op._shift_cols(dtype, x)
    shift = triton_op._shift_of(z).double().repeat_interleave(cols, 1)[:, :V]
    got = z.view(torch.float16).double() + shift
    ref = (x.double() @ w.double().T + b.double()) / 0.7
    size = (x.double().abs() @ w.double().abs().T + b.double().abs()) / 0.7
    u16 = torch.finfo(torch.float16).eps / 2
    below = (ref - ref.max(1, keepdim=True).values).abs()
    # float32 logits (see the test above, no softcap), then fl(z - m), its float16 rounding
    # (or half the subnormal spacing) and the float32 sum with m.
    bound = (gamma(H + 1) * size + 2 * U32 * ref.abs() + (u16 + U32) * below
             + U32 * ref.abs() + torch.finfo(torch.float16).smallest_normal * u16)
    assert_within("stored 16-bit logits", got, ref, bound)
    assert below.max() > 8          # the shifts matter: logits far below the row max


def test_no_stored_logits_where_the_store_spills(monkeypatch):
    """kernels.configs.STORE_SPILLS: on gfx950 (CDNA4) the bf16 forward's logits store spills
    with rows that are not 16-byte aligned, bias and softcap (docs/hardware.md). There the
    token-local op takes the recompute plan and the keep plan is not taken; aligned rows, a
    missing bias or softcap, and other targets still store."""
    from gift_fast.backends import token_local, triton_op
    from gift_fast.kernels.target import override_target
    from gift_fast.logprobs import keeps_logits
    g = torch.Generator().manual_seed(0)

    def inputs(H):
        x = torch.randn(6, H, generator=g).to(torch.bfloat16).requires_grad_()
        w = torch.randn(40, H, generator=g).to(torch.bfloat16).requires_grad_()
        return x, w
    x, w = inputs(13)                          # H = 13: rows of 26 bytes, not 16-aligned
    xa, wa = inputs(16)
    b = torch.randn(40, generator=g).to(torch.bfloat16)
    with override_target("gfx950"):
        assert not triton_op.stores_logits(x, w, b, 30.0)
        assert not keeps_logits("triton", x, w, b, False, 30.0)
        assert triton_op.stores_logits(x, w, b, None) and triton_op.stores_logits(x, w, None, 30.0)
        assert triton_op.stores_logits(xa, wa, b, 30.0)
        streamed = []
        monkeypatch.setattr(token_local, "_stream", lambda *a, **k: streamed.append(1))
        y = torch.randint(0, 40, (6,), generator=g)
        loss, _ = one_pass_token_local(x, w, b, y, lambda lp: (lp.sum(), {}), ignore_index=-100,
                                       backend="triton", softcap=30.0, temperature=1.0)
        assert not streamed and torch.isfinite(loss)
    with override_target("gfx942"):
        assert triton_op.stores_logits(x, w, b, 30.0)
    plan = planner.plan_token_local(6, 40, 13, 2, store=None, budget=1 << 30)
    assert plan.kind == "recompute"
