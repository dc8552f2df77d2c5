"""The keep plan of two-phase ops (:mod:`.plan`; 3 GEMM-eq): the forward stores the logits of
all rows (the stream plan's buffer: float32, or 16-bit shifted on triton), the backward forms
D from them in place and runs dX = D @ W, dW = D.T @ X in cuBLAS (:mod:`.blas`), without
recomputing the logits GEMM.

Run for ``linear_logprobs`` and the fused GIFT op (``triton_gift``) when gradients are wanted, the memory budget holds the logits
(:func:`plan.keep_bytes`), no entropy or argmax is asked for (D from stored logits has no entropy
term), on one device, in eager mode: inside torch.compile or a CUDA graph capture the op's
custom ops (recompute plan) run instead. The forward is the stream plan's (:mod:`.token_local`)
forward over one chunk of every row, whose tiles are those of the statistics-only forward, so
the log-probs have the recompute plan's bits; the backward is that plan's gradient step.
Rows with zero upstream gradient (ignored rows included) get D = 0 and add nothing.
"""
from __future__ import annotations

import os

import torch

from . import plan as planner
from .protocol import get_backend
from .token_local import (finish_sums, gradient_buffers, grads_from_logits, logit_store,
                          logits_buffer, stores_logits)

# "0" turns the keep plan off (every two-phase call recomputes); for tests and comparisons.
ENABLED = os.environ.get("GIFT_FAST_KEEP_LOGITS", "1") != "0"


def keep_fits(backend: str, hidden: torch.Tensor, weight: torch.Tensor, need, budget=None,
              bias=None, softcap=None) -> bool:
    """Whether the backend can store these inputs' logits and the keep plan's scratch fits the
    memory budget."""
    module = get_backend(backend)
    if not stores_logits(module, hidden, weight, bias, softcap):
        return False
    N, H = hidden.shape
    V = weight.shape[0]
    mm_dtype = module.stream_dtypes(hidden.dtype)[1]
    elt = torch.empty((), dtype=mm_dtype).element_size()
    fixed = module.stream_fixed_bytes(N, V, H, hidden.dtype, need[1])
    cost = planner.keep_bytes(N, V, H, elt, need[1], need[2], fixed,
                              logit_store(module, V, H, hidden.dtype, hidden.device))
    return cost <= planner.memory_budget(hidden.device, budget)


class KeepLogprobs(torch.autograd.Function):
    """logp [N] of flattened inputs (``y``: local targets, -1 for none) with the logits kept."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, y, active, backend, temperature, softcap):
        module = get_backend(backend)
        z = logits_buffer(module, hidden.shape[0], weight.shape[0], hidden.dtype, hidden.device)
        lse, target_logit = module.stream_logits(hidden, weight, bias, y, temperature, softcap, z)
        ctx.save_for_backward(hidden, weight, bias, y, active, lse)
        # Not saved through autograd: the backward overwrites it with D (its only use).
        ctx.logits = z
        ctx.cfg = (module, temperature, softcap)
        return torch.where(active, target_logit - lse, 0.0)

    @staticmethod
    def backward(ctx, d_logp):
        hidden, weight, bias, y, active, lse = ctx.saved_tensors
        module, temperature, softcap = ctx.cfg
        z, ctx.logits = ctx.logits, None
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        g = torch.where(active, d_logp.to(lse.dtype), 0.0)
        if z is None:         # a second backward (retain_graph): the logits became D; recompute
            grads = module.grad(hidden, weight, bias, y, lse, None, g, None, temperature,
                                softcap, *need)
            return (*grads, None, None, None, None, None)
        mm_dtype = module.stream_dtypes(hidden.dtype)[1]
        d = z if mm_dtype == z.dtype else torch.empty(z.shape, dtype=mm_dtype, device=z.device)
        w_mm, d_hidden, dx_tmp, dw_sum, db32 = gradient_buffers(module, hidden, weight,
                                                                hidden.shape[0], "once", need)
        grads_from_logits(module, z, d, hidden, y, g, lse, temperature, softcap, w_mm, d_hidden,
                          dx_tmp, dw_sum, db32, accumulate=False)
        return (d_hidden, *finish_sums(dw_sum, db32, weight, bias), None, None, None, None, None)
