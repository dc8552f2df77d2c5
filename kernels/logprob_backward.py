"""Backward kernel: recomputes logit tiles from the saved lse and writes d(loss)/d(raw logits).

For one chunk of rows (already compacted to rows whose upstream gradient is non-zero) it writes

    D[n, v] = d/d raw_{n,v} of  g_n * logp_n + e_n * H_n
            = [ g_n (1[v = y_n] - p_{n,v}) - e_n p_{n,v} (z_{n,v} - E_p[z_n]) ] / T * softcap'

into a [chunk, V] buffer in the input dtype, which cuBLAS then turns into dX and dW. The buffer
is bounded by the chunk size, never [N, V]. ``dlogits_from_logits`` computes the same D from
logits the forward kernel stored instead of recomputing them: no GEMM, one read of z (float32,
or float16 z - m_t plus the float32 tile maxima m_t, see ``logprob_forward``), and for 16-bit
logits D written over them in place.
"""
import torch
import triton
import triton.language as tl

from .logprob_forward import (_logit_tile, _logit_tile_tma, _tile_ids, _transform, tile_grid,
                              tma_operands)
from .configs import dlogits_config, from_logits_config
from .target import aligned16, launch_target


@triton.jit
def _dlogits_kernel(
    X, W, B, Y, G, E, LSE, ENT, D,
    C, V, H,
    stride_xn, stride_xh, stride_wv, stride_wh, stride_dn, stride_dv,
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, GROUP_N: tl.constexpr,
):
    # Not persistent: a persistent grid (Triton's tutorial: tiles looped with tl.range(...,
    # flatten=True) so the next tile's loads overlap this epilogue) spilled at 128 x 128 with the
    # entropy gradient, bias and softcap on sm_90 (8 warps: 255 registers + 88 B; 16 warps:
    # 136 B) and sm_100 (8 warps: 36 B). The grouped order is kept (one program per tile).
    pid_n, pid_v = _tile_ids(tl.cdiv(C, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < C
    rows64 = rows.to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    cols64 = cols.to(tl.int64)

    if USE_TMA:
        acc = _logit_tile_tma(X, W, pid_n * BLOCK_N, pid_v * BLOCK_V, H, BLOCK_N, BLOCK_V,
                              BLOCK_H, DOT_PRECISION)
    else:
        acc = _logit_tile(X, W, rows64, row_mask, cols64, col_mask, H, stride_xn, stride_xh,
                          stride_wv, stride_wh, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    z = _transform(acc, cols, col_mask, B, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
    dz = _dz(z, rows64, row_mask, cols, col_mask, Y, G, E, LSE, ENT, inv_temperature, softcap,
             HAS_SOFTCAP, HAS_ENTROPY_GRAD)
    tl.store(D + rows64[:, None] * stride_dn + cols64[None, :] * stride_dv,
             dz.to(D.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _dz(z, rows64, row_mask, cols, col_mask, Y, G, E, LSE, ENT, inv_temperature, softcap,
        HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr):
    """D of a tile from its transformed logits z (out-of-vocab columns at NEG_BIG)."""
    y = tl.load(Y + rows64, mask=row_mask, other=-1)
    g = tl.load(G + rows64, mask=row_mask, other=0.0)
    lse = tl.load(LSE + rows64, mask=row_mask, other=0.0)
    p = tl.where(col_mask[None, :], tl.exp(z - lse[:, None]), 0.0)
    coef = -g[:, None]
    if HAS_ENTROPY_GRAD:
        e = tl.load(E + rows64, mask=row_mask, other=0.0)
        mean_z = lse - tl.load(ENT + rows64, mask=row_mask, other=0.0)
        coef -= e[:, None] * (z - mean_z[:, None])
    dz = p * coef + tl.where(cols[None, :] == y[:, None], g[:, None], 0.0)
    dz *= inv_temperature
    if HAS_SOFTCAP:
        # = tanh(raw / c); out-of-vocab columns read 0 so the square cannot overflow.
        th = tl.where(col_mask[None, :], z, 0.0) * (1.0 / (inv_temperature * softcap))
        dz *= 1.0 - th * th
    return dz


@triton.jit
def _dlogits_from_logits_kernel(
    Z, Z_SHIFT, Y, G, LSE, D, C, V, stride_zn, stride_sn, stride_dn, inv_temperature, softcap,
    HAS_SOFTCAP: tl.constexpr, SHIFTED_LOGITS: tl.constexpr, SHIFT_COLS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """D from stored logits (float32, or float16 z - m_t with m_t in ``Z_SHIFT``; ``D`` may be
    the same memory: each element is read before it is written, by the same program). A row
    with g = 0 gets exactly 0 (its logits may be non-finite: an ignored row's hidden state is
    never read by the loss)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < C
    rows64 = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    cols64 = cols.to(tl.int64)
    mask = row_mask[:, None] & col_mask[None, :]
    z_ptrs = Z + rows64[:, None] * stride_zn + cols64[None, :]
    if SHIFTED_LOGITS:      # (columns outside V are masked wherever z is used)
        z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
        z += tl.load(Z_SHIFT + rows64[:, None] * stride_sn + (cols64 // SHIFT_COLS)[None, :],
                     mask=mask, other=0.0)
        if HAS_SOFTCAP:
            # |z| <= c / T exactly; the stored rounding (or a -inf below float16's range) must
            # not push the slope 1 - tanh^2 below 0 (nor make it -inf times p = 0).
            cap = softcap * inv_temperature
            z = tl.minimum(tl.maximum(z, -cap), cap)
    else:
        z = tl.load(z_ptrs, mask=mask, other=-1.0e30)
    dz = _dz(z, rows64, row_mask, cols, col_mask, Y, G, G, LSE, LSE, inv_temperature, softcap,
             HAS_SOFTCAP, False)
    g = tl.load(G + rows64, mask=row_mask, other=0.0)
    dz = tl.where(g[:, None] != 0.0, dz, 0.0)
    tl.store(D + rows64[:, None] * stride_dn + cols64[None, :], dz.to(D.dtype.element_ty),
             mask=mask)


def dlogits(x, w, b, y, g, e, lse, ent, temperature, softcap, out, dot_precision):
    """Fills ``out`` [C, V] with d(sum g*logp + e*H)/d(raw logits) for the rows of ``x`` [C, H]."""
    C, H = x.shape
    V = w.shape[0]
    aligned = aligned16(x, w, out, *x.stride(), *w.stride(), *out.stride())
    cfg = dlogits_config(x.dtype, launch_target(x), aligned)
    (x_op, w_op), use_tma = tma_operands(cfg, (x, (cfg["BLOCK_N"], cfg["BLOCK_H"])),
                                         (w, (cfg["BLOCK_V"], cfg["BLOCK_H"])))
    grid, group = tile_grid(cfg, triton.cdiv(C, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
    _dlogits_kernel[grid](
        x_op, w_op, b if b is not None else x, y, g, e if e is not None else g, lse,
        ent if ent is not None else lse, out,
        C, V, H,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        1.0 / temperature, float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=b is not None, HAS_SOFTCAP=softcap is not None, HAS_ENTROPY_GRAD=e is not None,
        DOT_PRECISION=dot_precision, USE_TMA=use_tma, GROUP_N=group, **cfg)


def dlogits_from_logits(z, y, g, lse, temperature, softcap, out, shift=None, shift_cols=1):
    """Fills ``out`` [C, V] (any float dtype, unit column stride; may be the memory of ``z``)
    with D for the rows whose stored logits are ``z`` [C, V]: float32, or float16 z - m_t with
    ``shift`` [C, cdiv(V, shift_cols)] the float32 m_t of each ``shift_cols`` columns (as the
    forward's 16-bit store writes them). Rows with g = 0 get 0."""
    C, V = z.shape
    if z.stride(1) != 1 or out.stride(1) != 1 or out.shape != z.shape:
        raise ValueError("z, out: expected [C, V] tensors of one shape with unit column stride")
    shifted = shift is not None
    if shifted and (z.dtype != torch.float16 or shift.dtype != torch.float32
                    or shift.shape != (C, triton.cdiv(V, shift_cols)) or shift.stride(1) != 1):
        raise ValueError("shift: expected float16 z and a float32 [C, cdiv(V, shift_cols)] "
                         "tensor with unit column stride")
    cfg = from_logits_config(launch_target(z))
    grid = (triton.cdiv(C, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
    _dlogits_from_logits_kernel[grid](
        z, shift if shifted else lse, y, g, lse, out, C, V, z.stride(0),
        shift.stride(0) if shifted else 0, out.stride(0), 1.0 / temperature,
        float(softcap) if softcap is not None else 1.0, HAS_SOFTCAP=softcap is not None,
        SHIFTED_LOGITS=shifted, SHIFT_COLS=shift_cols if shifted else 1, **cfg)
    return out
