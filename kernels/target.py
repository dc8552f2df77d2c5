"""Which code-generation target a launch is for, so launchers pick tile configs per target.

``launch_target(t)`` is the CUDA capability of ``t``'s device as an int (80, 90, 100, ...), or
``INTERPRETER`` for CPU tensors (``TRITON_INTERPRET=1``). ``override_target(arch)`` makes every
launch inside it choose the configs of ``arch`` whatever the device: the compile-for-target check
(``gift_fast.compile_targets``) and the native build drive the real launchers on small CPU
tensors this way and record the launches instead of relying on hand-copied configs.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Union

INTERPRETER = "interpreter"
Target = Union[int, str]

_state = threading.local()


def launch_target(tensor) -> Target:
    arch = getattr(_state, "arch", None)
    if arch is not None:
        return arch
    if not tensor.is_cuda:
        return INTERPRETER
    import torch
    major, minor = torch.cuda.get_device_capability(tensor.device)
    return 10 * major + minor


@contextlib.contextmanager
def override_target(arch: Target) -> Iterator[None]:
    if not (arch == INTERPRETER or isinstance(arch, int)):
        raise TypeError(f"arch: expected an int CUDA capability such as 90 or {INTERPRETER!r}, "
                        f"got {arch!r}")
    previous = getattr(_state, "arch", None)
    _state.arch = arch
    try:
        yield
    finally:
        _state.arch = previous


def aligned16(*values) -> bool:
    """True when Triton will specialise every value as divisible by 16 (ints: multiple of 16
    or 1; tensors: 16-byte-aligned data pointer). Unaligned operands cannot be loaded in
    vectors, so their address registers limit the tile size a kernel can afford."""
    for v in values:
        if hasattr(v, "data_ptr"):
            if v.data_ptr() % 16:
                return False
        elif v != 1 and v % 16:
            return False
    return True
