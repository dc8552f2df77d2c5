"""Median time and peak incremental memory of one callable.

CUDA: CUDA events around each repeat, warm-up excluded (the first call also compiles and autotunes),
median over the repeats; memory = ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus
what was allocated before the call, so the inputs do not count but everything the call allocates
(its outputs included) does.

CPU: ``time.perf_counter``; the smoke mode times each method on its own (never a performance
result); the ``--cpu`` mode interleaves the repeats of all methods and keeps the minimum
(:func:`measure_interleaved_cpu`). CPU memory = rise of the
process's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), which
is approximate (the allocator may reuse freed pages) and None where /proc is unavailable.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch


@dataclass
class Measurement:
    median_ms: float
    times_ms: List[float]
    first_call_ms: float          # the warm-up call (compilation, autotuning, caches)
    peak_mem_bytes: Optional[int]
    out_bytes: int                # bytes of the tensors the call returned (loss, dX, dW, logits)
    memory_method: str

    def to_json(self) -> dict:
        extra = {}
        if hasattr(self, "cpu_ms"):        # interleaved CPU mode: median_ms holds the minimum
            extra = {"time_statistic": "min", "min_ms": self.median_ms,
                     "median_of_repeats_ms": self.median_of_repeats_ms,
                     "cpu_ms": self.cpu_ms, "cpu_min_ms": min(self.cpu_ms)}
        return {**extra, "median_ms": self.median_ms, "times_ms": self.times_ms,
                "first_call_ms": self.first_call_ms, "peak_mem_bytes": self.peak_mem_bytes,
                "out_bytes": self.out_bytes,
                "scratch_bytes": (None if self.peak_mem_bytes is None
                                  else max(0, self.peak_mem_bytes - self.out_bytes)),
                "memory_method": self.memory_method, "repeats": len(self.times_ms)}


def _tensor_bytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_tensor_bytes(o) for o in out)
    return 0


def choose_repeats(first_ms: float, target_ms: float, lo: int, hi: int) -> int:
    """Enough repeats to fill ``target_ms`` of timed work, between ``lo`` and ``hi``."""
    if first_ms <= 0:
        return hi
    return int(max(lo, min(hi, target_ms // max(first_ms, 1e-3))))


def measure(fn: Callable, device: torch.device, *, warmup: int = 1, min_repeats: int = 3,
            max_repeats: int = 20, target_ms: float = 400.0) -> Measurement:
    if device.type == "cuda":
        return _measure_cuda(fn, device, warmup, min_repeats, max_repeats, target_ms)
    return _measure_cpu(fn, warmup, min_repeats, max_repeats, target_ms)


def _measure_cuda(fn, device, warmup, min_repeats, max_repeats, target_ms) -> Measurement:
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        out = fn()
        del out
    torch.cuda.synchronize(device)
    first_ms = (time.perf_counter() - t0) * 1e3 / max(1, warmup)

    # Memory: one call after warm-up, peak above what was allocated before it.
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    out_bytes = _tensor_bytes(out)
    del out
    probe_ms = start.elapsed_time(end)

    repeats = choose_repeats(probe_ms, target_ms, min_repeats, max_repeats)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for s, e in events:
        s.record()
        out = fn()
        e.record()
        del out
    torch.cuda.synchronize(device)
    times = [s.elapsed_time(e) for s, e in events]
    return Measurement(statistics.median(times), times, first_ms, peak, out_bytes,
                       "cuda max_memory_allocated - memory_allocated before the call")


def _read_status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure_cpu(fn, warmup, min_repeats, max_repeats, target_ms) -> Measurement:
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        out = fn()
        del out
    first_ms = (time.perf_counter() - t0) * 1e3 / max(1, warmup)

    peak = None
    ok = _reset_hwm()
    base = _read_status("VmRSS")
    t1 = time.perf_counter()
    out = fn()
    probe_ms = (time.perf_counter() - t1) * 1e3
    hwm = _read_status("VmHWM")
    if ok and base is not None and hwm is not None:
        peak = max(0, hwm - base)
    out_bytes = _tensor_bytes(out)
    del out

    repeats = choose_repeats(probe_ms, target_ms, min_repeats, max_repeats)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1e3)
        del out
    return Measurement(statistics.median(times), times, first_ms, peak, out_bytes,
                       "CPU resident-set high-water rise (approximate)")


def measure_interleaved_cpu(fns: dict, repeats: int) -> dict:
    """CPU measurement of several callables on a shared, possibly loaded machine.

    Each callable is warmed up once and its memory taken from one more call; then the repeats run
    round-robin (method A, B, C, A, B, C, ...) so that a burst of load from other processes hits
    every method alike. The headline time is the *minimum* wall time over the repeats (the least
    disturbed run); the median and the process CPU time of each repeat are kept alongside.
    Returns ``{name: Measurement or Exception}``.
    """
    out, first, peaks, outs = {}, {}, {}, {}
    for name, fn in fns.items():
        try:
            t0 = time.perf_counter()
            res = fn()
            first[name] = (time.perf_counter() - t0) * 1e3
            del res
            ok = _reset_hwm()
            base = _read_status("VmRSS")
            res = fn()
            hwm = _read_status("VmHWM")
            peaks[name] = max(0, hwm - base) if (ok and base is not None and hwm is not None) else None
            outs[name] = _tensor_bytes(res)
            del res
        except Exception as e:  # noqa: BLE001 - the caller classifies it
            out[name] = e
    wall = {n: [] for n in fns if n not in out}
    cpu = {n: [] for n in wall}
    for _ in range(repeats):
        for name in wall:
            try:
                c0, t0 = time.process_time(), time.perf_counter()
                res = fns[name]()
                wall[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
                del res
            except Exception as e:  # noqa: BLE001
                out[name] = e
    for name in wall:
        if name in out:
            continue
        m = Measurement(min(wall[name]), wall[name], first[name], peaks[name], outs[name],
                        "CPU resident-set high-water rise (approximate)")
        m.median_of_repeats_ms = statistics.median(wall[name])
        m.cpu_ms = cpu[name]
        out[name] = m
    return out
