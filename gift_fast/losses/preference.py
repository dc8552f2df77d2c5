"""Pairwise preference losses on sequence log-ratios: DPO, IPO, SimPO.

Batch convention: chosen = first half of the batch, rejected = second half (sequence k pairs with
k + B/2). ``anchor_logps`` is the frozen reference the log-ratios are taken against (None:
reference-free). ``beta`` is an inverse temperature on the log-ratios (the implicit reward is
``beta * Delta``); IPO's margin is ``1 / (2 beta)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..sequences import nonfinite_rows, pair_split
from ..validation import check_choice
from .common import (REDUCTIONS, AnchoredLossModule, Head, LossResult, LossSpec, Metrics,
                     TokensLossModule, check_length_norm, check_number, composed, detached,
                     mean_of, prepare, reduce, renamed, seq_logratios)

__all__ = ["dpo_loss", "ipo_loss", "simpo_loss", "dpo_loss_from_logps", "ipo_loss_from_logps",
           "simpo_loss_from_logps", "DPOLoss", "IPOLoss", "SimPOLoss", "preference_metrics"]


def preference_metrics(rw: torch.Tensor, rl: torch.Tensor, n_bad: torch.Tensor) -> Metrics:
    """The metrics of every pairwise loss, from the chosen / rejected implicit rewards."""
    with torch.no_grad():
        return {
            "reward_margin": mean_of(rw - rl),
            "reward_accuracy": mean_of((rw > rl).float()),
            "chosen_reward": mean_of(rw),
            "rejected_reward": mean_of(rl),
            "nonfinite_rows": n_bad,
        }


def _length_norm_from_bool(length_normalized) -> float:
    return 1.0 if length_normalized else 0.0


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------

def _pair_logratios(logps, anchor_logps, mask, cu_seqlens, length_norm: float):
    """The (chosen, rejected) sequence log-ratios of a pairwise batch, and its non-finite row
    count: the common start of DPO and IPO."""
    layout, active, _, lp, fl = prepare(logps, mask, cu_seqlens, anchor_logps=anchor_logps)
    ref = detached(fl["anchor_logps"])
    d, _ = seq_logratios(layout, active, lp, ref, length_norm)
    dw, dl = pair_split(d, "logps")
    return dw, dl, nonfinite_rows(active, lp, ref)


@renamed(ref_logps="anchor_logps")
def dpo_loss_from_logps(logps: torch.Tensor, anchor_logps: Optional[torch.Tensor] = None, *,
                        mask: Optional[torch.Tensor] = None,
                        cu_seqlens: Optional[torch.Tensor] = None, beta: float = 0.1,
                        label_smoothing: float = 0.0, length_norm: float = 0.0,
                        reduction: str = "mean") -> LossResult:
    """DPO: ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``, ``h = Delta_w - Delta_l``.

    ``Delta = sum m (logp - anchor) / |y|^length_norm`` (``anchor_logps=None``: reference-free).
    Mean over pairs. Metrics (rewards are ``beta * Delta``): ``reward_margin``,
    ``reward_accuracy``, ``chosen_reward``, ``rejected_reward``.
    """
    check_number("beta", beta)
    check_number("label_smoothing", label_smoothing, 0.0, 1.0)
    check_length_norm(length_norm)
    check_choice("reduction", reduction, REDUCTIONS)
    dw, dl, n_bad = _pair_logratios(logps, anchor_logps, mask, cu_seqlens, length_norm)
    x = beta * (dw - dl)
    per = -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)
    return reduce(per, reduction), preference_metrics(beta * dw, beta * dl, n_bad)


@renamed(ref_logps="anchor_logps")
def dpo_loss(hidden, weight, targets, anchor_logps=None, *, beta=0.1, label_smoothing=0.0,
             length_norm=0.0, cu_seqlens=None, bias=None, temperature=1.0, softcap=None,
             ignore_index=-100, reduction="mean", backend="auto",
             vocab_parallel_group=None) -> LossResult:
    """DPO on hidden states; chosen = first half of the batch, rejected = second half.
    ``anchor_logps``: the reference's per-token log-probs (None: reference-free)."""
    head = Head(weight, bias, temperature, softcap, ignore_index, backend, vocab_parallel_group)
    return composed(hidden, targets, cu_seqlens, head, lambda logps, mask: dpo_loss_from_logps(
        logps, anchor_logps, mask=mask, cu_seqlens=cu_seqlens, beta=beta,
        label_smoothing=label_smoothing, length_norm=length_norm, reduction=reduction))


class DPOLoss(AnchoredLossModule):
    """DPO as a module; options as :func:`dpo_loss`."""

    loss_fn = staticmethod(dpo_loss)


# --------------------------------------------------------------------------------------------
# IPO
# --------------------------------------------------------------------------------------------

@renamed(ref_logps="anchor_logps", length_normalized=("length_norm", _length_norm_from_bool))
def ipo_loss_from_logps(logps: torch.Tensor, anchor_logps: Optional[torch.Tensor] = None, *,
                        mask: Optional[torch.Tensor] = None,
                        cu_seqlens: Optional[torch.Tensor] = None, beta: float = 0.1,
                        length_norm: float = 1.0, reduction: str = "mean") -> LossResult:
    """IPO: ``(h - 1/(2 beta))^2``, ``h = Delta_w - Delta_l``, mean over pairs; the log-ratios
    are length-normalised by default (``length_norm=1``, TRL's convention; 0 = sums)."""
    check_number("beta", beta, 0.0, lo_open=True)
    check_length_norm(length_norm)
    check_choice("reduction", reduction, REDUCTIONS)
    dw, dl, n_bad = _pair_logratios(logps, anchor_logps, mask, cu_seqlens, length_norm)
    per = (dw - dl - 1.0 / (2.0 * beta)) ** 2
    return reduce(per, reduction), preference_metrics(beta * dw, beta * dl, n_bad)


@renamed(ref_logps="anchor_logps", length_normalized=("length_norm", _length_norm_from_bool))
def ipo_loss(hidden, weight, targets, anchor_logps=None, *, beta=0.1, length_norm=1.0,
             cu_seqlens=None, bias=None, temperature=1.0, softcap=None, ignore_index=-100,
             reduction="mean", backend="auto", vocab_parallel_group=None) -> LossResult:
    """IPO on hidden states ``(h - 1/(2 beta))^2``, length-normalised log-ratios by default."""
    head = Head(weight, bias, temperature, softcap, ignore_index, backend, vocab_parallel_group)
    return composed(hidden, targets, cu_seqlens, head, lambda logps, mask: ipo_loss_from_logps(
        logps, anchor_logps, mask=mask, cu_seqlens=cu_seqlens, beta=beta,
        length_norm=length_norm, reduction=reduction))


class IPOLoss(AnchoredLossModule):
    """IPO as a module; options as :func:`ipo_loss`."""

    loss_fn = staticmethod(ipo_loss)


# --------------------------------------------------------------------------------------------
# SimPO
# --------------------------------------------------------------------------------------------

def simpo_loss_from_logps(logps: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
                          cu_seqlens: Optional[torch.Tensor] = None, beta: float = 2.0,
                          gamma: float = 1.0, sft_weight: float = 0.0,
                          label_smoothing: float = 0.0, reduction: str = "mean") -> LossResult:
    """SimPO: ``-log sigma(beta (mean logp_w - mean logp_l) - gamma)``, mean over pairs, plus
    ``sft_weight * NLL`` of the chosen responses (token mean over active chosen tokens).
    Reference-free and always length-normalised (mean log-probs), so it takes neither
    ``anchor_logps`` nor ``length_norm``. Metrics add ``nll`` (the chosen NLL, also when
    ``sft_weight = 0``)."""
    check_number("beta", beta)
    check_number("gamma", gamma)
    check_number("sft_weight", sft_weight, 0.0)
    check_number("label_smoothing", label_smoothing, 0.0, 1.0)
    check_choice("reduction", reduction, REDUCTIONS)
    layout, active, acc, lp, fl = prepare(logps, mask, cu_seqlens)
    sums, lengths = seq_logratios(layout, active, lp, None, 0.0)
    avg = sums / lengths.clamp_min(1)
    aw, al = pair_split(avg, "logps")
    x = beta * (aw - al) - gamma
    per = -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)
    sw, _ = pair_split(sums, "logps")
    lw, _ = pair_split(lengths, "logps")
    nll = -sw.sum() / lw.sum().clamp_min(1)
    if reduction == "none":
        loss = per + sft_weight * nll if sft_weight else per
    else:
        loss = reduce(per, reduction)
        if sft_weight:
            loss = loss + sft_weight * nll
    metrics = preference_metrics(beta * aw, beta * al, nonfinite_rows(active, lp))
    metrics["nll"] = nll.detach().float()
    return loss, metrics


def simpo_loss(hidden, weight, targets, *, beta=2.0, gamma=1.0, sft_weight=0.0,
               label_smoothing=0.0, cu_seqlens=None, bias=None, temperature=1.0, softcap=None,
               ignore_index=-100, reduction="mean", backend="auto",
               vocab_parallel_group=None) -> LossResult:
    """SimPO on hidden states (reference-free, mean log-probs, margin ``gamma``), optional NLL on
    chosen."""
    head = Head(weight, bias, temperature, softcap, ignore_index, backend, vocab_parallel_group)
    return composed(hidden, targets, cu_seqlens, head, lambda logps, mask: simpo_loss_from_logps(
        logps, mask=mask, cu_seqlens=cu_seqlens, beta=beta, gamma=gamma, sft_weight=sft_weight,
        label_smoothing=label_smoothing, reduction=reduction))


class SimPOLoss(TokensLossModule):
    """SimPO as a module; options as :func:`simpo_loss`."""

    loss_fn = staticmethod(simpo_loss)


_DPO_SPEC = LossSpec("dpo", dpo_loss_from_logps, dpo_loss, DPOLoss, token_local=False,
                    mean_over="pairs")
_IPO_SPEC = LossSpec("ipo", ipo_loss_from_logps, ipo_loss, IPOLoss, token_local=False,
                    mean_over="pairs")
_SIMPO_SPEC = LossSpec("simpo", simpo_loss_from_logps, simpo_loss, SimPOLoss, token_local=False,
                      mean_over="pairs")
SPECS = (_DPO_SPEC, _IPO_SPEC, _SIMPO_SPEC)
