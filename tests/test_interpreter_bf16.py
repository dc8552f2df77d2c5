"""The test harness's bf16 ``tl.dot`` for the Triton interpreter (tests/conftest.py): installed,
still wrapping the upstream function it was written against, and computing what a GPU computes
(exact bf16 products accumulated in float32) where the unpatched interpreter does not."""
import hashlib
import inspect

import pytest
import torch

from helpers import assert_within, gamma

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the patch is for the CPU interpreter only")

# sha256 of the source of triton 3.9.0's InterpreterBuilder.create_dot. A new triton that changes
# it (say, fixes #11584) fails here: re-read it and drop or adapt the patch in conftest.
UPSTREAM_CREATE_DOT_SHA256 = "7d5da68ca4b33412463a4cc40998b81b841797607d10c338e8918e173469d452"


def _create_dot():
    from triton.runtime import interpreter
    return interpreter.InterpreterBuilder.create_dot


def test_patch_is_installed_over_the_known_upstream_function():
    patched = _create_dot()
    assert hasattr(patched, "upstream"), "tests/conftest.py did not patch create_dot"
    source = inspect.getsource(patched.upstream)
    assert hashlib.sha256(source.encode()).hexdigest() == UPSTREAM_CREATE_DOT_SHA256, (
        "triton's InterpreterBuilder.create_dot changed: check whether it still multiplies bf16 "
        "bit patterns, then update or remove _interpret_bf16_dot_in_float32 in conftest.py")


def _dot(a, b):
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
        m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
        x = tl.load(a_ptr + m[:, None] * K + k[None, :])
        y = tl.load(b_ptr + k[:, None] * N + n[None, :])
        tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(x, y))

    c = torch.empty(a.shape[0], b.shape[1])
    dot_kernel[(1,)](a, b, c, a.shape[0], a.shape[1], b.shape[1])
    return c


def test_bf16_dot_is_exact_products_accumulated_in_float32(monkeypatch):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32, generator=g).bfloat16()
    b = torch.randn(32, 16, generator=g).bfloat16()
    exact = a.double() @ b.double()
    # bf16 products are exact in float32 (8 + 8 significant bits); the K-term float32 sum in any
    # order is within gamma(K) sum |terms| (tests/helpers.py).
    assert_within("bf16 tl.dot", _dot(a, b), exact,
                  gamma(a.shape[1]) * (a.double().abs() @ b.double().abs()))
    # Without the patch the interpreter multiplies the uint16 bit patterns: nowhere near.
    from triton.runtime import interpreter
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", _create_dot().upstream)
    wrong = _dot(a, b)
    assert not torch.allclose(wrong.double(), exact, rtol=0.1, atol=0.1)
