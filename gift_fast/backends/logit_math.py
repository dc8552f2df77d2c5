"""The per-logit math shared by the PyTorch backends (the Triton kernels inline the same formulas).

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


def grad_raw_from_grad_z(dz: torch.Tensor, z: torch.Tensor, softcap: Optional[float],
                         temperature: float) -> torch.Tensor:
    """Chain rule from the transformed logits z back to the raw GEMM output (in place on dz)."""
    if temperature != 1.0:
        dz /= temperature
    if softcap is not None:
        # z * temperature = c * tanh(raw / c), so tanh(raw / c) = z * temperature / c.
        tanh = z * (temperature / softcap)
        dz *= 1.0 - tanh * tanh
    return dz


def grad_z(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, g: torch.Tensor,
           e: Optional[torch.Tensor], entropy: Optional[torch.Tensor]) -> torch.Tensor:
    """d(sum_n g_n * logp_n + e_n * H_n) / dz for live rows (targets outside [0, V): no one-hot).

    dlogp/dz_v = 1[v = y] - p_v;  dH/dz_v = -p_v (z_v - E_p[z]) with E_p[z] = lse - H.
    """
    p = torch.exp(z - lse[:, None])
    if e is not None:
        mean_z = (lse - entropy)[:, None]
        dz = p * (-(g[:, None]) - e[:, None] * (z - mean_z))
    else:
        dz = p * (-g[:, None])
    # A target outside [0, V) (not in this vocabulary shard) has no one-hot term.
    hit = (targets >= 0) & (targets < z.shape[1])
    dz.scatter_add_(1, torch.where(hit, targets, 0)[:, None], torch.where(hit, g, 0.0)[:, None])
    return dz
