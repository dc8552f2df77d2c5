"""The keep plan of bare ``linear_logprobs`` on the triton backend (gift_fast/backends/keep.py):
the forward stores the logits of all rows (float32; 16-bit inputs: float16 z - tile max and the
float32 tile maxima), the backward forms D from them and runs the dX / dW GEMMs (3 GEMM-eq).

Against float64 and the recompute plan: odd shapes, N = 1, V below one tile, ignored rows, rows
with zero upstream gradient, bias / softcap / temperature, float32 / float16 / bfloat16,
gradients w.r.t. hidden, weight and bias. Bounds: backend_rounding_bounds (tests/helpers.py) of
the triton backend with the same upstream gradient: the keep plan forms the same float32 logits
(the forward's tiles, checked bit for bit below), D from them with the dlogits rounding of the
recompute plan (D stored in the input dtype), and the same GEMM sums (any order), so the bound
of the recompute plan covers it; for 16-bit inputs plus the rounding of the stored float16
logits (``stored_logits`` of the bound). The memory test: the stored logits are the only [N, V]
tensor and fit the budget; below the keep plan's bytes, no-grad passes and entropy outputs
recompute (no [N, V] tensor).
"""
import pytest
import torch

import gift_fast.logprobs as op
from gift_fast import linear_logprobs
from gift_fast.backends import keep
from gift_fast.backends import plan as planner
from helpers import LargestAllocation, assert_within, backend_rounding_bounds

# (N, H, V, bias, temperature, softcap, ignored rows)
SHAPES = {
    "odd": (21, 19, 53, True, 0.8, 5.0, 3),
    "n1": (1, 16, 37, True, 1.0, None, 0),
    "v_below_tile": (6, 8, 20, False, 1.3, 2.0, 1),
}


def _inputs(shape, dtype, seed):
    N, H, V, bias, temperature, softcap, ignored = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[:ignored] = -100
    g_logp = torch.randn(N, generator=g)
    g_logp[1::4] = 0.0                          # live rows with no upstream gradient
    return hidden, weight, b, targets, g_logp, dict(temperature=temperature, softcap=softcap)


def _run(hidden, weight, b, targets, g_logp, need, kw, keep_on, monkeypatch):
    """(logp, grads of sum(g * logp) w.r.t. the leaves in ``need``) on triton, keep plan on or
    off; asserts which plan ran."""
    monkeypatch.setattr(op, "KEEP_ENABLED", keep_on)
    ran = []
    original = keep.KeepLogprobs.forward
    monkeypatch.setattr(keep.KeepLogprobs, "forward",
                        staticmethod(lambda *a: (ran.append(1), original(*a))[1]))
    leaves = [None if t is None else t.clone().requires_grad_(r)
              for t, r in zip((hidden, weight, b), need)]
    logp = linear_logprobs(leaves[0], leaves[1], targets, leaves[2], backend="triton", **kw)
    assert bool(ran) == keep_on
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    return logp.detach(), torch.autograd.grad((logp * g_logp).sum(), wanted)


CASES = ([(s, torch.float32) for s in SHAPES]
         + [("odd", torch.float16), ("odd", torch.bfloat16), ("n1", torch.float16),
            ("n1", torch.bfloat16), ("v_below_tile", torch.bfloat16),
            ("v_below_tile", torch.float16)])


@pytest.mark.parametrize("shape, dtype", CASES)
def test_keep_matches_float64_and_the_recompute_plan(shape, dtype, monkeypatch):
    hidden, weight, b, targets, g_logp, kw = _inputs(shape, dtype, seed=len(shape))
    need = (True, True, b is not None)
    logp, grads = _run(hidden, weight, b, targets, g_logp, need, kw, True, monkeypatch)
    logp_re, grads_re = _run(hidden, weight, b, targets, g_logp, need, kw, False, monkeypatch)
    # Same forward tiles: the log-probs of both plans have the same bits.
    assert torch.equal(logp, logp_re)
    exact = [None if t is None else t.double().requires_grad_() for t in (hidden, weight, b)]
    lp64 = linear_logprobs(exact[0], exact[1], targets, exact[2], backend="reference",
                           reference_dtype=torch.float64, **kw)
    grads64 = torch.autograd.grad((lp64 * g_logp.double()).sum(),
                                  [t for t in exact if t is not None])
    # 16-bit inputs: the backward reads float16 logits (z - tile max), the recompute plan
    # recomputes them; the stored term (helpers.py, step 4) bounds the keep plan and, being
    # non-negative, still bounds the recompute plan.
    stored = torch.float16 if dtype != torch.float32 else None
    bound = backend_rounding_bounds("triton", dtype, hidden, weight, b, targets, g_logp,
                                    stored_logits=stored, **kw)
    assert_within("logp", logp, lp64.detach(), bound.logp)
    for name, got, re, want, leaf in zip(("d_hidden", "d_weight", "d_bias"), grads, grads_re,
                                         grads64, (hidden, weight, b)):
        assert got.dtype == leaf.dtype
        assert_within(name, got, want, getattr(bound, name))
        # Both plans within the bound of float64, hence within twice it of each other.
        assert_within(f"{name} keep vs recompute", got, re, 2 * getattr(bound, name))
    dead = (targets == -100) | (g_logp == 0)
    assert torch.all(grads[0][dead] == 0)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, True), (False, False, True)])
def test_keep_gradient_subsets(need, monkeypatch):
    hidden, weight, b, targets, g_logp, kw = _inputs("odd", torch.float32, seed=3)
    _, grads = _run(hidden, weight, b, targets, g_logp, need, kw, True, monkeypatch)
    _, grads_re = _run(hidden, weight, b, targets, g_logp, need, kw, False, monkeypatch)
    bound = backend_rounding_bounds("triton", torch.float32, hidden, weight, b, targets,
                                    g_logp, **kw)
    names = [n for n, r in zip(("d_hidden", "d_weight", "d_bias"), need) if r]
    for name, got, re in zip(names, grads, grads_re):
        assert_within(f"{name} of {need}", got, re, 2 * getattr(bound, name))


def test_keep_is_batch_invariant_and_dead_rows_add_nothing(monkeypatch):
    hidden, weight, b, targets, g_logp, kw = _inputs("odd", torch.float32, seed=4)
    kw["softcap"] = None                           # (a softcap would keep the logits finite)
    hidden[13] = 3e38                              # logits overflow; g_logp[13] == 0: dead
    logp, grads = _run(hidden, weight, b, targets, g_logp, (True, True, True), kw, True,
                       monkeypatch)
    part, _ = _run(hidden[5:9], weight, b, targets[5:9], g_logp[5:9], (True, True, True), kw,
                   True, monkeypatch)
    assert torch.equal(part, logp[5:9])
    assert targets[13] != -100 and not torch.isfinite(logp[13])
    assert torch.all(grads[0][13] == 0)
    assert all(torch.isfinite(g).all() for g in (grads[1], grads[2]))


def test_stored_logits_fit_the_budget_and_recompute_otherwise():
    N, H, V = 40, 16, 96
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    need_bytes = planner.keep_bytes(N, V, H, 4, True, False)

    def largest(budget, backward=True, **kw):
        with planner.use_memory_budget(budget), LargestAllocation() as spy:
            out = linear_logprobs(hidden, weight, targets, backend="triton", **kw)
            logp = out[0] if isinstance(out, tuple) else out
            if backward and logp.requires_grad:
                logp.sum().backward()
        return spy.largest

    assert N * V * 4 <= need_bytes
    assert largest(need_bytes) == N * V                # the stored logits, inside the budget
    # A quarter of the keep plan's bytes: the recompute plan, in blocks below N x V.
    assert largest(need_bytes // 4) < N * V
    assert largest(need_bytes - 1, backward=False) < N * V     # one byte short: no keep
    # A forward without gradients, or with an entropy output, stores no logits (its recompute
    # backward may use N x V blocks within this budget, so only the forward is measured).
    with torch.no_grad():
        assert largest(need_bytes) < N * V
    assert largest(need_bytes, backward=False, return_entropy=True) < N * V
    assert largest(need_bytes, backward=False) == N * V
    assert planner.plan_two_phase(N, N, V, H, 4, budget=need_bytes, can_keep=True).kind == "keep"
    assert planner.plan_two_phase(N, N, V, H, 4, budget=need_bytes - 1,
                                  can_keep=True).kind == "recompute"


@pytest.mark.parametrize("dtype, drop, reduction", [(torch.float32, False, "mean"),
                                                    (torch.float32, True, "sum"),
                                                    (torch.float16, False, "mean"),
                                                    (torch.bfloat16, True, "mean")])
def test_fused_gift_keep_matches_float64_and_the_recompute_plan(dtype, drop, reduction,
                                                                monkeypatch):
    """The fused GIFT op on the keep plan: the loss and metrics of the recompute plan bit for
    bit (same log-prob bits through the same epilogue kernel); the gradients of sum(g * logp)
    for the epilogue's g (captured as the keep backward's upstream gradient, which the recompute
    plan's backward receives too), within the bound of that g against float64."""
    from gift_fast.backends.triton_gift import fused_gift_loss
    B, T, H, V, G = 8, 5, 12, 37, 4
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(B * T, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * 0.3).to(dtype)
    b = (torch.randn(V, generator=gen) * 0.1).to(dtype)
    targets = torch.randint(0, V, (B * T,), generator=gen)
    targets[::T] = -100
    anchor = torch.randn(B * T, generator=gen) * 0.1 - 4.0
    rewards = torch.randn(B, generator=gen)
    rewards[:G] = 0.5                                # a uniform group (dropped when drop)
    kw = dict(beta=0.5, eps=1e-6, std="unbiased", length_norm=0.0, drop_uniform_groups=drop,
              temperature=0.9, softcap=6.0, ignore_index=-100, reduction=reduction)
    captured = []
    original = keep.KeepLogprobs.backward
    monkeypatch.setattr(keep.KeepLogprobs, "backward", staticmethod(
        lambda ctx, d: (captured.append(d.detach().clone()), original(ctx, d))[1]))

    def run(keep_on):
        monkeypatch.setattr(op, "KEEP_ENABLED", keep_on)
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        loss, metrics = fused_gift_loss(*leaves, targets, anchor, rewards, torch.arange(B + 1) * T,
                                        G, **kw)
        (loss * 1.5).backward()
        return loss.detach(), metrics, [t.grad for t in leaves]

    loss, metrics, grads = run(True)
    assert len(captured) == 1
    loss_re, metrics_re, grads_re = run(False)
    assert len(captured) == 1
    assert torch.equal(loss, loss_re)
    for k in metrics:
        assert torch.equal(torch.as_tensor(metrics[k]), torch.as_tensor(metrics_re[k])), k
    g = captured[0].float()
    exact = [t.double().requires_grad_() for t in (hidden, weight, b)]
    lp64 = linear_logprobs(exact[0], exact[1], targets, exact[2], backend="reference",
                           reference_dtype=torch.float64, temperature=0.9, softcap=6.0)
    grads64 = torch.autograd.grad((lp64 * g.double()).sum(), exact)
    # 16-bit: the keep backward reads float16 logits (z - tile max); see the test above.
    bound = backend_rounding_bounds("triton", dtype, hidden, weight, b, targets, g,
                                    temperature=0.9, softcap=6.0,
                                    stored_logits=None if dtype == torch.float32
                                    else torch.float16)
    for name, got, re, want in zip(("d_hidden", "d_weight", "d_bias"), grads, grads_re, grads64):
        assert_within(name, got, want, getattr(bound, name))
        assert_within(f"{name} recompute", re, want, getattr(bound, name))


def test_a_second_backward_recomputes(monkeypatch):
    """retain_graph: the first backward turned the stored logits into D; a second one runs the
    recompute backward and gives the same gradients within the bound of each against float64,
    i.e. within twice that bound of each other."""
    hidden, weight, b, targets, g_logp, kw = _inputs("odd", torch.float32, seed=9)
    monkeypatch.setattr(op, "KEEP_ENABLED", True)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    logp = linear_logprobs(*leaves[:2], targets, leaves[2], backend="triton", **kw)
    first = torch.autograd.grad((logp * g_logp).sum(), leaves, retain_graph=True)
    second = torch.autograd.grad((logp * g_logp).sum(), leaves)
    bound = backend_rounding_bounds("triton", torch.float32, hidden, weight, b, targets, g_logp,
                                    **kw)
    for name, a, c in zip(("d_hidden", "d_weight", "d_bias"), first, second):
        assert_within(name, a, c, 2 * getattr(bound, name))
