"""Vocabulary-parallel lm_head (``vocab_parallel_group=``) on CPU: gloo, 2, 3 and 4 processes.

One spawn per world size runs every case on one process group. Each rank builds the same full
inputs from a seed, keeps its own rows of the lm_head (uneven shards, V = 37 not divisible), runs
the sharded op and the single-device op on the full weight, and records max abs differences of
values, entropy, argmax and gradients (hidden, its own rows of weight and bias). The parent
prints the table (the figures quoted in docs/distributed.md) and checks every difference,
elementwise, against the sum of the two computations' rounding bounds (tests/helpers.py: from
|x|, |W|, |b|, 1/T, H, V, the shard sizes and the unit roundoff; each shard's dX partial is
rounded to the input dtype before the sum).
"""
from __future__ import annotations

import datetime
import json
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.utils._python_dispatch
from helpers import (LargestAllocation, assert_within, backend_rounding_bounds, finish_rank,
                     front_end_rounding_bounds, init_gloo)

V, H = 37, 16
SPLITS = {2: [17, 20], 3: [10, 15, 12], 4: [9, 1, 15, 12]}   # rows of the lm_head per rank
WORKER_TIMEOUT_S = 300          # wall clock for one world size (a loaded 2-core machine)
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)


# ------------------------------------------------------------------------------------------------
# worker side
# ------------------------------------------------------------------------------------------------

def _span(sizes, rank):
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _inputs(seed, n, dtype, bias=True, p_ignore=0.25, lead=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.25).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, V, (n,), generator=g)
    targets[torch.rand(n, generator=g) < p_ignore] = -100
    if lead is not None:
        hidden, targets = hidden.reshape(*lead, H), targets.reshape(lead)
    return hidden, weight, b, targets


class Recorder:
    """Max abs differences of one case, each compared with its tolerance."""

    def __init__(self):
        self.rows = {}

    def diff(self, name, got, want, bound):
        """|got - want| <= bound elementwise (bound: a tensor like want, or a number)."""
        err = (got.detach().double() - want.detach().double()).abs().reshape(-1)
        bound = torch.as_tensor(bound, dtype=torch.float64).expand(want.shape).reshape(-1)
        if not err.numel():
            self.rows[name] = {"err": 0.0, "limit": 0.0, "ok": True}
            return
        worst = int(torch.argmax(torch.where(err > 0, err / bound, 0.0)))
        self.rows[name] = {"err": err.max().item(), "limit": bound[worst].item(),
                           "ok": bool((err <= bound).all())}

    def exact(self, name, got, want):
        mismatches = int((got != want).sum())
        self.rows[name] = {"err": float(mismatches), "limit": 0.0, "ok": mismatches == 0}

    def check(self, name, ok, detail=""):
        self.rows[name] = {"err": 0.0 if ok else 1.0, "limit": 0.0, "ok": bool(ok),
                           "detail": detail}


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def _logprob_case(rec, group, sizes, rank, *, backend, dtype, seed, n=13, bias=True,
                  temperature=1.0, softcap=None, lead=None, p_ignore=0.25, start_index=None,
                  weight_override=None, hidden_override=None):
    from gift_fast import linear_logprobs
    hidden, weight, b, targets = _inputs(seed, n, dtype, bias, p_ignore, lead)
    if weight_override is not None:
        weight = weight_override.to(dtype)
    if hidden_override is not None:
        hidden = hidden_override.to(dtype)
    lo, hi = _span(sizes, rank) if start_index is None else (start_index, start_index + sizes[rank])
    g = torch.Generator().manual_seed(seed + 1)
    up_logp = torch.randn(targets.shape, generator=g)
    up_ent = torch.randn(targets.shape, generator=g)
    kw = dict(temperature=temperature, softcap=softcap, return_entropy=True, return_argmax=True,
              backend=backend)

    h1, w1, b1 = _leaves(hidden, weight, b)
    lp1, ent1, am1 = linear_logprobs(h1, w1, targets, b1, **kw)
    h2, w2, b2 = _leaves(hidden, weight[lo:hi], None if b is None else b[lo:hi])
    lp2, ent2, am2 = linear_logprobs(h2, w2, targets, b2, vocab_parallel_group=group,
                                     vocab_start_index=start_index, **kw)
    full = [t for t in (h1, w1, b1) if t is not None]
    part = [t for t in (h2, w2, b2) if t is not None]
    g1 = torch.autograd.grad((lp1 * up_logp).sum() + (ent1 * up_ent).sum(), full)
    g2 = torch.autograd.grad((lp2 * up_logp).sum() + (ent2 * up_ent).sum(), part)

    # Each result is within its rounding bound of the exact value: the two are within the sum.
    args = (backend, dtype, hidden, weight, b, targets, up_logp, up_ent, temperature, softcap)
    one = backend_rounding_bounds(*args, oracle_rounds_outputs=False)
    shards = backend_rounding_bounds(*args, oracle_rounds_outputs=False, shard_sizes=sizes)
    bound = type(one)(*(None if x is None else x + y for x, y in zip(one, shards)))
    rec.diff("logp", lp2, lp1, bound.logp.reshape(lp1.shape))
    rec.diff("entropy", ent2, ent1, bound.entropy.reshape(ent1.shape))
    rec.exact("argmax", am2, am1)
    rec.diff("d_hidden", g2[0], g1[0], bound.d_hidden)
    rec.diff("d_weight_shard", g2[1], g1[1][lo:hi], bound.d_weight[lo:hi])
    if b is not None:
        rec.diff("d_bias_shard", g2[2], g1[2][lo:hi], bound.d_bias[lo:hi])
    rec.check("dtypes", g2[0].dtype == dtype and g2[1].dtype == dtype and lp2.dtype == lp1.dtype
              and ent2.dtype == ent1.dtype and am2.dtype == torch.int64
              and lp2.shape == targets.shape)
    ignored = targets == -100
    rec.check("ignored_rows_zero", bool((lp2[ignored] == 0).all() and (ent2[ignored] == 0).all()))
    with torch.no_grad():   # inference path (nothing saved) gives the same values
        lp3, ent3, am3 = linear_logprobs(hidden, weight[lo:hi], targets,
                                         None if b is None else b[lo:hi],
                                         vocab_parallel_group=group, vocab_start_index=start_index,
                                         **kw)
    rec.diff("no_grad_logp", lp3, lp1, bound.logp.reshape(lp1.shape))
    rec.exact("no_grad_argmax", am3, am1)


def _tie_case(rec, group, sizes, rank, *, backend, dtype, across_rank0):
    """Identical lm_head rows at shard boundaries (exact integer arithmetic): lowest index wins.

    ``across_rank0``: ties between the last row of shard r and the first of shard r + 1 (the
    lowest is rank 0's last row); otherwise ties only on ranks >= 1 (the lowest is shard 1's first
    row, and the max on rank 0 is lower).
    """
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    g = torch.Generator().manual_seed(7)
    hidden = torch.randint(1, 3, (11, H), generator=g).float()
    weight = torch.randint(-2, 3, (V, H), generator=g).float()
    if across_rank0:
        tie = {s for r in range(1, len(sizes)) for s in (starts[r] - 1, starts[r])}
    else:
        tie = {starts[r] for r in range(1, len(sizes))} | {V - 1} \
            | {starts[r] - 1 for r in range(2, len(sizes))}
    tie = sorted(tie)
    weight[tie] = 3.0                 # logit 3 * sum(h) > 2 * sum(h) >= any other row's
    want = torch.full((11,), tie[0])
    _logprob_case(rec, group, sizes, rank, backend=backend, dtype=dtype, seed=11, n=11,
                  bias=False, weight_override=weight, hidden_override=hidden, p_ignore=0.0)
    from gift_fast import linear_logprobs
    lo, hi = _span(sizes, rank)
    _, am = linear_logprobs(hidden.to(dtype), weight[lo:hi].to(dtype),
                            torch.zeros(11, dtype=torch.long), return_argmax=True,
                            backend=backend, vocab_parallel_group=group)
    rec.exact("argmax_lowest_tied_index", am, want)


def _loss_cases(group, sizes, rank, backend):
    """Every loss front-end (and two nn.Modules) with vocab_parallel_group vs single device."""
    import gift_fast as gf
    B, T = 4, 5
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(B, T, H, generator=g) * 0.8
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.1
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < 0.3] = -100
    anchor = -torch.rand(B, T, generator=g) * 3
    rewards = torch.randn(B, generator=g)
    adv = gf.group_advantages(rewards, 2)
    lo, hi = _span(sizes, rank)
    fronts = {
        "gift": lambda h, w, b, **k: gf.gift_loss(h, w, targets, anchor, rewards, group_size=2,
                                                  bias=b, **k),
        "gift_diffstats": lambda h, w, b, **k: gf.gift_loss(
            h, w, targets, anchor, rewards, group_size=2, bias=b, detach_stats=False,
            length_norm=1.0, **k),
        "grpo": lambda h, w, b, **k: gf.grpo_loss(h, w, targets, anchor, adv, kl_ref_logps=anchor * 1.1,
                                                  beta=0.04, bias=b, **k),
        "dpo": lambda h, w, b, **k: gf.dpo_loss(h, w, targets, anchor, bias=b, **k),
        "ipo": lambda h, w, b, **k: gf.ipo_loss(h, w, targets, anchor, bias=b, **k),
        "simpo": lambda h, w, b, **k: gf.simpo_loss(h, w, targets, sft_weight=0.5, bias=b, **k),
        "rpo": lambda h, w, b, **k: gf.rpo_loss(h, w, targets, anchor, rewards, kind="bwd_kl",
                                                bias=b, **k),
        "una": lambda h, w, b, **k: gf.una_loss(h, w, targets, anchor, kind="binary_bce", beta=0.3,
                                                bias=b, **k),
        "fdiv_sft": lambda h, w, b, **k: gf.fdiv_sft_loss(h, w, targets, anchor, divergence="js",
                                                          bias=b, **k),
        "dft": lambda h, w, b, **k: gf.dft_loss(h, w, targets, bias=b, softcap=4.0, **k),
        "ift": lambda h, w, b, **k: gf.ift_loss(h, w, targets, bias=b, temperature=0.8, **k),
        "GIFTLoss_module": lambda h, w, b, **k: gf.GIFTLoss(group_size=2, **k)(
            h, w, targets, anchor, rewards, bias=b),
        "DFTLoss_module": lambda h, w, b, **k: gf.DFTLoss()(h, w, targets, bias=b, **k),
    }
    if backend == "triton":   # interpreter: the fused paths' fallbacks, kept few
        fronts = {k: fronts[k] for k in ("gift", "dft")}
    results = {}
    for name, front in fronts.items():
        rec = Recorder()
        try:
            h1, w1, b1 = _leaves(hidden, weight, bias)
            loss1, _ = front(h1, w1, b1, backend=backend)
            g1 = torch.autograd.grad(loss1, (h1, w1, b1))
            h2, w2, b2 = _leaves(hidden, weight[lo:hi], bias[lo:hi])
            loss2, _ = front(h2, w2, b2, backend=backend, vocab_parallel_group=group)
            g2 = torch.autograd.grad(loss2, (h2, w2, b2))
            # each within its rounding bound of the exact value (helpers.py), the two within the sum
            one, two = (front_end_rounding_bounds(front, backend, torch.float32, hidden, weight,
                                                  bias, targets, shard_sizes=s)
                        for s in (None, sizes))
            rec.diff("loss", loss2, loss1, one.loss + two.loss)
            rec.diff("d_hidden", g2[0], g1[0], one.grads.d_hidden + two.grads.d_hidden)
            rec.diff("d_weight_shard", g2[1], g1[1][lo:hi],
                     (one.grads.d_weight + two.grads.d_weight)[lo:hi])
            rec.diff("d_bias_shard", g2[2], g1[2][lo:hi],
                     (one.grads.d_bias + two.grads.d_bias)[lo:hi])
        except Exception:   # noqa: BLE001 - reported to the parent, which fails the test
            rec.check("raised", False, traceback.format_exc())
        results[f"loss/{backend}/{name}"] = rec.rows
    rec = Recorder()
    pred1 = gf.ift_greedy_predictions(hidden, weight, bias, backend=backend)
    pred2 = gf.ift_greedy_predictions(hidden, weight[lo:hi], bias[lo:hi], backend=backend,
                                      vocab_parallel_group=group)
    rec.exact("argmax", pred2, pred1)
    results[f"loss/{backend}/ift_greedy_predictions"] = rec.rows
    return results


def _error_cases(rec, group, sizes, rank):
    """Bad input raises the same ValueError on every rank (no rank is left in a collective)."""
    from gift_fast import linear_logprobs
    hidden, weight, _, targets = _inputs(3, 6, torch.float32, bias=False, p_ignore=0.0)
    lo, hi = _span(sizes, rank)
    shard = weight[lo:hi]

    def raises(name, fn, match):
        try:
            fn()
        except ValueError as exc:
            rec.check(name, match in str(exc), str(exc))
        else:
            rec.check(name, False, "no ValueError")

    bad = targets.clone()
    bad[2] = V                        # in range of no shard: global V is the bound
    raises("target_out_of_global_range",
           lambda: linear_logprobs(hidden, shard, bad, backend="torch", vocab_parallel_group=group),
           f"[0, {V})")
    high = targets.clone()
    high[:] = V - 1                   # beyond every shard but the last: valid
    out = linear_logprobs(hidden, shard, high, backend="torch", vocab_parallel_group=group)
    ref = linear_logprobs(hidden, weight, high, backend="torch")
    bounds = [backend_rounding_bounds("torch", torch.float32, hidden, weight, None, high,
                                      shard_sizes=s) for s in (None, sizes)]
    rec.diff("target_in_last_shard_only", out, ref, bounds[0].logp + bounds[1].logp)
    raises("overlapping_start_index",
           lambda: linear_logprobs(hidden, shard, targets, backend="torch",
                                   vocab_parallel_group=group, vocab_start_index=0),
           "tile [0, V)")
    raises("start_index_on_some_ranks",
           lambda: linear_logprobs(hidden, shard, targets, backend="torch", vocab_parallel_group=group,
                                   vocab_start_index=lo if rank == 0 else None),
           "on some ranks")
    raises("reference_backend",
           lambda: linear_logprobs(hidden, shard, targets, backend="reference",
                                   vocab_parallel_group=group),
           "backend")
    other = targets.clone()
    other[0] = (other[0] + rank) % V  # targets must be replicated
    raises("different_targets_per_rank",
           lambda: linear_logprobs(hidden, shard, other, backend="torch", vocab_parallel_group=group),
           "same targets")
    rows = 6 if rank == 0 else 5      # hidden must be replicated
    raises("different_rows_per_rank",
           lambda: linear_logprobs(hidden[:rows], shard, targets[:rows], backend="torch",
                                   vocab_parallel_group=group),
           "same rows")


def _run_cases(rank, world, group):
    sizes = SPLITS[world]
    results, seconds = {}, {}

    def case(name, fn, *args, **kw):
        rec = Recorder()
        t0 = time.perf_counter()
        try:
            fn(rec, *args, **kw)
        except Exception:   # noqa: BLE001 - reported to the parent
            rec.check("raised", False, traceback.format_exc())
        results[name] = rec.rows
        seconds[name] = time.perf_counter() - t0

    F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
    common = (group, sizes, rank)
    case("torch/f32/bias", _logprob_case, *common, backend="torch", dtype=F32, seed=1)
    case("torch/f32/softcap_temperature", _logprob_case, *common, backend="torch", dtype=F32,
         seed=2, softcap=3.0, temperature=0.7)
    case("torch/f32/leading_dims_no_bias", _logprob_case, *common, backend="torch", dtype=F32,
         seed=3, n=12, lead=(3, 4), bias=False)
    case("torch/f32/n1", _logprob_case, *common, backend="torch", dtype=F32, seed=4, n=1,
         p_ignore=0.0)
    case("torch/f32/all_ignored", _logprob_case, *common, backend="torch", dtype=F32, seed=5, n=5,
         p_ignore=1.0)
    case("torch/f64/softcap", _logprob_case, *common, backend="torch", dtype=F64, seed=6,
         softcap=5.0, temperature=1.3)
    case("torch/bf16/bias", _logprob_case, *common, backend="torch", dtype=BF16, seed=7)
    case("torch/f32/ties_across_rank0", _tie_case, *common, backend="torch", dtype=F32,
         across_rank0=True)
    case("torch/f32/ties_beyond_rank0", _tie_case, *common, backend="torch", dtype=F32,
         across_rank0=False)
    # shards in reverse rank order, stated with vocab_start_index
    rev = sizes[::-1]
    case("torch/f32/start_index_reversed", _logprob_case, group, rev, world - 1 - rank,
         backend="torch", dtype=F32, seed=8, start_index=sum(rev[:world - 1 - rank]))
    case("triton/f32/bias_softcap", _logprob_case, *common, backend="triton", dtype=F32, seed=9,
         softcap=3.0, temperature=0.9)
    case("triton/f16", _logprob_case, *common, backend="triton", dtype=F16, seed=10)
    case("triton/f32/ties_beyond_rank0", _tie_case, *common, backend="triton", dtype=F32,
         across_rank0=False)
    case("errors", _error_cases, *common)
    # the triton front-ends (fallbacks of the fused paths) once, on the split with every shard
    # narrower than one interpreter tile; the interpreter is slow
    for backend in ("torch", "triton") if world == 3 else ("torch",):
        t0 = time.perf_counter()
        results.update(_loss_cases(group, sizes, rank, backend))
        seconds[f"loss/{backend}/*"] = time.perf_counter() - t0
    if world == 4:   # two tensor-parallel groups of 2 (TP x DP = 2 x 2), group-local ranks
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        sub = pairs[rank // 2]
        case("torch/f32/subgroups_2x2", _logprob_case, sub, [20, 17], rank % 2, backend="torch",
             dtype=F32, seed=20 + rank // 2)
    return results, seconds


def _worker(rank, world, port, out_dir):
    # CPU tensors only here (gloo): the triton cases run through the interpreter even on a CUDA
    # machine. Set before gift_fast.kernels is first imported (inside the cases).
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)          # 2 cores shared by up to 4 ranks
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    init_gloo(rank, world, COLLECTIVE_TIMEOUT.total_seconds(), store=store)
    try:
        results, seconds = _run_cases(rank, world, dist.group.WORLD)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"results": results, "seconds": seconds}, f)
    except BaseException:       # the traceback goes to the parent; the group goes first
        dist.destroy_process_group()
        raise
    finish_rank()


# ------------------------------------------------------------------------------------------------
# parent side
# ------------------------------------------------------------------------------------------------

def _spawn(world, out_dir):
    # The parent owns the rendezvous store on a port the OS picked: no port race between tests.
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                          timeout=COLLECTIVE_TIMEOUT)
    ctx = mp.start_processes(_worker, args=(world, store.port, str(out_dir)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"vocab-parallel workers (world {world}) did not finish in "
                            f"{WORKER_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        del store
    return [json.load(open(out_dir / f"rank{r}.json")) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_vocab_parallel_equals_single_device(world, tmp_path):
    t0 = time.monotonic()
    outputs = _spawn(world, tmp_path)
    wall = time.monotonic() - t0
    per_rank = [out["results"] for out in outputs]
    failures, lines = [], []
    for case in per_rank[0]:
        worst = {}
        for rank, results in enumerate(per_rank):
            for metric, row in results[case].items():
                if not row["ok"]:
                    failures.append(f"world {world} rank {rank} {case} {metric}: "
                                    f"{row['err']:.3g} > {row['limit']:.3g} {row.get('detail', '')}")
                worst[metric] = max(worst.get(metric, 0.0), row["err"])
        lines.append(f"{case:45s} " + "  ".join(f"{m}={e:.1e}" for m, e in worst.items()))
    print(f"\nvocab-parallel, world {world}, shards {SPLITS[world]} (max abs diff over ranks):")
    print("\n".join(lines))
    slowest = sorted(outputs[0]["seconds"].items(), key=lambda kv: -kv[1])[:4]
    print(f"wall {wall:.1f} s incl. spawn; slowest cases on rank 0: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in slowest))
    assert not failures, "\n".join(failures)


CPU_BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="triton on CPU tensors needs the interpreter"))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_n_by_v_tensor_under_vocab_parallel(backend, monkeypatch):
    """With chunk budgets of 8 rows, no tensor larger than hidden [N, H] appears in the forward
    or backward of the vocab-parallel path (H = 16 < V = 37: an [N, V] tensor would show). The
    allocations do not depend on the world size, so a group of one process (in this process,
    where the spy works without a spawn) covers them."""
    import gift_fast.backends.torch_chunked as tc
    from gift_fast.backends import plan
    from gift_fast import linear_logprobs
    n = 64
    hidden, weight, _, targets = _inputs(12, n, torch.float32, bias=False)
    h, w = _leaves(hidden, weight)
    monkeypatch.setattr(tc, "CHUNK_ELEMENTS", 8 * V)
    # The torch backend also counts its float32 copies of a block of X and of its dX.
    monkeypatch.setattr(plan, "_process_budget", 8 * V * 4 + n * plan.PER_ROW_BYTES
                        + (2 * n * H * 4 if backend == "torch" else 0))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with LargestAllocation() as spy:
            logp, ent = linear_logprobs(h, w, targets, return_entropy=True, backend=backend,
                                        vocab_parallel_group=dist.group.WORLD)
            (logp.sum() + ent.sum()).backward()
    finally:
        dist.destroy_process_group()
    assert spy.largest <= n * H, f"largest tensor {spy.largest} elements; N*H={n * H}, N*V={n * V}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shard_hooks_add_up_to_the_full_op(backend):
    """The backend hooks alone, in one process: each shard's local backward with the GLOBAL
    lse / entropy gives that shard's rows of dW and db, and the shards' dX sum to the full dX;
    an active row whose target is in another shard (local target -1) gets no one-hot term."""
    from gift_fast import linear_logprobs
    from gift_fast.backends.protocol import get_backend
    n = 13
    hidden, weight, b, targets = _inputs(30, n, torch.float32, bias=True)
    h, w, bb = _leaves(hidden, weight, b)
    logp, ent = linear_logprobs(h, w, targets, bb, return_entropy=True, softcap=3.0,
                                temperature=0.8, backend=backend)
    g = torch.Generator().manual_seed(31)
    up_logp, up_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    (logp * up_logp + ent * up_ent).sum().backward()
    active = targets != -100
    lse_parts, stats = [], []
    local_stats, local_backward = get_backend(backend).stats, get_backend(backend).grad
    d_hidden = torch.zeros_like(hidden)
    spans = [(0, 10), (10, 25), (25, V)]
    for lo, hi in spans:
        local = torch.where(active & (targets >= lo) & (targets < hi), targets - lo, -1)
        stats.append(local_stats(hidden, weight[lo:hi], b[lo:hi], local, 0.8, 3.0, True))
        lse_parts.append(stats[-1][0])
    lse = torch.logsumexp(torch.stack(lse_parts), dim=0)       # the global lse
    # Full op and shards: each within its rounding bound of the exact value, the two within the sum.
    args = (backend, torch.float32, hidden, weight, b, targets, up_logp, up_ent, 0.8, 3.0)
    one, two = (backend_rounding_bounds(*args, oracle_rounds_outputs=False, shard_sizes=s)
                for s in (None, [hi - lo for lo, hi in spans]))
    bound = type(one)(*(None if x is None else x + y for x, y in zip(one, two)))
    for (lo, hi), st in zip(spans, stats):
        in_shard = active & (targets >= lo) & (targets < hi)
        # the owner's target logit minus the global lse is the log-prob; 0 elsewhere
        assert_within("logp", torch.where(in_shard, st[1] - lse, 0.0)[in_shard],
                      logp.detach()[in_shard], bound.logp[in_shard])
        assert bool((st[1][~in_shard] == 0).all())
    for (lo, hi), st in zip(spans, stats):
        local = torch.where(active & (targets >= lo) & (targets < hi), targets - lo, -1)
        dx, dw, db = local_backward(hidden, weight[lo:hi], b[lo:hi], local, lse, ent.detach(),
                                    torch.where(active, up_logp, 0.0),
                                    torch.where(active, up_ent, 0.0), 0.8, 3.0, True, True, True)
        d_hidden += dx
        assert_within("d_weight", dw, w.grad[lo:hi], bound.d_weight[lo:hi])
        assert_within("d_bias", db, bb.grad[lo:hi], bound.d_bias[lo:hi])
    assert_within("d_hidden", d_hidden, h.grad, bound.d_hidden)
