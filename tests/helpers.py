"""Helpers shared by several test modules: an allocation spy, a host-sync spy and a bounded
multi-process spawn."""
import collections
import contextlib
import functools
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp


def dispatch_into_custom_ops(mode, func, args, kwargs):
    """``func(*args, **kwargs)`` for a TorchDispatchMode, looking inside custom ops.

    A mode sees a ``torch.library`` custom op (``gift_fast::linear_logprobs_fwd`` / ``_bwd``) as
    one op and runs it with the mode off, so the allocations inside would go unseen; the op's
    Python body is run instead with the mode on."""
    from torch._library.custom_ops import _maybe_get_opdef
    opdef = _maybe_get_opdef(func)
    if opdef is None:
        return func(*args, **(kwargs or {}))
    with mode:
        return opdef._init_fn(*args, **(kwargs or {}))


class LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest floating-point tensor any aten op produces while active, inside the
    library's custom ops too (logits or their gradient would be floating point; the
    interpreter's uint8 copies of argument storages are not ours)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = dispatch_into_custom_ops(self, func, args, kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


def free_port() -> int:
    """A free TCP port on the loopback interface (for a gloo rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_wait(fn, args, nprocs: int, timeout_s: float, what: str) -> None:
    """Runs ``fn(rank, *args)`` in ``nprocs`` spawned processes; fails the test if they do not
    finish within ``timeout_s`` (a hang guard, not a speed check) and kills what is left."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: ranks did not finish in {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


# Tensor methods (and torch functions) that copy a device value to the host: on a GPU each one is
# a device sync, and inside torch.compile each one is a graph break or a data-dependent shape.
# item / bool / int / float all read one scalar; nonzero and tolist read the whole tensor.
_SYNC_METHODS = ("item", "__bool__", "__int__", "__float__", "nonzero", "tolist")


@contextlib.contextmanager
def count_host_syncs():
    """Counts host reads of tensor values while active: yields a ``collections.Counter`` keyed by
    method name (``"item"``, ``"__bool__"``, ``"__int__"``, ``"__float__"``, ``"nonzero"``,
    ``"tolist"``, and ``"torch.nonzero"`` for the function form).

    A Python-level spy: it sees calls made from Python (library code, and the eager body of a
    custom op called from a compiled graph), not reads done inside C++ kernels (e.g. the nonzero
    of boolean-mask indexing). Compile outside the block (dynamo tracing calls these methods on
    fake tensors), run the compiled step inside it.
    """
    counts = collections.Counter()
    saved = {}

    def spy(name, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)
        return wrapper

    try:
        for name in _SYNC_METHODS:
            saved[(torch.Tensor, name)] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, spy(name, saved[(torch.Tensor, name)]))
        saved[(torch, "nonzero")] = torch.nonzero
        torch.nonzero = spy("torch.nonzero", torch.nonzero)
        yield counts
    finally:
        for (owner, name), original in saved.items():
            setattr(owner, name, original)
