"""Triton backend: the protocol's :func:`stats` and :func:`grad` (:mod:`.protocol`) on the
kernels in ``gift_fast.kernels``, the plain GEMMs in cuBLAS (:mod:`.blas`).

Forward: one streaming kernel gives per-row lse (and entropy); no logits are kept.

Backward (the recompute plan of :mod:`.plan`): rows whose upstream gradient is zero are dropped
first (one host sync). The rest go through one of two loop orders, chosen per call by
:func:`plan_backward` within the memory budget (``plan.memory_budget``), widest blocks first:

- ``"vocab"`` (vocabulary outer): for each block of ``step`` vocabulary columns, recompute
  D = dlogits[:, block] for all live rows (Triton), write dW[block] = D.T @ X once, straight in
  the weight dtype (cuBLAS sums all rows in float32 before rounding once), and add D @ W[block]
  into a float32 [rows, H] dX sum (cuBLAS, ``out_dtype=float32`` for 16-bit inputs).
- ``"rows"`` (rows outer): for each chunk of ``step`` rows, recompute D = dlogits[chunk, :],
  write dX[chunk] = D @ W, and add D.T @ X into a float32 [V, H] dW sum (16-bit weights; a
  float32 weight takes the sum in its gradient).

Both orders run in a fixed order without atomics and accumulate in float32; cuBLAS is
deterministic for a fixed shape on a given GPU, so the gradients are reproducible run to run.
"""
from __future__ import annotations

import math
import os

import torch

from ..kernels import dlogits, dlogits_from_logits, dot_precision, logprob_forward_stats
from . import plan as planner
from .blas import mm_into
from .protocol import Grads, RowStats

# "auto" lets the planner pick; "rows" / "vocab" force one order (tests, benchmarks).
BACKWARD_ORDER = os.environ.get("GIFT_FAST_BWD_ORDER", "auto")
BACKWARD_ORDERS = planner.RECOMPUTE_ORDERS


def plan_backward(n_rows: int, n_live: int, vocab: int, hidden: int, element_size: int,
                  need_dx: bool = True, need_dw: bool = True, need_db: bool = False,
                  order: str | None = None, budget: int | None = None) -> planner.Plan:
    """The loop order and step of the backward for these sizes (``order`` defaults to
    ``BACKWARD_ORDER``, ``budget`` to the process default of :func:`plan.memory_budget`).
    Pure arithmetic: the cost model calls it too. Raises ``plan.BudgetTooSmall``."""
    order = BACKWARD_ORDER if order is None else order
    return planner.plan_recompute(n_rows, n_live, vocab, hidden, element_size, need_dx, need_dw,
                                  need_db, planner.memory_budget(None, budget), order)


def _check_dtype(hidden: torch.Tensor) -> None:
    if hidden.dtype == torch.float64:
        raise TypeError("hidden: backend='triton' takes float32, float16 or bfloat16; "
                        "use backend='torch' or 'reference' for float64")


def stats(hidden, weight, bias, local_targets, temperature, softcap, want_entropy,
          want_argmax=True) -> RowStats:
    """The protocol's statistics (:mod:`.protocol`), float32; a target of -1 matches no column,
    so the kernel never indexes with it."""
    _check_dtype(hidden)
    max_logit = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    lse, target_logit, entropy, argmax = logprob_forward_stats(
        hidden, weight, bias, local_targets, temperature, softcap, want_entropy,
        row_max=max_logit)
    return RowStats(lse, target_logit, entropy, argmax if want_argmax else None, max_logit)


def dlogits_vocab_slice(x, weight, bias, y, g, e, lse, ent, v0: int, v1: int, temperature,
                        softcap, out, precision):
    """Fills ``out`` [C, v1 - v0] with D[:, v0:v1], the gradient w.r.t. the raw logits of
    vocabulary columns v0..v1-1, for the rows of ``x`` [C, H].

    ``lse`` (and ``ent``) are the rows' statistics over the whole vocabulary, so the slice's
    softmax is exact. Targets are shifted by v0: one outside the slice (or -1) matches no column.
    """
    dlogits(x, weight[v0:v1], bias[v0:v1] if bias is not None else None, y - v0, g, e, lse, ent,
            temperature, softcap, out, precision)
    return out


def _rows_outer(hidden, rows, weight, bias, y, g, e, lse, ent, temperature, softcap, precision,
                step, d_hidden, dw_sum, db32):
    """Chunks of ``step`` live rows (``rows``: their ids, None when all are live): D [step, V];
    dX rows written once, dW (float32 or the weight's own float32 gradient) and db summed."""
    n = hidden.shape[0] if rows is None else rows.numel()
    V = weight.shape[0]
    buffer = torch.empty((min(step, n), V), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        idx = rows[start:stop] if rows is not None else None
        x = hidden[start:stop] if idx is None else hidden[idx]     # a copy of the chunk's rows
        d = buffer[:stop - start]
        dlogits_vocab_slice(x, weight, bias, y[start:stop], g[start:stop],
                            e[start:stop] if e is not None else None, lse[start:stop],
                            ent[start:stop] if e is not None else None, 0, V, temperature,
                            softcap, d, precision)
        if d_hidden is not None:
            if idx is None:
                mm_into(d_hidden[start:stop], d, weight)
            else:
                d_hidden.index_copy_(0, idx, mm_into(torch.empty_like(x), d, weight))
        if dw_sum is not None:
            mm_into(dw_sum, d.T, x, accumulate=start > 0)
        if db32 is not None:
            db32 += d.sum(0, dtype=torch.float32)


def _vocab_outer(x, weight, bias, y, g, e, lse, ent, temperature, softcap, precision, step,
                 dx, dw_out, db_out):
    """Blocks of ``step`` columns: D [rows, step]; dW/db rows written once in the weight dtype
    (one GEMM over all rows, float32 inside cuBLAS); dX summed over blocks in float32 ``dx``."""
    n = x.shape[0]
    V = weight.shape[0]
    buffer = torch.empty((n, min(step, V)), dtype=x.dtype, device=x.device)
    for v0 in range(0, V, step):
        v1 = min(V, v0 + step)
        d = buffer[:, :v1 - v0]
        dlogits_vocab_slice(x, weight, bias, y, g, e, lse, ent, v0, v1, temperature, softcap, d,
                            precision)
        if dw_out is not None:
            mm_into(dw_out[v0:v1], d.T, x)
        if dx is not None:
            mm_into(dx, d, weight[v0:v1], accumulate=v0 > 0)
        if db_out is not None:
            db_out[v0:v1] = d.sum(0, dtype=torch.float32)


def _dead_rows_as_zero_rows(hidden, bias, vocab, lse, entropy, live, temperature, softcap):
    """Without compaction every row goes through the kernels; a dead row (g = e = 0) adds
    exactly 0 only if its dlogits are finite, so it is replaced by a zero hidden state with that
    state's exact lse (whatever its own values were, NaN included). Costs one [N, H] copy, as the
    compaction's copy of the live rows does."""
    hidden = torch.where(live[:, None], hidden, 0.0)
    if bias is None:                          # V logits equal to 0
        lse0 = torch.full((), math.log(vocab), dtype=lse.dtype, device=lse.device)
    else:
        zb = bias.float()
        if softcap is not None:
            zb = torch.tanh(zb / softcap) * softcap
        lse0 = torch.logsumexp(zb / temperature, 0)
    lse = torch.where(live, lse, lse0)
    entropy = None if entropy is None else torch.where(live, entropy, 0.0)
    return hidden, lse, entropy


def grad(hidden, weight, bias, local_targets, lse, entropy, g, e, temperature, softcap,
         need_dx: bool, need_dw: bool, need_db: bool, order: str | None = None,
         compact: bool = True, budget: int | None = None) -> Grads:
    """The protocol's gradients (:mod:`.protocol`): of sum_n g_n logp_n + e_n H_n w.r.t. hidden,
    weight, bias (None where not needed).

    ``g``/``e`` are float32 per-row upstream gradients, already 0 at inactive rows; ``e`` may be
    None. Rows with g = e = 0 cost nothing: they are dropped before any GEMM (one host sync).
    ``order`` overrides ``BACKWARD_ORDER`` ("auto", "rows" or "vocab"); ``budget`` the memory
    budget of :mod:`.plan` (bytes; default: its process default). ``compact=False`` runs
    every row instead, with no host read (see :func:`_dead_rows_as_zero_rows`).
    """
    y = local_targets
    live = g != 0 if e is None else (g != 0) | (e != 0)
    N, H = hidden.shape
    V = weight.shape[0]
    if compact:
        rows = torch.nonzero(live).squeeze(1)
        n_live = rows.numel()
    else:
        rows, n_live = None, N
        hidden, lse, entropy = _dead_rows_as_zero_rows(hidden, bias, V, lse, entropy, live,
                                                       temperature, softcap)
    dtype, dev = hidden.dtype, hidden.device
    if n_live == 0 or not (need_dx or need_dw or need_db):
        return Grads(torch.zeros_like(hidden) if need_dx else None,
                     torch.zeros(weight.shape, dtype=weight.dtype, device=dev) if need_dw else None,
                     torch.zeros_like(bias) if need_db else None)
    plan = plan_backward(N, n_live, V, H, hidden.element_size(), need_dx, need_dw, need_db,
                         order=order, budget=planner.memory_budget(dev, budget))
    precision = dot_precision(dtype)
    partial = n_live < N
    if partial:        # the live rows' per-row vectors, compacted
        y, g, lse = y[rows], g[rows], lse[rows]
        if e is not None:
            e, entropy = e[rows], entropy[rows]
    ent = entropy if e is not None else None
    args = (weight, bias, y, g, e, lse, ent, temperature, softcap, precision, plan.step)

    if plan.order == "vocab":
        d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=dev) if need_dw else None
        d_bias = torch.empty_like(bias) if need_db else None
        dx = None
        if need_dx:
            if partial or dtype != torch.float32:
                dx = torch.empty((n_live, H), dtype=torch.float32, device=dev)
            else:                               # float32, every row live: the gradient itself
                dx = torch.empty_like(hidden)
        x = hidden[rows] if partial else hidden          # contiguous copy of the live rows
        _vocab_outer(x, *args, dx, d_weight, d_bias)
        del x
        d_hidden = None
        if need_dx:
            if partial:
                d_hidden = torch.zeros_like(hidden)
                d_hidden.index_copy_(0, rows, dx.to(dtype))
            else:
                d_hidden = dx.to(dtype)
    else:
        d_hidden = torch.zeros_like(hidden) if need_dx else None
        # A float32 weight sums dW in its own gradient; a 16-bit one in a float32 scratch.
        dw_sum = (torch.empty(weight.shape, dtype=torch.float32, device=dev) if need_dw
                  else None)
        db32 = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None
        _rows_outer(hidden, rows if partial else None, *args, d_hidden, dw_sum, db32)
        d_weight = dw_sum.to(weight.dtype) if need_dw else None
        d_bias = db32.to(bias.dtype) if need_db else None
    return Grads(d_hidden, d_weight, d_bias)


# -- the stream plan of token-local losses (``token_local``) ----------------------------------
# float32 inputs store float32 logits and form D over them. 16-bit inputs store float16 z - m_t
# with the float32 tile maxima m_t (``kernels/logprob_forward.py``) and write D over them in the
# input dtype: one [rows, W] buffer of the input dtype holds a row's V values in its first
# columns and its shifts, as float32, in the last ones (see ``_layout``); the
# [rows, V] view the op passes around keeps its shifts with it when sliced by rows.

def stream_dtypes(dtype: torch.dtype):
    """(per-row sums, GEMM operands): float32; D and the cuBLAS GEMMs in the input dtype."""
    return torch.float32, dtype


def _shift_cols(dtype, where) -> int:
    """Columns per stored shift on the target of ``where`` (a tensor, or a kernels Target)."""
    from ..kernels.configs import shift_columns
    from ..kernels.target import launch_target
    return shift_columns(dtype, launch_target(where) if isinstance(where, torch.Tensor)
                         else where)


def _layout(vocab: int, dtype, where):
    """(columns of the values, of a row's shifts in the input dtype, shift columns)."""
    cols = _shift_cols(dtype, where)
    # Both parts padded to 16 elements: row starts and the shifts 32-byte aligned, and a row
    # stride Triton specialises as divisible by 16 (vector stores).
    return -(-vocab // 16) * 16, -(-2 * -(-vocab // cols) // 16) * 16, cols


def stores_logits(x, weight, bias, softcap) -> bool:
    """Whether the stored-logits plans (stream, keep) may run on these inputs: not where the
    forward's logits store does not compile cleanly (``kernels.configs.store_supported``)."""
    from ..kernels.configs import store_supported
    from ..kernels.target import aligned16, launch_target
    return store_supported(x.dtype, launch_target(x),
                           aligned16(x, weight, *x.stride(), *weight.stride()),
                           bias is not None, softcap is not None)


def stream_store(vocab: int, hidden: int, dtype, device=None, target=None) -> planner.LogitStore:
    """The planner's :class:`plan.LogitStore` of :func:`stream_buffer` on ``device`` (or for
    ``target``, a ``kernels.target`` Target: the cost model's GPU), its padding included."""
    if dtype == torch.float32:
        return planner.FLOAT32_LOGITS
    where = target if target is not None else torch.empty(0, device=device)
    return planner.LogitStore(2, _shift_cols(dtype, where), 16)


def stream_buffer(rows: int, vocab: int, dtype, device) -> torch.Tensor:
    """The [rows, V] stored-logits buffer of a chunk (see above)."""
    if dtype == torch.float32:
        return torch.empty((rows, vocab), dtype=torch.float32, device=device)
    buf = torch.empty((rows, 0), dtype=dtype, device=device)
    values, shifts, _ = _layout(vocab, dtype, buf)
    return torch.empty((rows, values + shifts), dtype=dtype, device=device)[:, :vocab]


def _shift_of(z: torch.Tensor) -> torch.Tensor:
    """The float32 shifts [rows, cdiv(V, cols)] stored after the values of :func:`stream_buffer`."""
    values, shifts, cols = _layout(z.shape[1], z.dtype, z)
    full = z.as_strided((z.shape[0], values + shifts), z.stride(), z.storage_offset())
    return full[:, values:values + 2 * -(-z.shape[1] // cols)].view(torch.float32)


def stream_fixed_bytes(n_rows: int, vocab: int, hidden: int, dtype, need_dw: bool) -> int:
    """Scratch of the stream beyond the planner's buffers: none."""
    return 0


def recompute_minimum(n_rows, vocab, hidden, dtype, need_dw, softcap):
    """None: the planner's own model of :func:`grad` (``plan.recompute_extra_bytes``) applies."""
    return None


def stream_logits(x, weight, bias, y, temperature, softcap, z):
    """Writes the logits of the rows of ``x`` into ``z`` (a :func:`stream_buffer`); returns
    (lse, target_logit)."""
    _check_dtype(x)
    if z.dtype == torch.float32:
        lse, target_logit, _, _ = logprob_forward_stats(x, weight, bias, y, temperature, softcap,
                                                        False, logits_out=z)
    else:
        lse, target_logit, _, _ = logprob_forward_stats(
            x, weight, bias, y, temperature, softcap, False, logits_out=z.view(torch.float16),
            logits_shift=_shift_of(z))
    return lse, target_logit


def stream_dlogits(z, y, g, lse, temperature, softcap, out):
    """D of the rows whose logits :func:`stream_logits` wrote into ``z``, into ``out`` (``z``
    itself: in place); None: no per-row factor (``token_local.grads_from_logits``)."""
    if z.dtype == torch.float32:
        dlogits_from_logits(z, y, g, lse, temperature, softcap, out)
    else:
        dlogits_from_logits(z.view(torch.float16), y, g, lse, temperature, softcap, out,
                            shift=_shift_of(z), shift_cols=_shift_cols(z.dtype, z))
    return None
