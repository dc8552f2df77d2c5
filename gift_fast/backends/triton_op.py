"""Triton backend: the protocol's :func:`stats` and :func:`grad` (:mod:`.protocol`) on the
kernels in ``gift_fast.kernels``.

Forward: one streaming kernel gives per-row lse (and entropy); no logits are kept.

Backward: rows whose upstream gradient is zero are dropped first (one host sync). The rest go
through one of two loop orders, chosen per call by :func:`plan_backward` as the one that needs
less scratch memory beyond the gradients themselves (``bench/model.py`` shows why it matters):

- ``"vocab"`` (vocabulary outer): for each block of ``step`` vocabulary columns, recompute
  D = dlogits[:, block] for all live rows, write dW[block] = D.T @ X once, straight in the weight
  dtype (float32 accumulation over all rows stays in registers), and add D @ W[block] into a
  float32 [rows, H] dX accumulator. Scratch: the [rows, step] buffer + the dX accumulator; for
  16-bit dtypes with every row live the accumulator is split (``kernels/gemm.py``): its high half
  lives in the storage of dX itself, so only its int16 low half (2 bytes/element) is scratch.
- ``"rows"`` (rows outer): for each chunk of ``step`` rows, recompute D = dlogits[chunk, :],
  write dX[chunk] = D @ W, and add D.T @ X into a float32 [V, H] dW accumulator. Scratch: the
  [step, V] buffer + the dW accumulator (V x H x 4 bytes), which is read and rewritten once per
  chunk. Smaller only when the live rows outnumber the vocabulary (or dW is not needed).

Both orders run in a fixed order without atomics (deterministic) and accumulate in float32. The
dlogits buffer is bounded by ``BACKWARD_CHUNK_BYTES`` in either order, never [N, V].
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..kernels import dlogits, dot_precision, logprob_forward_stats, matmul
from .protocol import Grads, RowStats

# Budget of the one dlogits buffer of the backward, whatever N and V are.
# 32 MiB keeps the whole backward scratch within 2*N*H bytes + 64 MiB at N=8192, H=4096 (bf16)
# while the vocabulary blocks stay 2048 columns wide, GEMM-sized (bench/model.py).
BACKWARD_CHUNK_BYTES = int(os.environ.get("GIFT_FAST_BWD_CHUNK_BYTES", 32 << 20))
# "auto" picks the order with less scratch memory; "rows" / "vocab" force one (tests, benchmarks).
BACKWARD_ORDER = os.environ.get("GIFT_FAST_BWD_ORDER", "auto")
BACKWARD_ORDERS = ("auto", "rows", "vocab")
_ALIGN = 128      # multiples of 128 rows / columns keep the GEMM tiles full


def _budget_steps(budget: int, other_dim: int, element_size: int, limit: int) -> int:
    """How many rows (or columns) of a [step, other_dim] buffer fit in ``budget`` bytes."""
    step = budget // max(1, other_dim * element_size)
    # Tiny budgets (tests) may go below one tile; the budget is never exceeded except at 1.
    step = step // _ALIGN * _ALIGN if step >= _ALIGN else max(1, step)
    return max(1, min(step, limit))


def backward_chunk_rows(vocab: int, element_size: int, n_rows: int,
                        budget: int | None = None) -> int:
    """Rows per chunk of the rows-outer order: a [rows, V] buffer within the budget."""
    budget = BACKWARD_CHUNK_BYTES if budget is None else budget
    return _budget_steps(budget, vocab, element_size, n_rows)


def backward_block_cols(n_rows: int, element_size: int, vocab: int,
                        budget: int | None = None) -> int:
    """Vocabulary columns per block of the vocab-outer order: a [rows, cols] buffer within the
    budget."""
    budget = BACKWARD_CHUNK_BYTES if budget is None else budget
    return _budget_steps(budget, n_rows, element_size, vocab)


@dataclass(frozen=True)
class BackwardPlan:
    order: str          # "rows" or "vocab"
    step: int           # rows per chunk ("rows") or vocabulary columns per block ("vocab")
    extra_bytes: int    # peak scratch beyond the gradients themselves (model of this code)


def _split_dx(n_rows: int, n_live: int, element_size: int) -> bool:
    """The vocab order keeps a 16-bit dX's float32 sum split: high half in dX, low half int16."""
    return element_size == 2 and n_live == n_rows


def backward_extra_bytes(order: str, step: int, n_rows: int, n_live: int, vocab: int, hidden: int,
                         element_size: int, need_dx: bool, need_dw: bool, need_db: bool) -> int:
    """Peak bytes the backward allocates besides dX, dW, db themselves, for this code's buffers."""
    e = element_size
    per_row = n_live * 32                                  # row ids, gathered y / g / e / lse
    partial = n_live < n_rows
    if order == "rows":
        loop = step * vocab * e + (step * hidden * e if partial else 0)      # D, gathered x
        loop += step * hidden * e if (need_dx and partial) else 0           # dX of the chunk
        loop += vocab * hidden * 4 if need_dw else 0                         # float32 dW
        loop += vocab * 4 if need_db else 0                                  # float32 db
        return per_row + loop
    if order != "vocab":
        raise ValueError(f"order: expected 'rows' or 'vocab', got {order!r}")
    gathered = n_live * hidden * e if partial else 0
    acc = 0
    if need_dx and _split_dx(n_rows, n_live, e):
        acc = n_live * hidden * 2                                        # int16 low half
    elif need_dx and (partial or e != 4):
        acc = n_live * hidden * 4                                        # float32 dX
    loop = n_live * step * e + gathered + acc
    finish = acc + (n_live * hidden * e if need_dx and partial and e != 4 else 0)
    if need_dx and _split_dx(n_rows, n_live, e):
        finish = 0
    return per_row + max(loop, finish)


def plan_backward(n_rows: int, n_live: int, vocab: int, hidden: int, element_size: int,
                  need_dx: bool = True, need_dw: bool = True, need_db: bool = False,
                  order: str | None = None, budget: int | None = None) -> BackwardPlan:
    """The loop order and step of the backward for these sizes (``order``/``budget`` default to
    ``BACKWARD_ORDER``/``BACKWARD_CHUNK_BYTES``). Pure arithmetic: the cost model calls it too."""
    order = BACKWARD_ORDER if order is None else order
    if order not in BACKWARD_ORDERS:
        raise ValueError(f"order: expected one of {list(BACKWARD_ORDERS)}, got {order!r}")
    live = max(1, n_live)
    plans = []
    for o in (("vocab", "rows") if order == "auto" else (order,)):
        step = (backward_block_cols(live, element_size, vocab, budget) if o == "vocab"
                else backward_chunk_rows(vocab, element_size, live, budget))
        plans.append(BackwardPlan(o, step, backward_extra_bytes(
            o, step, n_rows, n_live, vocab, hidden, element_size, need_dx, need_dw, need_db)))
    return min(plans, key=lambda p: p.extra_bytes)      # ties: the vocab order (listed first)


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
                step, d_hidden, dw32, db32):
    """Chunks of ``step`` live rows (``rows``: their ids, None when all are live): D [step, V];
    dX rows written once, dW/db added in float32."""
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
                matmul(d, weight, d_hidden[start:stop], accumulate=False, dot_precision=precision)
            else:
                dx = torch.empty_like(x)
                d_hidden.index_copy_(0, idx, matmul(d, weight, dx, accumulate=False,
                                                    dot_precision=precision))
        if dw32 is not None:
            matmul(d.T, x, dw32, accumulate=True, dot_precision=precision)
        if db32 is not None:
            db32 += d.sum(0, dtype=torch.float32)


def _vocab_outer(x, weight, bias, y, g, e, lse, ent, temperature, softcap, precision, step,
                 dx, dx_lo, dw_out, db_out):
    """Blocks of ``step`` columns: D [rows, step]; dW/db rows written once in the weight dtype
    (K = all rows, float32 in registers); dX summed over blocks in float32: in ``dx`` (float32),
    or split between ``dx`` (bfloat16 high half, rounded at the last block) and ``dx_lo``."""
    n = x.shape[0]
    V = weight.shape[0]
    buffer = torch.empty((n, min(step, V)), dtype=x.dtype, device=x.device)
    for v0 in range(0, V, step):
        v1 = min(V, v0 + step)
        d = buffer[:, :v1 - v0]
        dlogits_vocab_slice(x, weight, bias, y, g, e, lse, ent, v0, v1, temperature, softcap, d,
                            precision)
        if dw_out is not None:
            matmul(d.T, x, dw_out[v0:v1], accumulate=False, dot_precision=precision)
        if dx is not None:
            matmul(d, weight[v0:v1], dx, accumulate=v0 > 0, dot_precision=precision, lo=dx_lo,
                   keep_lo=v1 < V)
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
         compact: bool = True) -> Grads:
    """The protocol's gradients (:mod:`.protocol`): of sum_n g_n logp_n + e_n H_n w.r.t. hidden,
    weight, bias (None where not needed).

    ``g``/``e`` are float32 per-row upstream gradients, already 0 at inactive rows; ``e`` may be
    None. Rows with g = e = 0 cost nothing: they are dropped before any GEMM (one host sync).
    ``order`` overrides ``BACKWARD_ORDER`` ("auto", "rows" or "vocab"). ``compact=False`` runs
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
                         order=order)
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
        dx = dx_lo = None
        if need_dx:
            if _split_dx(N, n_live, hidden.element_size()):   # high half in dX, low = scratch
                dx = torch.empty((N, H), dtype=dtype, device=dev)
                dx_lo = torch.empty((N, H), dtype=torch.int16, device=dev)
            elif partial or dtype != torch.float32:
                dx = torch.empty((n_live, H), dtype=torch.float32, device=dev)
            else:                               # float32, every row live: the gradient itself
                dx = torch.empty_like(hidden)
        x = hidden[rows] if partial else hidden          # contiguous copy of the live rows
        _vocab_outer(x, *args, dx, dx_lo, d_weight, d_bias)
        del x, dx_lo
        d_hidden = None
        if need_dx:
            if partial:
                d_hidden = torch.zeros_like(hidden)
                d_hidden.index_copy_(0, rows, dx.to(dtype))
            else:
                d_hidden = dx.to(dtype)
    else:
        d_hidden = torch.zeros_like(hidden) if need_dx else None
        dw32 = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_dw else None
        db32 = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None
        _rows_outer(hidden, rows if partial else None, *args, d_hidden, dw32, db32)
        d_weight = dw32.to(weight.dtype) if need_dw else None
        d_bias = db32.to(bias.dtype) if need_db else None
    return Grads(d_hidden, d_weight, d_bias)
