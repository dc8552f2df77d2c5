"""UNA (unified alignment): the implicit reward ``r = beta * s`` and implicit score
``q = sigma(r)`` fitted to pairwise preferences, binary labels or scores.

``anchor_logps`` is the frozen reference the log-ratios ``s`` are taken against (None:
reference-free); ``beta`` is the implicit reward's inverse temperature, with a kind-dependent
default (``None``: 0.03 pairwise / score_mse, 0.01 binary).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..sequences import nonfinite_rows, pair_split
from ..validation import check_choice, check_unit_interval
from .common import (REDUCTIONS, AnchoredLossModule, Head, LossResult, LossSpec,
                     check_length_norm, check_number, check_per_seq, composed, detached, mean_of,
                     prepare, reduce, renamed, seq_logratios)
from .preference import preference_metrics

__all__ = ["una_loss", "una_loss_from_logps", "UNALoss", "UNA_KINDS"]

UNA_KINDS = ("pairwise", "binary_mse", "binary_bce", "score_mse")


@renamed(ref_logps="anchor_logps")
def una_loss_from_logps(logps: torch.Tensor, anchor_logps: Optional[torch.Tensor] = None, *,
                        mask: Optional[torch.Tensor] = None,
                        cu_seqlens: Optional[torch.Tensor] = None, kind: str = "pairwise",
                        labels: Optional[torch.Tensor] = None,
                        scores: Optional[torch.Tensor] = None, beta: Optional[float] = None,
                        length_norm: float = 0.0, reduction: str = "mean") -> LossResult:
    """UNA with implicit reward ``r = beta s`` and implicit score ``q = sigma(r)``.

    ``pairwise``: ``-log sigma(r_w - r_l)`` per pair (DPO convention). ``binary_mse``:
    ``(q_i - t_i)^2``; ``binary_bce``: ``-t log q - (1 - t) log(1 - q)`` per sequence, with
    ``t = labels`` (1 desirable / 0 undesirable; default: first half 1, second half 0).
    ``score_mse``: ``(q_i - scores_i)^2``, ``scores`` in [0, 1] required. Mean over examples.
    ``beta=None``: 0.03 for pairwise and score_mse, 0.01 for the binary kinds.
    """
    check_choice("kind", kind, UNA_KINDS)
    check_choice("reduction", reduction, REDUCTIONS)
    if beta is None:
        beta = 0.01 if kind.startswith("binary") else 0.03
    check_number("beta", beta)
    check_length_norm(length_norm)
    layout, active, acc, lp, fl = prepare(logps, mask, cu_seqlens, anchor_logps=anchor_logps)
    anchor = detached(fl["anchor_logps"])
    s, _ = seq_logratios(layout, active, lp, anchor, length_norm)
    r = beta * s
    if kind == "pairwise":
        rw, rl = pair_split(r, "logps")
        return reduce(-F.logsigmoid(rw - rl), reduction), preference_metrics(
            rw, rl, nonfinite_rows(active, lp, anchor))
    if kind == "score_mse":
        if scores is None:
            raise ValueError("scores: required for kind='score_mse' (one target score in [0, 1] per sequence)")
        check_per_seq("scores", scores, layout, logps)
        t = scores.detach().to(acc)
        name = "scores"
    else:
        if labels is None:
            b = layout.n_seq
            if b % 2:
                raise ValueError(f"logps: without labels, kind={kind!r} needs an even number of "
                                 f"sequences (first half desirable, second half not), got {b}")
            t = (torch.arange(b, device=lp.device) < b // 2).to(acc)
        else:
            if not isinstance(labels, torch.Tensor):
                raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
            if tuple(labels.shape) != (layout.n_seq,):
                raise ValueError(f"labels: expected shape ({layout.n_seq},), got {tuple(labels.shape)}")
            t = labels.detach().to(acc)
        name = "labels"
    check_unit_interval(name, t)
    if kind == "binary_bce":
        per = -(t * F.logsigmoid(r) + (1 - t) * F.logsigmoid(-r))
    else:
        per = (torch.sigmoid(r) - t) ** 2
    with torch.no_grad():
        metrics = {"implicit_reward_mean": mean_of(r),
                   "implicit_score_mean": mean_of(torch.sigmoid(r)),
                   "nonfinite_rows": nonfinite_rows(active, lp, anchor)}
    return reduce(per, reduction), metrics


@renamed(ref_logps="anchor_logps")
def una_loss(hidden, weight, targets, anchor_logps=None, *, kind="pairwise", labels=None,
             scores=None, beta=None, length_norm=0.0, cu_seqlens=None, bias=None,
             temperature=1.0, softcap=None, ignore_index=-100, reduction="mean", backend="auto",
             vocab_parallel_group=None) -> LossResult:
    """UNA on hidden states (``kind`` in pairwise, binary_mse, binary_bce, score_mse)."""
    head = Head(weight, bias, temperature, softcap, ignore_index, backend, vocab_parallel_group)
    return composed(hidden, targets, cu_seqlens, head, lambda logps, mask: una_loss_from_logps(
        logps, anchor_logps, mask=mask, cu_seqlens=cu_seqlens, kind=kind, labels=labels,
        scores=scores, beta=beta, length_norm=length_norm, reduction=reduction))


class UNALoss(AnchoredLossModule):
    """UNA as a module; options as :func:`una_loss`; ``labels`` / ``scores`` per call."""

    loss_fn = staticmethod(una_loss)


def _mean_over(kind: str = "pairwise", **_) -> str:
    return "pairs" if kind == "pairwise" else "sequences"


SPECS = (LossSpec("una", una_loss_from_logps, una_loss, UNALoss, token_local=False,
                mean_over=_mean_over),)
