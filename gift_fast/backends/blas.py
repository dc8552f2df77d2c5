"""Plain GEMMs of the backward through torch (cuBLAS on CUDA): ``out (+)= a @ b``.

A 16-bit GEMM whose sum continues across blocks or chunks must keep that sum in float32, so
``out`` may be float32 while ``a`` and ``b`` are 16-bit. On CUDA that is cuBLAS with
``out_dtype=torch.float32`` (16-bit operands, float32 accumulation and output). torch 2.13
implements ``out_dtype`` for CUDA tensors only (CPU raises NotImplementedError), so on CPU (the
interpreter tests) the operands are converted to float32 first: the same products, exact in
float32, summed in float32.

cuBLAS picks its algorithm from the shapes, dtypes and GPU, so for a fixed shape on a given GPU
the result is deterministic run to run (no split-K atomics in these GEMMs' default algorithms).
"""
from __future__ import annotations

import torch


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
            accumulate: bool = False) -> torch.Tensor:
    """``out = a @ b`` (``accumulate``: ``out += a @ b``) for 2-D tensors of any strides;
    ``out`` has the operands' dtype or float32."""
    if out.dtype == a.dtype:
        if accumulate:
            return out.addmm_(a, b)
        return torch.mm(a, b, out=out)
    if out.dtype != torch.float32:
        raise TypeError(f"out: expected {a.dtype} or torch.float32, got {out.dtype}")
    if a.is_cuda:
        if accumulate:
            return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    a32, b32 = a.float(), b.float()
    return out.addmm_(a32, b32) if accumulate else torch.mm(a32, b32, out=out)
