"""Vocabulary-parallel linear log-probs: the lm_head is sharded along V over a process group.

Rank r of the group holds the contiguous rows [start_r, end_r) of the [V, H] lm_head (and of its
bias); shard sizes may differ. ``hidden`` and ``targets`` (global token ids) are the same on every
rank. Each rank streams its own shard through its backend's ``stats``
(:mod:`gift_fast.backends.protocol`: per-row lse, target logit, entropy, max and argmax), then a
few [N] vectors are all-reduced over the group (:func:`combine`):

    all_reduce MAX  [lse_r, max_r]                                  -> M, global max logit
    all_reduce SUM  [exp(lse_r - M), z_y on its owner, entropy term] -> lse, z_y, entropy
    all_reduce MIN  (argmax asked) global index of the local argmax where max_r is the global max
                    (the lowest global index wins ties, as torch.argmax on the full logits)

Entropy: with a_r = lse_r - M and w_r = exp(a_r), S = sum_r w_r, the global
H = log S + sum_r w_r (H_r - a_r) / S (the local means E_r[z] = lse_r - H_r weighted by the shard
masses, written relative to M so that nothing large cancels).

Backward: each rank computes dlogits of its own columns from the GLOBAL lse and entropy (the
backend's ``grad``), gives dW (and db) of its shard only, and dX is all-reduced (sum,
:func:`sum_over_group`). The op is the single-device one (the custom ops
``gift_fast::linear_logprobs_fwd`` / ``_bwd`` of :mod:`gift_fast.logprobs`) with these two
functions as its combiner.
No [N, V] tensor exists anywhere; communication is O(N) in the forward and O(N H) in the backward.

Only ``torch.distributed`` collectives on the given group are used, so any backend that has
them runs the same code (gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..backends.protocol import RowStats


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows [start, start + size) of a vocabulary of ``vocab_size`` rows."""
    start: int
    size: int
    vocab_size: int
    rank: int
    world_size: int


def _check_group(group) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_parallel_group: torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group first")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"vocab_parallel_group: expected a torch.distributed.ProcessGroup "
                        f"(e.g. dist.group.WORLD or dist.new_group(...)), got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("vocab_parallel_group: this process is not a member of the group")


def targets_fingerprint(targets: torch.Tensor) -> torch.Tensor:
    """An int64 0-dim fingerprint of the target ids (a position-weighted sum, exact in int64 for
    N < 2^24 rows and ids < 2^20): equal targets give equal fingerprints on every rank; a
    difference is caught unless it cancels in the weighted sum (a consistency check, not a hash)."""
    t = targets.reshape(-1).long()
    pos = torch.arange(t.numel(), device=t.device, dtype=torch.int64) % 65521 + 1
    return ((t + 101) * pos).sum()


def vocab_shard(group, local_vocab: int, n_rows: int, device: torch.device,
                vocab_start_index: Optional[int] = None,
                targets: Optional[torch.Tensor] = None) -> VocabShard:
    """Learns every rank's shard with one ``all_gather`` of (start, size, rows, fingerprint of
    the targets) per rank.

    Without ``vocab_start_index`` the shards follow rank order (rank 0 holds the first rows);
    with it, each rank states its own start (all ranks must give it) and the shards may be in any
    rank order. Either way they must tile [0, V) exactly, and every rank must have the same rows
    and (if given) the same targets; otherwise every rank raises the same ValueError.
    """
    _check_group(group)
    if vocab_start_index is not None and (
            not isinstance(vocab_start_index, int) or isinstance(vocab_start_index, bool)
            or vocab_start_index < 0):
        raise ValueError(f"vocab_start_index: expected an int >= 0, got {vocab_start_index!r}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    start = -1 if vocab_start_index is None else vocab_start_index
    mine = torch.zeros(4, dtype=torch.int64, device=device)
    mine[0], mine[1], mine[2] = start, local_vocab, n_rows
    if targets is not None:
        mine[3] = targets_fingerprint(targets)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    gathered = torch.stack(table).tolist()          # one host sync
    rows = [tuple(r[:3]) for r in gathered]
    fingerprints = {r[3] for r in gathered}

    given = [s >= 0 for s, _, _ in rows]
    if any(given) and not all(given):
        raise ValueError("vocab_start_index: given on some ranks of vocab_parallel_group and not "
                         "on others; give it on every rank or on none (then shards follow rank order)")
    counts = sorted({n for _, _, n in rows})
    if len(counts) > 1:
        raise ValueError(f"hidden: expected the same rows on every rank of vocab_parallel_group "
                         f"(hidden and targets are replicated), got row counts {counts}")
    if len(fingerprints) > 1:
        raise ValueError("targets: expected the same targets on every rank of vocab_parallel_group "
                         "(global token ids, replicated like hidden); they differ")
    if not all(given):
        starts, pos = [], 0
        for _, size, _ in rows:
            starts.append(pos)
            pos += size
    else:
        starts = [s for s, _, _ in rows]
    spans = sorted((s, s + size, r) for r, (s, (_, size, _)) in enumerate(zip(starts, rows)))
    pos = 0
    for lo, hi, r in spans:
        if lo != pos or hi <= lo:
            desc = ", ".join(f"rank {q}: [{a}, {b})" for a, b, q in spans)
            raise ValueError(f"weight: the vocabulary shards of vocab_parallel_group must be "
                             f"non-empty and tile [0, V) without gaps or overlaps, got {desc}")
        pos = hi
    return VocabShard(start=starts[rank], size=local_vocab, vocab_size=pos, rank=rank,
                      world_size=world)


def group_of(name: str):
    """The process group named ``name`` (``group.group_name``): the op's arguments carry the
    name, not the group object, as torch's functional collectives do, so that the op's inputs
    stay plain values."""
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


def combine(stats: RowStats, active: torch.Tensor, group_name: str, vocab_start: int,
            vocab_size: int):
    """Global (logp, entropy or None, argmax or None, lse) from each rank's statistics of its
    shard (entropy and argmax when the shard's stats have them)."""
    group = group_of(group_name)
    lse_r, target_logit_r, entropy_r, argmax_r, max_r = stats
    maxes = torch.stack([lse_r, max_r.to(lse_r.dtype)])
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    m, best = maxes[0], maxes[1]

    a = lse_r - m                                   # <= 0 on the shard holding the max
    w = torch.exp(a)
    terms = [w, target_logit_r]                     # z_y is non-zero only on its owner
    if entropy_r is not None:
        terms.append(w * (entropy_r - a))
    sums = torch.stack(terms)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    log_s = torch.log(sums[0])
    lse = m + log_s
    logp = torch.where(active, sums[1] - lse, 0.0)
    entropy = None
    if entropy_r is not None:
        entropy = torch.where(active, log_s + sums[2] / sums[0], 0.0)
    if argmax_r is None:
        return logp, entropy, None, lse
    # Lowest global index among the shards that reach the global max.
    candidate = torch.where(max_r.to(best.dtype) == best, argmax_r + vocab_start,
                            torch.full_like(argmax_r, vocab_size))
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
    return logp, entropy, candidate, lse


def sum_over_group(d_hidden: torch.Tensor, group_name: str) -> torch.Tensor:
    """Each shard's dX is a partial sum over its columns; sum them in float32 at least."""
    total = d_hidden.to(torch.promote_types(d_hidden.dtype, torch.float32))
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group_of(group_name))
    return total.to(d_hidden.dtype)
