"""RPO (reward-aware preference optimisation): the policy's implicit reward ``beta * Delta`` is
matched to the explicit reward ``eta * R``, pairwise (``group_size=2``) or over groups of K.

``anchor_logps`` is the frozen reference the log-ratios ``Delta`` are taken against (None:
reference-free); ``beta`` is the inverse temperature of the implicit reward, as in DPO.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..sequences import group_index, group_sum, nonfinite_rows, pair_split
from ..validation import check_choice
from .common import (REDUCTIONS, FusedLossModule, Head, LossResult, LossSpec, check_length_norm,
                     check_number, check_per_seq, composed, detached, mean_of, prepare, reduce,
                     renamed, seq_logratios)
from .preference import preference_metrics

__all__ = ["rpo_loss", "rpo_loss_from_logps", "RPOLoss", "RPO_KINDS"]

RPO_KINDS = ("sq", "bwd_kl", "fwd_kl")


def _bern_kl(p_logit: torch.Tensor, q_logit: torch.Tensor) -> torch.Tensor:
    """KL(Bern(sigma(p)) || Bern(sigma(q))) from logits, via logsigmoid."""
    lp1, lp0 = F.logsigmoid(p_logit), F.logsigmoid(-p_logit)
    lq1, lq0 = F.logsigmoid(q_logit), F.logsigmoid(-q_logit)
    return torch.exp(lp1) * (lp1 - lq1) + torch.exp(lp0) * (lp0 - lq0)


def _group_logsumexp(x: torch.Tensor, grp: torch.Tensor, n_groups: int) -> torch.Tensor:
    mx = torch.full((n_groups,), -math.inf, dtype=x.dtype, device=x.device).scatter_reduce(
        0, grp, x.detach(), "amax")
    e = torch.exp(x - mx.index_select(0, grp))
    return mx + torch.log(group_sum(e, grp, n_groups))


@renamed(ref_logps="anchor_logps")
def rpo_loss_from_logps(logps: torch.Tensor, anchor_logps: Optional[torch.Tensor],
                        rewards: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
                        cu_seqlens: Optional[torch.Tensor] = None, kind: str = "sq",
                        beta: float = 0.2, eta: float = 1.0, group_size: int = 2,
                        group_ids: Optional[torch.Tensor] = None, length_norm: float = 0.0,
                        reduction: str = "mean") -> LossResult:
    """Reward-aware preference optimisation (RPO), mean over pairs / groups.

    ``group_size=2`` without ``group_ids``: pairwise form, batch convention of DPO (sequence k pairs
    with k + B/2), ``h = Delta_w - Delta_l``, ``g = eta (R_w - R_l)``:
    ``sq: (beta h - g)^2``; ``bwd_kl: KL(Bern(sigma(g)) || Bern(sigma(beta h)))``;
    ``fwd_kl: KL(Bern(sigma(beta h)) || Bern(sigma(g)))``.
    Otherwise the multi-response form (ours) over groups (consecutive runs of ``group_size`` or
    ``group_ids``): ``sq: (1/K) sum_i (beta (Delta_i - mean Delta) - eta (R_i - mean R))^2``;
    ``bwd_kl: KL(softmax(eta R) || softmax(beta Delta))``; ``fwd_kl`` the reverse direction.
    For K = 2 the multi-response sq is the pairwise sq / 4, the KLs are equal.
    """
    check_choice("kind", kind, RPO_KINDS)
    check_number("beta", beta)
    check_number("eta", eta)
    check_length_norm(length_norm)
    check_choice("reduction", reduction, REDUCTIONS)
    layout, active, acc, lp, fl = prepare(logps, mask, cu_seqlens, anchor_logps=anchor_logps)
    check_per_seq("rewards", rewards, layout, logps)
    ref = detached(fl["anchor_logps"])
    d, _ = seq_logratios(layout, active, lp, ref, length_norm)
    r = rewards.detach().to(acc)
    if group_ids is None and group_size == 2:
        dw, dl = pair_split(d, "logps")
        rw, rl = pair_split(r, "rewards")
        x = beta * (dw - dl)
        g = eta * (rw - rl)
        if kind == "sq":
            per = (x - g) ** 2
        elif kind == "bwd_kl":
            per = _bern_kl(g, x)
        else:
            per = _bern_kl(x, g)
        return reduce(per, reduction), preference_metrics(beta * dw, beta * dl,
                                                          nonfinite_rows(active, lp, ref))
    grp, n_groups = group_index(layout.n_seq, group_size, group_ids, logps.device)
    counts = group_sum(torch.ones_like(r), grp, n_groups)
    x = beta * d
    g = eta * r
    if kind == "sq":
        xc = x - (group_sum(x, grp, n_groups) / counts).index_select(0, grp)
        gc = g - (group_sum(g, grp, n_groups) / counts).index_select(0, grp)
        per = group_sum((xc - gc) ** 2, grp, n_groups) / counts
    else:
        lx = x - _group_logsumexp(x, grp, n_groups).index_select(0, grp)   # log softmax_i(beta D)
        lg = g - _group_logsumexp(g, grp, n_groups).index_select(0, grp)   # log softmax_i(eta R)
        if kind == "bwd_kl":
            per = group_sum(torch.exp(lg) * (lg - lx), grp, n_groups)
        else:
            per = group_sum(torch.exp(lx) * (lx - lg), grp, n_groups)
    with torch.no_grad():
        metrics = {"implicit_reward_mean": mean_of(x), "reward_mean": mean_of(r),
                   "nonfinite_rows": nonfinite_rows(active, lp, ref)}
    return reduce(per, reduction), metrics


@renamed(ref_logps="anchor_logps")
def rpo_loss(hidden, weight, targets, anchor_logps, rewards, *, kind="sq", beta=0.2, eta=1.0,
             group_size=2, group_ids=None, length_norm=0.0, cu_seqlens=None, bias=None,
             temperature=1.0, softcap=None, ignore_index=-100, reduction="mean", backend="auto",
             vocab_parallel_group=None) -> LossResult:
    """RPO on hidden states (``kind`` in sq, bwd_kl, fwd_kl); pairwise for ``group_size=2``,
    multi-response otherwise. ``anchor_logps``: the reference's log-probs (None:
    reference-free). See :func:`rpo_loss_from_logps`."""
    head = Head(weight, bias, temperature, softcap, ignore_index, backend, vocab_parallel_group)
    return composed(hidden, targets, cu_seqlens, head, lambda logps, mask: rpo_loss_from_logps(
        logps, anchor_logps, rewards, mask=mask, cu_seqlens=cu_seqlens, kind=kind, beta=beta,
        eta=eta, group_size=group_size, group_ids=group_ids, length_norm=length_norm,
        reduction=reduction))


class RPOLoss(FusedLossModule):
    """RPO as a module; options as :func:`rpo_loss`."""

    loss_fn = staticmethod(rpo_loss)

    def forward(self, hidden: torch.Tensor, lm_head, targets: torch.Tensor,
                anchor_logps: Optional[torch.Tensor], rewards: torch.Tensor, *,
                bias: Optional[torch.Tensor] = None, **call_options) -> LossResult:
        return self._loss(hidden, lm_head, targets, anchor_logps, rewards, bias=bias,
                          **call_options)


# Pairwise (group_size=2, no group_ids) is one item per pair, i.e. per group of two.
SPECS = (LossSpec("rpo", rpo_loss_from_logps, rpo_loss, RPOLoss, token_local=False,
                mean_over="groups"),)
