"""Evaluation of a policy on the task, and the start-versus-end summary of a run's log."""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from . import distributed as dp
from .rollout import fixed_seed, generate
from .task import AdditionTask


@torch.no_grad()
def evaluate(model, task: AdditionTask, device, cfg, compute_dtype,
             problems=None, prefix: str = "heldout", parallel=None, samples: int = 0) -> Dict:
    """Greedy accuracy and reward on the held-out problems (or on ``problems``); with
    ``samples`` > 0 also the mean reward of that many responses per problem sampled at the
    training temperature (``<prefix>_sampled_reward``), from a fixed seed in a forked RNG so that
    evaluating never changes the training run's random streams. Data-parallel: rank r decodes
    problems r, r + W, ... and the sums are all-reduced (the same on every rank)."""
    tok = task.tokenizer
    problems = task.heldout if problems is None else problems
    n = len(problems)
    if parallel is not None:
        problems = problems[parallel.rank::parallel.world]
    sums = [0.0, 0.0, 0.0]
    if problems:
        prompts = task.prompt_ids(problems).to(device)
        responses = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, pad_id=tok.pad_id,
                             eos_id=tok.eos_id, sample=False, compute_dtype=compute_dtype)
        rewards, exact = task.score(problems, responses.cpu())
        sums = [exact.sum().item(), rewards.sum().item(), 0.0]
        if samples:
            with fixed_seed(cfg.seed + 7 + (parallel.rank if parallel else 0), device):
                responses = generate(model, prompts.repeat_interleave(samples, 0),
                                     max_new_tokens=cfg.max_new_tokens, pad_id=tok.pad_id,
                                     eos_id=tok.eos_id, temperature=cfg.temperature,
                                     compute_dtype=compute_dtype)
            rewards, _ = task.score([p for p in problems for _ in range(samples)], responses.cpu())
            sums[2] = rewards.sum().item() / samples
    exact_sum, reward_sum, sampled_sum = dp.all_reduce_sums(sums, parallel)
    out = {f"{prefix}_accuracy": exact_sum / n, f"{prefix}_reward": reward_sum / n}
    if samples:
        out[f"{prefix}_sampled_reward"] = sampled_sum / n
    return out


def summarise(records: List[Dict], window: int = 25) -> Dict:
    """Start vs end of the RL phase: mean sampled reward over the first and last ``window``
    steps, and held-out greedy accuracy at the start and the end of RL."""
    rl = [r for r in records if r.get("phase") == "rl"]
    evals = [r for r in records if r.get("phase") == "eval"]
    out: Dict = {}
    if rl:
        w = min(window, len(rl))
        out.update(rl_steps=len(rl), window=w,
                   reward_first=float(np.mean([r["reward"] for r in rl[:w]])),
                   reward_last=float(np.mean([r["reward"] for r in rl[-w:]])),
                   train_accuracy_first=float(np.mean([r["accuracy"] for r in rl[:w]])),
                   train_accuracy_last=float(np.mean([r["accuracy"] for r in rl[-w:]])))
    if evals:
        out.update(heldout_accuracy_start=evals[0]["heldout_accuracy"],
                   heldout_accuracy_end=evals[-1]["heldout_accuracy"],
                   heldout_reward_start=evals[0]["heldout_reward"],
                   heldout_reward_end=evals[-1]["heldout_reward"])
        if "heldout_sampled_reward" in evals[0]:
            out.update(heldout_sampled_reward_start=evals[0]["heldout_sampled_reward"],
                       heldout_sampled_reward_end=evals[-1]["heldout_sampled_reward"])
    steps = [r for r in records if "step_s" in r]
    out["train_s"] = float(sum(r["step_s"] for r in steps))
    return out
