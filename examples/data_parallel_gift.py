"""End-to-end check of a data-parallel setup: GIFT steps with groups split across ranks.

    torchrun --nproc-per-node 2 examples/data_parallel_gift.py --wrap fsdp2

Every rank takes an uneven share of one fixed global batch (the groups span ranks), wraps a tiny
causal LM in DDP or FSDP2 around :class:`FusedLossModel`, and runs ``--steps`` AdamW steps of
``gift_loss(..., data_parallel_group=WORLD)`` with the loss scaled by the world size (both wrappers
average gradients over ranks). Rank 0 then trains the same model on the whole batch in one
process and prints the max abs difference of the parameters. ``--backend nccl`` runs on GPUs
(one per rank, ``LOCAL_RANK``), ``--backend gloo`` on CPUs. A user of gift_fast, not part of it:
it imports only the public API, and the tests import it (pytest.ini puts examples/ on the path).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from gift_fast import gift_loss
from gift_fast.integrations.fsdp import FusedLossModel


class _Block(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.norm = nn.LayerNorm(h)
        self.fc = nn.Linear(h, h)

    def forward(self, x):
        return x + torch.tanh(self.fc(self.norm(x)))


class _Backbone(nn.Module):
    def __init__(self, v: int, h: int, n_layers: int):
        super().__init__()
        self.embed = nn.Embedding(v, h)
        self.layers = nn.ModuleList(_Block(h) for _ in range(n_layers))
        self.norm = nn.LayerNorm(h)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return (self.norm(x),)


class TinyLM(nn.Module):
    """Causal-LM-shaped like transformers models (``.model`` backbone, ``.lm_head``), tiny."""

    def __init__(self, vocab: int = 37, hidden: int = 16, n_layers: int = 2):
        super().__init__()
        self.model = _Backbone(vocab, hidden, n_layers)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)


def shares(world: int):
    """Uneven numbers of sequences per rank (2, 3, 2, 3, ...)."""
    return [2 + r % 2 for r in range(world)]


def global_batch(n_seq: int, seq_len: int = 8, vocab: int = 37, device="cpu"):
    """A fixed batch: inputs, targets (prompt ignored), anchor log-probs, rewards, group ids."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n_seq, seq_len + 1), generator=g)
    targets = ids[:, 1:].clone()
    targets[:, :3] = -100
    anchor = -3 * torch.rand(n_seq, seq_len, generator=g)   # an anchor policy unlike the model's
    rewards = torch.rand(n_seq, generator=g)
    group_ids = torch.arange(n_seq) % max(n_seq // 3, 1)     # groups of ~3 spread over ranks
    return [t.to(device) for t in (ids[:, :-1], targets, anchor, rewards, group_ids)]


def train(model: nn.Module, batch, steps: int, group=None, world: int = 1):
    """``steps`` AdamW steps of GIFT; with ``group`` the batch is this rank's share."""
    inputs, targets, anchor, rewards, group_ids = batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss, _ = model(inputs, targets, anchor, rewards, group_ids=group_ids,
                        data_parallel_group=group)
        (loss * world).backward()          # DDP / FSDP2 average over ranks: undo it
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        if group is not None:
            dist.all_reduce(total, group=group)
        losses.append(float(total))
    return losses


def check(wrap: str, steps: int, device=torch.device("cpu")):
    """Trains under ``wrap`` on this rank's share (torch.distributed initialised), then on rank 0
    the same model on the whole batch in one process.

    Returns ``(losses, single_losses, max_param_diff)``; the last two are None on other ranks.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    counts = shares(world)
    batch = global_batch(sum(counts), device=device)
    lo = sum(counts[:rank])
    local = [t[lo:lo + counts[rank]] for t in batch]

    torch.manual_seed(0)
    model = TinyLM().to(device)
    root = FusedLossModel(model, gift_loss)
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        root = DDP(root, device_ids=[device.index] if device.type == "cuda" else None)
    elif wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(root)                  # the root: lm_head unsharded inside its forward
    else:
        raise ValueError(f"wrap: expected 'ddp' or 'fsdp2', got {wrap!r}")
    losses = train(root, local, steps, dist.group.WORLD, world)
    params = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
              for k, v in model.named_parameters()}
    if rank != 0:
        return losses, None, None
    torch.manual_seed(0)
    single = TinyLM().to(device)
    single_losses = train(FusedLossModel(single, gift_loss), batch, steps)
    diff = max(float((params[k] - v.detach()).abs().max()) for k, v in single.named_parameters())
    return losses, single_losses, diff


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wrap", choices=("ddp", "fsdp2"), default="fsdp2")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                   help="default: nccl when CUDA is available, else gloo")
    args = p.parse_args(argv)
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    try:
        losses, single_losses, diff = check(args.wrap, args.steps, device)
        if dist.get_rank() == 0:
            print(f"{args.wrap}, {dist.get_world_size()} ranks ({backend}), sequences per rank "
                  f"{shares(dist.get_world_size())}: loss per step {[round(x, 6) for x in losses]}")
            print(f"single process, whole batch: loss per step "
                  f"{[round(x, 6) for x in single_losses]}")
            print(f"max |parameter - single-process parameter| after {args.steps} steps: {diff:.2e}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
