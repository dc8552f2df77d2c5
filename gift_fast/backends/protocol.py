"""The backend protocol of the fused linear log-prob op: per-row statistics and their gradients.

A backend is a module with two functions, ``stats`` and ``grad`` (signatures below), over ONE
weight: the whole lm_head on one device, or this rank's vocabulary shard. Everything above them
(masking of ignored rows, combining shards, autograd) is shared, in :mod:`gift_fast.logprobs`.

Conventions, the same for every backend:

- ``local_targets`` [N] int64: the row's target as a column of THIS weight, in ``[0, V_local)``,
  or -1 when no column of this weight is the target (ignored rows, and on a vocabulary shard the
  rows whose target another shard owns). Which rows are active is the caller's business.
- Statistics and upstream gradients are float32 (float64 when the inputs are float64, on the
  torch backend); ``g`` / ``e`` are already zero at inactive rows, and rows where both are zero
  cost no GEMM work.
- Arguments are tensors and plain scalars only, so both functions can become library ops.

Backends: ``torch`` (:mod:`.torch_chunked`, chunked PyTorch) and ``triton`` (:mod:`.triton_op`,
the kernels of ``gift_fast.kernels``). The ``reference`` backend (:mod:`.reference`) is not one:
it is the test oracle, autograd end to end on materialised logits, independent of this code.
"""
from __future__ import annotations

import importlib
from typing import NamedTuple, Optional, Protocol, runtime_checkable

import torch


class RowStats(NamedTuple):
    """Per-row statistics of ``z = softcap(hidden @ weight.T + bias) / T`` over this weight's rows.

    ``target_logit`` is ``z[local_target]``, 0 where the local target is -1; ``entropy`` and
    ``argmax`` (int64, lowest index on ties) are None unless asked for.
    """
    lse: torch.Tensor
    target_logit: torch.Tensor
    entropy: Optional[torch.Tensor]
    argmax: Optional[torch.Tensor]
    max_logit: torch.Tensor


class Grads(NamedTuple):
    """Gradients in the dtypes of hidden / weight / bias; None where not needed."""
    d_hidden: Optional[torch.Tensor]
    d_weight: Optional[torch.Tensor]
    d_bias: Optional[torch.Tensor]


@runtime_checkable
class Backend(Protocol):
    def stats(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              local_targets: torch.Tensor, temperature: float, softcap: Optional[float],
              want_entropy: bool, want_argmax: bool = True) -> RowStats:
        """Statistics of each row of ``hidden`` [N, H] against ``weight`` [V_local, H]."""

    def grad(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             local_targets: torch.Tensor, lse: torch.Tensor, entropy: Optional[torch.Tensor],
             g: torch.Tensor, e: Optional[torch.Tensor], temperature: float,
             softcap: Optional[float], need_dx: bool, need_dw: bool, need_db: bool,
             compact: bool = True) -> Grads:
        """Gradients of ``sum_n g_n logp_n + e_n H_n`` w.r.t. hidden, weight and bias, where the
        row's probabilities are ``exp(z - lse)`` with the given ``lse`` (and ``entropy``, needed
        when ``e`` is given): global statistics over every shard give this shard's part (its dW
        and db, and its share of dX, to be summed over shards). ``compact``: rows with g = e = 0
        are dropped before any GEMM (a host sync counts them); False processes every row with
        no host read, a dead row contributing exactly 0 (compiled graphs, CUDA graph capture)."""


_MODULES = {"torch": "gift_fast.backends.torch_chunked", "triton": "gift_fast.backends.triton_op"}


def get_backend(name: str) -> Backend:
    """The module implementing backend ``name`` ("torch" or "triton"), imported on first use."""
    if name not in _MODULES:
        raise ValueError(f"backend: expected one of {sorted(_MODULES)}, got {name!r}")
    return importlib.import_module(_MODULES[name])


def local_targets(targets: torch.Tensor, active: torch.Tensor, start: int = 0,
                  size: Optional[int] = None) -> torch.Tensor:
    """Global target ids -> columns of the weight rows [start, start + size) (all rows when
    ``size`` is None), -1 on inactive rows and on targets outside those rows."""
    here = active
    if start or size is not None:
        here = here & (targets >= start)
        if size is not None:
            here = here & (targets < start + size)
    shifted = targets.long() - start if start else targets.long()
    return torch.where(here, shifted, -1).contiguous()


def single_device(stats: RowStats, active: torch.Tensor):
    """The identity combiner: (logp, entropy or None, argmax or None, lse) of one whole weight."""
    logp = torch.where(active, stats.target_logit - stats.lse, 0.0)
    entropy = None if stats.entropy is None else torch.where(active, stats.entropy, 0.0)
    return logp, entropy, stats.argmax, stats.lse
