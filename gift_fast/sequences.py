"""Sequence and group layout helpers shared by the loss epilogues.

Per-token values come either padded ``[B, T]`` (a mask marks the active tokens) or packed ``[N]``
with ``cu_seqlens [B + 1]`` (sequence ``i`` owns rows ``cu_seqlens[i]:cu_seqlens[i + 1]``).
:class:`Layout` turns per-token values into per-sequence sums and broadcasts per-sequence values
back to tokens, with vectorised segment ops only (no Python loop over sequences).

Groups (the G responses to one prompt) come from ``group_size`` (consecutive runs) or
``group_ids [B]`` (any labels; sequences with the same label form one group).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .validation import _assert_in_graph, _capturing

STD_CHOICES = ("unbiased", "biased")


def acc_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 when any input is float64 (gradcheck, audits); float32 otherwise."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _fmt(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


class Layout:
    """Maps flat per-token rows ``[N]`` to sequences ``[B]``.

    Attributes: ``n_seq`` (B), ``n_rows`` (N), ``shape`` (the per-token shape the user passed),
    ``padded`` (True for ``[B, T]``), ``seq_index`` (``[N]`` sequence of each row, packed only).
    """

    def __init__(self, shape, n_seq: int, seq_index: Optional[torch.Tensor]):
        self.shape = tuple(shape)
        self.n_seq = n_seq
        self.padded = seq_index is None
        self.seq_index = seq_index
        self.n_rows = 1
        for d in self.shape:
            self.n_rows *= d
        self.max_len = self.shape[1] if self.padded else None

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sequence sum of flat per-token values ``x [N]`` -> ``[B]``."""
        if self.padded:
            return x.view(self.n_seq, self.shape[1]).sum(1)
        out = torch.zeros(self.n_seq, dtype=x.dtype, device=x.device)
        return out.index_add(0, self.seq_index, x)

    def expand(self, c: torch.Tensor) -> torch.Tensor:
        """Broadcasts per-sequence values ``c [B]`` to flat per-token rows ``[N]``."""
        if self.padded:
            return c[:, None].expand(self.n_seq, self.shape[1]).reshape(-1)
        return c.index_select(0, self.seq_index)


def make_layout(values: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                name: str = "logps") -> Layout:
    """Layout of per-token ``values``: ``[B, T]`` when ``cu_seqlens`` is None, else ``[N]``."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(values).__name__}")
    if cu_seqlens is None:
        if values.dim() != 2:
            raise ValueError(f"{name}: expected shape [B, T] (or [N] with cu_seqlens), got {_fmt(values)}")
        return Layout(values.shape, values.shape[0], None)
    if values.dim() != 1:
        raise ValueError(f"{name}: expected packed shape [N] when cu_seqlens is given, got {_fmt(values)}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        got = _fmt(cu_seqlens) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens: expected a 1-D tensor [B + 1] with B >= 1, got {got}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens: expected an integer dtype, got {cu_seqlens.dtype}")
    if cu_seqlens.device != values.device:
        raise ValueError(f"cu_seqlens: expected device {values.device}, got {cu_seqlens.device}")
    n = values.shape[0]
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    if torch.compiler.is_compiling():
        ok = (cu[0] == 0) & (cu[-1] == n) & ~(lengths < 0).any()
        # (no {n} in the message: formatting a symbolic size would specialize it)
        _assert_in_graph(ok, "cu_seqlens: expected non-decreasing offsets from 0 to N")
    elif not _capturing(cu):
        if int(cu[0]) != 0 or int(cu[-1]) != n or bool((lengths < 0).any()):
            raise ValueError(
                f"cu_seqlens: expected non-decreasing offsets from 0 to N = {n}, got {cu.tolist()[:8]}"
                f"{'...' if cu.numel() > 8 else ''} ending at {int(cu[-1])}")
    n_seq = cu.numel() - 1
    seq_index = torch.repeat_interleave(torch.arange(n_seq, device=values.device), lengths,
                                        output_size=n)
    return Layout(values.shape, n_seq, seq_index)


def check_like(name: str, t: Optional[torch.Tensor], ref: torch.Tensor, what: str) -> None:
    """Checks that ``t`` is a floating tensor with the same shape and device as ``ref``."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if _fmt(t) != _fmt(ref):
        raise ValueError(f"{name}: expected shape {_fmt(ref)} ({what}), got {_fmt(t)}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device}, got {t.device}")


def token_mask(values: torch.Tensor, mask: Optional[torch.Tensor], name: str = "mask") -> torch.Tensor:
    """Flat boolean mask ``[N]`` of active tokens (all active when ``mask`` is None)."""
    if mask is None:
        return torch.ones(values.numel(), dtype=torch.bool, device=values.device)
    check_like(name, mask, values, "one flag per token")
    return mask.reshape(-1) != 0


def group_index(n_seq: int, group_size: Optional[int], group_ids: Optional[torch.Tensor],
                device, required: bool = True,
                empty_groups_ok: bool = False) -> Tuple[torch.Tensor, int]:
    """Group of each sequence ``[B]`` (int64, labels 0..n_groups-1, in the order of the sorted
    ids) and the number of groups.

    The number of distinct ``group_ids`` is data: counting them (``torch.unique``) reads it on
    the host, a sync, and a graph break under torch.compile. A caller that tolerates empty groups
    (``empty_groups_ok``: every per-group statistic masked by ``counts > 0``) gets, under
    torch.compile or a CUDA graph capture, the same labels built on the device and ``n_seq`` (a
    bound known from the shapes) as the number of groups: labels past the true count are empty.
    """
    if group_ids is not None:
        if not isinstance(group_ids, torch.Tensor):
            raise TypeError(f"group_ids: expected a torch.Tensor, got {type(group_ids).__name__}")
        if group_ids.dtype.is_floating_point:
            raise TypeError(f"group_ids: expected an integer dtype, got {group_ids.dtype}")
        if _fmt(group_ids) != (n_seq,):
            raise ValueError(f"group_ids: expected shape ({n_seq},) (one id per sequence), got {_fmt(group_ids)}")
        if group_ids.device != torch.device(device):
            raise ValueError(f"group_ids: expected device {device}, got {group_ids.device}")
        if empty_groups_ok and (torch.compiler.is_compiling() or _capturing(group_ids)):
            return _sorted_labels(group_ids.long()), n_seq
        uniq, inverse = torch.unique(group_ids, return_inverse=True)
        return inverse, int(uniq.numel())
    if group_size is None:
        if required:
            raise ValueError("group_size: expected an int >= 1 (or pass group_ids), got None")
        return torch.zeros(n_seq, dtype=torch.long, device=device), 1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected an int >= 1, got {group_size!r}")
    if n_seq % group_size != 0:
        raise ValueError(
            f"group_size: the batch of {n_seq} sequences is not divisible by group_size={group_size} "
            "(groups must be whole)")
    grp = torch.arange(n_seq, device=device) // group_size
    return grp, n_seq // group_size


def _sorted_labels(ids: torch.Tensor) -> torch.Tensor:
    """torch.unique's ``inverse`` without its data-dependent size: the rank of each id among the
    distinct ids, from a stable sort and a running count of where the sorted ids change."""
    sorted_ids, order = torch.sort(ids, stable=True)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[1:] = sorted_ids[1:] != sorted_ids[:-1]
    labels = new.long().cumsum(0) - 1
    return torch.empty_like(labels).scatter_(0, order, labels)


def nonfinite_rows(active: torch.Tensor, *per_token: Optional[torch.Tensor]) -> torch.Tensor:
    """Number of active rows (flat ``[N]`` mask) where any of ``per_token`` (flat ``[N]``; None
    skipped) is NaN or +-inf: a float32 0-dim tensor on the data's device, no host sync."""
    with torch.no_grad():
        bad = torch.zeros_like(active)
        for t in per_token:
            if t is not None:
                bad = bad | ~torch.isfinite(t.detach().reshape(-1))
        return (bad & active).sum(dtype=torch.float32)


def group_sum(x: torch.Tensor, grp: torch.Tensor, n_groups: int) -> torch.Tensor:
    return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add(0, grp, x)


def safe_sqrt(var: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (not inf/NaN) at var == 0."""
    pos = var > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, var, torch.ones_like(var))),
                       torch.zeros_like(var))


def group_mean_std(x: torch.Tensor, grp: torch.Tensor, n_groups: int, counts: torch.Tensor,
                   std: str = "unbiased"):
    """Per-group mean and standard deviation of ``x [B]`` (float, differentiable).

    ``counts`` is the group size per group (same dtype as ``x``). Unbiased std divides by
    ``G - 1`` (clamped to >= 1); groups of one get std 0 here: callers apply their own G = 1 rule.
    """
    # clamp_min(1): an empty group (group_index's empty_groups_ok) gets 0, not NaN; no-op otherwise
    mean = group_sum(x, grp, n_groups) / counts.clamp_min(1)
    dev = x - mean.index_select(0, grp)
    ss = group_sum(dev * dev, grp, n_groups)
    denom = (counts - 1).clamp_min(1) if std == "unbiased" else counts.clamp_min(1)
    return mean, safe_sqrt(ss / denom)


def pair_split(x: torch.Tensor, name: str = "batch"):
    """First half (chosen) and second half (rejected) of ``x [B]``; B must be even."""
    b = x.shape[0]
    if b % 2 != 0:
        raise ValueError(
            f"{name}: pairwise losses need an even number of sequences (first half chosen, second "
            f"half rejected), got {b}")
    return x[: b // 2], x[b // 2:]
