"""Loss epilogues on precomputed per-token log-probs (form (a) of every loss).

Each function takes per-token log-probs of the policy (with gradient), anchor / reference /
old-policy log-probs (no gradient), and per-sequence data, and returns ``(loss, metrics)``:
``loss`` a scalar (or per-sequence / per-pair values with ``reduction="none"``), ``metrics`` a
dict of detached 0-dim tensors worth logging (no host sync to produce them). Every loss reports
``nonfinite_rows``: the number of active tokens whose log-prob, or a per-token input at that token
(anchor / reference / old log-prob, per-token advantage), is NaN or +-inf. Non-finite values are
not checked on this path (it would cost a host sync): they propagate into the loss and gradients,
and this count is how to see it. On an empty batch every metric is finite (0).

Per-token log-probs given as data (``anchor_logps``, ``ref_logps``, ``old_logps``) must be
float32 or float64 (16-bit ones are refused, :func:`gift_fast.validation.check_logprob_input`);
``logps`` may be any float dtype; rewards, scores and advantages of any float dtype are cast.

Layouts: padded ``logps [B, T]`` with an optional ``mask [B, T]`` (nonzero = active token; None =
all active), or packed ``logps [N]`` with ``cu_seqlens [B + 1]``. Ignored tokens contribute
nothing, whatever their log-prob value. All reductions and statistics run in float32 (float64
when an input is float64), whatever the input dtype. The math follows ``docs/losses.md``.

These compose with any engine producing per-token log-probs; the fused front-ends in
:mod:`gift_fast.losses` call them on the output of :func:`gift_fast.linear_logprobs`.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .sequences import (STD_CHOICES, Layout, acc_dtype, check_like, group_index, group_mean_std,
                        group_sum, make_layout, nonfinite_rows, pair_split, token_mask)
from .validation import _capturing, check_choice, check_finite, check_logprob_input

__all__ = [
    "gift_loss", "grpo_loss", "group_advantages", "dpo_loss", "ipo_loss", "simpo_loss",
    "rpo_loss", "una_loss", "fdiv_sft_loss", "dft_loss", "ift_loss", "sequence_logratios",
    "REDUCTIONS", "GRPO_LOSS_TYPES", "RPO_KINDS", "UNA_KINDS", "DIVERGENCES",
]

REDUCTIONS = ("mean", "sum", "none")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
RPO_KINDS = ("sq", "bwd_kl", "fwd_kl")
UNA_KINDS = ("pairwise", "binary_mse", "binary_bce", "score_mse")
DIVERGENCES = ("tv", "pearson", "hellinger", "kl", "js")
ADV_SCALES = ("group", "batch", "none")

Metrics = Dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------

def _check_float_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")


def _check_number(name: str, value, lo: Optional[float] = None, hi: Optional[float] = None,
                  lo_open: bool = False) -> None:
    # A comparison, not math.isfinite, which dynamo cannot trace (False for NaN as well).
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and -math.inf < value < math.inf)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        rng = ""
        if lo is not None or hi is not None:
            rng = f" in {'(' if lo_open else '['}{lo if lo is not None else '-inf'}, " \
                  f"{hi if hi is not None else 'inf'}]"
        raise ValueError(f"{name}: expected a finite number{rng}, got {value!r}")


def _per_seq(name: str, t, layout: Layout, logps: torch.Tensor, check_values: bool = True):
    _check_float_tensor(name, t)
    if tuple(t.shape) != (layout.n_seq,):
        raise ValueError(f"{name}: expected shape ({layout.n_seq},) (one value per sequence), "
                         f"got {tuple(t.shape)}")
    if t.device != logps.device:
        raise ValueError(f"{name}: expected device {logps.device}, got {t.device}")
    if check_values:
        check_finite(name, t)


def _prepare(logps, mask, cu_seqlens, **others):
    """Validates the per-token inputs; returns (layout, flat float mask, acc dtype, flat tensors).

    ``others`` are per-token log-probs given as data (anchor / reference / old policy): float32
    or float64 only (:func:`gift_fast.validation.check_logprob_input`)."""
    _check_float_tensor("logps", logps)
    layout = make_layout(logps, cu_seqlens, "logps")
    for k, v in others.items():
        if v is not None:
            check_logprob_input(k, v)
            check_like(k, v, logps, "one value per token, like logps")
    active = token_mask(logps, mask)
    acc = acc_dtype(logps, *others.values())
    flat = {k: (v.reshape(-1).to(acc) if v is not None else None) for k, v in others.items()}
    return layout, active, acc, logps.reshape(-1).to(acc), flat


def _reduce(per: torch.Tensor, reduction: str, denom=None) -> torch.Tensor:
    if reduction == "none":
        return per
    total = per.sum()
    if reduction == "sum":
        return total
    n = per.numel() if denom is None else denom
    if isinstance(n, torch.Tensor):
        return total / n.clamp_min(1)
    return total / max(n, 1)


def _masked(active: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(active, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _mean_of(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().mean() if x.numel() else torch.zeros((), device=x.device)


def sequence_logratios(logps: torch.Tensor, anchor_logps: Optional[torch.Tensor] = None, *,
                       mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                       length_norm: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``s_i = sum_{n in i} m_n (logp_n - anchor_n) / |y_i|^p`` and ``|y_i|`` (float, >= 0).

    ``anchor_logps=None`` gives plain per-sequence log-likelihoods (SimPO). ``|y_i|`` is clamped
    to >= 1 where it divides (an empty response gives s = 0).
    """
    _check_number("length_norm", length_norm, 0.0, 1.0)
    layout, active, acc, lp, fl = _prepare(logps, mask, cu_seqlens, anchor_logps=anchor_logps)
    return _seq_logratios(layout, active, lp, fl["anchor_logps"], length_norm)


def _seq_logratios(layout: Layout, active, lp, anchor, length_norm: float):
    diff = lp if anchor is None else lp - anchor
    s = layout.seq_sum(_masked(active, diff))
    lengths = layout.seq_sum(active.to(lp.dtype))
    if length_norm != 0:
        s = s / lengths.clamp_min(1) ** length_norm
    return s, lengths


# --------------------------------------------------------------------------------------------
# GIFT
# --------------------------------------------------------------------------------------------

def gift_loss(logps: torch.Tensor, anchor_logps: torch.Tensor, rewards: torch.Tensor, *,
              mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
              group_size: Optional[int] = None, group_ids: Optional[torch.Tensor] = None,
              beta: float = 1.0, eps: float = 1e-6, std: str = "unbiased",
              detach_stats: bool = True, length_norm: float = 0.0,
              drop_uniform_groups: bool = False, reduction: str = "mean",
              data_parallel_group=None) -> Tuple[torch.Tensor, Metrics]:
    """GIFT: ``L = (1/N_seq) sum_i (A_i - beta z_i)^2``.

    ``A`` standardises the rewards within each group, ``z`` the sequence log-ratios
    ``s_i = sum m (logp - anchor) / |y|^length_norm`` within each group (statistics detached unless
    ``detach_stats=False``). A group of one follows the authors' code (mean 0 and std 1 for the
    rewards, the detached ``s`` and std 1 for the implicit rewards): ``A = R / (1 + eps)`` and
    ``z = (s - stopgrad(s)) / (1 + eps)``, 0 in value but with gradient ``1 / (1 + eps)``, so the
    sequence is still trained. A group whose rewards are all equal has ``A = 0`` exactly.
    ``drop_uniform_groups`` skips groups whose rewards are all equal (groups of one included): they
    add nothing to the loss or the normaliser. ``reduction="none"`` returns the per-sequence terms
    (zero for dropped sequences).
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
    check_choice("std", std, STD_CHOICES)
    check_choice("reduction", reduction, REDUCTIONS)
    # beta scales the implicit term: beta <= 0 drops it or rewards anti-correlation.
    _check_number("beta", beta, 0.0, lo_open=True)
    _check_number("eps", eps, 0.0)
    _check_number("length_norm", length_norm, 0.0, 1.0)
    layout, active, acc, lp, fl = _prepare(logps, mask, cu_seqlens, anchor_logps=anchor_logps)
    if anchor_logps is None:
        raise ValueError("anchor_logps: required (log-probs of pi_old or pi_ref), got None")
    _per_seq("rewards", rewards, layout, logps)
    r = rewards.detach().to(acc)
    s, _ = _seq_logratios(layout, active, lp, fl["anchor_logps"].detach(), length_norm)
    n_local, offset = layout.n_seq, 0
    n_bad = nonfinite_rows(active, lp, fl["anchor_logps"])
    if data_parallel_group is not None:    # from here on s, r, group_ids span the whole batch
        from .distributed.data_parallel import data_parallel_world, gather_group_batch
        s, r, group_ids, offset = gather_group_batch(s, r, group_ids, data_parallel_group,
                                                     detach_stats)
        if data_parallel_world(data_parallel_group)[0] > 1:     # a count over the whole batch
            torch.distributed.all_reduce(n_bad, group=data_parallel_group)
    n_seq = s.shape[0]
    grp, n_groups = group_index(n_seq, group_size, group_ids, logps.device, empty_groups_ok=True)

    ones = torch.ones(n_seq, dtype=acc, device=lp.device)
    counts = group_sum(ones, grp, n_groups)
    present = counts > 0           # all but the empty groups of a compiled group_ids batch
    single = (counts == 1).index_select(0, grp)                    # [B] sequence alone in its group

    r_max = torch.full((n_groups,), -math.inf, dtype=acc, device=lp.device).scatter_reduce(
        0, grp, r, "amax")
    r_min = torch.full((n_groups,), math.inf, dtype=acc, device=lp.device).scatter_reduce(
        0, grp, r, "amin")
    uniform_g = r_max == r_min
    uniform = uniform_g.index_select(0, grp)

    r_mean, r_std = group_mean_std(r, grp, n_groups, counts, std)
    a = (r - r_mean.index_select(0, grp)) / (r_std.index_select(0, grp) + eps)
    a = torch.where(uniform, torch.zeros_like(a), a)             # exactly 0, no rounding noise
    a = torch.where(single, r / (1 + eps), a)                      # authors: mean 0, std 1

    s_stat = s.detach() if detach_stats else s
    s_mean, s_std = group_mean_std(s_stat, grp, n_groups, counts, std)
    z = (s - s_mean.index_select(0, grp)) / (s_std.index_select(0, grp) + eps)
    # A group of one: detached mean s, std 1 (authors' code) -> 0 in value, gradient 1/(1+eps).
    z = torch.where(single, (s - s.detach()) / (1 + eps), z)

    per = (a - beta * z) ** 2
    if drop_uniform_groups:
        keep = ~uniform
        per = _masked(keep, per)
        n_kept = keep.to(acc).sum()
    else:
        n_kept = n_seq
    loss = _reduce(per[offset:offset + n_local], reduction, n_kept)   # this rank's sequences

    with torch.no_grad():
        dr = r - r_mean.index_select(0, grp)
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
            "implicit_std": ((s_std.detach() * multi).sum() / multi.sum().clamp_min(1)).float(),
            "correlation": (rho.sum() / n_def.clamp_min(1)).float(),
            "uniform_reward_frac": uniform_g.to(torch.float32).sum() / g_div,
            "loss_groups": (~uniform_g & present).to(torch.float32).sum() if drop_uniform_groups
            else present.to(torch.float32).sum(),
            "nonfinite_rows": n_bad,
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages ``(R - mean_g R) / (std(R) + eps)`` (unbiased std), no gradient.

    ``scale``: ``"group"`` (std within each group), ``"batch"`` (std over the whole batch) or
    ``"none"`` (centre only). Consecutive runs of ``group_size`` rewards form a group.
    """
    _check_float_tensor("rewards", rewards)
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


def grpo_loss(logps: torch.Tensor, old_logps: Optional[torch.Tensor], advantages: torch.Tensor, *,
              mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
              ref_logps: Optional[torch.Tensor] = None, beta: float = 0.0,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "dapo",
              max_completion_length: Optional[int] = None,
              num_items_in_batch=None) -> Tuple[torch.Tensor, Metrics]:
    """Clipped-surrogate GRPO with optional k3 KL to a reference, token-local.

    Per token ``-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * k3`` with
    ``rho = exp(logp - old)`` (``old_logps=None``: on-policy, ``old = logp.detach()``),
    ``k3 = exp(ref - logp) - (ref - logp) - 1``. ``advantages`` is ``[B]`` (broadcast over the
    sequence) or per token like ``logps``. Aggregation by ``loss_type``: ``grpo`` (mean over
    sequences of per-sequence token means), ``bnpo`` (sum / active tokens), ``dr_grpo``
    (sum / (B * max_completion_length); T by default on padded input), ``dapo`` (sum / active
    tokens, or ``num_items_in_batch``).
    Metrics: ``clip_fraction`` (tokens whose clipped branch is active), ``kl`` (mean k3 over active
    tokens, when ``ref_logps`` is given), ``ratio_mean``.
    """
    check_choice("loss_type", loss_type, GRPO_LOSS_TYPES)
    _check_number("beta", beta, 0.0)
    _check_number("epsilon_low", epsilon_low, 0.0)
    _check_number("epsilon_high", epsilon_high, 0.0)
    if beta != 0 and ref_logps is None:
        raise ValueError("ref_logps: required when beta != 0 (the KL term needs reference log-probs)")
    layout, active, acc, lp, fl = _prepare(logps, mask, cu_seqlens, old_logps=old_logps,
                                           ref_logps=ref_logps)
    _check_float_tensor("advantages", advantages)
    adv_tok = None                           # per-token advantages are counted, not checked
    if tuple(advantages.shape) == (layout.n_seq,):
        check_finite("advantages", advantages)
        adv = layout.expand(advantages.detach().to(acc))
    elif tuple(advantages.shape) == tuple(logps.shape):
        adv = adv_tok = advantages.detach().reshape(-1).to(acc)
    else:
        raise ValueError(f"advantages: expected shape ({layout.n_seq},) (one per sequence) or "
                         f"{tuple(logps.shape)} (one per token), got {tuple(advantages.shape)}")
    old = fl["old_logps"].detach() if fl["old_logps"] is not None else lp.detach()
    zero = torch.zeros((), dtype=acc, device=lp.device)
    log_ratio = _masked(active, lp - old)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    per = -torch.minimum(ratio * adv, clipped * adv)
    kl = None
    if fl["ref_logps"] is not None:
        d = _masked(active, fl["ref_logps"].detach() - lp)
        kl = torch.exp(d) - d - 1
        if beta != 0:
            per = per + beta * kl
    per = _masked(active, per)
    act_f = active.to(acc)
    n_active = act_f.sum()
    if loss_type == "grpo":
        lengths = layout.seq_sum(act_f)
        loss = (layout.seq_sum(per) / lengths.clamp_min(1)).sum() / max(layout.n_seq, 1)
    elif loss_type == "bnpo":
        loss = per.sum() / n_active.clamp_min(1)
    elif loss_type == "dr_grpo":
        mcl = max_completion_length if max_completion_length is not None else layout.max_len
        if mcl is None:
            raise ValueError("max_completion_length: required for loss_type='dr_grpo' on packed input")
        _check_number("max_completion_length", mcl, 0, lo_open=True)
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
            "ratio_mean": (_masked(active, ratio).sum() / nf).float(),
        }
        if kl is not None:
            metrics["kl"] = (_masked(active, kl).sum() / nf).float()
        else:
            metrics["kl"] = zero.float()
        metrics["nonfinite_rows"] = nonfinite_rows(active, lp, fl["old_logps"], fl["ref_logps"],
                                                   adv_tok)
    return loss, metrics


# --------------------------------------------------------------------------------------------
# pairwise preference losses (chosen = first half, rejected = second half)
# --------------------------------------------------------------------------------------------

def _pref_metrics(rw: torch.Tensor, rl: torch.Tensor, n_bad: torch.Tensor) -> Metrics:
    with torch.no_grad():
        return {
            "reward_margin": _mean_of(rw - rl),
            "reward_accuracy": _mean_of((rw > rl).float()),
            "chosen_reward": _mean_of(rw),
            "rejected_reward": _mean_of(rl),
            "nonfinite_rows": n_bad,
        }


def dpo_loss(logps: torch.Tensor, ref_logps: Optional[torch.Tensor], *,
             mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
             beta: float = 0.1, label_smoothing: float = 0.0, length_norm: float = 0.0,
             reduction: str = "mean") -> Tuple[torch.Tensor, Metrics]:
    """DPO: ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``, ``h = Delta_w - Delta_l``.

    ``Delta = sum m (logp - ref)`` (``ref_logps=None``: reference-free). Mean over pairs.
    Metrics (rewards are ``beta * Delta``): ``reward_margin``, ``reward_accuracy``,
    ``chosen_reward``, ``rejected_reward``.
    """
    _check_number("beta", beta)
    _check_number("label_smoothing", label_smoothing, 0.0, 1.0)
    check_choice("reduction", reduction, REDUCTIONS)
    layout, active, acc, lp, fl = _prepare(logps, mask, cu_seqlens, ref_logps=ref_logps)
    ref = fl["ref_logps"].detach() if fl["ref_logps"] is not None else None
    d, _ = _seq_logratios(layout, active, lp, ref, length_norm)
    dw, dl = pair_split(d, "logps")
    x = beta * (dw - dl)
    per = -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)
    return _reduce(per, reduction), _pref_metrics(beta * dw, beta * dl,
                                                  nonfinite_rows(active, lp, ref))


def ipo_loss(logps: torch.Tensor, ref_logps: Optional[torch.Tensor], *,
             mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
             beta: float = 0.1, length_normalized: bool = True,
             reduction: str = "mean") -> Tuple[torch.Tensor, Metrics]:
    """IPO: ``(h - 1/(2 beta))^2`` with length-normalised log-ratios by default. Mean over pairs."""
    _check_number("beta", beta, 0.0, lo_open=True)
    check_choice("reduction", reduction, REDUCTIONS)
    layout, active, acc, lp, fl = _prepare(logps, mask, cu_seqlens, ref_logps=ref_logps)
    ref = fl["ref_logps"].detach() if fl["ref_logps"] is not None else None
    d, _ = _seq_logratios(layout, active, lp, ref, 1.0 if length_normalized else 0.0)
    dw, dl = pair_split(d, "logps")
    per = (dw - dl - 1.0 / (2.0 * beta)) ** 2
    return _reduce(per, reduction), _pref_metrics(beta * dw, beta * dl,
                                                  nonfinite_rows(active, lp, ref))


def simpo_loss(logps: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
               cu_seqlens: Optional[torch.Tensor] = None, beta: float = 2.0, gamma: float = 1.0,
               sft_weight: float = 0.0, label_smoothing: float = 0.0,
               reduction: str = "mean") -> Tuple[torch.Tensor, Metrics]:
    """SimPO: ``-log sigma(beta (mean logp_w - mean logp_l) - gamma)``, mean over pairs, plus
    ``sft_weight * NLL`` of the chosen responses (token mean over active chosen tokens).
    Metrics add ``nll`` (the chosen NLL, also when ``sft_weight = 0``)."""
    _check_number("beta", beta)
    _check_number("gamma", gamma)
    _check_number("sft_weight", sft_weight, 0.0)
    _check_number("label_smoothing", label_smoothing, 0.0, 1.0)
    check_choice("reduction", reduction, REDUCTIONS)
    layout, active, acc, lp, fl = _prepare(logps, mask, cu_seqlens)
    sums, lengths = _seq_logratios(layout, active, lp, None, 0.0)
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
        loss = _reduce(per, reduction)
        if sft_weight:
            loss = loss + sft_weight * nll
    metrics = _pref_metrics(beta * aw, beta * al, nonfinite_rows(active, lp))
    metrics["nll"] = nll.detach().float()
    return loss, metrics


# --------------------------------------------------------------------------------------------
# RPO
# --------------------------------------------------------------------------------------------

def _bern_kl(p_logit: torch.Tensor, q_logit: torch.Tensor) -> torch.Tensor:
    """KL(Bern(sigma(p)) || Bern(sigma(q))) from logits, via logsigmoid."""
    lp1, lp0 = F.logsigmoid(p_logit), F.logsigmoid(-p_logit)
    lq1, lq0 = F.logsigmoid(q_logit), F.logsigmoid(-q_logit)
    return torch.exp(lp1) * (lp1 - lq1) + torch.exp(lp0) * (lp0 - lq0)


def rpo_loss(logps: torch.Tensor, ref_logps: Optional[torch.Tensor], rewards: torch.Tensor, *,
             mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
             kind: str = "sq", beta: float = 0.2, eta: float = 1.0, group_size: int = 2,
             group_ids: Optional[torch.Tensor] = None, length_norm: float = 0.0,
             reduction: str = "mean") -> Tuple[torch.Tensor, Metrics]:
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
    _check_number("beta", beta)
    _check_number("eta", eta)
    check_choice("reduction", reduction, REDUCTIONS)
    layout, active, acc, lp, fl = _prepare(logps, mask, cu_seqlens, ref_logps=ref_logps)
    _per_seq("rewards", rewards, layout, logps)
    ref = fl["ref_logps"].detach() if fl["ref_logps"] is not None else None
    d, _ = _seq_logratios(layout, active, lp, ref, length_norm)
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
        return _reduce(per, reduction), _pref_metrics(beta * dw, beta * dl,
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
        metrics = {"implicit_reward_mean": _mean_of(x), "reward_mean": _mean_of(r),
                   "nonfinite_rows": nonfinite_rows(active, lp, ref)}
    return _reduce(per, reduction), metrics


def _group_logsumexp(x: torch.Tensor, grp: torch.Tensor, n_groups: int) -> torch.Tensor:
    mx = torch.full((n_groups,), -math.inf, dtype=x.dtype, device=x.device).scatter_reduce(
        0, grp, x.detach(), "amax")
    e = torch.exp(x - mx.index_select(0, grp))
    return mx + torch.log(group_sum(e, grp, n_groups))


# --------------------------------------------------------------------------------------------
# UNA
# --------------------------------------------------------------------------------------------

def una_loss(logps: torch.Tensor, anchor_logps: Optional[torch.Tensor], *,
             mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
             kind: str = "pairwise", labels: Optional[torch.Tensor] = None,
             scores: Optional[torch.Tensor] = None, beta: Optional[float] = None,
             reduction: str = "mean") -> Tuple[torch.Tensor, Metrics]:
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
    _check_number("beta", beta)
    layout, active, acc, lp, fl = _prepare(logps, mask, cu_seqlens, anchor_logps=anchor_logps)
    anchor = fl["anchor_logps"].detach() if fl["anchor_logps"] is not None else None
    s, _ = _seq_logratios(layout, active, lp, anchor, 0.0)
    r = beta * s
    if kind == "pairwise":
        rw, rl = pair_split(r, "logps")
        return _reduce(-F.logsigmoid(rw - rl), reduction), _pref_metrics(
            rw, rl, nonfinite_rows(active, lp, anchor))
    if kind == "score_mse":
        if scores is None:
            raise ValueError("scores: required for kind='score_mse' (one target score in [0, 1] per sequence)")
        _per_seq("scores", scores, layout, logps)
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
    if not _capturing(t) and bool(((t < 0) | (t > 1) | ~torch.isfinite(t)).any()):
        raise ValueError(f"{name}: expected values in [0, 1]")
    if kind == "binary_bce":
        per = -(t * F.logsigmoid(r) + (1 - t) * F.logsigmoid(-r))
    else:
        per = (torch.sigmoid(r) - t) ** 2
    with torch.no_grad():
        metrics = {"implicit_reward_mean": _mean_of(r),
                   "implicit_score_mean": _mean_of(torch.sigmoid(r)),
                   "nonfinite_rows": nonfinite_rows(active, lp, anchor)}
    return _reduce(per, reduction), metrics


# --------------------------------------------------------------------------------------------
# token-local SFT variants
# --------------------------------------------------------------------------------------------

_EDGES = {"hellinger": -1.0, "js": -math.log(2.0)}


def _phi(div: str, u: torch.Tensor) -> torch.Tensor:
    if div == "pearson":
        return u - u * u / 4
    if div == "kl":
        return 1 - torch.exp(-u)
    if div == "hellinger":
        return u / (1 + u)
    if div == "js":
        return torch.log(2 - torch.exp(-u))
    return u


def _dphi(div: str, u):
    if div == "pearson":
        return 1 - u / 2
    if div == "kl":
        return math.exp(-u)
    if div == "hellinger":
        return 1 / (1 + u) ** 2
    if div == "js":
        return math.exp(-u) / (2 - math.exp(-u))
    return 1.0


def phi_f(div: str, u: torch.Tensor) -> torch.Tensor:
    """The rescaled ``phi_f`` with its C1 linear extension below ``edge + 0.05``."""
    if div not in _EDGES:
        return _phi(div, u)
    u0 = _EDGES[div] + 0.05
    inside = u >= u0
    val = _phi(div, torch.where(inside, u, torch.full_like(u, u0)))
    lin = float(_phi(div, torch.tensor(u0, dtype=torch.float64))) + _dphi(div, u0) * (u - u0)
    return torch.where(inside, val, lin)


def fdiv_sft_loss(logps: torch.Tensor, ref_logps: Optional[torch.Tensor] = None, *,
                  mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                  divergence: str = "tv", beta: float = 0.1) -> Tuple[torch.Tensor, Metrics]:
    """f-divergence SFT (ours): ``L = -(1/beta) mean_n phi_f(beta (logp_n - ref_n))``.

    ``tv`` reports plain NLL ``mean(-logp)`` (same gradient). ``ref_logps=None`` anchors at the
    current policy (``ref = logp.detach()``, i.e. u = 0 and the gradient of SFT).
    Token mean over active tokens. Metrics: ``nll``, ``implicit_reward_mean`` (mean u).
    """
    check_choice("divergence", divergence, DIVERGENCES)
    _check_number("beta", beta, 0.0, lo_open=True)
    layout, active, acc, lp, fl = _prepare(logps, mask, cu_seqlens, ref_logps=ref_logps)
    n_active = active.to(acc).sum().clamp_min(1)
    nll = -_masked(active, lp).sum() / n_active
    ref = fl["ref_logps"].detach() if fl["ref_logps"] is not None else lp.detach()
    u = _masked(active, beta * (lp - ref))
    if divergence == "tv":
        loss = nll
    else:
        loss = -_masked(active, phi_f(divergence, u)).sum() / (beta * n_active)
    with torch.no_grad():
        metrics = {"nll": nll.detach().float(),
                   "implicit_reward_mean": (u.sum() / n_active).float(),
                   "nonfinite_rows": nonfinite_rows(active, lp, fl["ref_logps"])}
    return loss, metrics


def dft_loss(logps: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
             cu_seqlens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Metrics]:
    """Dynamic fine-tuning: ``L = -mean_n sg(exp logp_n) logp_n`` over active tokens."""
    layout, active, acc, lp, fl = _prepare(logps, mask, cu_seqlens)
    n_active = active.to(acc).sum().clamp_min(1)
    lpm = _masked(active, lp)
    loss = -(torch.exp(lpm).detach() * lpm).sum() / n_active
    with torch.no_grad():
        metrics = {"nll": (-lpm.sum() / n_active).float(),
                   "prob_mean": (_masked(active, torch.exp(lpm)).sum() / n_active).float(),
                   "nonfinite_rows": nonfinite_rows(active, lp)}
    return loss, metrics


_SCAN_BLOCK = 128


def discounted_suffix_sum(c: torch.Tensor, gamma: float) -> torch.Tensor:
    """``w_t = sum_{j >= t} gamma^(j - t) c_j`` along the last dim of ``c [B, T]``.

    Blocked: an in-block ``[K, K]`` discount matrix plus a ``[nb, nb]`` matrix across blocks; only
    non-negative powers of gamma appear, so nothing overflows for long T.
    """
    b, t = c.shape
    k = min(_SCAN_BLOCK, max(t, 1))
    nb = -(-t // k)
    pad = nb * k - t
    x = F.pad(c, (0, pad)).view(b, nb, k)
    ar = torch.arange(k, device=c.device, dtype=c.dtype)
    e = ar[None, :] - ar[:, None]                             # e[t, j] = j - t
    dmat = torch.where(e >= 0, torch.pow(torch.tensor(gamma, dtype=c.dtype, device=c.device),
                                         e.clamp_min(0)), torch.zeros_like(e))
    inner = x @ dmat.T                                         # [b, nb, k]: in-block suffix sums
    starts = inner[:, :, 0]                                    # block sums discounted to block start
    ab = torch.arange(nb, device=c.device, dtype=c.dtype)
    eb = ab[None, :] - ab[:, None]                             # later block index - block index
    gk = torch.tensor(gamma, dtype=c.dtype, device=c.device) ** k
    bmat = torch.where(eb >= 1, torch.pow(gk, (eb - 1).clamp_min(0)), torch.zeros_like(eb))
    carry = starts @ bmat.T                                    # value at the start of block b+1
    tail = torch.pow(torch.tensor(gamma, dtype=c.dtype, device=c.device), k - ar)  # gamma^(k - t)
    out = inner + carry[:, :, None] * tail[None, None, :]
    return out.reshape(b, nb * k)[:, :t]


def ift_loss(logps: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
             gamma: float = 0.95) -> Tuple[torch.Tensor, Metrics]:
    """Intuitive fine-tuning loss on the log-probs of the ground truth under mixed inputs.

    ``c_t = -logp_t / |y|`` on active tokens, ``w_t = sum_{j >= t} gamma^(j - t) c_j`` rescaled so
    that ``sum_t w_t = |y|`` (not detached), ``L = mean_b sum_t (-logp_t w_t) / |y_b|``.
    ``gamma = 0`` uses ``w = 1`` (plain SFT), as the authors' code does. Padded ``[B, T]`` only.
    """
    _check_number("gamma", gamma, 0.0, 1.0)
    layout, active, acc, lp, fl = _prepare(logps, mask, None)
    b, t = layout.shape
    act = active.view(b, t)
    act_f = act.to(acc)
    lp2 = _masked(act, lp.view(b, t))
    lengths = act_f.sum(1).clamp_min(1)
    if gamma == 0:
        w = act_f
    else:
        c = -lp2 / lengths[:, None]
        w = _masked(act, discounted_suffix_sum(c, gamma))
        tot = w.sum(1, keepdim=True)
        w = w * (lengths[:, None] / torch.where(tot == 0, torch.ones_like(tot), tot))
    per = (-lp2 * w).sum(1) / lengths
    loss = per.mean() if b else per.sum()
    with torch.no_grad():
        metrics = {"nll": (((-lp2).sum(1) / lengths).sum() / max(b, 1)).float(),   # b = 0: 0
                   "weight_max": w.detach().max().float() if w.numel()
                   else torch.zeros((), device=lp.device),
                   "nonfinite_rows": nonfinite_rows(active, lp)}
    return loss, metrics
