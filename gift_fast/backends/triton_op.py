"""Triton backend: autograd wiring around the kernels in ``gift_fast.kernels``.

Forward: one streaming kernel saves per-row lse (and entropy); no logits are kept.
Backward: rows whose upstream gradient is zero are dropped first (one host sync); the rest are
processed in chunks of C rows bounded by ``BACKWARD_CHUNK_BYTES``: recompute dlogits [C, V]
into one reused buffer, then dX = D @ W and dW += D.T @ X in float32, in fixed order.
"""
from __future__ import annotations

import os

import torch

from ..kernels import dlogits, dot_precision, logprob_forward_stats, matmul

# The one [C, V] buffer of the backward: 256 MiB by default, whatever N and V are.
BACKWARD_CHUNK_BYTES = int(os.environ.get("GIFT_FAST_BWD_CHUNK_BYTES", 256 << 20))
_ROW_ALIGN = 128


def backward_chunk_rows(vocab: int, element_size: int, n_rows: int) -> int:
    rows = BACKWARD_CHUNK_BYTES // (vocab * element_size)
    # Multiples of 128 rows keep the GEMM tiles full; tiny budgets (tests) may go below.
    rows = rows // _ROW_ALIGN * _ROW_ALIGN if rows >= _ROW_ALIGN else max(1, rows)
    return max(1, min(rows, n_rows))


def _check_dtype(hidden: torch.Tensor) -> None:
    if hidden.dtype == torch.float64:
        raise TypeError("hidden: backend='triton' takes float32, float16 or bfloat16; "
                        "use backend='torch' or 'reference' for float64")


def triton_forward(hidden, weight, bias, targets, temperature, softcap, ignore_index,
                   want_entropy):
    """Returns (logp, entropy or None, argmax, lse, kernel targets) for flattened inputs."""
    _check_dtype(hidden)
    active = targets != ignore_index
    # Ignored rows get target -1, which matches no column: the kernel never indexes with it.
    y = torch.where(active, targets.long(), -1).contiguous()
    lse, target_logit, entropy, argmax = logprob_forward_stats(
        hidden, weight, bias, y, temperature, softcap, want_entropy)
    logp = torch.where(active, target_logit - lse, 0.0)
    if want_entropy:
        entropy = torch.where(active, entropy, 0.0)
    return logp, entropy, argmax, lse, y


def triton_backward(hidden, weight, bias, y, lse, entropy, g, e, temperature, softcap,
                    need_dx: bool, need_dw: bool, need_db: bool):
    """Gradients of sum_n g_n logp_n + e_n H_n w.r.t. hidden, weight, bias (None where not needed).

    ``g``/``e`` are float32 per-row upstream gradients, already 0 at ignored rows; ``e`` may be
    None. Rows with g = e = 0 cost nothing: they are dropped before any GEMM (one host sync).
    """
    live = g != 0 if e is None else (g != 0) | (e != 0)
    rows = torch.nonzero(live).squeeze(1)
    d_hidden = torch.zeros_like(hidden) if need_dx else None
    d_weight32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
        if need_dw else None
    d_bias32 = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
        if need_db else None
    n_live = rows.numel()
    if n_live:
        V, H = weight.shape
        precision = dot_precision(hidden.dtype)
        step = backward_chunk_rows(V, hidden.element_size(), n_live)
        buffer = torch.empty((step, V), dtype=hidden.dtype, device=hidden.device)
        for start in range(0, n_live, step):
            idx = rows[start:start + step]
            x = hidden[idx]                            # contiguous copy of the chunk's rows
            d = buffer[:idx.numel()]
            dlogits(x, weight, bias, y[idx], g[idx], e[idx] if e is not None else None,
                    lse[idx], entropy[idx] if e is not None else None, temperature, softcap,
                    d, precision)
            if need_dx:
                dx = torch.empty((idx.numel(), H), dtype=hidden.dtype, device=hidden.device)
                d_hidden[idx] = matmul(d, weight, dx, accumulate=False, dot_precision=precision)
            if need_dw:
                matmul(d.T, x, d_weight32, accumulate=True, dot_precision=precision)
            if need_db:
                d_bias32 += d.sum(0, dtype=torch.float32)
    d_weight = d_weight32.to(weight.dtype) if need_dw else None
    d_bias = d_bias32.to(bias.dtype) if need_db else None
    return d_hidden, d_weight, d_bias


class TritonLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, ignore_index,
                want_entropy):
        logp, entropy, argmax, lse, y = triton_forward(hidden, weight, bias, targets, temperature,
                                                       softcap, ignore_index, want_entropy)
        ctx.save_for_backward(hidden, weight, bias, y, lse, entropy)
        ctx.cfg = (temperature, softcap)
        ctx.mark_non_differentiable(argmax)
        return logp, entropy if entropy is not None else torch.zeros_like(logp), argmax

    @staticmethod
    def backward(ctx, d_logp, d_entropy, _d_argmax):
        hidden, weight, bias, y, lse, entropy = ctx.saved_tensors
        active = y >= 0
        g = torch.where(active, d_logp.float(), 0.0) if d_logp is not None else torch.zeros_like(lse)
        e = None
        if entropy is not None and d_entropy is not None:
            e = torch.where(active, d_entropy.float(), 0.0)
        grads = triton_backward(hidden, weight, bias, y, lse, entropy, g, e, *ctx.cfg,
                                need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1],
                                need_db=bias is not None and ctx.needs_input_grad[2])
        return (*grads, None, None, None, None, None)
