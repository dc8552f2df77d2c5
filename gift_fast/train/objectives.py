"""Maps each ``--loss`` name onto a call of the library's fused loss; no loss math lives here.

On-policy losses (gift, grpo, dpo, rpo, una) train on the sampled responses against the anchor
log-probs; the SFT variants (sft, fdiv-*, dft, ift) train on the gold answers of the same prompts.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

import gift_fast
from ..losses import BY_NAME
from ..losses.common import LossSpec
from ..losses.sft import DIVERGENCES
from .rollout import IGNORE_INDEX, Batch, head_weight, response_hidden

ON_POLICY = ("gift", "grpo", "dpo", "rpo", "una")
SUPERVISED = ("sft",) + tuple(f"fdiv-{d}" for d in DIVERGENCES) + ("dft", "ift")
LOSSES = ON_POLICY + SUPERVISED
# Losses that need a group of >= 2 sampled responses per prompt to say anything.
NEEDS_GROUPS = ("gift", "grpo", "dpo", "rpo")


def library_loss(name: str) -> Tuple[LossSpec, Dict]:
    """The library loss behind trainer loss ``name`` and the options the trainer calls it with
    that decide what its mean divides by (data-parallel scaling reads both)."""
    if name in ("sft", "dft", "ift") or name.startswith("fdiv-"):
        return BY_NAME["fdiv_sft" if name == "sft" or name.startswith("fdiv-") else name], {}
    if name == "una":
        return BY_NAME["una"], {"kind": "score_mse"}
    if name in ON_POLICY:
        return BY_NAME[name], {}
    raise ValueError(f"loss: no data-parallel normalisation known for {name!r}")


def _scalars(metrics) -> Dict[str, object]:
    """The loss's scalar metrics, tensors left on the device: reading them is a host sync, done
    once per update by the trainer (metrics_to_floats), outside a compiled step."""
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, torch.Tensor):
            if v.numel() == 1:
                out[k] = v.detach().reshape(())
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def metrics_to_floats(metrics: Dict[str, object]) -> Dict[str, float]:
    """``_scalars``'s output as Python floats, with one host sync for all the tensors."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([metrics[k].double() for k in keys]).tolist() if keys else []
    return {**metrics, **dict(zip(keys, values))}


def sft_nll(hidden, weight, targets, temperature: float, backend: str = "auto"):
    """Plain SFT (token-mean NLL) through the library: f-divergence SFT with TV is exactly NLL."""
    return gift_fast.fdiv_sft_loss(hidden, weight, targets, divergence="tv",
                                   temperature=temperature, ignore_index=IGNORE_INDEX,
                                   backend=backend)


def best_worst_pairs(batch: Batch) -> torch.Tensor:
    """Indices ``[chosen..., rejected...]`` of the best and worst response of each group whose
    rewards are not all equal (a tie says nothing about preference)."""
    g = batch.group_size
    rewards = batch.rewards.view(-1, g)
    best, worst = rewards.argmax(1), rewards.argmin(1)
    keep = rewards.max(1).values > rewards.min(1).values
    base = torch.arange(rewards.shape[0]) * g
    return torch.cat([(base + best)[keep], (base + worst)[keep]])


def compute_loss(name: str, model, batch: Batch, cfg, compute_dtype=torch.float32,
                 data_parallel_group=None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Loss and its metrics for one (mini-)batch. Returns ``(None, {})`` when the batch holds no
    signal for this loss (DPO with all-tie groups). ``data_parallel_group``: GIFT only, this
    rank's share of the loss of the batch spread over the group (see train/distributed.py)."""
    weight = head_weight(model, compute_dtype)
    if name == "dpo":
        index = best_worst_pairs(batch)
        if index.numel() == 0:
            return None, {}
        batch = batch.select(index, group_size=1)
    if name == "ift":
        return _ift(model, batch, cfg, weight, compute_dtype)
    hidden = response_hidden(model, batch, compute_dtype)
    return loss_from_hidden(name, hidden, weight, batch, cfg,
                            data_parallel_group=data_parallel_group)


def loss_from_hidden(name: str, hidden, weight, batch: Batch, cfg, backend: str = "auto",
                     data_parallel_group=None):
    """The library call for loss ``name`` on response hidden states ``[B, L, H]`` (not IFT,
    whose inputs depend on the model; DPO expects the already-paired batch)."""
    T = cfg.temperature
    beta = {} if cfg.beta is None else {"beta": cfg.beta}
    common = dict(temperature=T, ignore_index=IGNORE_INDEX, backend=backend)
    t = batch.targets
    if name == "gift":
        loss, m = gift_fast.gift_loss(hidden, weight, t, batch.anchor_logps, batch.rewards,
                                      group_size=batch.group_size,
                                      data_parallel_group=data_parallel_group, **common, **beta)
    elif name == "grpo":
        adv = gift_fast.group_advantages(batch.rewards, batch.group_size)
        loss, m = gift_fast.grpo_loss(hidden, weight, t, batch.anchor_logps, adv,
                                      **common, **beta)
    elif name == "dpo":
        loss, m = gift_fast.dpo_loss(hidden, weight, t, batch.anchor_logps, **common, **beta)
    elif name == "rpo":
        loss, m = gift_fast.rpo_loss(hidden, weight, t, batch.anchor_logps, batch.rewards,
                                     group_size=batch.group_size, **common, **beta)
    elif name == "una":
        # Online UNA scores every response against its reward, which already lies in [0, 1].
        loss, m = gift_fast.una_loss(hidden, weight, t, batch.anchor_logps, kind="score_mse",
                                     scores=batch.rewards, **common, **beta)
    elif name == "sft":
        loss, m = sft_nll(hidden, weight, t, T, backend)
    elif name.startswith("fdiv-"):
        loss, m = gift_fast.fdiv_sft_loss(hidden, weight, t, None,
                                          divergence=name.split("-", 1)[1], **common, **beta)
    elif name == "dft":
        loss, m = gift_fast.dft_loss(hidden, weight, t, **common)
    else:
        raise ValueError(f"loss: expected one of {list(LOSSES)}, got {name!r}")
    return loss, _scalars(m)


def _ift(model, batch: Batch, cfg, weight, compute_dtype):
    """IFT: greedy predictions from a no-grad pass through the fused op's argmax, mixed input
    embeddings of the response tokens, then ift_loss on a forward with gradient."""
    from .model import body
    p = batch.prompt_len
    with torch.no_grad():
        # Only response rows matter: row p - 1 + j predicts response token j.
        greedy = gift_fast.ift_greedy_predictions(response_hidden(model, batch, compute_dtype),
                                                  weight, temperature=cfg.temperature)
    seqs = batch.sequences
    greedy_next = seqs.clone()
    greedy_next[:, p - 1:-1] = greedy
    labels = torch.cat([torch.full_like(seqs[:, :p], IGNORE_INDEX), batch.targets], 1)
    embeds = gift_fast.ift_mixed_embeddings(seqs, labels, greedy_next,
                                            body(model).get_input_embeddings(),
                                            lam=cfg.ift_lambda, ignore_index=IGNORE_INDEX)
    hidden = response_hidden(model, batch, compute_dtype, inputs_embeds=embeds)
    loss, m = gift_fast.ift_loss(hidden, weight, batch.targets, temperature=cfg.temperature,
                                 ignore_index=IGNORE_INDEX)
    return loss, _scalars(m)
