"""Exact group statistics when a GIFT group's responses are split across data-parallel ranks.

Each rank holds some sequences of the global batch (rank order defines the global order). GIFT's
group statistics need, per sequence, only the implicit reward ``s``, the reward ``R`` and the group
label, so those few numbers are all-gathered (counts first, then padded to the largest count,
since ranks may hold different numbers of sequences). Every rank then computes the same global
statistics; its own sequences keep their autograd graph, the other ranks' values are constants.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist


def data_parallel_world(group) -> Tuple[int, int]:
    """``(world_size, rank)`` of ``group`` (a ``ProcessGroup`` or ``torch.distributed.group.WORLD``).

    Raises a ValueError when torch.distributed is not initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("data_parallel_group: torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group first (e.g. under torchrun), or pass "
                         "data_parallel_group=None on a single process")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"data_parallel_group: expected a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD), got {type(group).__name__}")
    return dist.get_world_size(group), dist.get_rank(group)


def _gather_counts(n: int, device, group, world: int) -> List[int]:
    mine = torch.tensor([n], dtype=torch.long, device=device)
    counts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(counts, mine, group=group)
    return [int(c) for c in torch.cat(counts).tolist()]


def all_gather_uneven(x: torch.Tensor, group, counts: Optional[List[int]] = None
                      ) -> Tuple[torch.Tensor, List[int]]:
    """Concatenation over the ranks of ``group`` (in rank order) of ``x [n_r, ...]``; the ``n_r``
    may differ. Returns ``(gathered, counts)``; pass ``counts`` back to skip the count exchange.

    No gradient flows through the result (use it for statistics only).
    """
    world, _ = data_parallel_world(group)
    if counts is None:
        counts = _gather_counts(x.shape[0], x.device, group, world)
    width = max(counts)
    padded = x.new_zeros((width,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), counts


def gather_group_batch(s: torch.Tensor, r: torch.Tensor, group_ids: Optional[torch.Tensor], group,
                       detach_stats: bool):
    """The global batch of per-sequence ``(s, R, group label)`` seen from this rank.

    Returns ``(s_all, r_all, ids_all, offset)``: ``s_all [B_total]`` holds this rank's own ``s``
    (with its gradient) at ``[offset, offset + B_local)`` and the other ranks' values as constants;
    ``ids_all`` is None when ``group_ids`` is None (consecutive groups of the global order).
    """
    world, rank = data_parallel_world(group)
    if world > 1 and not detach_stats:
        raise ValueError(
            "detach_stats: must be True when a data_parallel_group of more than one rank is given "
            "(differentiable group statistics would need gradients from the other ranks' losses); "
            "use detach_stats=True (the default, as the GIFT authors' code) or gather the whole "
            "group on one rank")
    n = s.shape[0]
    if group_ids is not None:
        if not isinstance(group_ids, torch.Tensor):
            raise TypeError(f"group_ids: expected a torch.Tensor, got {type(group_ids).__name__}")
        if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
            raise TypeError(f"group_ids: expected an integer dtype, got {group_ids.dtype}")
        if tuple(group_ids.shape) != (n,):
            raise ValueError(f"group_ids: expected shape ({n},) (one id per local sequence), "
                             f"got {tuple(group_ids.shape)}")
        if group_ids.device != s.device:
            raise ValueError(f"group_ids: expected device {s.device}, got {group_ids.device}")
    if world == 1:
        return s, r, group_ids, 0
    values, counts = all_gather_uneven(torch.stack([s.detach(), r], 1), group)
    offset = sum(counts[:rank])
    s_all = torch.cat([values[:offset, 0], s, values[offset + n:, 0]])
    ids_all = None
    if group_ids is not None:
        ids_all, _ = all_gather_uneven(group_ids.long(), group, counts)
    return s_all, values[:, 1], ids_all, offset
