"""Training configuration: one dataclass, shared by the Python API and the CLI.

Frozen: a run never changes its caller's config. What a run resolves while it runs (its output
directory, where ``sft_until`` ended SFT) lives in the run's own copy (``TrainResult.config``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class TrainConfig:
    # What to train
    loss: str = "gift"
    model: str = "tiny"                 # tiny | qwen2 | gpu (see model.py)
    vocab: int = 2048                   # padded vocabulary size (exercises the large-vocab path)
    seed: int = 0
    # Supervised warm start (gold answers, the library's fused SFT loss)
    sft_steps: int = 3000               # the limit; sft_until usually ends SFT earlier
    sft_batch: int = 64
    sft_lr: float = 3e-3
    sft_until: Optional[float] = 0.5    # end SFT once greedy accuracy on training problems >= this
    # On-policy RL
    rl_steps: int = 450
    prompts_per_step: int = 32          # 4 mini-batches of 8 prompts x 8 responses per update
    group_size: int = 8                 # G responses sampled per prompt
    mini_batches: int = 4               # optimiser steps per pass over a rollout (whole groups; at
                                        # most one per group)
    updates_per_batch: int = 1          # passes over each rollout batch (anchor = rollout policy)
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0            # sampling temperature == loss temperature
    beta: Optional[float] = None        # the loss's beta; None = the library default
    anchor: str = "old"                 # old: rollout policy (authors' code); ref: post-SFT model
    max_new_tokens: int = 5
    ift_lambda: float = 0.2             # IFT's mix of predicted-token embeddings
    # Evaluation, logging, checkpoints
    eval_every: int = 25
    eval_samples: int = 4               # sampled responses per held-out problem (0: greedy only)
    n_heldout: int = 256
    save_every: int = 100
    out_dir: Optional[str] = None       # default runs/<name>
    overwrite: bool = False             # a new run may replace a run already in out_dir
    name: Optional[str] = None
    resume: Optional[str] = None        # a checkpoint file or a run directory
    warm_start: Optional[str] = None    # checkpoint of a finished SFT-only run: skip the SFT phase
    memory_report: Optional[bool] = None  # default: on for the qwen2 preset
    device: str = "auto"
    threads: Optional[int] = None
    compile: bool = False               # torch.compile the training step (model + fused loss)
    progress: bool = True
    plot: bool = True

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def validate(cfg: TrainConfig) -> None:
    """Raises ValueError naming the bad setting and what was expected."""
    from .model import PRESETS
    from .objectives import LOSSES, NEEDS_GROUPS
    from .tokenizer import MIN_VOCAB

    def need(ok: bool, message: str):
        if not ok:
            raise ValueError(message)

    need(cfg.loss in LOSSES, f"loss: expected one of {', '.join(LOSSES)}; got {cfg.loss!r}")
    need(cfg.model in PRESETS, f"model: expected one of {', '.join(PRESETS)}; got {cfg.model!r}")
    need(cfg.vocab >= MIN_VOCAB, f"vocab: expected >= {MIN_VOCAB} (the task's alphabet), got {cfg.vocab}")
    for name in ("sft_steps", "rl_steps"):
        need(getattr(cfg, name) >= 0, f"{name}: expected >= 0, got {getattr(cfg, name)}")
    for name in ("sft_batch", "prompts_per_step", "group_size", "updates_per_batch", "mini_batches",
                 "max_new_tokens", "eval_every", "n_heldout", "save_every"):
        need(getattr(cfg, name) >= 1, f"{name}: expected >= 1, got {getattr(cfg, name)}")
    need(cfg.eval_samples >= 0, f"eval_samples: expected >= 0, got {cfg.eval_samples}")
    need(cfg.n_heldout <= 5000, f"n_heldout: expected <= 5000 of the 10000 problems, got {cfg.n_heldout}")
    need(cfg.group_size >= 2 or cfg.loss not in NEEDS_GROUPS,
         f"group_size: loss {cfg.loss!r} compares responses within a group; expected >= 2, "
         f"got {cfg.group_size}")
    for name in ("lr", "sft_lr", "temperature"):
        need(getattr(cfg, name) > 0, f"{name}: expected > 0, got {getattr(cfg, name)}")
    need(cfg.sft_until is None or 0 < cfg.sft_until <= 1,
         f"sft_until: expected a fraction in (0, 1], got {cfg.sft_until}")
    need(cfg.grad_clip >= 0, f"grad_clip: expected >= 0 (0 disables), got {cfg.grad_clip}")
    need(cfg.anchor in ("old", "ref"), f"anchor: expected 'old' or 'ref', got {cfg.anchor!r}")
    need(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
         f"device: expected auto, cpu or cuda[:N], got {cfg.device!r}")
    need(cfg.threads is None or cfg.threads >= 1, f"threads: expected >= 1, got {cfg.threads}")
    need(cfg.beta is None or cfg.beta > 0, f"beta: expected > 0 (or unset for the loss's "
         f"default), got {cfg.beta}")
    import os
    from .run_dir import checkpoint_path
    for name in ("resume", "warm_start"):
        path = getattr(cfg, name)
        need(path is None or os.path.isfile(checkpoint_path(path)),
             f"{name}: no checkpoint found at {path!r}")
    need(cfg.resume is None or cfg.warm_start is None,
         "warm_start: a resumed run already has its weights; give --resume or --warm-start, not both")
