"""Chunked PyTorch backend: the same math as the Triton kernels, one [rows, vocab] tile at a time.

Two plain functions do the work; :func:`stats` and :func:`grad` are this module's side of the
backend protocol (:mod:`.protocol`):

- :func:`chunked_forward` streams the vocabulary in tiles with an online log-sum-exp and returns
  per-row statistics (:class:`ChunkedStats`: log-prob, lse, entropy, argmax, max and target logit);
- :func:`chunked_backward` recomputes each tile's logits from a given lse (and entropy), turns
  them into dlogits in place and accumulates dX, dW and db; rows whose upstream gradient is zero
  are skipped.

Why tiles of both rows and vocabulary (CPU cost, measured in bench/README.md): a tile of
``ROW_BLOCK`` rows by ``CHUNK_ELEMENTS / ROW_BLOCK`` columns keeps every GEMM large enough for
BLAS to run near its peak (the GEMMs are nearly all of the time; the softmax passes after each
one are a few per cent). Every tile buffer is allocated once per call and reused (fresh
multi-MiB allocations page-fault on CPU). Peak extra memory is a few tiles plus O(N) statistics:
flat in N and V, never [N, V].
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import plan as planner
from .protocol import Grads, RowStats


# Rows per block: the GEMMs of a block have M or K up to 2048, where CPU BLAS runs at its peak,
# and the float32 dW is read and written once per block (N / 2048 times in all).
ROW_BLOCK = 2048
# Elements of one [rows, vocab-tile] logits tile (16 MiB in float32; 2048 x 2048). fwd+bwd at
# N=2048 H=896 V=32768 float32 on a quiet 2-core Xeon (AVX-512), time / the bare GEMM fwd+bwd,
# min of 8 round-robin repeats, 2 threads: 2048 x 512 tiles 1.39x, 2048 x 2048 1.33x,
# 2048 x 4096 1.33x (1 thread: 1.41x, 1.35x, 1.32x). Wider tiles give the dX and recompute
# GEMMs a longer vocabulary dimension; past 2048 columns the gain is within noise and the
# scratch (one to three tiles) doubles.
CHUNK_ELEMENTS = 1 << 22
# exp() of float32 arguments below about -87 (results that underflow to a subnormal or zero)
# takes a slow path on CPU: 60-220 ms instead of 3 ms per 2048 x 2048 tile, measured. Logits
# that far below the row maximum (or the lse) contribute less than 1e-34 of the row's mass,
# so the argument is clamped first (one cheap pass; float64 keeps its own range).
EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


def _floor_(t: torch.Tensor) -> torch.Tensor:
    """``t`` clamped in place at EXP_FLOOR (see there), ready for exp."""
    return t.clamp_(min=EXP_FLOOR[t.dtype])


def _exp_(t: torch.Tensor) -> torch.Tensor:
    """In-place exp with the argument clamped at EXP_FLOOR."""
    return _floor_(t).exp_()


class ChunkedStats(NamedTuple):
    """Per-row statistics of :func:`chunked_forward`, in the accumulation dtype unless noted.

    ``logp`` and ``target_logit`` are 0 on rows that are ignored or whose target lies outside
    ``[0, V)`` of this weight; ``lse`` and ``max_logit`` are over this weight's rows for every row;
    ``entropy`` is that distribution's entropy (0 on ignored rows), None unless asked;
    ``argmax`` (int64, lowest index on ties) is None unless asked.
    """
    logp: torch.Tensor
    lse: torch.Tensor
    entropy: Optional[torch.Tensor]
    argmax: Optional[torch.Tensor]
    max_logit: torch.Tensor
    target_logit: torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every training dtype; float64 inputs stay float64 (gradcheck, audits)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tile_shape(n_rows: int, vocab: int, chunk_elements: Optional[int] = None):
    """(rows per block, vocabulary columns per tile); rows * columns <= max(chunk_elements, rows).
    ``chunk_elements`` defaults to ``CHUNK_ELEMENTS`` as it is at call time."""
    chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    rows = max(1, min(n_rows, ROW_BLOCK, chunk_elements))
    cols = max(1, min(vocab, chunk_elements // rows))
    return rows, cols


class _Tiles:
    """Flat scratch buffers reused by every tile of a call; ``view`` gives a contiguous [r, c]."""

    def __init__(self, count: int, rows: int, cols: int, dtype, device):
        self.bufs = [torch.empty(rows * cols, dtype=dtype, device=device) for _ in range(count)]

    def view(self, i: int, r: int, c: int) -> torch.Tensor:
        return self.bufs[i][:r * c].view(r, c)


def _logit_tile(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], v0: int,
                v1: int, softcap: Optional[float], temperature: float, out: torch.Tensor):
    """z = softcap(x @ W[v0:v1].T + b[v0:v1]) / T written into ``out`` (x already in ``out``'s dtype)."""
    w = weight[v0:v1]
    if w.dtype != out.dtype:           # half inputs: the GEMM runs on float32 copies of the tile
        w = w.to(out.dtype)
    if bias is not None:
        torch.addmm(bias[v0:v1].to(out.dtype), x, w.T, out=out)
    else:
        torch.mm(x, w.T, out=out)
    if softcap is not None:
        out.div_(softcap).tanh_().mul_(softcap)
    if temperature != 1.0:
        out.div_(temperature)
    return out


def _local_targets(targets: torch.Tensor, ignore_index: Optional[int], vocab: int):
    """(rows whose target is a column of this weight, that column or 0)."""
    in_vocab = (targets >= 0) & (targets < vocab)
    if ignore_index is not None:
        in_vocab &= targets != ignore_index
    return in_vocab, torch.where(in_vocab, targets, torch.zeros_like(targets)).long()


@torch.no_grad()
def chunked_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    targets: torch.Tensor, temperature: float, softcap: Optional[float],
                    ignore_index: Optional[int], want_entropy: bool, want_argmax: bool = True,
                    chunk_elements: Optional[int] = None) -> ChunkedStats:
    """Per-row statistics of ``softmax(softcap(hidden @ weight.T + bias) / temperature)``.

    ``hidden`` is [N, H], ``weight`` [V, H], ``targets`` [N]. A target equal to ``ignore_index``
    marks an ignored row (entropy 0; None: no row is ignored, the protocol's convention); any
    other target outside ``[0, V)`` marks an active row whose target is not a column of this
    weight (e.g. another shard of a vocabulary-parallel lm_head): its ``target_logit`` and
    ``logp`` are 0 and it is never gathered, while ``lse``, ``max_logit``, ``entropy`` and
    ``argmax`` still describe this weight's columns. Nothing of size N x V is allocated; the
    statistics are in float32 (float64 for float64 inputs).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    acc = accumulation_dtype(hidden.dtype)
    lse = torch.empty(n, dtype=acc, device=dev)
    max_logit = torch.empty(n, dtype=acc, device=dev)
    target_logit = torch.zeros(n, dtype=acc, device=dev)
    entropy = torch.empty(n, dtype=acc, device=dev) if want_entropy else None
    argmax = torch.empty(n, dtype=torch.int64, device=dev) if want_argmax else None
    in_vocab, safe_t = _local_targets(targets, ignore_index, vocab)
    rows, cols = tile_shape(n, vocab, chunk_elements)
    tiles = _Tiles(2 if want_entropy else 1, rows, cols, acc, dev)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        c = r1 - r0
        x = hidden[r0:r1].to(acc)
        t_c = safe_t[r0:r1]
        m = s = b = best = best_idx = zt = None
        for v0 in range(0, vocab, cols):
            v1 = min(vocab, v0 + cols)
            z = _logit_tile(x, weight, bias, v0, v1, softcap, temperature, tiles.view(0, c, v1 - v0))
            # Target logit, taken from the tile that holds it (never gathered out of range).
            here = (t_c >= v0) & (t_c < v1)
            picked = z.gather(1, (t_c - v0).clamp_(0, v1 - v0 - 1)[:, None]).squeeze(1)
            zt = torch.where(here, picked, zt if zt is not None else torch.zeros_like(picked))
            if want_argmax:
                t_max, t_idx = z.max(dim=1)
                if best is None:
                    best, best_idx = t_max, t_idx
                else:                       # strictly greater: the lowest index wins ties
                    better = t_max > best
                    best = torch.where(better, t_max, best)
                    best_idx = torch.where(better, t_idx + v0, best_idx)
            else:
                t_max = z.amax(dim=1)
            # Online log-sum-exp relative to the running max m: s = sum e^(z-m), and for the
            # entropy b = sum e^(z-m) (z-m); both rescale by e^(m-m_new) when the max grows.
            m_new = t_max if m is None else torch.maximum(m, t_max)
            z.sub_(m_new[:, None])
            if want_entropy:
                e = torch.exp(_floor_(z), out=tiles.view(1, c, v1 - v0))   # z stays for b
                t_s = e.sum(1)
                t_b = e.mul_(z).sum(1)
            else:
                t_s = _exp_(z).sum(1)
            if m is None:
                s = t_s
                b = t_b if want_entropy else None
            else:
                scale = torch.exp(m - m_new)
                if want_entropy:
                    b = scale * (b + (m - m_new) * s) + t_b
                s = scale * s + t_s
            m = m_new
        log_s = torch.log(s)
        lse[r0:r1] = m + log_s
        max_logit[r0:r1] = m
        target_logit[r0:r1] = zt
        if want_entropy:
            entropy[r0:r1] = log_s - b / s           # H = lse - E[z] = log s - b / s
        if want_argmax:
            argmax[r0:r1] = best_idx
    zero = torch.zeros((), dtype=acc, device=dev)
    target_logit = torch.where(in_vocab, target_logit, zero)
    logp = torch.where(in_vocab, target_logit - lse, zero)
    if want_entropy and ignore_index is not None:
        entropy = torch.where(targets != ignore_index, entropy, zero)
    return ChunkedStats(logp, lse, entropy, argmax, max_logit, target_logit)


@torch.no_grad()
def chunked_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     targets: torch.Tensor, lse: torch.Tensor, entropy: Optional[torch.Tensor],
                     g: Optional[torch.Tensor], e: Optional[torch.Tensor], temperature: float,
                     softcap: Optional[float], ignore_index: Optional[int] = None, *,
                     need_hidden: bool = True, need_weight: bool = True, need_bias: bool = True,
                     chunk_elements: Optional[int] = None, compact: bool = True):
    """Gradients of ``sum_n g_n * logp_n + e_n * H_n`` with respect to hidden, weight and bias.

    ``lse`` [N] and ``entropy`` [N] define the distribution each row's probabilities are taken
    from; they may come from outside, e.g. global statistics over all shards of a
    vocabulary-parallel lm_head, in which case the result is this shard's part: d_weight / d_bias
    of its columns and its contribution to d_hidden (sum it over shards). ``g`` / ``e`` are the
    upstream gradients of logp / entropy ([N], None = 0; ``entropy`` is needed when ``e`` is
    given). Targets follow :func:`chunked_forward`: ``ignore_index`` rows get no gradient; an
    active row whose target is outside ``[0, V)`` gets the ``-p`` terms and no one-hot term.

    Returns ``(d_hidden, d_weight, d_bias)`` in the dtypes of hidden / weight / bias (None where
    not needed or bias is None); accumulation is in float32 (float64 for float64 inputs).
    Rows whose ``g`` and ``e`` are both zero are skipped (one host sync selects the live rows);
    ``compact=False`` runs every row instead, with no host read, and zeroes each dead row's
    dlogits (exactly 0 even where its hidden state or lse is not finite): no saving then.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    acc = accumulation_dtype(hidden.dtype)
    if e is not None and entropy is None:
        raise ValueError("entropy: needed by chunked_backward when an entropy gradient e is given")
    g = torch.zeros(n, dtype=acc, device=dev) if g is None else g.to(acc)
    e = None if e is None else e.to(acc)
    live = g != 0 if e is None else (g != 0) | (e != 0)
    if ignore_index is not None:
        live &= targets != ignore_index
    rows_idx = torch.nonzero(live).squeeze(1) if compact else None
    in_vocab, safe_t = _local_targets(targets, ignore_index, vocab)

    d_hidden = torch.zeros_like(hidden) if need_hidden else None
    # float32 weights take the gradient in place; half weights go through a float32 scratch.
    d_weight = torch.zeros(weight.shape, dtype=acc, device=dev) if need_weight else None
    d_bias = (torch.zeros(vocab, dtype=acc, device=dev)
              if (bias is not None and need_bias) else None)
    n_live = rows_idx.numel() if compact else n
    rows, cols = tile_shape(max(1, n_live), vocab, chunk_elements)
    tiles = _Tiles(1 + (e is not None) + (softcap is not None), rows, cols, acc, dev)
    inv_t = 1.0 / temperature
    for r0 in range(0, n_live, rows):
        idx = rows_idx[r0:r0 + rows] if compact else slice(r0, min(n, r0 + rows))
        c = idx.numel() if compact else idx.stop - r0
        x = hidden[idx].to(acc)
        dead = None
        if not compact:     # dead rows: zero inputs and zero dlogits, so they add exactly 0
            dead = ~live[idx][:, None]
            x = x.masked_fill(dead, 0.0)
        # 1/T of the chain rule folded into the per-row coefficients.
        g_c = g[idx] * inv_t
        lse_c = lse[idx].to(acc)[:, None]
        if e is not None:
            e_c = (e[idx] * inv_t)[:, None]
            mean_z = (lse[idx].to(acc) - entropy[idx].to(acc))[:, None]   # E_p[z] = lse - H
        onehot_g = torch.where(in_vocab[idx], g_c, torch.zeros_like(g_c))
        t_c = safe_t[idx]
        dx = torch.zeros(c, hidden.shape[1], dtype=acc, device=dev) if need_hidden else None
        for v0 in range(0, vocab, cols):
            v1 = min(vocab, v0 + cols)
            w = v1 - v0
            z = _logit_tile(x, weight, bias, v0, v1, softcap, temperature, tiles.view(0, c, w))
            k = 1
            if softcap is not None:
                # d softcap(raw) / d raw = 1 - tanh^2, with tanh = z * T / c (before z is reused).
                fac = torch.mul(z, temperature / softcap, out=tiles.view(k, c, w))
                fac.mul_(fac).neg_().add_(1.0)
                k += 1
            if e is not None:
                # dz = p * (-g - e (z - E[z])) + g * onehot, all already divided by T.
                p = _exp_(torch.sub(z, lse_c, out=tiles.view(k, c, w)))
                z.sub_(mean_z).mul_(-e_c).sub_(g_c[:, None]).mul_(p)
            else:
                _exp_(z.sub_(lse_c)).mul_(-g_c[:, None])
            here = (t_c >= v0) & (t_c < v1)
            z.scatter_add_(1, (t_c - v0).clamp_(0, w - 1)[:, None],
                           torch.where(here, onehot_g, torch.zeros_like(onehot_g))[:, None])
            if softcap is not None:
                z.mul_(fac)
            if dead is not None:
                z.masked_fill_(dead, 0.0)
            w_t = weight[v0:v1]
            if need_hidden:
                dx.addmm_(z, w_t if w_t.dtype == acc else w_t.to(acc))
            if need_weight:
                d_weight[v0:v1].addmm_(z.T, x)
            if d_bias is not None:
                d_bias[v0:v1] += z.sum(0)
        if need_hidden:
            d_hidden[idx] = dx.to(hidden.dtype)
    if d_weight is not None and d_weight.dtype != weight.dtype:
        d_weight = d_weight.to(weight.dtype)
    if d_bias is not None and d_bias.dtype != bias.dtype:
        d_bias = d_bias.to(bias.dtype)
    return d_hidden, d_weight, d_bias


def _budget_parts(n_rows, vocab, hidden, dtype, buffers, need_dw):
    """(bytes independent of the tile size, bytes per tile element) of a chunked pass."""
    acc = accumulation_dtype(dtype)
    size = torch.empty((), dtype=acc).element_size()
    rows = max(1, min(n_rows, ROW_BLOCK))
    fixed = n_rows * planner.PER_ROW_BYTES + 2 * rows * hidden * size     # x and dX of a block
    per_element = buffers * size
    if acc != dtype:
        fixed += vocab * hidden * size if need_dw else 0      # float32 dW of a 16-bit weight
        per_element += -(-hidden * size // rows)               # float32 copy of the W tile
    return fixed, per_element


def recompute_minimum(n_rows, vocab, hidden, dtype, need_dw, softcap) -> int:
    """The least budget of stats + grad (no entropy gradient): one-element tiles."""
    fixed, per_element = _budget_parts(n_rows, vocab, hidden, dtype,
                                       1 + (softcap is not None), need_dw)
    return fixed + per_element


def budget_chunk_elements(n_rows: int, vocab: int, hidden: int, dtype, buffers: int,
                          need_dw: bool, budget: int) -> int:
    """Elements of one logits tile (``buffers`` tiles live at once) such that a chunked pass
    stays within ``budget`` bytes (:mod:`.plan`), at most ``CHUNK_ELEMENTS`` (past it CPU BLAS
    gains nothing, see there). Raises ``plan.BudgetTooSmall`` naming the minimum."""
    fixed, per_element = _budget_parts(n_rows, vocab, hidden, dtype, buffers, need_dw)
    elements = (budget - fixed) // per_element
    if elements < 1:
        raise planner.BudgetTooSmall(budget, fixed + per_element,
                                     f"a chunked pass over {n_rows} rows, V={vocab}, H={hidden}")
    return min(CHUNK_ELEMENTS, elements)


def stats(hidden, weight, bias, local_targets, temperature, softcap, want_entropy,
          want_argmax=True, budget=None) -> RowStats:
    """The protocol's statistics (:mod:`.protocol`), in float32 (float64 for float64 inputs);
    tiles within the memory budget of :mod:`.plan` (``budget`` bytes, default the process's)."""
    elements = budget_chunk_elements(
        hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype, 1 + want_entropy,
        False, planner.memory_budget(hidden.device, budget))
    st = chunked_forward(hidden, weight, bias, local_targets, temperature, softcap, None,
                         want_entropy, want_argmax, chunk_elements=elements)
    return RowStats(st.lse, st.target_logit, st.entropy, st.argmax, st.max_logit)


def grad(hidden, weight, bias, local_targets, lse, entropy, g, e, temperature, softcap,
         need_dx, need_dw, need_db, compact: bool = True, budget=None) -> Grads:
    """The protocol's gradients (:mod:`.protocol`); tiles within the memory budget."""
    elements = budget_chunk_elements(
        hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype,
        1 + (e is not None) + (softcap is not None), need_dw,
        planner.memory_budget(hidden.device, budget))
    return Grads(*chunked_backward(hidden, weight, bias, local_targets, lse, entropy, g, e,
                                   temperature, softcap, need_hidden=need_dx,
                                   need_weight=need_dw, need_bias=need_db, compact=compact,
                                   chunk_elements=elements))


# -- the stream plan of token-local losses (``token_local``) ----------------------------------

# Rows of a chunk turned into probabilities together (:func:`stream_logits`): about 1 MiB of
# float32, so once the max has read a block from memory, the shift, exp, sum and division run
# on it in the core's L2 cache (one pass over the chunk's logits in all, instead of one per op).
STREAM_BLOCK_ELEMENTS = 1 << 18


def stream_dtypes(dtype: torch.dtype):
    """(stored logits, GEMM operands): both the accumulation dtype (the CPU GEMMs run in it)."""
    acc = accumulation_dtype(dtype)
    return acc, acc


def stream_fixed_bytes(n_rows: int, vocab: int, hidden: int, dtype, need_dw: bool) -> int:
    """Scratch of the stream beyond the planner's buffers: with softcap, the slope of one row
    block (:func:`stream_logits`); for 16-bit inputs, float32 copies of the weight, of its
    gradient and of a chunk's dX."""
    acc = accumulation_dtype(dtype)
    size = torch.empty((), dtype=acc).element_size()
    fixed = _stream_block_rows(n_rows, vocab) * vocab * size
    if acc != dtype:
        fixed += vocab * hidden * size * (2 if need_dw else 1) + n_rows * hidden * size
    return fixed


def _stream_block_rows(rows: int, vocab: int) -> int:
    return max(1, min(rows, STREAM_BLOCK_ELEMENTS // max(1, vocab)))


def _softcap_slope(z: torch.Tensor, temperature: float, softcap: float, out=None):
    """d softcap(raw) / d raw = 1 - tanh^2, with tanh = z T / c, of the stored logits ``z``."""
    f = torch.mul(z, temperature / softcap, out=out)
    return f.mul_(f).neg_().add_(1.0)


@torch.no_grad()
def stream_logits(x, weight, bias, y, temperature, softcap, z):
    """The rows of ``x``: returns (lse, target_logit) and leaves in ``z`` [rows, V] the matrix
    (p - onehot(y)) * f (f = 1 - tanh^2, the softcap slope; 1 without softcap), whose rows
    times -g / T are the loss gradient D (:func:`stream_dlogits`). ``y``: local targets, -1 for
    none (target_logit 0, no one-hot term).

    Storing p rather than the logits lets the backward skip its pass over [rows, V]: the row
    factor -g / T goes into the GEMMs' [rows, H] operands instead (``token_local``). Each row
    block is shifted by its own max, so p = e^(z - m) / s in one exp (the division by s rounds
    once, where z - lse would carry lse's rounding)."""
    rows, vocab = z.shape
    _logit_tile(x.to(z.dtype), weight, bias, 0, vocab, softcap, temperature, z)
    has = y >= 0
    safe_y = y.clamp(min=0)[:, None]
    target_logit = torch.where(has, z.gather(1, safe_y).squeeze(1), 0.0)
    lse = torch.empty(rows, dtype=z.dtype, device=z.device)
    step = _stream_block_rows(rows, vocab)
    slope = (torch.empty(step * vocab, dtype=z.dtype, device=z.device)
             if softcap is not None else None)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        blk = z[r0:r1]
        f = None
        if softcap is not None:         # from the logits, before they are overwritten
            f = _softcap_slope(blk, temperature, softcap, slope[:(r1 - r0) * vocab].view(r1 - r0, vocab))
        m = blk.amax(1, keepdim=True)
        s = _exp_(blk.sub_(m)).sum(1, keepdim=True)
        blk.div_(s)
        if f is not None:
            blk.mul_(f)
        lse[r0:r1] = (m + torch.log(s)).squeeze(1)
    # The target's one-hot term, times its slope (the same ops on the same logit as above).
    f_t = (_softcap_slope(target_logit, temperature, softcap) if softcap is not None
           else torch.ones_like(target_logit))
    z.scatter_add_(1, safe_y, torch.where(has, -f_t, 0.0)[:, None])
    return lse, target_logit


@torch.no_grad()
def stream_dlogits(z, y, g, lse, temperature, softcap, out):
    """The loss gradient of the rows whose :func:`stream_logits` matrix is ``z``: returns the
    per-row factor r = -g / T with D = r[:, None] * z (``out`` is ``z``). Rows with g = 0 get
    r = 0, which zeroes their D exactly where z is finite; z is not finite only on rows whose
    logits are not (a NaN or +inf logit, or all -inf), and then neither is lse: those rows are
    zeroed (0 * NaN is not 0)."""
    bad = (g == 0) & ~torch.isfinite(lse)
    if z.device.type == "cpu":
        # On CPU reading the row ids back costs nothing and touches those rows only.
        z.index_fill_(0, torch.nonzero(bad).squeeze(1), 0.0)
    else:
        # On a GPU that read would sync with the host: one masked pass over the chunk instead.
        z.masked_fill_(bad[:, None], 0.0)
    return (g * (-1.0 / temperature)).to(z.dtype)
