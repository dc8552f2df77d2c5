"""The layout of a run directory and of a study directory: every file name lives here.

A run directory holds one training run (``RunDir``); a study directory (``StudyDir``) holds one
warm start per seed, one run directory per (loss, seed) and the comparison's table and plot.
Nothing else in gift_fast.train spells a file name, so moving or renaming a file is one edit.
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from typing import List, Optional

CHECKPOINT_NAME = "checkpoint.pt"


def checkpoint_path(path: str) -> str:
    """Accepts a checkpoint file or the run directory holding one."""
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path


def unused_path(path: str) -> str:
    """``path``, or ``path-2``, ``path-3``, ... if it exists (two runs started in the same second
    never share a directory)."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def timestamped(name: str, root: str = "runs") -> str:
    """``<root>/<name>-<YYYYmmdd-HHMMSS>``, made unique with :func:`unused_path`."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return unused_path(os.path.join(root, f"{name}-{stamp}"))


def new_run_path(name: Optional[str], loss: str) -> str:
    """Where a run without ``out_dir`` goes: ``runs/<name>``, else ``runs/<loss>-<timestamp>``
    (either made unique)."""
    return unused_path(os.path.join("runs", name)) if name else timestamped(loss)


@dataclass(frozen=True)
class _Directory:
    path: str

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_json(self, name: str, obj) -> str:
        path = self.file(name)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
        return path

    def read_json(self, name: str) -> Optional[dict]:
        """The file's JSON, or None when it is missing or unreadable (an unfinished run)."""
        try:
            with open(self.file(name), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None


@dataclass(frozen=True)
class RunDir(_Directory):
    """One run's directory and the names of the files a run writes there."""

    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    CONFIG = "config.json"
    TOKENIZER = "tokenizer.json"
    CURVES = "curves.png"
    MEMORY = "memory.json"
    CHECKPOINT = CHECKPOINT_NAME
    # Files whose presence means the directory holds a run (a new run must not replace it).
    RUN_FILES = (METRICS, SUMMARY, CHECKPOINT)

    @property
    def metrics(self) -> str:
        return self.file(self.METRICS)

    @property
    def checkpoint(self) -> str:
        return self.file(self.CHECKPOINT)

    def held_run_files(self) -> List[str]:
        """The run files already present (empty for a new or an empty directory)."""
        return [name for name in self.RUN_FILES if os.path.exists(self.file(name))]

    def refuse_replacing(self, held: List[str]) -> None:
        """A new run never replaces another run's log or checkpoint without being told to."""
        if held:
            raise ValueError(f"out_dir: {self.path!r} already holds a run ({', '.join(held)}); "
                             "choose another --out-dir, continue that run with --resume, or pass "
                             "--overwrite (TrainConfig(overwrite=True)) to replace it")


@dataclass(frozen=True)
class StudyDir(_Directory):
    """A ``--compare`` / ``--seeds`` study: a warm start per seed and a run per (loss, seed)."""

    TABLE = "compare.md"
    NUMBERS = "compare.json"
    PLOT = "compare.png"

    def warm_start(self, seed: int) -> RunDir:
        return RunDir(os.path.join(self.path, f"warmstart-s{seed}"))

    def run(self, loss: str, seed: int) -> RunDir:
        return RunDir(os.path.join(self.path, f"{loss}-s{seed}"))
