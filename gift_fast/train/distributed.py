"""Data-parallel training under ``torchrun``: the process group, per-rank streams, loss scaling.

Each rank holds ``1/W`` of every batch (whole GIFT groups: a rank samples its own prompts and all
``G`` responses of each), the model is wrapped in DDP (gloo on CPU, nccl on CUDA) and every loss
is scaled so that DDP's gradient *average* equals the single-process gradient of the whole batch
(docs/distributed.md, "DDP and FSDP2: scaling the loss"):

- GIFT (its spec's ``global_statistics``): ``gift_loss(..., data_parallel_group=)`` already
  returns this rank's share of the whole-batch loss (global group statistics and ``N_seq``);
- every other loss is a mean over items (active tokens, sequences, groups or pairs, as its
  ``LossSpec`` in gift_fast.losses says): its share is ``loss_r * n_r / N`` with ``N`` the
  all-reduced count;

then ``backward(share * W)``. Only rank 0 writes logs, plots and checkpoints.
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .objectives import best_worst_pairs, compute_loss, library_loss
from .rollout import IGNORE_INDEX, Batch

@dataclass
class DataParallel:
    """This process's place in the data-parallel run."""

    rank: int
    world: int
    group: object = None            # None: the default (WORLD) group
    owns_group: bool = False        # we called init_process_group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def process_group(self):
        return self.group if self.group is not None else dist.group.WORLD


def from_environment(device: torch.device) -> Optional[DataParallel]:
    """The data-parallel run this process belongs to: ``None`` for one process; under ``torchrun``
    (``WORLD_SIZE`` > 1) it joins the process group (nccl for CUDA tensors and gloo for CPU ones
    on CUDA, gloo on CPU), unless one is already initialised (on CUDA it then needs a backend for
    CPU tensors as well, e.g. ``"cpu:gloo,cuda:nccl"``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == 1:
            return None
        return DataParallel(dist.get_rank(), dist.get_world_size())
    if world <= 1:
        return None
    # On CUDA the loss's collectives run on nccl; the trainer's few CPU ones (item counts,
    # evaluation sums, metric records) on gloo.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    # torch.distributed.nn.functional binds ``group=group.WORLD`` as a default argument when first
    # imported, and DDP imports it. Imported after init_process_group, it would keep the group
    # alive past destroy_process_group, its gloo worker threads then running into interpreter
    # shutdown, where one releasing a collective's tensors aborts the process (SIGABRT).
    import torch.distributed.nn  # noqa: F401
    dist.init_process_group(backend)
    return DataParallel(dist.get_rank(), dist.get_world_size(), owns_group=True)


def local_device(device: torch.device, parallel: Optional[DataParallel]) -> torch.device:
    """On CUDA, rank r of a node uses GPU ``LOCAL_RANK``."""
    if parallel is None or device.type != "cuda":
        return device
    index = int(os.environ.get("LOCAL_RANK", parallel.rank))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def stream_seed(seed: int, rank: int, what: str) -> int:
    """The seed of one of rank ``rank``'s random streams. Rank 0 uses the single-process seeds
    (``seed + 1`` for prompts, the torch stream continuing after the model's initialisation);
    rank r > 0 seeds from ``sha256("gift-fast:<what>:<seed>:<rank>")``, so no two ranks and no two
    seeds share a stream."""
    digest = hashlib.sha256(f"gift-fast:{what}:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2 ** 63)


def seed_rank_streams(seed: int, parallel: Optional[DataParallel]) -> random.Random:
    """Returns this rank's prompt stream (and reseeds torch's sampling stream on ranks > 0)."""
    if parallel is None or parallel.rank == 0:
        return random.Random(seed + 1)
    torch.manual_seed(stream_seed(seed, parallel.rank, "torch"))
    return random.Random(stream_seed(seed, parallel.rank, "prompts"))


def per_rank(total: int, name: str, parallel: Optional[DataParallel]) -> int:
    """This rank's share of a global batch size; ValueError if ``total`` does not divide."""
    if parallel is None:
        return total
    if total % parallel.world:
        raise ValueError(f"{name}: expected a multiple of the number of processes "
                         f"({parallel.world}), got {total}")
    return total // parallel.world


def item_count(name: str, batch: Batch) -> int:
    """How many items this rank's (mini-)batch contributes to loss ``name``'s mean, as the
    loss's spec counts them (gift_fast.losses: ``LossSpec.count``)."""
    spec, options = library_loss(name)
    # DPO trains on the best/worst pair of each group with distinct rewards.
    n_seq = best_worst_pairs(batch).numel() if name == "dpo" else batch.sequences.shape[0]
    return spec.count(batch.targets != IGNORE_INDEX, n_seq, batch.group_size, **options)


class LossRoot(nn.Module):
    """The model with the trainer's loss as its forward, so DDP sees the forward whose backward it
    synchronises (the fused loss reads the lm_head weight directly, never calling ``lm_head``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, name: str, batch: Batch, cfg, compute_dtype, data_parallel_group=None,
                empty: bool = False):
        if empty:   # nothing for the loss here, something elsewhere: a zero reaching every weight
            return sum(p.sum() for p in self.model.parameters()) * 0.0, {}
        return compute_loss(name, self.model, batch, cfg, compute_dtype,
                            data_parallel_group=data_parallel_group)


def wrap(model: nn.Module, parallel: Optional[DataParallel], device: torch.device) -> nn.Module:
    root = LossRoot(model)
    if parallel is None:
        return root
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    # Parameters and buffers are broadcast from rank 0 here; the buffers (rotary tables) never
    # change, so they are not re-synchronised before every forward.
    return DDP(root, device_ids=ids, forward_sync_buffers=False, process_group=parallel.group)


def data_parallel_loss(root: nn.Module, name: str, batch: Batch, cfg, compute_dtype,
                       parallel: Optional[DataParallel]):
    """``(to_backward, share, metrics)``: ``share`` is this rank's part of the whole-batch loss
    (the loss itself on one process), ``to_backward`` is what to call ``backward`` on; both None
    when the whole batch holds no signal for the loss (DPO with all-tie groups everywhere)."""
    if parallel is None:
        loss, metrics = root(name, batch, cfg, compute_dtype)
        return loss, loss, metrics
    group = parallel.process_group
    if library_loss(name)[0].global_statistics:     # exact over the whole batch by itself
        loss, metrics = root(name, batch, cfg, compute_dtype, data_parallel_group=group)
        return loss * parallel.world, loss, metrics
    n = item_count(name, batch)
    total = torch.tensor([n], dtype=torch.float64)
    dist.all_reduce(total, group=group)
    total = float(total)
    if total == 0:
        return None, None, {}
    loss, metrics = root(name, batch, cfg, compute_dtype, empty=n == 0)
    share = loss * (n / total)
    return share * parallel.world, share, metrics


# How a record's numbers combine across ranks (everything else: the mean over ranks, which is the
# whole-batch mean since every rank holds the same number of prompts).
SUM_KEYS = ("loss", "loss_first", "response_tokens", "tokens_per_s")
MAX_KEYS = ("step_s", "peak_mem_mib", "updates")


def reduce_record(record: Dict, parallel: Optional[DataParallel]) -> Dict:
    """The whole run's view of one step's record (the same on every rank)."""
    if parallel is None:
        return record
    records: List[Dict] = [None] * parallel.world
    dist.all_gather_object(records, record, group=parallel.group)
    return _combine(records)


def _combine(records: List[Dict]) -> Dict:
    out = {}
    for key, value in records[0].items():
        values = [r.get(key) for r in records]
        if isinstance(value, dict):
            out[key] = _combine([v if isinstance(v, dict) else {} for v in values])
        elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                and all(isinstance(v, (int, float)) for v in values):
            if key in SUM_KEYS:
                out[key] = sum(values)
            elif key in MAX_KEYS:
                out[key] = max(values)
            elif key in ("step", "rl_step"):
                out[key] = value
            else:
                out[key] = sum(values) / len(values)
        else:
            out[key] = value
    return out


def all_reduce_sums(values: List[float], parallel: Optional[DataParallel]) -> List[float]:
    if parallel is None:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=parallel.group)
    return t.tolist()


def broadcast_object(obj, parallel: Optional[DataParallel]):
    """Rank 0's ``obj`` on every rank."""
    if parallel is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=parallel.group)
    return box[0]


def barrier(parallel: Optional[DataParallel]) -> None:
    if parallel is not None:
        dist.barrier(group=parallel.group)


def shutdown(parallel: Optional[DataParallel]) -> None:
    if parallel is not None and parallel.owns_group and dist.is_initialized():
        dist.destroy_process_group()
