"""Helpers shared by several test modules: an allocation spy, a bounded multi-process spawn and
the set-up and tear-down of a spawned rank's gloo process group."""
import os
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest floating-point tensor any aten op produces while active (logits or
    their gradient would be floating point; the interpreter's uint8 copies of argument storages
    are not ours)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


def rendezvous(tmp_path) -> str:
    """A file rendezvous for one spawn: no port to pick, so no race with other processes on the
    machine for a port picked free and bound later (gloo's own connections use ports the OS
    assigns)."""
    return f"file://{os.path.join(str(tmp_path), 'rendezvous')}"


def init_gloo(rank: int, world: int, timeout_s: float, **how) -> None:
    """Joins the gloo group of a spawned rank; ``how``: ``init_method=`` or ``store=``."""
    # torch.distributed.nn.functional binds ``group=group.WORLD`` as a default argument when first
    # imported (DDP and FSDP2 import it): imported after init_process_group, it would keep the
    # group, and its gloo worker threads, alive past destroy_process_group (see finish_rank).
    import torch.distributed.nn  # noqa: F401
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s), **how)


def finish_rank() -> None:
    """The end of a spawned rank whose work is done and written: destroys the process group and
    leaves without the interpreter's shutdown.

    torch can keep the group referenced after destroy_process_group (after FSDP2, DTensor's
    sharding caches hold its device mesh), so its gloo worker threads keep running. A worker
    releasing the last collective's tensors while the interpreter shuts down takes the GIL;
    Python then ends that thread with pthread_exit, whose unwind through a noexcept destructor
    aborts the process: "terminate called without an active exception", SIGABRT, although every
    case passed. There is nothing left to run, so the rank exits here, with exit code 0."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
