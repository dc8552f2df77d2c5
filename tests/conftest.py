"""Test setup: on a machine without CUDA the Triton kernels run through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of conftest.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _interpret_bf16_dot_in_float32():
    """The interpreter stores bfloat16 as uint16 and its ``tl.dot`` (InterpreterBuilder.create_dot)
    multiplies those raw bit patterns (triton #11584, fix declined upstream), so no bf16 kernel
    would compute a number on CPU. A GPU multiplies the bf16 values exactly into a float32
    accumulator; widening each operand to float32 (bf16 is float32's upper 16 bits, exact) before
    the original dot does the same. tests/test_interpreter_bf16.py fails if this is not installed
    or if upstream's function changes."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        bits = np.ascontiguousarray(x.data).view(np.uint16).astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot.upstream = original
    interpreter.InterpreterBuilder.create_dot = create_dot


if not HAS_CUDA:
    _interpret_bf16_dot_in_float32()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long on CPU")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"
