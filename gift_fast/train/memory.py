"""Peak memory of the loss path (fused op) next to the naive path (materialised logits).

Both paths get the same inputs (one real rollout batch: response hidden states and the lm_head
weight as leaves) and run the same loss forward and backward; only the engine differs: the
library's default backend (chunked torch on CPU, Triton on CUDA) versus its ``reference``
backend, which materialises the [N, V] logits the way a plain PyTorch loss does.

Peak memory counts bytes allocated by torch above what was live before the call: on CUDA from
the caching allocator's statistics, on CPU from the profiler's allocation events.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Callable, Dict

import torch

from .objectives import SUPERVISED, best_worst_pairs, loss_from_hidden
from .rollout import Batch, response_hidden


@contextlib.contextmanager
def _quiet_native_stderr():
    """The profiler's native library prints start/stop lines on fd 2; keep the console clean."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile
    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU],
                                         profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            events = json.load(f)["traceEvents"]
    # "Total Allocated" is the allocator's running total since profiling started.
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak_bytes(fn)


def _time_s(fn: Callable[[], None], device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up (allocator, kernels' compilation on GPU)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def compare_loss_memory(loss_name: str, model, batch: Batch, cfg, compute_dtype) -> Dict:
    """Fused vs naive loss path on ``batch``: peak MiB above the inputs and best-of-3 time of
    forward + backward (gradients w.r.t. hidden states and lm_head weight)."""
    name = "sft" if loss_name in SUPERVISED else loss_name
    if name == "dpo":
        index = best_worst_pairs(batch)
        if index.numel() == 0:  # all groups tied: pair arbitrary responses, memory is the same
            g = batch.group_size
            index = torch.cat([torch.arange(0, batch.targets.shape[0], g),
                               torch.arange(1, batch.targets.shape[0], g)])
        batch = batch.select(index, group_size=1)
    with torch.no_grad():
        hidden = response_hidden(model, batch, compute_dtype).contiguous()
        weight = model.get_output_embeddings().weight.detach().to(compute_dtype).clone()
    device = hidden.device

    def run(backend: str) -> Callable[[], None]:
        def step():
            h = hidden.clone().requires_grad_(True)
            w = weight.requires_grad_(True)
            w.grad = None
            loss, _ = loss_from_hidden(name, h, w, batch, cfg, backend=backend)
            loss.backward()
        return step

    n_rows, vocab = batch.targets.numel(), weight.shape[0]
    report = {"loss": name, "device": _device_name(device), "rows": n_rows, "vocab": vocab,
              "hidden": weight.shape[1], "dtype": str(compute_dtype).replace("torch.", ""),
              "logits_mib": n_rows * vocab * 4 / 2**20}
    for label, backend in (("fused", "auto"), ("naive", "reference")):
        report[f"{label}_peak_mib"] = peak_bytes(run(backend), device) / 2**20
        report[f"{label}_time_ms"] = _time_s(run(backend), device) * 1e3
    report["memory_ratio"] = report["naive_peak_mib"] / max(report["fused_peak_mib"], 1e-9)
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_report(r: Dict) -> str:
    return (f"loss path memory ({r['loss']}, {r['rows']} rows x vocab {r['vocab']}, {r['device']}): "
            f"fused {r['fused_peak_mib']:.1f} MiB / {r['fused_time_ms']:.1f} ms vs naive "
            f"(materialised logits) {r['naive_peak_mib']:.1f} MiB / {r['naive_time_ms']:.1f} ms "
            f"-> {r['memory_ratio']:.1f}x less memory")
