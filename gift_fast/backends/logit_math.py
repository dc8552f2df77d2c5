"""The logit transform of the reference backend (torch_chunked and the Triton kernels inline it).

z = softcap(h @ W.T + b) / temperature;  softcap(x) = c * tanh(x / c).
"""
from __future__ import annotations

from typing import Optional

import torch


def transform_logits(raw: torch.Tensor, softcap: Optional[float], temperature: float) -> torch.Tensor:
    z = raw
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    return z
