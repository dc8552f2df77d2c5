"""GIFT on the triton backend as one two-phase op: forward kernel -> epilogue kernel -> backward.

The forward kernel gives per-row log-probs (and the lse saved for backward); the epilogue kernel
(``gift_fast.kernels.gift_epilogue``) turns them into the loss and dL/dlogp per row in one launch;
the backward multiplies by grad_output and runs the Triton backend's ``grad``, which skips every
row with zero gradient (prompt tokens, padding, dropped groups). Both ends are the backend
protocol (:mod:`.protocol`) with the single-device combiner.

Handles consecutive groups, detached statistics and "mean"/"sum" reductions; ``gift_loss``
falls back to the composed path (linear_logprobs + functional epilogue) otherwise.
"""
from __future__ import annotations

import torch

from ..kernels import gift_epilogue
from ..sequences import nonfinite_rows
from . import triton_op
from .protocol import local_targets, single_device


class FusedGIFT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, anchor, rewards, cu_seqlens, group_ptr,
                temperature, softcap, ignore_index, beta, eps, length_norm, unbiased,
                drop_uniform, max_group, mean_reduction):
        active = targets != ignore_index
        y = local_targets(targets, active)
        logp, _, _, lse = single_device(triton_op.stats(
            hidden, weight, bias, y, temperature, softcap, want_entropy=False,
            want_argmax=False), active)
        out = gift_epilogue(logp, anchor.detach().float().contiguous(), y, cu_seqlens, group_ptr,
                            rewards.detach().float().contiguous(), beta=beta, eps=eps,
                            length_norm=length_norm, unbiased=unbiased,
                            drop_uniform=drop_uniform, max_group=max_group)
        kept = (group_ptr[1:] - group_ptr[:-1]).float()
        if drop_uniform:
            kept = kept * (1.0 - out["stats"][:, 3])
        denom = kept.sum().clamp_min(1.0) if mean_reduction else torch.ones((), device=lse.device)
        loss = out["err"].sum() / denom
        ctx.save_for_backward(hidden, weight, bias, y, lse, out["grad_rows"], denom)
        ctx.cfg = (temperature, softcap)
        n_bad = nonfinite_rows(y >= 0, logp, anchor)
        ctx.mark_non_differentiable(out["adv"], out["z"], out["stats"], n_bad)
        return loss, out["adv"], out["z"], out["stats"], n_bad

    @staticmethod
    def backward(ctx, d_loss, *_unused):
        hidden, weight, bias, y, lse, grad_rows, denom = ctx.saved_tensors
        g = grad_rows * (d_loss.float() / denom)
        grads = triton_op.grad(hidden, weight, bias, y, lse, None, g, None, *ctx.cfg,
                               need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1],
                               need_db=bias is not None and ctx.needs_input_grad[2])
        return (*grads,) + (None,) * 15


def gift_metrics(adv, z, stats, n_bad, drop_uniform: bool, group_size: int):
    """The same metric names as :func:`gift_fast.functional.gift_loss`."""
    with torch.no_grad():
        std_s, rho, defined, uniform = stats.unbind(1)
        n_groups = stats.shape[0]
        n_div, g_div = max(adv.numel(), 1), max(n_groups, 1)   # an empty batch gives 0, not NaN
        return {
            "adv_mean": adv.sum() / n_div,
            "z_mean": z.sum() / n_div,
            "z_abs_mean": z.abs().sum() / n_div,
            "implicit_std": std_s.sum() / g_div if group_size > 1
            else torch.zeros((), device=adv.device),
            "correlation": rho.sum() / defined.sum().clamp_min(1),
            "uniform_reward_frac": uniform.sum() / g_div,
            "loss_groups": (1.0 - uniform).sum() if drop_uniform
            else torch.tensor(float(n_groups), device=adv.device),
            "nonfinite_rows": n_bad,
        }


def fused_gift_loss(h2, weight, bias, t1, anchor, rewards, cu_seqlens, group_size, *, beta, eps,
                    std, length_norm, drop_uniform_groups, temperature, softcap, ignore_index,
                    reduction):
    """Flattened inputs: h2 [N, H], t1 / anchor [N], rewards [B], cu_seqlens [B+1] int64."""
    B = rewards.numel()
    group_ptr = torch.arange(0, B + 1, group_size, device=h2.device, dtype=torch.int64)
    loss, adv, z, stats, n_bad = FusedGIFT.apply(
        h2, weight, bias, t1, anchor.reshape(-1), rewards, cu_seqlens.long().contiguous(),
        group_ptr, float(temperature), softcap, ignore_index, float(beta), float(eps),
        float(length_norm), std == "unbiased", bool(drop_uniform_groups), group_size,
        reduction == "mean")
    return loss, gift_metrics(adv, z, stats, n_bad, drop_uniform_groups, group_size)
