"""A deterministic GEMM with float32 accumulation: ``C = A @ B`` or ``C += A @ B``.

Used by the backward pass for dX (+)= D @ W and dW (+)= D.T @ X. ``ACCUMULATE`` adds into C
in float32, so sums across chunks / vocabulary blocks never round to 16 bits. A float32
accumulator can also be kept split in two 16-bit halves (``LO_IN`` / ``LO_OUT``): C (a 16-bit
float tensor, used as raw bits until the end) holds the high 16 bits and LO (int16) the low 16.
Then C is the storage of the 16-bit gradient itself and the only scratch is LO, half of a float32
accumulator; the last launch (``LO_OUT`` off) stores the sum rounded to C's dtype. Tile sizes
are fixed (no autotuning), so results are reproducible run to run.
"""
import torch
import triton
import triton.language as tl

from .configs import matmul_config
from .target import aligned16, launch_target


@triton.jit
def _matmul_kernel(
    A, B, C, LO, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    ACCUMULATE: tl.constexpr, LO_IN: tl.constexpr, LO_OUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: consecutive programs share B tiles, which keeps them in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        a = tl.load(A + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(B + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    c_off = rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_ptrs = C + c_off
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        if LO_IN:      # float32 = (bf16 bits of C) << 16 | (bits of LO), exactly
            hi = tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.uint16, bitcast=True)
            lo = tl.load(LO + c_off, mask=c_mask, other=0).to(tl.uint16, bitcast=True)
            bits = (hi.to(tl.uint32) << 16) | lo.to(tl.uint32)
            acc += bits.to(tl.float32, bitcast=True)
        else:
            acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    if LO_OUT:
        bits = acc.to(tl.uint32, bitcast=True)
        tl.store(c_ptrs, (bits >> 16).to(tl.uint16).to(C.dtype.element_ty, bitcast=True),
                 mask=c_mask)
        tl.store(LO + c_off, (bits & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True),
                 mask=c_mask)
    else:
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=c_mask)


def matmul(a, b, out, accumulate: bool, dot_precision: str, lo=None, keep_lo: bool = False):
    """out (+)= a @ b for 2-D tensors of any strides; ``out`` float32 when accumulating, or
    bfloat16/float16 with ``lo`` (int16, same shape and strides): ``out`` then holds the raw high
    16 bits and ``lo`` the low 16 bits of a float32 accumulator. ``accumulate`` reads that split
    accumulator, ``keep_lo`` writes it split again (otherwise ``out`` gets the sum rounded to its
    dtype and ``lo`` is left alone)."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return out
    if lo is not None and (out.dtype not in (torch.bfloat16, torch.float16)
                           or lo.dtype != torch.int16
                           or lo.shape != out.shape or lo.stride() != out.stride()):
        raise ValueError("lo: expected an int16 tensor with the shape and strides of a 16-bit "
                         f"out, got {lo.dtype} {tuple(lo.shape)} for {out.dtype} "
                         f"{tuple(out.shape)}")
    aligned = aligned16(a, b, out, *a.stride(), *b.stride(), *out.stride())
    cfg = matmul_config(a.dtype, launch_target(a), aligned)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _matmul_kernel[grid](
        a, b, out, lo if lo is not None else out, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, LO_IN=accumulate and lo is not None,
        LO_OUT=lo is not None and keep_lo, DOT_PRECISION=dot_precision, **cfg)
    return out
