"""GRPO family: the clipped surrogate with optional k3 KL, token-local, four aggregations
(``loss_type``: grpo, bnpo, dr_grpo, dapo), and its group-standardised advantages.

Two per-token log-prob inputs with two roles: ``anchor_logps`` is the rollout policy (pi_old) the
importance ratio ``rho = exp(logp - anchor)`` is taken against; ``kl_ref_logps`` is the frozen
reference the ``beta`` KL term pulls towards. ``beta`` here is the KL coefficient (>= 0).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..sequences import acc_dtype, group_index, group_mean_std, group_sum, nonfinite_rows
from ..validation import check_choice, check_finite
from .common import (REDUCTIONS, FusedLossModule, Head, LossResult, LossSpec, check_float_tensor,
                     check_number, detached, masked, per_token, prepare, renamed, token_local)

__all__ = ["grpo_loss", "grpo_loss_from_logps", "GRPOLoss", "group_advantages", "k3_kl",
           "GRPO_LOSS_TYPES", "ADV_SCALES"]

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ADV_SCALES = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages ``(R - mean_g R) / (std(R) + eps)`` (unbiased std), no gradient.

    ``scale``: ``"group"`` (std within each group), ``"batch"`` (std over the whole batch) or
    ``"none"`` (centre only). Consecutive runs of ``group_size`` rewards form a group. (GIFT's
    advantages differ: groups of one and uniform groups have their own rule,
    :func:`gift_fast.losses.gift.gift_advantages`.)
    """
    check_float_tensor("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected shape [B], got {tuple(rewards.shape)}")
    check_finite("rewards", rewards)
    check_choice("scale", scale, ADV_SCALES)
    grp, n_groups = group_index(rewards.shape[0], group_size, None, rewards.device)
    acc = acc_dtype(rewards)
    r = rewards.detach().to(acc)
    counts = group_sum(torch.ones_like(r), grp, n_groups)
    mean, gstd = group_mean_std(r, grp, n_groups, counts, "unbiased")
    centred = r - mean.index_select(0, grp)
    if scale == "group":
        return centred / (gstd.index_select(0, grp) + eps)
    if scale == "batch":
        bstd = r.std() if r.numel() > 1 else torch.zeros((), dtype=acc, device=r.device)
        return centred / (bstd + eps)
    return centred


def k3_kl(lp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): ``exp(ref - lp) - (ref - lp) - 1`` (>= 0, unbiased
    under samples of pi, gradient ``1 - exp(ref - lp)``)."""
    d = ref - lp
    return torch.exp(d) - d - 1


def check_grpo_options(*, beta, epsilon_low, epsilon_high, loss_type, reduction,
                       kl_ref_logps) -> None:
    check_choice("loss_type", loss_type, GRPO_LOSS_TYPES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_number("beta", beta, 0.0)
    check_number("epsilon_low", epsilon_low, 0.0)
    check_number("epsilon_high", epsilon_high, 0.0)
    if beta != 0 and kl_ref_logps is None:
        raise ValueError("kl_ref_logps: required when beta != 0 (the KL term needs reference "
                         "log-probs)")


@renamed(old_logps="anchor_logps", ref_logps="kl_ref_logps")
def grpo_loss_from_logps(logps: torch.Tensor, anchor_logps: Optional[torch.Tensor],
                         advantages: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
                         cu_seqlens: Optional[torch.Tensor] = None,
                         kl_ref_logps: Optional[torch.Tensor] = None, beta: float = 0.0,
                         epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                         loss_type: str = "dapo", max_completion_length: Optional[int] = None,
                         num_items_in_batch=None, reduction: str = "mean") -> LossResult:
    """Clipped-surrogate GRPO with optional k3 KL to a reference, token-local.

    Per token ``-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * k3`` with
    ``rho = exp(logp - anchor)`` (``anchor_logps=None``: on-policy, ``anchor = logp.detach()``),
    ``k3 = exp(ref - logp) - (ref - logp) - 1`` with ``ref = kl_ref_logps``. ``advantages`` is
    ``[B]`` (broadcast over the sequence) or per token like ``logps``. ``reduction="mean"``
    aggregates by ``loss_type``: ``grpo`` (mean over sequences of per-sequence token means),
    ``bnpo`` (sum / active tokens), ``dr_grpo`` (sum / (B * max_completion_length); T by default
    on padded input), ``dapo`` (sum / active tokens, or ``num_items_in_batch``); ``"sum"`` is the
    numerator of that mean, ``"none"`` the per-token terms (like ``logps``, 0 at ignored tokens).
    Metrics: ``clip_fraction`` (tokens whose clipped branch is active), ``kl`` (mean k3 over active
    tokens, when ``kl_ref_logps`` is given), ``ratio_mean``.
    """
    check_grpo_options(beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                       loss_type=loss_type, reduction=reduction, kl_ref_logps=kl_ref_logps)
    layout, active, acc, lp, fl = prepare(logps, mask, cu_seqlens, anchor_logps=anchor_logps,
                                          kl_ref_logps=kl_ref_logps)
    check_float_tensor("advantages", advantages)
    adv_tok = None                           # per-token advantages are counted, not checked
    if tuple(advantages.shape) == (layout.n_seq,):
        check_finite("advantages", advantages)
        adv = layout.expand(advantages.detach().to(acc))
    elif tuple(advantages.shape) == tuple(logps.shape):
        adv = adv_tok = advantages.detach().reshape(-1).to(acc)
    else:
        raise ValueError(f"advantages: expected shape ({layout.n_seq},) (one per sequence) or "
                         f"{tuple(logps.shape)} (one per token), got {tuple(advantages.shape)}")
    old = fl["anchor_logps"].detach() if fl["anchor_logps"] is not None else lp.detach()
    ref = detached(fl["kl_ref_logps"])
    zero = torch.zeros((), dtype=acc, device=lp.device)
    log_ratio = masked(active, lp - old)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    per = -torch.minimum(ratio * adv, clipped * adv)
    kl = None
    if ref is not None:
        kl = k3_kl(masked(active, lp), masked(active, ref))
        if beta != 0:
            per = per + beta * kl
    per = masked(active, per)
    act_f = active.to(acc)
    n_active = act_f.sum()
    if reduction == "none":
        loss = per_token(layout, per)
    elif loss_type == "grpo":
        lengths = layout.seq_sum(act_f)
        total = (layout.seq_sum(per) / lengths.clamp_min(1)).sum()
        loss = total if reduction == "sum" else total / max(layout.n_seq, 1)
    elif reduction == "sum":
        loss = per.sum()
    elif loss_type == "bnpo":
        loss = per.sum() / n_active.clamp_min(1)
    elif loss_type == "dr_grpo":
        mcl = max_completion_length if max_completion_length is not None else layout.max_len
        if mcl is None:
            raise ValueError("max_completion_length: required for loss_type='dr_grpo' on packed input")
        check_number("max_completion_length", mcl, 0, lo_open=True)
        loss = per.sum() / (layout.n_seq * mcl)
    else:
        if num_items_in_batch is not None:
            denom = torch.as_tensor(num_items_in_batch, dtype=acc, device=lp.device)
        else:
            denom = n_active
        loss = per.sum() / denom.clamp_min(1)
    with torch.no_grad():
        is_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
        nf = n_active.clamp_min(1)
        metrics = {
            "clip_fraction": ((is_clipped & active).to(acc).sum() / nf).float(),
            "ratio_mean": (masked(active, ratio).sum() / nf).float(),
        }
        if kl is not None:
            metrics["kl"] = (masked(active, kl).sum() / nf).float()
        else:
            metrics["kl"] = zero.float()
        metrics["nonfinite_rows"] = nonfinite_rows(active, lp, fl["anchor_logps"], ref, adv_tok)
    return loss, metrics


@renamed(old_logps="anchor_logps", ref_logps="kl_ref_logps")
def grpo_loss(hidden, weight, targets, anchor_logps, advantages, *, kl_ref_logps=None, beta=0.0,
              epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo", max_completion_length=None,
              num_items_in_batch=None, cu_seqlens=None, bias=None, temperature=1.0, softcap=None,
              ignore_index=-100, reduction="mean", backend="auto",
              vocab_parallel_group=None) -> LossResult:
    """GRPO clipped surrogate (+ beta * k3 KL) on hidden states; ``advantages [B]`` e.g. from
    :func:`group_advantages`; ``anchor_logps``: the rollout policy's log-probs (None:
    on-policy). See :func:`grpo_loss_from_logps`."""
    head = Head(weight, bias, temperature, softcap, ignore_index, backend, vocab_parallel_group)
    return token_local(
        hidden, targets, cu_seqlens, head,
        lambda logps, mask: grpo_loss_from_logps(
            logps, anchor_logps, advantages, mask=mask, cu_seqlens=cu_seqlens,
            kl_ref_logps=kl_ref_logps, beta=beta, epsilon_low=epsilon_low,
            epsilon_high=epsilon_high, loss_type=loss_type,
            max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
            reduction=reduction),
        scalar=reduction != "none")


class GRPOLoss(FusedLossModule):
    """GRPO as a module; options as :func:`grpo_loss` (``beta``, ``loss_type``, ...)."""

    loss_fn = staticmethod(grpo_loss)

    def forward(self, hidden: torch.Tensor, lm_head, targets: torch.Tensor,
                anchor_logps: Optional[torch.Tensor], advantages: torch.Tensor, *,
                kl_ref_logps: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                **call_options) -> LossResult:
        if kl_ref_logps is not None:
            call_options["kl_ref_logps"] = kl_ref_logps
        return self._loss(hidden, lm_head, targets, anchor_logps, advantages, bias=bias,
                          **call_options)


def _mean_over(loss_type: str = "dapo", **_) -> str:
    # dr_grpo divides by B * max_completion_length, a constant per sequence: scaling by
    # sequences is exact across ranks.
    return "sequences" if loss_type in ("grpo", "dr_grpo") else "tokens"


SPECS = (LossSpec("grpo", grpo_loss_from_logps, grpo_loss, GRPOLoss, token_local=True,
                mean_over=_mean_over),)
# Exported by gift_fast next to the front-ends.
HELPERS = (group_advantages,)
