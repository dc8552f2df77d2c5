"""Backends of the fused linear log-prob op; ``triton`` and ``torch`` implement the backend
protocol of :mod:`.protocol` (per-row statistics and their gradients over one weight).

- ``triton``: the fast path on CUDA tensors (kernels in ``gift_fast.kernels``).
- ``torch``: chunked PyTorch, same math, memory bounded by one chunk x V; default on CPU.
- ``reference``: materialised logits, float64 on request; the oracle for tests and benchmarks.
"""
import logging
import os
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "torch", "reference")
_log = logging.getLogger("gift_fast")
_told = set()


def interpreter_enabled() -> bool:
    """Triton kernels can run on CPU tensors only through the interpreter (tests, small shapes)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def auto_backend(device: torch.device, dtype: Optional[torch.dtype]) -> str:
    """"triton" on a GPU whose family runs ``dtype`` well (the compile check vouches for it),
    "torch" otherwise; a GPU sent to torch is reported once per (target, dtype) as a warning
    on the "gift_fast" logger (e.g. bf16 on a T4: no bf16 tensor cores)."""
    if device.type != "cuda":
        return "torch"
    from ..kernels.configs import unsupported_reason
    from ..kernels.target import device_target
    target = device_target(device)
    reason = unsupported_reason(target, dtype) if dtype is not None or target is None else None
    if reason is None:
        return "triton"
    key = (getattr(target, "name", str(device)), dtype)
    if key not in _told:
        _told.add(key)
        _log.warning("gift_fast: backend='auto' runs %s on %s with the torch backend: %s",
                     dtype, key[0], reason)
    return "torch"


def resolve_backend(backend: str, device: torch.device,
                    dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs inputs of ``dtype`` on ``device`` (see :func:`auto_backend`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return auto_backend(device, dtype)
    if backend == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got tensors on {device}); set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels on CPU for testing, or use backend='torch'")
    return backend
