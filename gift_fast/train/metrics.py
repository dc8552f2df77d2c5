"""The JSONL metrics log and the process-level numbers that go into it."""
from __future__ import annotations

import json
import os
import resource
from typing import Dict, List, Optional

import torch


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def read_log(path: str) -> List[Dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Appends one JSON object per line; on resume keeps only the records before ``keep_before``
    so the log reads as one uninterrupted run. ``path=None`` keeps the records in memory only
    (the ranks > 0 of a data-parallel run)."""

    def __init__(self, path: Optional[str], keep_before: int = 0):
        self.path = path
        kept = []
        if path is None:
            self.records: List[Dict] = kept
            return
        if keep_before > 0 and os.path.exists(path):
            # An eval or SFT-probe record's step counts the steps completed before it, a training
            # record's step is its own index: all belong to the part of the run the checkpoint
            # holds (the probe schedule reads the last probe back).
            kept = [r for r in read_log(path) if r.get("step", 0) < keep_before
                    or (r.get("phase") in ("eval", "sft_probe") and r.get("step") == keep_before)]
        with open(path, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        self.records: List[Dict] = kept

    def write(self, record: Dict) -> None:
        self.records.append(record)
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
