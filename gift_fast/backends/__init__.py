"""Backends of the fused linear log-prob op; ``triton`` and ``torch`` implement the backend
protocol of :mod:`.protocol` (per-row statistics and their gradients over one weight).

- ``triton``: the fast path on CUDA tensors (kernels in ``gift_fast.kernels``).
- ``torch``: chunked PyTorch, same math, memory bounded by one chunk x V; default on CPU.
- ``reference``: materialised logits, float64 on request; the oracle for tests and benchmarks.
"""
import os

import torch

BACKENDS = ("auto", "triton", "torch", "reference")


def interpreter_enabled() -> bool:
    """Triton kernels can run on CPU tensors only through the interpreter (tests, small shapes)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got tensors on {device}); set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels on CPU for testing, or use backend='torch'")
    return backend
