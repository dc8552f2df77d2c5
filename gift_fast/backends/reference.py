"""Reference backend: materialises the [N, V] logits and lets autograd differentiate them.

Never a default: it is the oracle for tests (in float64 on request) and a baseline in benchmarks.
"""
from __future__ import annotations

from typing import Optional

import torch

from .logit_math import transform_logits


def reference_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              bias: Optional[torch.Tensor], temperature: float,
                              softcap: Optional[float], ignore_index: int,
                              compute_dtype: torch.dtype = torch.float32):
    """Returns (logp, entropy, argmax) for flattened inputs, in ``compute_dtype`` (>= float32)."""
    raw = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        raw = raw + bias.to(compute_dtype)
    z = transform_logits(raw, softcap, temperature)
    log_probs = torch.log_softmax(z, dim=-1)
    active = targets != ignore_index
    safe_targets = torch.where(active, targets, torch.zeros_like(targets)).long()
    logp = log_probs.gather(1, safe_targets[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    zero = torch.zeros((), dtype=compute_dtype, device=hidden.device)
    logp = torch.where(active, logp, zero)
    entropy = torch.where(active, entropy, zero)
    return logp, entropy, z.detach().argmax(-1)
