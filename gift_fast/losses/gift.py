"""GIFT (Group-relative Implicit Fine Tuning): ``L = (1/N_seq) sum_i (A_i - beta z_i)^2``.

``A`` standardises the explicit rewards within each group, ``z`` the sequence log-ratios
``s_i = sum m (logp - anchor) / |y|^length_norm`` (docs/losses.md, GIFT). The group statistics
(:func:`gift_advantages`, :func:`gift_implicit_z`) are the library's one implementation of the
authors' rules; the verl adapter and the benchmarks call them. The test oracles
(tests/reference_losses.py, tests/gift_authors_reference.py) are independent on purpose.

``beta`` here weighs the implicit term against the advantages (> 0); in the preference losses it
is an inverse temperature, in GRPO a KL coefficient (docs/losses.md, "One vocabulary").
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ..backends import resolve_backend
from ..sequences import (STD_CHOICES, check_like, group_index, group_mean_std, group_sum,
                         make_layout, nonfinite_rows)
from ..validation import check_choice, check_linear_inputs, check_logprob_input
from .common import (REDUCTIONS, FusedLossModule, Head, LossResult, LossSpec, check_layout,
                     check_length_norm, check_number, check_per_seq, composed, masked, prepare,
                     reduce, seq_logratios)

__all__ = ["gift_loss", "gift_loss_from_logps", "GIFTLoss", "gift_advantages", "gift_implicit_z",
           "uniform_groups", "GroupStats"]


# --------------------------------------------------------------------------------------------
# group statistics (the authors' rules, once)
# --------------------------------------------------------------------------------------------

class GroupStats(NamedTuple):
    value: torch.Tensor     # [B] the standardised value of each sequence
    mean: torch.Tensor      # [n_groups]
    std: torch.Tensor       # [n_groups]
    counts: torch.Tensor    # [n_groups] sequences per group (value dtype)


def _counts(grp: torch.Tensor, n_groups: int, dtype) -> torch.Tensor:
    return group_sum(torch.ones(grp.numel(), dtype=dtype, device=grp.device), grp, n_groups)


def uniform_groups(r: torch.Tensor, grp: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``[n_groups]`` bool: every reward of the group is equal (a group of one included)."""
    r_max = torch.full((n_groups,), -math.inf, dtype=r.dtype, device=r.device).scatter_reduce(
        0, grp, r, "amax")
    r_min = torch.full((n_groups,), math.inf, dtype=r.dtype, device=r.device).scatter_reduce(
        0, grp, r, "amin")
    return r_max == r_min


def gift_advantages(r: torch.Tensor, grp: torch.Tensor, n_groups: int, eps: float,
                    std: str = "unbiased") -> GroupStats:
    """``A = (R - mean_g R) / (std_g R + eps)``; a group whose rewards are all equal has A = 0
    exactly (no rounding noise); a group of one follows the authors' code (mean 0, std 1):
    ``A = R / (1 + eps)``."""
    counts = _counts(grp, n_groups, r.dtype)
    mean, sd = group_mean_std(r, grp, n_groups, counts, std)
    a = (r - mean.index_select(0, grp)) / (sd.index_select(0, grp) + eps)
    a = torch.where(uniform_groups(r, grp, n_groups).index_select(0, grp), torch.zeros_like(a), a)
    a = torch.where((counts == 1).index_select(0, grp), r / (1 + eps), a)
    return GroupStats(a, mean, sd, counts)


def gift_implicit_z(s: torch.Tensor, grp: torch.Tensor, n_groups: int, eps: float,
                    std: str = "unbiased", detach_stats: bool = True) -> GroupStats:
    """``z = (s - mean_g s) / (std_g s + eps)`` (statistics detached unless ``detach_stats`` is
    False); a group of one uses the detached s as its mean and std 1 (authors' code):
    ``z = (s - stopgrad(s)) / (1 + eps)``, 0 in value, gradient ``1 / (1 + eps)``, so the
    sequence is still trained."""
    counts = _counts(grp, n_groups, s.dtype)
    mean, sd = group_mean_std(s.detach() if detach_stats else s, grp, n_groups, counts, std)
    z = (s - mean.index_select(0, grp)) / (sd.index_select(0, grp) + eps)
    z = torch.where((counts == 1).index_select(0, grp), (s - s.detach()) / (1 + eps), z)
    return GroupStats(z, mean, sd, counts)


# --------------------------------------------------------------------------------------------
# options: one parser for the composed and the fused path
# --------------------------------------------------------------------------------------------

def check_gift_options(*, beta, eps, std, length_norm, reduction) -> None:
    check_choice("std", std, STD_CHOICES)
    check_choice("reduction", reduction, REDUCTIONS)
    # beta scales the implicit term: beta <= 0 drops it or rewards anti-correlation.
    check_number("beta", beta, 0.0, lo_open=True)
    check_number("eps", eps, 0.0)
    check_length_norm(length_norm)


# --------------------------------------------------------------------------------------------
# the epilogue on per-token log-probs
# --------------------------------------------------------------------------------------------

def gift_loss_from_logps(logps: torch.Tensor, anchor_logps: torch.Tensor, rewards: torch.Tensor,
                         *, mask: Optional[torch.Tensor] = None,
                         cu_seqlens: Optional[torch.Tensor] = None,
                         group_size: Optional[int] = None, group_ids: Optional[torch.Tensor] = None,
                         beta: float = 1.0, eps: float = 1e-6, std: str = "unbiased",
                         detach_stats: bool = True, length_norm: float = 0.0,
                         drop_uniform_groups: bool = False, reduction: str = "mean",
                         data_parallel_group=None) -> LossResult:
    """GIFT: ``L = (1/N_seq) sum_i (A_i - beta z_i)^2`` on per-token log-probs.

    ``anchor_logps`` (required): the rollout policy's log-probs (pi_old, the authors' choice) or
    the reference's. ``A`` and ``z``: :func:`gift_advantages`, :func:`gift_implicit_z`.
    ``drop_uniform_groups`` skips groups whose rewards are all equal (groups of one included):
    they add nothing to the loss or the normaliser. ``reduction="none"`` returns the per-sequence
    terms (zero for dropped sequences).
    Metrics: ``adv_mean`` (mean A), ``z_mean``, ``z_abs_mean``, ``implicit_std`` (mean over groups of
    the std of s), ``correlation`` (mean within-group Pearson correlation of s and R over groups
    where it is defined), ``uniform_reward_frac``, ``loss_groups`` (groups kept),
    ``nonfinite_rows`` (active tokens whose log-prob or anchor is NaN or +-inf).

    ``data_parallel_group``: a ``torch.distributed`` process group whose ranks each hold part of
    the batch (in rank order). The group statistics (and ``N_seq``, and the metrics) are then those
    of the whole batch, exactly: ``group_size`` counts consecutive sequences of the global order,
    ``group_ids`` are global labels. Each rank's loss covers its own sequences, so the per-rank
    losses sum to the single-process loss (DDP / FSDP2 average gradients: see
    docs/distributed.md). Needs ``detach_stats=True`` when the group has more than one rank.
    """
    check_gift_options(beta=beta, eps=eps, std=std, length_norm=length_norm, reduction=reduction)
    layout, active, acc, lp, fl = prepare(logps, mask, cu_seqlens, anchor_logps=anchor_logps)
    if anchor_logps is None:
        raise ValueError("anchor_logps: required (log-probs of pi_old or pi_ref), got None")
    check_per_seq("rewards", rewards, layout, logps)
    r = rewards.detach().to(acc)
    s, _ = seq_logratios(layout, active, lp, fl["anchor_logps"].detach(), length_norm)
    n_local, offset = layout.n_seq, 0
    n_bad = nonfinite_rows(active, lp, fl["anchor_logps"])
    if data_parallel_group is not None:    # from here on s, r, group_ids span the whole batch
        from ..distributed.data_parallel import data_parallel_world, gather_group_batch
        s, r, group_ids, offset = gather_group_batch(s, r, group_ids, data_parallel_group,
                                                     detach_stats)
        if data_parallel_world(data_parallel_group)[0] > 1:     # a count over the whole batch
            torch.distributed.all_reduce(n_bad, group=data_parallel_group)
    n_seq = s.shape[0]
    grp, n_groups = group_index(n_seq, group_size, group_ids, logps.device, empty_groups_ok=True)

    adv = gift_advantages(r, grp, n_groups, eps, std)
    imp = gift_implicit_z(s, grp, n_groups, eps, std, detach_stats)
    a, z, counts = adv.value, imp.value, adv.counts
    present = counts > 0           # all but the empty groups of a compiled group_ids batch
    uniform_g = uniform_groups(r, grp, n_groups)

    per = (a - beta * z) ** 2
    if drop_uniform_groups:
        keep = ~uniform_g.index_select(0, grp)
        per = masked(keep, per)
        n_kept = keep.to(acc).sum()
    else:
        n_kept = n_seq
    loss = reduce(per[offset:offset + n_local], reduction, n_kept)   # this rank's sequences

    with torch.no_grad():
        dr = r - adv.mean.index_select(0, grp)
        sd = s.detach()
        ds = sd - group_mean_std(sd, grp, n_groups, counts, std)[0].index_select(0, grp)
        cov = group_sum(dr * ds, grp, n_groups)
        vr = group_sum(dr * dr, grp, n_groups)
        vs = group_sum(ds * ds, grp, n_groups)
        defined = (counts > 1) & (vr > 0) & (vs > 0)
        rho = torch.where(defined, cov / torch.sqrt(torch.where(defined, vr * vs, 1.0)), 0.0)
        n_def = defined.to(acc).sum()
        multi = (counts > 1).to(acc)
        n_div, g_div = max(n_seq, 1), present.sum().clamp_min(1)   # empty batch: 0, not NaN
        metrics = {
            "adv_mean": (a.sum() / n_div).float(),
            "z_mean": (z.detach().sum() / n_div).float(),
            "z_abs_mean": (z.detach().abs().sum() / n_div).float(),
            "implicit_std": ((imp.std.detach() * multi).sum() / multi.sum().clamp_min(1)).float(),
            "correlation": (rho.sum() / n_def.clamp_min(1)).float(),
            "uniform_reward_frac": uniform_g.to(torch.float32).sum() / g_div,
            "loss_groups": (~uniform_g & present).to(torch.float32).sum() if drop_uniform_groups
            else present.to(torch.float32).sum(),
            "nonfinite_rows": n_bad,
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# the fused front-end
# --------------------------------------------------------------------------------------------

def _fused(hidden, targets, anchor_logps, rewards, group_size, cu_seqlens, head: Head, **options):
    """GIFT through the triton two-phase op (forward kernel, epilogue kernel, one backward); the
    options were checked by :func:`check_gift_options`, the tensors are checked here as the
    epilogue checks them (the op never runs it)."""
    from ..backends.triton_gift import fused_gift_loss
    h2, t1, lead = check_linear_inputs(hidden, head.weight, targets, head.bias, head.temperature,
                                       head.softcap, head.ignore_index)
    check_logprob_input("anchor_logps", anchor_logps)
    check_like("anchor_logps", anchor_logps, targets, "one value per token, like targets")
    layout = make_layout(anchor_logps, cu_seqlens, "anchor_logps")
    check_per_seq("rewards", rewards, layout, anchor_logps)
    group_index(layout.n_seq, group_size, None, hidden.device)
    if cu_seqlens is None:
        B, T = lead
        cu_seqlens = torch.arange(B + 1, device=hidden.device) * T
    return fused_gift_loss(h2, head.weight, head.bias, t1, anchor_logps, rewards, cu_seqlens,
                           group_size, temperature=head.temperature, softcap=head.softcap,
                           ignore_index=head.ignore_index, **options)


def gift_loss(hidden, weight, targets, anchor_logps, rewards, *, group_size=None, group_ids=None,
              cu_seqlens=None, bias=None, beta=1.0, eps=1e-6, std="unbiased", detach_stats=True,
              length_norm=0.0, drop_uniform_groups=False, temperature=1.0, softcap=None,
              ignore_index=-100, reduction="mean", backend="auto", data_parallel_group=None,
              vocab_parallel_group=None) -> LossResult:
    """GIFT (Group-relative Implicit Fine Tuning) on hidden states: ``L = mean_i (A_i - beta z_i)^2``.

    Args:
        hidden: ``[B, T, H]`` (or packed ``[N, H]`` with ``cu_seqlens``).
        weight: ``[V, H]`` lm_head weight; ``bias`` optional ``[V]``.
        targets: ``[B, T]`` / ``[N]`` token ids, ``ignore_index`` on prompt and padding.
        anchor_logps: per-token log-probs of the anchor (pi_old by default, or pi_ref), like targets.
        rewards: ``[B]`` explicit rewards, finite.
        group_size / group_ids: consecutive groups of ``group_size`` sequences, or ``[B]`` labels.
        data_parallel_group: process group whose ranks each hold part of the batch: group
            statistics are exact over the whole batch (docs/distributed.md); then the log-probs
            and the epilogue are composed (on the triton backend too).
        vocab_parallel_group: the lm_head is sharded along the vocabulary over this process
            group (``weight``/``bias`` are this rank's shard); see :func:`gift_fast.linear_logprobs`
            and docs/distributed.md. Every front-end takes it.
        Other options: see :func:`gift_loss_from_logps` and docs/losses.md.

    On the triton backend, with detached statistics, ``group_size`` groups, no process group and
    a scalar reduction, GIFT runs as one two-phase op (tested equal to the composed path).
    Returns ``(loss, metrics)``.
    """
    check_gift_options(beta=beta, eps=eps, std=std, length_norm=length_norm, reduction=reduction)
    head = Head(weight, bias, temperature, softcap, ignore_index, backend, vocab_parallel_group)
    if (resolve_backend(backend, getattr(hidden, "device", torch.device("cpu")),
                        getattr(hidden, "dtype", None)) == "triton"
            and detach_stats and group_ids is None and group_size is not None
            and data_parallel_group is None and vocab_parallel_group is None
            and reduction in ("mean", "sum") and isinstance(hidden, torch.Tensor)):
        check_layout(hidden, targets, cu_seqlens)
        return _fused(hidden, targets, anchor_logps, rewards, group_size, cu_seqlens, head,
                      beta=beta, eps=eps, std=std, length_norm=length_norm,
                      drop_uniform_groups=drop_uniform_groups, reduction=reduction)
    return composed(hidden, targets, cu_seqlens, head, lambda logps, mask: gift_loss_from_logps(
        logps, anchor_logps, rewards, mask=mask, cu_seqlens=cu_seqlens, group_size=group_size,
        group_ids=group_ids, beta=beta, eps=eps, std=std, detach_stats=detach_stats,
        length_norm=length_norm, drop_uniform_groups=drop_uniform_groups, reduction=reduction,
        data_parallel_group=data_parallel_group))


class GIFTLoss(FusedLossModule):
    """GIFT as a module; options as :func:`gift_loss` (``group_size``, ``beta``, ``eps``, ...)."""

    loss_fn = staticmethod(gift_loss)

    def forward(self, hidden: torch.Tensor, lm_head, targets: torch.Tensor,
                anchor_logps: torch.Tensor, rewards: torch.Tensor, *,
                bias: Optional[torch.Tensor] = None, **call_options) -> LossResult:
        return self._loss(hidden, lm_head, targets, anchor_logps, rewards, bias=bias,
                          **call_options)


SPECS = (LossSpec("gift", gift_loss_from_logps, gift_loss, GIFTLoss, token_local=False,
                mean_over="sequences", global_statistics=True),)
