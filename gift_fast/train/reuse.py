"""When a run may continue, or reuse, another run's work: resume, warm start, a finished run.

The three key lists below are the whole policy: what a resumed run may change, what defines a
warm start, and which settings do not change what a run computes (a study reuses a finished run
that differs only in those).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from .config import TrainConfig
from .metrics import read_log
from .run_dir import RunDir, checkpoint_path

# Settings a resumed run may change: how long it runs and how it reports, not what it computes.
RESUME_MAY_CHANGE = ("rl_steps", "eval_every", "eval_samples", "save_every", "memory_report",
                     "device", "threads", "compile", "progress", "plot", "overwrite")
# Settings that define a warm start: an RL run can only start from an SFT run that used them.
WARM_START_KEYS = ("model", "vocab", "seed", "sft_steps", "sft_batch", "sft_lr", "weight_decay",
                   "n_heldout")


def resumed_config(cfg: TrainConfig, state: dict) -> TrainConfig:
    """The checkpoint's config, with the settings ``cfg`` may change on resume. A setting that
    ``cfg`` sets to something other than both its default and the checkpoint's value is refused
    (a resumed run is the same run); ``rl_steps`` left at its default keeps the saved value."""
    saved = TrainConfig.from_dict(state["config"])
    default = TrainConfig()
    # The run continues where its checkpoint lies (the directory may have been moved).
    run_dir = os.path.dirname(os.path.abspath(checkpoint_path(cfg.resume)))
    refused = []
    for name in saved.to_dict():
        given, old = getattr(cfg, name), getattr(saved, name)
        if name in RESUME_MAY_CHANGE or name in ("resume", "warm_start") or given == old \
                or given == getattr(default, name):
            continue
        if name == "out_dir" and os.path.abspath(given) == run_dir:
            continue
        refused.append(f"{name}={given!r} (the run has {old!r})")
    if refused:
        raise ValueError("resume: a resumed run keeps its settings; only "
                         f"{', '.join(RESUME_MAY_CHANGE)} may change, got " + "; ".join(refused))
    changes = {name: getattr(cfg, name) for name in RESUME_MAY_CHANGE}
    if cfg.rl_steps == default.rl_steps:
        changes["rl_steps"] = saved.rl_steps
    done_rl = max(0, state["step"] - saved.sft_steps)
    if changes["rl_steps"] < done_rl:
        raise ValueError(f"rl_steps: the run being resumed has done {done_rl} RL steps already; "
                         f"expected >= {done_rl}, got {changes['rl_steps']}")
    return saved.replace(**changes, resume=cfg.resume, out_dir=run_dir)


def check_warm_start(cfg: TrainConfig, state: dict) -> TrainConfig:
    """A warm start is the end of the SFT phase of a run with the same seed and SFT settings.
    Returns ``cfg`` with the warm start's actual SFT length (``sft_until`` may stop it early)."""
    saved = TrainConfig.from_dict(state["config"])
    if state["step"] != saved.sft_steps:
        raise ValueError(f"warm_start: {cfg.warm_start!r} is at step {state['step']}, not at the "
                         f"end of its SFT phase (step {saved.sft_steps}); make one with "
                         "--rl-steps 0")
    keys = WARM_START_KEYS + ("sft_until",)
    if cfg.sft_until is not None:   # stopped early: sft_steps was the limit, not the length
        keys = tuple(k for k in keys if k != "sft_steps")
    differ = [f"{k}={getattr(cfg, k)!r} (warm start: {getattr(saved, k)!r})"
              for k in keys if getattr(cfg, k) != getattr(saved, k)]
    if cfg.sft_until is not None and saved.sft_steps > cfg.sft_steps:
        differ.append(f"sft_steps={cfg.sft_steps} (warm start: {saved.sft_steps})")
    if differ:
        raise ValueError(f"warm_start: {cfg.warm_start!r} was made with other settings: "
                         + "; ".join(differ))
    return cfg.replace(sft_steps=saved.sft_steps)


# Settings that do not change what a run computes: a finished run with other values is reused.
PRESENTATION = ("out_dir", "overwrite", "progress", "plot", "memory_report", "save_every", "name",
                "warm_start", "resume")


def finished_run(cfg: TrainConfig, run: RunDir) -> Optional[List[Dict]]:
    """The records of a finished run in ``run`` made with the same settings as ``cfg``, else
    None: an interrupted study (or seeds run as separate processes into one directory) resumes
    without repeating finished runs."""
    saved = run.read_json(RunDir.CONFIG)
    if saved is None or run.read_json(RunDir.SUMMARY) is None:
        return None
    want = cfg.to_dict()
    for key in want:
        if key in PRESENTATION or (key == "sft_steps" and cfg.sft_until is not None):
            continue
        if saved.get(key) != want[key]:
            return None
    return read_log(run.metrics)
