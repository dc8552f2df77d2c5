"""One-pass token-local losses on the triton backend (SFT variants, DFT, GRPO with advantages).

For these losses dL/dlogp_n depends only on row n, so it is known as soon as the forward kernel
has produced the log-probs. The op therefore computes dX, dW (and db) inside its forward and
backward only scales them by grad_output: nothing but the gradients is kept alive between the
two, and hidden/weight are not saved. Rows whose derivative is zero cost no GEMM work.

The epilogue is any callable ``logp [N] -> (loss, metrics)`` written in torch (the functional
losses); its per-row derivative comes from autograd on that [N] vector, so the math lives in one
place and the fused op cannot drift from it.
"""
from __future__ import annotations

import torch

from . import triton_op
from .protocol import local_targets, single_device


class OnePassTokenLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, ignore_index, epilogue,
                box):
        active = targets != ignore_index
        y = local_targets(targets, active)
        logp, _, _, lse = single_device(triton_op.stats(
            hidden, weight, bias, y, temperature, softcap, want_entropy=False,
            want_argmax=False), active)
        with torch.enable_grad():
            leaf = logp.detach().requires_grad_()
            loss, metrics = epilogue(leaf)
            (g,) = torch.autograd.grad(loss, leaf, allow_unused=True)
        box["metrics"] = metrics
        need = ctx.needs_input_grad
        if any(need[:3]) and g is not None:
            g = torch.where(active, g.float(), 0.0)
            grads = triton_op.grad(hidden, weight, bias, y, lse, None, g, None, temperature,
                                   softcap, need_dx=need[0], need_dw=need[1],
                                   need_db=bias is not None and need[2])
        else:
            grads = (None, None, None)
        ctx.grads = grads
        return loss.detach()

    @staticmethod
    def backward(ctx, d_loss):
        # In place: the gradients are ours alone, and a second dX/dW copy would double memory.
        grads = tuple(None if t is None else t.mul_(d_loss.to(t.dtype)) for t in ctx.grads)
        ctx.grads = None
        return (*grads, None, None, None, None, None, None)


def one_pass_token_local(h2, weight, bias, t1, epilogue, *, temperature, softcap, ignore_index):
    """Loss and metrics of ``epilogue(logp)`` with gradients computed in the forward pass."""
    box = {}
    loss = OnePassTokenLocal.apply(h2, weight, bias, t1, float(temperature), softcap, ignore_index,
                                   epilogue, box)
    return loss, box["metrics"]
