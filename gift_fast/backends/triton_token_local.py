"""The entry point of the fused token-local losses (SFT variants, DFT, GRPO with advantages):
the triton backend by default, the torch one on request. The op itself and its plans (stream
chunks of stored logits: 3 GEMM-eq; recompute: 4) live in :mod:`.token_local`.
"""
from __future__ import annotations

from .token_local import OnePassTokenLocal, one_pass

__all__ = ["OnePassTokenLocal", "one_pass_token_local"]


def one_pass_token_local(h2, weight, bias, t1, epilogue, *, temperature, softcap, ignore_index,
                         backend="triton", memory_budget=None):
    """Loss and metrics of ``epilogue(logp)`` with gradients computed in the forward pass;
    ``backend`` "triton" or "torch", ``memory_budget`` in bytes (default: the process's)."""
    return one_pass(h2, weight, bias, t1, epilogue, backend=backend, temperature=temperature,
                    softcap=softcap, ignore_index=ignore_index, memory_budget=memory_budget)
