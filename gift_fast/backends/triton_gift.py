"""GIFT on the triton backend as one two-phase op: forward kernel -> epilogue kernel -> backward.

The forward kernel gives per-row log-probs (and the lse saved for backward); the epilogue kernel
(``gift_fast.kernels.gift_epilogue``) turns them into the loss and dL/dlogp per row in one launch;
the backward multiplies by grad_output and runs ``gift_fast::linear_logprobs_bwd`` on the triton
backend, which skips every row with zero gradient (prompt tokens, padding, dropped groups) in
eager mode. Both ends are the backend protocol (:mod:`.protocol`) with the single-device combiner.

The forward is the ``torch.library`` custom op ``gift_fast::fused_gift_fwd`` (fake implementation
and autograd registered): torch.compile sees one opaque node, so the Triton launches (and the
interpreter on CPU) are never traced by dynamo.

When the memory budget holds the logits (eager mode, gradients wanted), the op runs the keep
plan of :mod:`.keep` instead (3 GEMM-eq): the kept log-probs (same bits) go through the same
epilogue kernel, and the backward forms D from the stored logits.

Handles consecutive groups, detached statistics and "mean"/"sum" reductions; ``gift_loss``
falls back to the composed path (linear_logprobs + functional epilogue) otherwise.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kernels import gift_epilogue
from .. import logprobs as op_layer
from ..sequences import nonfinite_rows
from . import triton_op
from .keep import KeepLogprobs
from .protocol import local_targets, single_device

Tensor = torch.Tensor


@torch.library.custom_op("gift_fast::fused_gift_fwd", mutates_args=())
def fused_gift_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], local_targets: Tensor,
                   active: Tensor, anchor: Tensor, rewards: Tensor, cu_seqlens: Tensor,
                   group_ptr: Tensor, temperature: float, softcap: Optional[float], beta: float,
                   eps: float, length_norm: float, unbiased: bool, drop_uniform: bool,
                   max_group: int, mean_reduction: bool
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, adv [B], z [B], stats [groups, 4], n_bad, lse [N], grad_rows [N], denom), float32.

    ``lse``, ``grad_rows`` (dL/dlogp per row before 1/denom) and ``denom`` (the mean's
    normaliser, 1 for "sum") are what the backward needs; the others are metrics."""
    logp, _, _, lse = single_device(triton_op.stats(
        hidden, weight, bias, local_targets, temperature, softcap, want_entropy=False,
        want_argmax=False), active)
    loss, adv, z, stats, n_bad, grad_rows, denom = _epilogue(
        logp, active, anchor, local_targets, rewards, cu_seqlens, group_ptr, beta, eps,
        length_norm, unbiased, drop_uniform, max_group, mean_reduction)
    return loss, adv, z, stats, n_bad, lse, grad_rows, denom


def _epilogue(logp, active, anchor, local_targets, rewards, cu_seqlens, group_ptr, beta, eps,
              length_norm, unbiased, drop_uniform, max_group, mean_reduction):
    """(loss, adv, z, stats, n_bad, grad_rows, denom) of the log-probs (the epilogue kernel)."""
    out = gift_epilogue(logp, anchor.float().contiguous(), local_targets, cu_seqlens, group_ptr,
                        rewards.float().contiguous(), beta=beta, eps=eps,
                        length_norm=length_norm, unbiased=unbiased, drop_uniform=drop_uniform,
                        max_group=max_group)
    kept = (group_ptr[1:] - group_ptr[:-1]).float()
    if drop_uniform:
        kept = kept * (1.0 - out["stats"][:, 3])
    denom = (kept.sum().clamp_min(1.0) if mean_reduction
             else torch.ones((), dtype=torch.float32, device=logp.device))
    loss = out["err"].sum() / denom
    n_bad = nonfinite_rows(active, logp, anchor)
    return loss, out["adv"], out["z"], out["stats"], n_bad, out["grad_rows"], denom


class _EpilogueOfKeptLogprobs(torch.autograd.Function):
    """The epilogue on differentiable log-probs (the keep plan's): dL/dlogp = grad_rows / denom
    times grad_output, as the fused op's backward forms it."""

    @staticmethod
    def forward(ctx, logp, *args):
        loss, adv, z, stats, n_bad, grad_rows, denom = _epilogue(logp.detach(), *args)
        ctx.mark_non_differentiable(adv, z, stats, n_bad)
        ctx.save_for_backward(grad_rows, denom)
        return loss, adv, z, stats, n_bad

    @staticmethod
    def backward(ctx, d_loss, *_unused):
        grad_rows, denom = ctx.saved_tensors
        return (grad_rows * (d_loss.float() / denom),) + (None,) * 13


@fused_gift_fwd.register_fake
def _(hidden, weight, bias, local_targets, active, anchor, rewards, cu_seqlens, group_ptr,
      temperature, softcap, beta, eps, length_norm, unbiased, drop_uniform, max_group,
      mean_reduction):
    f32 = dict(dtype=torch.float32, device=hidden.device)
    n, b, groups = hidden.shape[0], rewards.shape[0], group_ptr.shape[0] - 1
    return (torch.empty((), **f32), torch.empty(b, **f32), torch.empty(b, **f32),
            torch.empty((groups, 4), **f32), torch.empty((), **f32), torch.empty(n, **f32),
            torch.empty(n, **f32), torch.empty((), **f32))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, y, active = inputs[:5]
    temperature, softcap = inputs[9], inputs[10]
    _loss, adv, z, stats, n_bad, lse, grad_rows, denom = output
    ctx.mark_non_differentiable(adv, z, stats, n_bad, lse, grad_rows, denom)
    ctx.save_for_backward(hidden, weight, bias, y, active, lse, grad_rows, denom)
    ctx.cfg = (temperature, softcap)


def _backward(ctx, d_loss, *_unused):
    hidden, weight, bias, y, active, lse, grad_rows, denom = ctx.saved_tensors
    temperature, softcap = ctx.cfg
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[2]
    g = grad_rows * (d_loss.float() / denom)
    d_hidden, d_weight, d_bias = op_layer.linear_logprobs_bwd(
        hidden, weight, bias, y, active, lse, None, g, None, "triton", temperature, softcap,
        need_dx, need_dw, need_db, None, not op_layer.must_not_sync(hidden))
    return ((d_hidden if need_dx else None, d_weight if need_dw else None,
             d_bias if need_db else None) + (None,) * 15)


fused_gift_fwd.register_autograd(_backward, setup_context=_setup_context)


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
            # a fill on the device, not a host-to-device copy (a sync; illegal in a capture)
            else torch.full((), n_groups, dtype=torch.float32, device=adv.device),
            "nonfinite_rows": n_bad,
        }


def fused_gift_loss(h2, weight, bias, t1, anchor, rewards, cu_seqlens, group_size, *, beta, eps,
                    std, length_norm, drop_uniform_groups, temperature, softcap, ignore_index,
                    reduction):
    """Flattened inputs: h2 [N, H], t1 / anchor [N], rewards [B], cu_seqlens [B+1] int64."""
    B = rewards.numel()
    group_ptr = torch.arange(0, B + 1, group_size, device=h2.device, dtype=torch.int64)
    active = t1 != ignore_index
    y = local_targets(t1, active)
    temperature, softcap = float(temperature), None if softcap is None else float(softcap)
    epilogue_args = (anchor.detach().reshape(-1), y, rewards.detach(),
                     cu_seqlens.long().contiguous(), group_ptr, float(beta), float(eps),
                     float(length_norm), std == "unbiased", bool(drop_uniform_groups),
                     group_size, reduction == "mean")
    if op_layer.keeps_logits("triton", h2, weight, bias, False, softcap):
        # The keep plan (3 GEMM-eq): the same log-prob bits, the logits kept for the backward.
        logp = KeepLogprobs.apply(h2, weight, bias, y, active, "triton", temperature, softcap)
        loss, adv, z, stats, n_bad = _EpilogueOfKeptLogprobs.apply(logp, active, *epilogue_args)
        return loss, gift_metrics(adv, z, stats, n_bad, drop_uniform_groups, group_size)
    (anchor1, y, rewards1, cu, ptr, beta, eps, length_norm, unbiased, drop, max_group,
     mean) = epilogue_args
    loss, adv, z, stats, n_bad, _, _, _ = fused_gift_fwd(
        h2, weight, bias, y, active, anchor1, rewards1, cu, ptr, temperature, softcap, beta, eps,
        length_norm, unbiased, drop, max_group, mean)
    return loss, gift_metrics(adv, z, stats, n_bad, drop_uniform_groups, group_size)
