"""Rollouts and the tensors every loss consumes: hidden states, aligned targets, anchor log-probs.

Prompts all have the same length ``P`` (see task.py), so a sequence is ``[prompt | response]``
with the response right-padded after EOS. Causal attention makes right padding harmless, so no
attention mask is needed; only targets are masked. Position ``t`` predicts token ``t + 1``, hence
the response rows are hidden positions ``P - 1 .. T - 2``: only those rows reach the loss.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import GenerationConfig

from ..logprobs import linear_logprobs
from .model import body, lm_head_weight

IGNORE_INDEX = -100


def autocast(device: torch.device, dtype: torch.dtype):
    """bfloat16 autocast for the GPU preset; a no-op context for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def fixed_seed(seed: int, device: torch.device):
    """Sampling from ``seed`` inside, the caller's random streams untouched outside: evaluations
    and measurements draw their samples without shifting the training run's."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate(model, prompts: torch.Tensor, *, max_new_tokens: int, pad_id: int, eos_id: int,
             temperature: float = 1.0, sample: bool = True, compute_dtype=torch.float32):
    """Samples from the full softmax at ``temperature`` (top_k=0, top_p=1: the distribution the
    loss assumes) or decodes greedily. Returns the responses ``[n, L]``, right-padded."""
    kwargs = dict(do_sample=True, top_k=0, top_p=1.0, temperature=temperature) if sample else \
        dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                              eos_token_id=eos_id, bos_token_id=None, **kwargs)
    was_training = model.training
    model.eval()
    with autocast(prompts.device, compute_dtype):
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts),
                             generation_config=config)
    model.train(was_training)
    return out[:, prompts.shape[1]:]


def response_targets(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Targets for the response rows: the response tokens up to and including the first EOS,
    ``IGNORE_INDEX`` after it (padding, or nothing at all past a missing EOS)."""
    is_eos = (responses == eos_id).int()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    return responses.masked_fill(after_eos, IGNORE_INDEX)


@dataclass
class Batch:
    """One batch of sequences as the losses see it. Groups are consecutive runs of ``group_size``."""

    sequences: torch.Tensor          # [B, P + L] prompt + response ids
    targets: torch.Tensor            # [B, L] response targets, IGNORE_INDEX where inactive
    prompt_len: int
    rewards: Optional[torch.Tensor] = None    # [B]
    anchor_logps: Optional[torch.Tensor] = None  # [B, L] rollout (or reference) policy
    group_size: int = 1

    def select(self, index: torch.Tensor, group_size: int) -> "Batch":
        pick = lambda t: None if t is None else t[index]
        return Batch(self.sequences[index], self.targets[index], self.prompt_len,
                     pick(self.rewards), pick(self.anchor_logps), group_size)

    @property
    def n_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def response_hidden(model, batch: Batch, compute_dtype=torch.float32,
                    inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Last hidden states of the rows that predict response tokens, ``[B, L, H]``, taken from the
    model body; the lm_head is applied only inside the fused op."""
    with autocast(batch.sequences.device, compute_dtype):
        if inputs_embeds is None:
            out = body(model)(input_ids=batch.sequences)
        else:
            out = body(model)(inputs_embeds=inputs_embeds)
    p = batch.prompt_len
    return out.last_hidden_state[:, p - 1:-1].to(compute_dtype)


def head_weight(model, compute_dtype=torch.float32) -> torch.Tensor:
    """lm_head weight in the compute dtype (a differentiable cast of the float32 master)."""
    return lm_head_weight(model).to(compute_dtype)


@torch.no_grad()
def policy_logprobs(model, batch: Batch, temperature: float,
                    compute_dtype=torch.float32) -> torch.Tensor:
    """Per-token log-probs of ``batch.targets`` under ``model`` through the fused op (no logits)."""
    hidden = response_hidden(model, batch, compute_dtype)
    return linear_logprobs(hidden, head_weight(model, compute_dtype), batch.targets,
                           temperature=temperature, ignore_index=IGNORE_INDEX)


def gold_batch(sequences: torch.Tensor, prompt_len: int, pad_id: int, eos_id: int) -> Batch:
    """A supervised batch from prompt + gold answer sequences (right-padded with PAD)."""
    responses = sequences[:, prompt_len:]
    targets = response_targets(responses, eos_id)
    return Batch(sequences, targets, prompt_len)
