"""Helpers shared by several test modules: an allocation spy, a host-sync spy, a bounded
multi-process spawn, the set-up and tear-down of a spawned rank's gloo process group, and
rounding-error bounds from which the float32 tolerances are derived."""
import collections
import contextlib
import functools
import math
import os
import sys
from typing import NamedTuple, Optional
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def dispatch_into_custom_ops(mode, func, args, kwargs):
    """``func(*args, **kwargs)`` for a TorchDispatchMode, looking inside custom ops.

    A mode sees a ``torch.library`` custom op (``gift_fast::linear_logprobs_fwd`` / ``_bwd``) as
    one op and runs it with the mode off, so the allocations inside would go unseen; the op's
    Python body is run instead with the mode on."""
    from torch._library.custom_ops import _maybe_get_opdef
    opdef = _maybe_get_opdef(func)
    if opdef is None:
        return func(*args, **(kwargs or {}))
    with mode:
        return opdef._init_fn(*args, **(kwargs or {}))


class LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest floating-point tensor any aten op produces while active, inside the
    library's custom ops too (logits or their gradient would be floating point; the
    interpreter's uint8 copies of argument storages are not ours)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = dispatch_into_custom_ops(self, func, args, kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


def rendezvous(tmp_path) -> str:
    """A file rendezvous for one spawn: no port to pick, so no race with other processes on the
    machine for a port picked free and bound later (gloo's own connections use ports the OS
    assigns)."""
    return f"file://{os.path.join(str(tmp_path), 'rendezvous')}"


def init_gloo(rank: int, world: int, timeout_s: float, **how) -> None:
    """Joins the gloo group of a spawned rank; ``how``: ``init_method=`` or ``store=``."""
    # torch.distributed.nn.functional binds ``group=group.WORLD`` as a default argument when first
    # imported (DDP and FSDP2 import it): imported after init_process_group, it would keep the
    # group, and its gloo worker threads, alive past destroy_process_group (see finish_rank).
    import torch.distributed.nn  # noqa: F401
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s), **how)


def finish_rank() -> None:
    """The end of a spawned rank whose work is done and written: destroys the process group and
    leaves without the interpreter's shutdown.

    torch can keep the group referenced after destroy_process_group (after FSDP2, DTensor's
    sharding caches hold its device mesh), so its gloo worker threads keep running. A worker
    releasing the last collective's tensors while the interpreter shuts down takes the GIL;
    Python then ends that thread with pthread_exit, whose unwind through a noexcept destructor
    aborts the process: "terminate called without an active exception", SIGABRT, although every
    case passed. There is nothing left to run, so the rank exits here, with exit code 0."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_and_wait(fn, args, nprocs: int, timeout_s: float, what: str) -> None:
    """Runs ``fn(rank, *args)`` in ``nprocs`` spawned processes; fails the test if they do not
    finish within ``timeout_s`` (a hang guard, not a speed check) and kills what is left."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: ranks did not finish in {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


# ---------------------------------------------------------------------------------------------
# Rounding-error bounds for z = softcap(x @ W.T + b) / T and the statistics and gradients made of
# it. A float32 tolerance comes from these (the magnitudes |x|, |W|, |b|, 1/T, H, V and the unit
# roundoff), never from a number tuned on one CPU: a different BLAS kernel, thread split or
# vector width (Xeon vs EPYC) changes the summation order, and the bounds hold for every order.
#
# Notation: u = unit roundoff of the accumulation dtype (float32: 2^-24 = eps32 / 2),
# gamma(n) = n u / (1 - n u). A dot product of n terms (+ a bias) computed in any order, with or
# without FMA, is within gamma(n + 1) * sum |terms| of the exact value (Higham, Accuracy and
# Stability of Numerical Algorithms, 2nd ed., sec. 3.1); a sum of n terms likewise within
# gamma(n - 1) * sum |terms|. Exact quantities (z, p, lse, mu = E_p[z]) come from float64 on the
# same, already rounded, inputs; the bounds are first order in u, which at u = 2^-24 and the
# sizes used in the tests (n u < 1e-4) leaves a margin far larger than the dropped terms.
# ---------------------------------------------------------------------------------------------

U32 = torch.finfo(torch.float32).eps / 2


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of ``dtype``: half the distance from 1 to the next representable number."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, u: float = U32) -> float:
    return n * u / (1 - n * u)


class RoundingBounds(NamedTuple):
    """Elementwise bounds on |computed - exact| (float64): per row [N] for the statistics,
    shaped like the gradient for the gradients (None where no bias)."""
    max_logit: torch.Tensor
    target_logit: torch.Tensor
    lse: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    dlogits: torch.Tensor
    d_hidden: Optional[torch.Tensor]
    d_weight: Optional[torch.Tensor]
    d_bias: Optional[torch.Tensor]


def linear_softmax_rounding_bounds(hidden, weight, bias=None, targets=None, g=None, e=None,
                                   temperature=1.0, softcap=None, ignore_index=-100,
                                   u=U32, dlogits_u=None, out_dtype=None, out_roundings=1,
                                   p_floor=0.0, given_lse=None, given_entropy=None,
                                   dg=None, shard_sizes=None, stored_logits=None,
                                   dw_roundings=0) -> RoundingBounds:
    """Bounds on the rounding error of log-probs, entropy and the gradients of
    ``sum g * logp + e * entropy`` computed with unit roundoff ``u`` (accumulation dtype) from
    ``hidden`` [N, H], ``weight`` [V, H], ``bias`` [V], ``targets`` [N] (``g`` / ``e`` [N]: the
    upstream gradients, None = 0). ``dlogits_u``: rounding of the logit gradient before the dX /
    dW GEMMs (a half-precision dlogits buffer; default none beyond ``u``); ``out_dtype``: the
    gradients are rounded to it at the end (default: not), ``out_roundings`` times (2 when the
    oracle's gradients are rounded to it too); ``p_floor``: an absolute error allowed
    in every probability (a backend that clamps exp's argument at a floor F passes e^F);
    ``given_lse`` / ``given_entropy`` [N]: statistics handed to the backward from outside, exact
    inputs there
    (default: the backward uses the forward's, with their rounding); ``dg`` [N]: a bound on the
    error of the upstream gradient ``g`` itself (it moves the logit gradient by
    dg |[v = t] - p_v| / T); ``shard_sizes``: the vocabulary is split into contiguous shards
    of these sizes whose statistics are combined (vocabulary parallelism: per shard lse_r and
    H_r, then lse = log sum_r e^lse_r and H from sum_r P_r (H_r - a_r), a_r = lse_r - max lse_r)
    and whose dX partials are rounded to ``out_dtype`` before being summed; ``stored_logits``:
    the backward reads logits stored in this dtype as z - m (m: the max of the row over a tile
    of columns, kept in float32) instead of recomputing them; ``dw_roundings``: dW is summed
    across row chunks in ``out_dtype``, rounded that many more times (one per chunk past the
    first).

    Derivation (per row n, column v; first order in u):

    1. Logits. raw = x.W_v + b_v is a length-(H+1) dot product: |d raw| <= gamma(H+1) a_v with
       a_v = |x|.|W_v| + |b_v|. softcap has slope <= 1; its ops and the division by T round
       relative to their result (4u |z_v|), and tanh itself is within 4u absolute (a kernel
       may form it as 1 - 2 / (e^2y + 1), which cancels near 0), c 4u / T after scaling:
       dz_v <= gamma(H+1) a_v / T + 4u |z_v| (+ 4u c / T with softcap c), which bounds the
       target logit's error and, the max
       of perturbed values moving by at most the largest perturbation, the max logit's. The
       later subtraction of lse / max / mu rounds once more relative to its result, and so may
       exp's own argument scaling (exp2 of y log2 e): the shifted logits are within
       dz'_v = dz_v + 2u (|z_v - lse| + |z_v - mu|).
    2. lse = m + log sum_v exp(z_v - m), streamed: exp within 2 ulp (4u), V - 1 additions and at
       most V rescales of the running sum (exp and a product, 5u each): s is within
       gamma(6V + 4) relative, so dlse <= sum_v p_v dz'_v + gamma(6V + 4) + 2u |lse|;
       logp = z_t - lse adds
       dz_t and u |logp|. (A probability p_floor at most, per column, moves lse and mu by
       less than V p_floor (1 + |z - max z|): negligible next to these terms at e^-80.)
    3. mu = E_p[z] = sum_v p_v z_v; with dp_v = p_v (dz_v - dlse) and sum_v p_v dz_v = dlse,
       dmu <= sum_v p_v dz'_v (1 + |z_v - mu|) + gamma(6V + 4) sum_v p_v |z_v - max z|
       + 2u (|lse| + |H|) (the sum b = sum e^(z-m) (z-m), H = log s - b/s, mu = lse - H);
       the entropy, from the same logits, moves by sum_v p_v |z_v - mu| dz'_v at first order
       (plus the sums' rounding), and by at most dlse + dmu when combined over shards.
    4. Logit gradient G_v = (p_v (-g - e (z_v - mu)) + g [v = t]) / T, times the softcap slope
       f_v = 1 - tanh^2 (|d f_v| <= 2 |tanh| T dz_v / c + 3u): with exp's 4u and the four
       products / differences of the epilogue (4u),
       dG_v <= (p_v (e^(dz'_v + dlse + 8u) - 1) (|g| + |e| |z_v - mu|)
               + p_v |e| (dz'_v + dmu)) f_v / T
               + |G_v / f_v| |d f_v| + (u + dlogits_u) |G_v|.
       Stored logits (``stored_logits``, unit roundoff u_s): the backward's logit is
       fl_s(fl(z - m)) + m, rounded again in float32, with m = the tile's max, so
       0 <= m - z <= max z - z. fl(z - m) errs by u |z - max z|, its rounding to the stored
       dtype by u_s |z - max z| (or, below the normal range, half the subnormal spacing
       s_min u_s), the sum by u |z|: dz'_v += (u_s + u) |z_v - max z| + u |z_v| + s_min u_s
       in G only (the log-probs come from the forward's online sums, never from the store).
       A stored value below the dtype's range (-inf) gives p = 0 where p < e^-65504 anyway; a
       softcap backend clamps the stored logit to |z| <= c / T, which only moves it closer.
    5. dX = G @ W, dW = G.T @ x, db = sum_n G: the propagated part plus the GEMM's own rounding,
       |d dX| <= |dG| @ |W| + gamma(V) |G| @ |W| (likewise gamma(N) for dW and db), plus
       out_u (|exact| + that) + half the subnormal spacing per rounding to a narrower dtype.
       dW summed across chunks in ``out_dtype`` (``dw_roundings`` = k): each partial sum
       (rows of the first j chunks) is rounded once more when the next chunk adds to it; it is
       at most |G|.T @ |x| over all rows plus the propagated bound, so k roundings add
       k (out_u1 (|G|.T @ |x| + d dW) + half the subnormal spacing), out_u1 one rounding's u.
    """
    dlogits_u = 0.0 if dlogits_u is None else dlogits_u
    out_u = out_abs = 0.0
    if out_dtype is not None:
        fi = torch.finfo(out_dtype)
        out_u = out_roundings * fi.eps / 2
        out_abs = out_roundings * fi.smallest_normal * fi.eps / 2
    x = hidden.detach().cpu().double().reshape(-1, hidden.shape[-1])
    w = weight.detach().cpu().double()
    b = bias.detach().cpu().double() if bias is not None else None
    N, H = x.shape
    V = w.shape[0]
    T = float(temperature)
    raw = x @ w.T + (b if b is not None else 0.0)
    a = x.abs() @ w.abs().T + (b.abs() if b is not None else 0.0)
    if softcap is not None:
        tanh = torch.tanh(raw / softcap)
        z = softcap * tanh / T
        slope = 1 - tanh ** 2
    else:
        z = raw / T
    dz_logit = gamma(H + 1, u) * a / T + 4 * u * z.abs()
    if softcap is not None:
        dz_logit = dz_logit + 4 * u * softcap / T

    def stats(cols):
        """lse, p, mu and the bounds of lse and mu for the columns ``cols`` streamed together."""
        zs = z[:, cols]
        lse_s = torch.logsumexp(zs, 1)
        p_s = torch.exp(zs - lse_s[:, None])
        mu_s = (p_s * zs).sum(1)
        dz_s = dz_logit[:, cols] + 2 * u * ((zs - lse_s[:, None]).abs()
                                            + (zs - mu_s[:, None]).abs())
        g_s = gamma(6 * zs.shape[1] + 4, u)
        d_lse_s = (p_s * dz_s).sum(1) + g_s + 2 * u * lse_s.abs()
        d_mu_s = ((p_s * dz_s * (1 + (zs - mu_s[:, None]).abs())).sum(1)
                  + g_s * (p_s * (zs - zs.max(1, keepdim=True).values).abs()).sum(1)
                  + 2 * u * (lse_s.abs() + (lse_s - mu_s).abs()))
        return lse_s, p_s, mu_s, d_lse_s, d_mu_s

    lse, p, mu, d_lse, d_mu = stats(slice(None))
    ent = lse - mu
    # The forward computes lse and H from the same rounded logits: dH/dz_v = -p_v (z_v - mu), so
    # dH <= sum_v p_v |z_v - mu| dz'_v + the sums' rounding (s and b = sum e^(z-m) (z-m) within
    # gamma(6V + 4) relative) + the last ops (H = log s - b/s).
    g_red = gamma(6 * V + 4, u)
    d_ent = ((p * dz_logit * (z - mu[:, None]).abs()).sum(1)
             + 2 * u * (p * ((z - lse[:, None]).abs() + (z - mu[:, None]).abs())
                        * (z - mu[:, None]).abs()).sum(1)
             + g_red * (1 + (p * (z - z.max(1, keepdim=True).values).abs()).sum(1))
             + 2 * u * (lse.abs() + ent.abs() + 1))
    if shard_sizes is not None and len([n for n in shard_sizes if n]) > 1:
        assert sum(shard_sizes) == V, "shard_sizes must add up to V"
        starts = [sum(shard_sizes[:r]) for r in range(len(shard_sizes))]
        parts = [stats(slice(s0, s0 + n)) for s0, n in zip(starts, shard_sizes) if n]
        lse_r, mu_r, dl_r, dm_r = (torch.stack([q[i] for q in parts]) for i in (0, 2, 3, 4))
        big_p = torch.exp(lse_r - lse)                       # shard masses P_r
        a_r = lse_r - lse_r.max(0).values                    # the combine's exp arguments
        # the combine: a_r and exp (u |a_r| + 4u), lse_r's own rounding, R-term sums, log
        dl_r = dl_r + u * (a_r.abs() + 2 * lse_r.abs()) + 4 * u
        g_c = gamma(len(parts) + 6, u)
        d_lse = (big_p * dl_r).sum(0) + g_c + u * lse.abs()
        # mu = sum_r P_r mu_r with dP_r = P_r (dlse_r - dlse); H = log S + sum_r P_r (H_r - a_r)
        d_mu = ((big_p * (dm_r + (dl_r + d_lse) * (mu_r - mu).abs())).sum(0)
                + g_c * (big_p * (lse_r - mu_r - a_r).abs()).sum(0)
                + 2 * u * (lse.abs() + ent.abs()))
        d_ent = d_lse + d_mu               # combined from the shards: no such cancellation
    dz = dz_logit + 2 * u * ((z - lse[:, None]).abs() + (z - mu[:, None]).abs())
    if targets is None:
        targets = torch.full((N,), ignore_index, dtype=torch.long)
    t = targets.reshape(-1).cpu()
    active = t != ignore_index
    in_vocab = active & (t >= 0) & (t < V)
    t_safe = torch.where(in_vocab, t, torch.zeros_like(t))
    zero = torch.zeros(N, dtype=torch.float64)
    dz_t = dz.gather(1, t_safe[:, None]).squeeze(1)
    d_target = torch.where(in_vocab, dz_logit.gather(1, t_safe[:, None]).squeeze(1), zero)
    d_max = dz_logit.max(1).values
    logp = z.gather(1, t_safe[:, None]).squeeze(1) - lse
    d_logp = torch.where(in_vocab, dz_t + d_lse + u * logp.abs(), zero)
    d_ent = torch.where(active, d_ent, zero)

    gg = zero.clone() if g is None else g.detach().double().reshape(-1).cpu()
    ee = zero.clone() if e is None else e.detach().double().reshape(-1).cpu()
    if given_lse is not None:      # the backward's statistics, given: exact inputs there
        lse = given_lse.detach().double().reshape(-1).cpu()
        mu = lse - (zero if given_entropy is None
                    else given_entropy.detach().double().reshape(-1).cpu())
        p = torch.exp(z - lse[:, None])
        dz = dz_logit + 2 * u * ((z - lse[:, None]).abs() + (z - mu[:, None]).abs())
        d_lse = d_mu = zero
    if stored_logits is not None:      # the backward's logits read back from the store
        fs = torch.finfo(stored_logits)
        u_s = fs.eps / 2
        below_max = (z - z.max(1, keepdim=True).values).abs()
        dz = dz + (u_s + u) * below_max + u * z.abs() + fs.smallest_normal * u_s
    gg = torch.where(active, gg, zero)
    ee = torch.where(active, ee, zero)
    onehot = torch.zeros(N, V, dtype=torch.float64)
    onehot[in_vocab, t_safe[in_vocab]] = 1.0
    zc = z - mu[:, None]
    G0 = (p * (-gg[:, None] - ee[:, None] * zc) + gg[:, None] * onehot) / T   # before softcap
    # p = e^(z - lse) moves by p (e^(dz' + dlse + 8u) - 1) at most: not only to first order
    dG = (p * torch.expm1(dz + d_lse[:, None] + 8 * u)
          * (gg.abs()[:, None] + ee.abs()[:, None] * zc.abs())
          + p * ee.abs()[:, None] * (dz + d_mu[:, None])) / T
    if softcap is not None:
        d_slope = 2 * tanh.abs() * T * dz / softcap + 3 * u
        dG = dG * slope + G0.abs() * d_slope
        G = G0 * slope
    else:
        G = G0
    # A clamped exp gives a probability of up to p_floor where the exact one is smaller.
    dG = dG + p_floor * (1 + 8 * u) * (gg.abs()[:, None] + ee.abs()[:, None] * (zc.abs() + 1)) / T
    if dg is not None:
        dG = dG + (dg.detach().double().reshape(-1).cpu()[:, None]
                   * (onehot - p).abs() * (slope if softcap is not None else 1.0) / T)
    dG = dG * (1 + dlogits_u) + (u + dlogits_u) * G.abs()
    Ga = G.abs()
    d_hidden = dG @ w.abs() + gamma(V, u) * Ga @ w.abs()
    # Rounding the float32 result r to the output dtype moves it by out_u |r| at most, and
    # |r| <= |exact| + the bound so far.
    d_hidden = d_hidden + out_u * ((G @ w).abs() + d_hidden) + out_abs
    if shard_sizes is not None and len(shard_sizes) > 1:     # partials rounded, |partial| summed
        d_hidden = d_hidden + out_u / out_roundings * (Ga @ w.abs()) + len(shard_sizes) * out_abs
    d_weight = dG.T @ x.abs() + gamma(N, u) * Ga.T @ x.abs()
    d_weight = d_weight + out_u * ((G.T @ x).abs() + d_weight) + out_abs
    if dw_roundings:                   # partial dW sums rounded to out_dtype, |partial| summed
        d_weight = d_weight + dw_roundings * (out_u / out_roundings * (Ga.T @ x.abs() + d_weight)
                                               + out_abs / out_roundings)
    d_bias = None
    if b is not None:
        d_bias = dG.sum(0) + gamma(N, u) * Ga.sum(0)
        d_bias = d_bias + out_u * (G.sum(0).abs() + d_bias) + out_abs
    return RoundingBounds(d_max, d_target, d_lse, d_logp, d_ent, dG,
                          d_hidden.reshape(hidden.shape), d_weight, d_bias)


def assert_within(name: str, got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> float:
    """Elementwise |got - want| <= bound (float64); returns the largest error / bound ratio."""
    err = (got.detach().double().cpu() - want.detach().double().cpu()).abs()
    bound = bound.double().cpu().expand_as(err)
    ratio = torch.where(err > 0, err / bound, 0.0).max().item() if err.numel() else 0.0
    assert torch.all(err <= bound), (
        f"{name}: max error / rounding bound {ratio:.3g} (max error {err.max().item():.3g})")
    return ratio


def backend_rounding_bounds(backend, dtype, hidden, weight, bias, targets, g=None, e=None,
                            temperature=1.0, softcap=None, oracle_rounds_outputs=True,
                            **kw) -> RoundingBounds:
    """:func:`linear_softmax_rounding_bounds` for ``linear_logprobs`` on ``backend`` ("torch" or
    "triton") with inputs of ``dtype``, against a float64 oracle on the same inputs. Both backends
    accumulate in float32 (half inputs are exact in float32; tensor cores may truncate instead of
    rounding: 2u per addition on CUDA). The triton backend stores the logit gradient in the input
    dtype before its GEMMs; gradients are rounded to the leaves' dtype at the end, and with
    ``oracle_rounds_outputs`` so are the oracle's (two roundings). The torch backend clamps exp's
    argument at -80 and the kernels' exp underflows below e^-87: a probability may be off by
    e^-80. The float64 oracle's own rounding is 2^-29 of these bounds (first-order slack).
    Triton with 16-bit inputs: the stored logits' rounding (``stored_logits``) by default."""
    half = dtype in (torch.float16, torch.bfloat16)
    u = U32 * (2 if half and hidden.is_cuda else 1)
    p_floor = math.exp(-80.0)
    if dtype == torch.float64:         # the torch backend in float64 (floor e^-700)
        u, p_floor = unit_roundoff(torch.float64), math.exp(-700.0)
    # The CPU interpreter converts float32 to bfloat16 by truncation (_convert_float in
    # triton/runtime/interpreter.py, no rounding mode): within one ulp (2u) where a GPU rounds to
    # nearest (u). The kernels' 16-bit stores (the logit gradient, gradients written by a kernel)
    # count twice; a rounding done by torch (to nearest) is covered by the same bound.
    kernel_roundings = 2 if (dtype == torch.bfloat16 and backend == "triton"
                             and not hidden.is_cuda) else 1
    # The triton backend's stored-logits plans (stream, keep) read 16-bit inputs' logits back
    # from float16 (z - tile max): a non-negative term, so the bound covers its recompute plan
    # too, whichever plan the memory budget picks.
    if half and backend == "triton":
        kw.setdefault("stored_logits", torch.float16)
    return linear_softmax_rounding_bounds(
        hidden, weight, bias, targets, g, e, temperature, softcap, u=u,
        dlogits_u=kernel_roundings * unit_roundoff(dtype) if half and backend == "triton" else 0.0,
        out_dtype=dtype if half else None,
        out_roundings=kernel_roundings + (1 if oracle_rounds_outputs else 0),
        p_floor=p_floor, **kw)


# ---------------------------------------------------------------------------------------------
# Forward error propagation through any torch computation (a loss epilogue and its backward):
# run it in float64 under ErrorBounds, with bounds on the errors of some inputs (the log-probs'
# rounding bounds above); every op's output gets a bound on the error that the same op sequence
# would carry when run with unit roundoff u: the inputs' errors through the op's local |Jacobian|
# plus the op's own rounding (elementwise arithmetic u |y|; exp, log, sqrt, sigmoid, tanh ...
# within 2 ulp: 4u |y|; a sum of n terms gamma(n - 1) sum |terms| in any order; matmul likewise
# over its inner dimension). First order in u. Comparisons and branches are taken as in float64
# (no input sits on a tie). An op without a rule raises, so nothing is silently left out.
# ---------------------------------------------------------------------------------------------

def _key(t):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


_aten = torch.ops.aten
# Ops that move, select or rearrange values: the output's error is the same op on the errors.
_STRUCTURAL = {
    "view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "squeeze",
    "unsqueeze", "select", "slice", "index_select", "gather", "index", "cat", "stack", "clone",
    "_to_copy", "detach", "alias", "lift_fresh", "lift_fresh_copy", "contiguous", "split",
    "split_with_sizes", "narrow", "repeat", "flip", "copy", "unbind", "as_strided", "roll",
    "diagonal", "masked_select", "take_along_dim", "unfold", "chunk", "_reshape_alias",
    "squeeze_copy", "view_copy", "expand_copy", "slice_backward", "select_backward",
    "index_select_backward", "unsqueeze_copy", "index_put", "embedding",
}
# Ops that create values (constants, fills, signs of values not on a tie): exact.
_CREATION = {
    "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full",
    "new_empty", "new_empty_strided", "scalar_tensor", "zeros", "ones", "full", "empty",
    "empty_strided", "arange", "fill", "sign", "floor", "ceil", "round", "trunc", "zero",
}
_TRANSCENDENTAL = {"exp", "log", "log1p", "expm1", "sqrt", "rsqrt", "sigmoid", "tanh", "softplus",
                   "log_sigmoid_forward", "pow", "log2", "exp2", "reciprocal", "erf", "atan"}


class ErrorBounds(torch.utils._python_dispatch.TorchDispatchMode):
    """Records a first-order error bound for every floating-point tensor produced while active
    (see the comment above). ``set(t, err)`` gives an input its error bound (default 0: exact);
    ``get(t)`` returns the bound of any tensor computed under the mode."""

    def __init__(self, u: float = U32):
        super().__init__()
        self.u = u
        self.err = {}

    def set(self, t, err):
        self.err[_key(t)] = (t, torch.as_tensor(err, dtype=torch.float64).expand(t.shape).clone())

    def get(self, t):
        hit = self.err.get(_key(t))
        return hit[1] if hit is not None else torch.zeros(t.shape, dtype=torch.float64)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        with torch.utils._python_dispatch._disable_current_modes():
            outs = out if isinstance(out, (tuple, list)) else (out,)
            floats = [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]
            if floats:
                errs = self._rule(func, args, kwargs, out)
                errs = errs if isinstance(errs, (tuple, list)) else (errs,)
                for o, e in zip(outs, errs):
                    if isinstance(o, torch.Tensor) and o.is_floating_point() and e is not None:
                        self.err[_key(o)] = (o, e.double().expand(o.shape).clone())
        return out

    def _e(self, x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return self.get(x)
        return torch.zeros((), dtype=torch.float64)

    def _rule(self, func, args, kwargs, out):
        name = func.overloadpacket.__name__.rstrip("_")      # in-place variants alike
        u, e = self.u, self._e
        y = out if isinstance(out, torch.Tensor) else out[0]
        ay = y.detach().double().abs() if isinstance(y, torch.Tensor) else None
        a = args[0] if args else None
        b = args[1] if len(args) > 1 else None
        if name in ("add", "sub", "rsub"):
            alpha = abs(kwargs.get("alpha", args[2] if len(args) > 2 else 1))
            return e(a) + alpha * e(b) + u * ay
        if name == "mul":
            return (e(a) * (b.abs() if isinstance(b, torch.Tensor) else abs(b))
                    + (a.abs() if isinstance(a, torch.Tensor) else abs(a)) * e(b) + u * ay)
        if name == "div":
            bb = b.abs() if isinstance(b, torch.Tensor) else abs(b)
            return e(a) / bb + ay / bb * e(b) + u * ay
        if name in ("sum", "mean", "nansum"):
            dims = args[1] if len(args) > 1 and args[1] is not None else list(range(a.dim()))
            dims = [dims] if isinstance(dims, int) else list(dims)
            n = 1
            for d in dims:
                n *= a.shape[d]
            keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            red = (lambda t: t.sum(dims, keepdim=keep)) if name != "mean" else \
                (lambda t: t.mean(dims, keepdim=keep))
            return red(e(a).expand(a.shape)) + gamma(max(n - 1, 0) + (name == "mean"), u) * \
                red(a.detach().double().abs())
        if name in ("index_add", "scatter_add"):
            if name == "index_add":
                dim, index, src = args[1], args[2], args[3]
                alpha = abs(kwargs.get("alpha", args[4] if len(args) > 4 else 1))
                f = lambda s, t: s.index_add(dim, index, t, alpha=alpha)
            else:
                dim, index, src = args[1], args[2], args[3]
                alpha = 1
                f = lambda s, t: s.scatter_add(dim, index, t)
            n = src.numel()
            prop = f(e(a).expand(a.shape).clone(), e(src).expand(src.shape))
            return prop + gamma(n, u) * f(a.detach().double().abs(), src.detach().double().abs())
        if name == "scatter_reduce":
            dim, index, src, reduce = args[1], args[2], args[3], args[4]
            if reduce not in ("amax", "amin"):
                raise NotImplementedError(f"ErrorBounds: scatter_reduce {reduce}")
            return func(e(a).expand(a.shape).clone(), dim, index, e(src).expand(src.shape),
                        "amax", **{k: v for k, v in kwargs.items() if k == "include_self"})
        if name in ("mm", "matmul", "bmm", "mv", "dot"):
            k = a.shape[-1]
            aa, ab = a.detach().double().abs(), b.detach().double().abs()
            return (func(e(a).expand(a.shape), ab) + func(aa, e(b).expand(b.shape))
                    + gamma(k, u) * func(aa, ab))
        if name == "where":
            return torch.where(args[0], e(args[1]), e(args[2]))
        if name == "masked_fill":
            return e(a).expand(a.shape).masked_fill(args[1], 0.0)
        if name in ("amax", "amin", "max", "min") and len(args) >= 2 and \
                isinstance(b, torch.Tensor):                  # elementwise max / min
            return e(a) + e(b)
        if name in ("amax", "amin", "max", "min"):
            ea = e(a).expand(a.shape)
            if len(args) == 1:
                return ea.amax()
            dim = args[1]
            keep = args[2] if len(args) > 2 else False
            m = ea.amax(dim, keepdim=keep)
            return (m, None) if isinstance(out, (tuple, list)) else m
        if name in ("maximum", "minimum", "fmax", "fmin"):
            return e(a) + e(b)
        if name in ("std", "var"):                 # two-pass: relative gamma(n + 3), + sqrt
            dims = args[1] if len(args) > 1 and args[1] is not None else kwargs.get("dim")
            dims = list(range(a.dim())) if dims is None else ([dims] if isinstance(dims, int)
                                                               else list(dims))
            corr = kwargs.get("correction", 1)
            corr = 1 if corr is None else float(corr)
            keep = kwargs.get("keepdim", False)
            n = 1
            for d in dims:
                n *= a.shape[d]
            x = a.detach().double()
            dev = (x - x.mean(dims, keepdim=True)).abs()
            dvar = 2 * (dev * e(a)).sum(dims, keepdim=keep) / max(n - corr, 1)
            if name == "var":
                return dvar + gamma(n + 3, u) * ay
            d_std = torch.where(ay > 0, dvar / (2 * ay), dvar.sqrt())
            return d_std + (gamma(n + 3, u) + 4 * u) * ay
        if name == "constant_pad_nd":              # padding with a constant: exact
            return func(e(a).expand(a.shape), args[1], 0.0)
        if name == "pow" and (isinstance(b, torch.Tensor) or not isinstance(a, torch.Tensor)):
            # x^p with a tensor exponent (or a number base): d/dx = p x^(p-1), d/dp = y log x
            x = a.detach().double() if isinstance(a, torch.Tensor) else torch.tensor(float(a))
            q = b.detach().double() if isinstance(b, torch.Tensor) else torch.tensor(float(b))
            dx = torch.where(q == 0, 0.0, (q * x.abs() ** (q - 1)).abs())
            dq = torch.where(ay == 0, 0.0, ay * x.abs().log().abs())
            return dx * e(a) + dq * e(b) + 4 * u * ay
        if name in ("neg", "abs", "clamp", "clamp_min", "clamp_max", "relu", "nan_to_num"):
            return e(a).expand(a.shape)        # a clamp moves no value by more than its error
        if name in _CREATION or (name in _STRUCTURAL and name != "copy"
                                 and isinstance(a, torch.Tensor) and not a.is_floating_point()):
            return torch.zeros(y.shape, dtype=torch.float64)       # e.g. a mask made float
        if name == "copy" and not (isinstance(b, torch.Tensor) and b.is_floating_point()):
            return torch.zeros(y.shape, dtype=torch.float64)
        if name in _STRUCTURAL:
            return func(*[self._swap(x) for x in args], **kwargs)
        if name in _TRANSCENDENTAL:
            x = a.detach().double()
            ex = e(a)
            if name == "exp":
                d = ay
            elif name == "exp2":
                d = ay * math.log(2)
            elif name == "expm1":
                d = ay + 1
            elif name in ("log", "log2"):
                d = 1 / x.abs()
            elif name == "log1p":
                d = 1 / (1 + x).abs()
            elif name == "sqrt":
                d = torch.where(ay > 0, 0.5 / ay, torch.inf)
            elif name == "rsqrt":
                d = 0.5 * ay / x.abs()
            elif name == "reciprocal":
                d = ay * ay
            elif name == "sigmoid":
                d = ay * (1 - ay)
            elif name == "tanh":
                d = 1 - ay * ay
            elif name in ("softplus", "log_sigmoid_forward"):
                d = torch.sigmoid(x if name == "softplus" else -x)
            elif name == "pow":
                if isinstance(b, torch.Tensor):
                    raise NotImplementedError("ErrorBounds: pow with a tensor exponent")
                d = abs(b) * x.abs() ** (b - 1) if b != 0 else torch.zeros_like(x)
                if b in (1, 2):
                    return d * ex + u * ay
            elif name == "erf":
                d = 2 / math.sqrt(math.pi) * torch.exp(-x * x)
            else:
                d = 1 / (1 + x * x)
            r = d * ex + 4 * u * ay
            if name == "log_sigmoid_forward":
                return (r, torch.zeros_like(out[1], dtype=torch.float64))
            return r
        if name == "sigmoid_backward":              # grad * y * (1 - y)
            g_, s_ = a.detach().double(), b.detach().double()
            return ((s_ * (1 - s_)).abs() * e(a) + (g_ * (1 - 2 * s_)).abs() * e(b)
                    + 3 * u * ay + u * (g_ * s_).abs())
        if name == "tanh_backward":                 # grad * (1 - y^2)
            g_, t_ = a.detach().double(), b.detach().double()
            return ((1 - t_ * t_).abs() * e(a) + 2 * (g_ * t_).abs() * e(b) + 3 * u * ay
                    + u * g_.abs())
        if name == "log_sigmoid_backward":          # grad * sigmoid(-x)
            g_, x_ = a.detach().double(), b.detach().double()
            s_ = torch.sigmoid(-x_)
            return s_ * e(a) + (g_ * s_ * (1 - s_)).abs() * e(b) + 5 * u * ay
        if name in ("eq", "ne", "gt", "lt", "ge", "le", "isnan", "isinf", "isfinite",
                    "logical_and", "logical_or", "logical_not", "any", "all", "argmax", "argmin",
                    "nonzero", "count_nonzero"):
            return None
        raise NotImplementedError(f"ErrorBounds: no rule for {func}")

    def _swap(self, x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return self.get(x)
        if isinstance(x, (list, tuple)):
            return type(x)(self._swap(y) for y in x)
        return x


class LossBounds(NamedTuple):
    """Bounds on |float32 result - exact| for a loss on log-probs: the loss, its float metrics
    (a dict), and the gradients (RoundingBounds: d_hidden, d_weight, d_bias)."""
    loss: torch.Tensor
    metrics: dict
    grads: RoundingBounds


def loss_rounding_bounds(loss_of_logp, backend, dtype, hidden, weight, bias, targets,
                         temperature=1.0, softcap=None, **grad_kw) -> LossBounds:
    """Rounding bounds for ``loss, metrics = loss_of_logp(linear_logprobs(hidden, weight, ...))``
    computed in float32 on ``backend``: the log-probs' bounds (backend_rounding_bounds) are the
    input errors of the loss epilogue, which ErrorBounds follows through the loss, its metrics
    and its gradient g w.r.t. the log-probs; g's error then enters the backward of the op (the
    ``dg`` of linear_softmax_rounding_bounds). ``loss_of_logp`` gets exact float64 log-probs and
    must build its other float inputs in float64 (exact copies of the float32 ones). A fused
    implementation of the same formulas (any summation order) is covered alike. ``grad_kw``
    (``stored_logits``, ``dw_roundings``): how the backward differs, for the gradients' bound."""
    from gift_fast import linear_logprobs
    h, w = hidden.detach().double(), weight.detach().double()
    b = bias.detach().double() if bias is not None else None
    lp = linear_logprobs(h, w, targets, b, temperature=temperature, softcap=softcap,
                         backend="reference", reference_dtype=torch.float64).detach()
    lp.requires_grad_()
    base = backend_rounding_bounds(backend, dtype, hidden, weight, bias, targets,
                                   temperature=temperature, softcap=softcap)
    with ErrorBounds(U32) as eb:
        eb.set(lp, base.logp.reshape(lp.shape))
        loss, metrics = loss_of_logp(lp)
        g, = torch.autograd.grad(loss, lp)
    d_loss = eb.get(loss)
    d_metrics = {k: eb.get(v) for k, v in metrics.items()
                 if isinstance(v, torch.Tensor) and v.is_floating_point()}
    grads = backend_rounding_bounds(backend, dtype, hidden, weight, bias, targets,
                                    g.detach().reshape(-1), temperature=temperature,
                                    softcap=softcap, dg=eb.get(g).reshape(-1),
                                    oracle_rounds_outputs=False, **grad_kw)
    return LossBounds(d_loss, d_metrics, grads)


def front_end_rounding_bounds(front, backend, dtype, hidden, weight, bias, targets,
                              shard_sizes=None, oracle_rounds_outputs=False,
                              input_errors=()) -> LossBounds:
    """loss_rounding_bounds for a loss front-end ``front(hidden, weight, bias, backend=...)``
    (gift_fast.losses): its policy log-probs (``common.policy_logps``, the one entry point of
    every front-end) are replaced by exact float64 ones carrying the backend's rounding bounds (with
    the temperature and softcap the front-end asks for), and the rest of the front-end runs in
    float64 under ErrorBounds. ``shard_sizes``: the log-probs come from a vocabulary-parallel
    lm_head with these shards; ``oracle_rounds_outputs``: as in backend_rounding_bounds;
    ``input_errors``: (tensor, bound) pairs for other inputs of the front-end that carry errors."""
    import gift_fast.losses.common as losses
    from gift_fast import linear_logprobs
    h, w = hidden.detach().double(), weight.detach().double()
    b = bias.detach().double() if bias is not None else None
    seen = {}

    def exact_logps(hh, ww, tt, bb, temperature, ignore_index, be, softcap=None,
                    vocab_parallel_group=None):
        with torch.utils._python_dispatch._disable_current_modes():
            lp = linear_logprobs(h, w, tt, b, temperature=temperature, softcap=softcap,
                                 ignore_index=ignore_index, backend="reference",
                                 reference_dtype=torch.float64).detach().requires_grad_()
            base = backend_rounding_bounds(backend, dtype, hidden, weight, bias, tt,
                                           temperature=temperature, softcap=softcap,
                                           ignore_index=ignore_index, shard_sizes=shard_sizes)
            eb.set(lp, base.logp.reshape(lp.shape))
        seen.update(lp=lp, targets=tt, kw=dict(temperature=temperature, softcap=softcap,
                                                ignore_index=ignore_index))
        return lp

    saved = losses.policy_logps
    losses.policy_logps = exact_logps
    try:
        with ErrorBounds(U32) as eb:
            for t, err in input_errors:
                eb.set(t, err)
            loss, metrics = front(h, w, b, backend="torch")
            g, = torch.autograd.grad(loss, seen["lp"])
    finally:
        losses.policy_logps = saved
    d_metrics = {k: eb.get(v) for k, v in metrics.items()
                 if isinstance(v, torch.Tensor) and v.is_floating_point()}
    grads = backend_rounding_bounds(backend, dtype, hidden, weight, bias, seen["targets"],
                                    g.detach().reshape(-1), dg=eb.get(g).reshape(-1),
                                    shard_sizes=shard_sizes,
                                    oracle_rounds_outputs=oracle_rounds_outputs, **seen["kw"])
    return LossBounds(eb.get(loss), d_metrics, grads)


def rounding_bound(fn, input_errors=(), u: float = U32):
    """(value, bound): ``fn()`` computes a tensor in float64 from exact inputs (``input_errors``:
    (tensor, bound) pairs for inputs that carry errors); the bound is that of the same
    computation with unit roundoff ``u`` (ErrorBounds)."""
    with ErrorBounds(u) as eb:
        for t, err in input_errors:
            eb.set(t, err)
        out = fn()
    return out, eb.get(out)


# Tensor methods (and torch functions) that copy a device value to the host: on a GPU each one is
# a device sync, and inside torch.compile each one is a graph break or a data-dependent shape.
# item / bool / int / float all read one scalar; nonzero and tolist read the whole tensor.
_SYNC_METHODS = ("item", "__bool__", "__int__", "__float__", "nonzero", "tolist")


@contextlib.contextmanager
def count_host_syncs():
    """Counts host reads of tensor values while active: yields a ``collections.Counter`` keyed by
    method name (``"item"``, ``"__bool__"``, ``"__int__"``, ``"__float__"``, ``"nonzero"``,
    ``"tolist"``, and ``"torch.nonzero"`` for the function form).

    A Python-level spy: it sees calls made from Python (library code, and the eager body of a
    custom op called from a compiled graph), not reads done inside C++ kernels (e.g. the nonzero
    of boolean-mask indexing). Compile outside the block (dynamo tracing calls these methods on
    fake tensors), run the compiled step inside it.
    """
    counts = collections.Counter()
    saved = {}

    def spy(name, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)
        return wrapper

    try:
        for name in _SYNC_METHODS:
            saved[(torch.Tensor, name)] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, spy(name, saved[(torch.Tensor, name)]))
        saved[(torch, "nonzero")] = torch.nonzero
        torch.nonzero = spy("torch.nonzero", torch.nonzero)
        yield counts
    finally:
        for (owner, name), original in saved.items():
            setattr(owner, name, original)
