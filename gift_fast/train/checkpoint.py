"""Checkpoint save and resume: model, optimiser, step, config and every RNG stream, so that a
resumed run continues exactly as the uninterrupted one would (on CPU)."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from .run_dir import checkpoint_path


def save_checkpoint(path: str, *, model, optimizer, step: int, config: dict,
                    data_rng: random.Random, ref_model=None) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "config": config,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": np.random.get_state(), "data": data_rng.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "ref_model": None if ref_model is None else ref_model.state_dict(),
    }
    # Written next to ``path`` and renamed over it (atomic on one filesystem): a crash or a full
    # disk mid-write leaves the previous checkpoint as it was, never a truncated one.
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


CHECKPOINT_KEYS = ("model", "optimizer", "step", "config", "rng")


def load_checkpoint(path: str, what: str = "resume") -> dict:
    """The checkpoint's state; a ValueError naming the file when it is not one of ours."""
    file = checkpoint_path(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle, zip, EOF, decode errors: all mean "not a checkpoint"
        first_line = (str(exc).strip().splitlines() or [""])[0][:120]
        raise ValueError(f"{what}: {file!r} is not a gift-fast checkpoint "
                         f"({type(exc).__name__}: {first_line})") from None
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise ValueError(f"{what}: {file!r} is not a gift-fast checkpoint (expected a dict with "
                         f"{', '.join(CHECKPOINT_KEYS)})")
    return state


def restore_rng(state: dict, data_rng: random.Random) -> None:
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    data_rng.setstate(rng["data"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
