"""Status strings of a method that did not produce a number: never silently dropped.

``ok`` | ``oom`` | ``unavailable: <reason>`` | ``skipped: <reason>`` | ``error: <type>: <message>``
"""
from __future__ import annotations

import torch

OK = "ok"
OOM = "oom"


def classify_exception(exc: BaseException, device: torch.device) -> str:
    """Maps an exception raised while setting up or running a method to its status; frees the
    CUDA cache after an out-of-memory error so the next method starts clean."""
    oom_types = (torch.cuda.OutOfMemoryError,) if hasattr(torch.cuda, "OutOfMemoryError") else ()
    if isinstance(exc, oom_types) or (isinstance(exc, RuntimeError)
                                      and "out of memory" in str(exc).lower()):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return OOM
    if isinstance(exc, ImportError):
        return f"unavailable: {type(exc).__name__}: {_short(exc)}"
    if isinstance(exc, NotImplementedError):
        return f"unavailable: NotImplementedError: {_short(exc)}"
    return f"error: {type(exc).__name__}: {_short(exc)}"


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def is_ok(status: str) -> bool:
    return status == OK
