"""Forward kernel: per-row log-prob, log-sum-exp, entropy and argmax of ``x @ w.T`` without logits.

Each program owns BLOCK_N rows and one slice of the vocabulary. It streams that slice in
BLOCK_V tiles, computes each logit tile with ``tl.dot`` over H, and folds it into running
statistics with an online log-sum-exp:

    m  = max_v z_v                    (running max)
    s  = sum_v exp(z_v - m)           (rescaled when m grows)
    t  = sum_v exp(z_v - m) (z_v - m) (for the entropy, rescaled the same way)

The slices' partial statistics are merged by ``_combine_kernel``. The number of slices and all
tile sizes depend on V and H only, never on N: a row's result is bit-identical whatever the batch.

``STORE_LOGITS`` also writes each tile's transformed logits z into a [rows, V] buffer: the
stored-logits plans (``gift_fast/backends/plan.py``) form the loss gradient from them instead of
recomputing them. The statistics are the same bits either way. float32 inputs store z in float32;
16-bit inputs (``SHIFTED_LOGITS``) store float16(z - m_t), m_t the row's max over the BLOCK_V
tile (so z - m_t <= 0: 11 significant bits down to -65504, -inf below, where exp is 0 anyway),
and m_t in float32 into ``Z_SHIFT`` [rows, cdiv(V, SHIFT_COLS)], once per SHIFT_COLS columns
(``configs.shift_columns``: a divisor of every BLOCK_V the target uses, so the reader's layout
does not depend on the launch's alignment).
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .configs import combine_config, dot_precision, forward_config, shift_columns
from .target import aligned16, launch_target

# Sentinel below any real logit; finite so that (m_old - m_new) * s stays 0, never NaN.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _transform(acc, cols, col_mask, B, inv_temperature, softcap,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """raw GEMM tile -> z = softcap(raw + b) / T, with out-of-vocab columns at NEG_BIG."""
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        # tanh(u) = 1 - 2 / (exp(2u) + 1): stable for large |u| in float32.
        u = acc / softcap
        acc = softcap * (1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    z = acc * inv_temperature
    return tl.where(col_mask[None, :], z, NEG_BIG)


@triton.jit
def _logit_tile(X, W, rows64, row_mask, cols64, col_mask, H, stride_xn, stride_xh,
                stride_wv, stride_wh, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """[BLOCK_N, BLOCK_V] tile of x @ w.T, accumulated in float32 over H."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_mask = hs < H
        x = tl.load(X + rows64[:, None] * stride_xn + hs[None, :] * stride_xh,
                    mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        w = tl.load(W + cols64[:, None] * stride_wv + hs[None, :] * stride_wh,
                    mask=col_mask[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _store_shifted(Z, Z_SHIFT, z, tile_max, rows, rows64, row_mask, cols, col_mask, v0, v_end,
                   stride_zn, stride_sn, BLOCK_V: tl.constexpr, SHIFT_COLS: tl.constexpr):
    """The 16-bit logits store: float16(z - m_t) and m_t once per SHIFT_COLS columns."""
    tl.store(Z + rows64[:, None] * stride_zn + cols.to(tl.int64)[None, :],
             (z - tile_max[:, None]).to(tl.float16), mask=row_mask[:, None] & col_mask[None, :])
    shift_ptrs = Z_SHIFT + rows64 * stride_sn + v0 // SHIFT_COLS
    tl.store(shift_ptrs, tile_max, mask=row_mask)                # slot 0: v0 < v_end
    for k in tl.static_range(1, BLOCK_V // SHIFT_COLS):          # the tile's other slots
        tl.store(shift_ptrs + k, tile_max,
                 mask=row_mask & (rows * 0 + v0 + k * SHIFT_COLS < v_end))


@triton.jit
def _logit_tile_tma(XD, WD, row0, col0, H, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The same tile from TMA descriptors of x [N, H] and w [V, H] (blocks [BLOCK_N, BLOCK_H]
    and [BLOCK_V, BLOCK_H]). The descriptors zero-fill rows, columns and H past the tensors' ends,
    as the masked loads do; columns past a vocabulary slice's end are read (the next slice's W
    rows) and set to NEG_BIG by ``_transform`` like any out-of-slice column."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        x = XD.load([row0, h0])
        w = WD.load([col0, h0])
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _tile_ids(n_rows, n_cols, GROUP: tl.constexpr):
    """(row block, column) of this program. GROUP > 0: a 1-D grid in grouped order, GROUP row
    blocks take every column before the next GROUP start, the row block varying fastest, so the
    programs running at once share each column's W tiles and keep few X row blocks in L2.
    GROUP == 0: the ids of a 2-D grid."""
    if GROUP > 0:
        pid = tl.program_id(0)
        row, col = tl.swizzle2d(pid // n_cols, pid % n_cols, n_rows, n_cols, GROUP)
    else:
        row = tl.program_id(0)
        col = tl.program_id(1)
    return row, col


@triton.jit
def _logprob_forward_kernel(
    X, W, B, Y,
    M_part, S_part, T_part, ZY_part, BEST_part, ARG_part, Z, Z_SHIFT,
    N, V, H, v_per_split,
    stride_xn, stride_xh, stride_wv, stride_wh, stride_zn, stride_sn,
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_ENTROPY: tl.constexpr,
    STORE_LOGITS: tl.constexpr, SHIFTED_LOGITS: tl.constexpr, SHIFT_COLS: tl.constexpr,
    STORE_LATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_s = _tile_ids(tl.cdiv(N, BLOCK_N), tl.cdiv(V, v_per_split), GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    # Ignored / out-of-range targets are never matched (-1 is no column); no out-of-bounds read.
    y = tl.load(Y + rows64, mask=row_mask, other=-1)

    m = tl.full((BLOCK_N,), NEG_BIG, dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    best = tl.full((BLOCK_N,), NEG_BIG, dtype=tl.float32)
    arg = tl.zeros((BLOCK_N,), dtype=tl.int32)

    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        if USE_TMA:
            acc = _logit_tile_tma(X, W, pid_n * BLOCK_N, v0, H, BLOCK_N, BLOCK_V, BLOCK_H,
                                  DOT_PRECISION)
        else:
            acc = _logit_tile(X, W, rows64, row_mask, cols.to(tl.int64), col_mask, H, stride_xn,
                              stride_xh, stride_wv, stride_wh, BLOCK_N, BLOCK_V, BLOCK_H,
                              DOT_PRECISION)
        z = _transform(acc, cols, col_mask, B, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
        if STORE_LOGITS and not SHIFTED_LOGITS:
            tl.store(Z + rows64[:, None] * stride_zn + cols.to(tl.int64)[None, :], z,
                     mask=row_mask[:, None] & col_mask[None, :])

        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        tile_max = tl.max(z, axis=1)
        if SHIFTED_LOGITS and not STORE_LATE:
            _store_shifted(Z, Z_SHIFT, z, tile_max, rows, rows64, row_mask, cols, col_mask, v0,
                           v_end, stride_zn, stride_sn, BLOCK_V, SHIFT_COLS)
        tile_arg = tl.argmax(z, axis=1).to(tl.int32) + v0
        better = tile_max > best          # strict: the first maximum wins, as torch.argmax
        arg = tl.where(better, tile_arg, arg)
        best = tl.where(better, tile_max, best)

        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp(m - m_new)
        p = tl.where(col_mask[None, :], tl.exp(z - m_new[:, None]), 0.0)
        if WANT_ENTROPY:
            d = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
            t = alpha * (t + (m - m_new) * s) + tl.sum(p * d, axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
        if SHIFTED_LOGITS and STORE_LATE:
            _store_shifted(Z, Z_SHIFT, z, tile_max, rows, rows64, row_mask, cols, col_mask, v0,
                           v_end, stride_zn, stride_sn, BLOCK_V, SHIFT_COLS)

    out = pid_s.to(tl.int64) * N + rows64
    tl.store(M_part + out, m, mask=row_mask)
    tl.store(S_part + out, s, mask=row_mask)
    tl.store(ZY_part + out, zy, mask=row_mask)
    tl.store(BEST_part + out, best, mask=row_mask)
    tl.store(ARG_part + out, arg, mask=row_mask)
    if WANT_ENTROPY:
        tl.store(T_part + out, t, mask=row_mask)


@triton.jit
def _combine_kernel(M_part, S_part, T_part, ZY_part, BEST_part, ARG_part,
                    LSE, ZY, ENT, ARGMAX, ROW_MAX, N, n_split,
                    WANT_ENTROPY: tl.constexpr, WANT_ROW_MAX: tl.constexpr, BLOCK: tl.constexpr):
    """Merges the vocabulary slices of each row in a fixed sequential order (batch-invariant;
    a torch reduction over the slice axis could change its order with N)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    rows64 = rows.to(tl.int64)
    m = tl.full((BLOCK,), NEG_BIG, dtype=tl.float32)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    t = tl.zeros((BLOCK,), dtype=tl.float32)
    zy = tl.zeros((BLOCK,), dtype=tl.float32)
    best = tl.full((BLOCK,), NEG_BIG, dtype=tl.float32)
    arg = tl.zeros((BLOCK,), dtype=tl.int32)
    for k in range(0, n_split):
        off = k * N + rows64
        m_k = tl.load(M_part + off, mask=mask, other=NEG_BIG)
        s_k = tl.load(S_part + off, mask=mask, other=0.0)
        m_new = tl.maximum(m, m_k)
        a_old = tl.exp(m - m_new)
        a_k = tl.exp(m_k - m_new)
        if WANT_ENTROPY:
            t_k = tl.load(T_part + off, mask=mask, other=0.0)
            t = a_old * (t + (m - m_new) * s) + a_k * (t_k + (m_k - m_new) * s_k)
        s = a_old * s + a_k * s_k
        m = m_new
        zy += tl.load(ZY_part + off, mask=mask, other=0.0)
        best_k = tl.load(BEST_part + off, mask=mask, other=NEG_BIG)
        better = best_k > best        # strict: the lowest index wins ties, as torch.argmax
        arg = tl.where(better, tl.load(ARG_part + off, mask=mask, other=0), arg)
        best = tl.where(better, best_k, best)
    log_s = tl.log(tl.where(mask, s, 1.0))
    tl.store(LSE + rows64, m + log_s, mask=mask)
    tl.store(ZY + rows64, zy, mask=mask)
    tl.store(ARGMAX + rows64, arg.to(tl.int64), mask=mask)
    if WANT_ROW_MAX:
        tl.store(ROW_MAX + rows64, best, mask=mask)
    if WANT_ENTROPY:
        tl.store(ENT + rows64, log_s - t / tl.where(mask, s, 1.0), mask=mask)


def tile_grid(cfg, n_rows: int, n_cols: int):
    """(grid, GROUP_N) of a launch over [n_rows, n_cols] tiles: 1-D in the grouped order of
    ``_tile_ids`` when ``cfg`` asks for it (popping GROUP_N), else 2-D."""
    group = cfg.pop("GROUP_N", 0)
    return ((n_rows * n_cols,) if group else (n_rows, n_cols)), group


def tma_operands(cfg, *tensors_and_blocks):
    """The [rows, cols] tensors as TMA descriptors of their blocks when ``cfg`` asks for TMA
    (popping USE_TMA) and every one can be described (unit column stride, 16-byte aligned rows);
    otherwise the tensors themselves. Returns (operands, USE_TMA). Same tiles either way."""
    want = cfg.pop("USE_TMA", False)
    tensors = [t for t, _ in tensors_and_blocks]
    ok = all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
             and t.data_ptr() % 16 == 0 and t.shape[0] > 0 and t.shape[1] > 0 for t in tensors)
    if not (want and ok):
        return tensors, False
    return [TensorDescriptor(t, list(t.shape), [t.stride(0), 1], list(block))
            for t, block in tensors_and_blocks], True


def logprob_forward_stats(x, w, b, targets, temperature, softcap, want_entropy, config=None,
                          row_max=None, logits_out=None, logits_shift=None):
    """Launches the forward kernel. x [N, H], w [V, H], targets [N] (ignored rows: any value
    outside [0, V)). Returns float32 (lse, target_logit, entropy or None, argmax int64).
    ``row_max``: optional float32 [N] output, filled with each row's max logit (the value at
    argmax; used to break argmax ties across vocabulary shards). ``logits_out``: optional
    [N, V] (unit column stride) that receives the transformed logits z: float32, or float16
    z - m_t with ``logits_shift`` the float32 [N, cdiv(V, shift_columns)] tile maxima m_t
    (unit column stride; see the module docstring)."""
    N, H = x.shape
    V = w.shape[0]
    target = launch_target(x)
    aligned = aligned16(x, w, *x.stride(), *w.stride())
    cfg = dict(forward_config(V, H, x.dtype, target, aligned, logits_out is not None),
               **(config or {}))
    v_per_split = triton.cdiv(cfg.pop("v_per_split"), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    store_late = cfg.pop("store_late", False)
    n_split = triton.cdiv(V, v_per_split)
    parts = torch.empty((5, n_split, N), dtype=torch.float32, device=x.device)
    arg = torch.empty((n_split, N), dtype=torch.int32, device=x.device)
    m, s, t, zy, best = parts
    lse = torch.empty(N, dtype=torch.float32, device=x.device)
    target_logit = torch.empty_like(lse)
    entropy = torch.empty_like(lse) if want_entropy else None
    argmax = torch.empty(N, dtype=torch.int64, device=x.device)
    if N == 0:
        return lse, target_logit, entropy, argmax
    shifted = logits_shift is not None
    want = torch.float16 if shifted else torch.float32
    if logits_out is not None and (logits_out.dtype != want
                                   or logits_out.shape != (N, V) or logits_out.stride(1) != 1):
        raise ValueError(f"logits_out: expected a {want} [{N}, {V}] tensor with unit column "
                         f"stride, got {logits_out.dtype} {tuple(logits_out.shape)} "
                         f"strides {logits_out.stride()}")
    shift_cols = shift_columns(x.dtype, target)
    if shifted:
        tiles = triton.cdiv(V, shift_cols)
        if (logits_out is None or logits_shift.dtype != torch.float32
                or logits_shift.shape != (N, tiles) or logits_shift.stride(1) != 1
                or cfg["BLOCK_V"] % shift_cols):
            raise ValueError(f"logits_shift: expected a float32 [{N}, {tiles}] tensor with unit "
                             f"column stride next to float16 logits_out, got "
                             f"{logits_shift.dtype} {tuple(logits_shift.shape)}")
    (x_op, w_op), use_tma = tma_operands(cfg, (x, (cfg["BLOCK_N"], cfg["BLOCK_H"])),
                                         (w, (cfg["BLOCK_V"], cfg["BLOCK_H"])))
    grid, group = tile_grid(cfg, triton.cdiv(N, cfg["BLOCK_N"]), n_split)
    _logprob_forward_kernel[grid](
        x_op, w_op, b if b is not None else x, targets,
        m, s, t, zy, best, arg, logits_out if logits_out is not None else lse,
        logits_shift if shifted else lse,
        N, V, H, v_per_split,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        logits_out.stride(0) if logits_out is not None else 0,
        logits_shift.stride(0) if shifted else 0,
        1.0 / temperature, float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=b is not None, HAS_SOFTCAP=softcap is not None, WANT_ENTROPY=want_entropy,
        STORE_LOGITS=logits_out is not None, SHIFTED_LOGITS=shifted,
        SHIFT_COLS=shift_cols if shifted else 1, STORE_LATE=shifted and store_late,
        DOT_PRECISION=dot_precision(x.dtype), USE_TMA=use_tma, GROUP_N=group, **cfg)
    ccfg = combine_config(target)
    _combine_kernel[(triton.cdiv(N, ccfg["BLOCK"]),)](
        m, s, t, zy, best, arg, lse, target_logit, entropy if want_entropy else lse, argmax,
        row_max if row_max is not None else lse,
        N, n_split, WANT_ENTROPY=want_entropy, WANT_ROW_MAX=row_max is not None, **ccfg)
    return lse, target_logit, entropy, argmax
