"""PNG curves of one run or several runs side by side (``--compare``)."""
from __future__ import annotations

from typing import Dict, List

import numpy as np


def _smooth(values: List[float], window: int = 10) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if len(v) < window:
        return v
    kernel = np.ones(window) / window
    head = np.cumsum(v[:window - 1]) / np.arange(1, window)  # running mean until a full window
    return np.concatenate([head, np.convolve(v, kernel, mode="valid")])


def plot_runs(runs: Dict[str, List[Dict]], path: str) -> str:
    """Three panels over RL steps: sampled reward (10-step running mean), held-out greedy
    accuracy, loss. Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, records in runs.items():
        rl = [r for r in records if r.get("phase") == "rl"]
        ev = [r for r in records if r.get("phase") == "eval"]
        if rl:
            steps = [r["rl_step"] for r in rl]
            line, = axes[0].plot(steps, _smooth([r["reward"] for r in rl]), label=name)
            axes[0].plot(steps, [r["reward"] for r in rl], alpha=0.15, color=line.get_color())
            losses = [(r["rl_step"], r["loss"]) for r in rl if r.get("loss") is not None]
            if losses:
                axes[2].plot(*zip(*losses), label=name, alpha=0.8)
        if ev:
            axes[1].plot([r["rl_step"] for r in ev], [r["heldout_accuracy"] for r in ev],
                         marker="o", label=name)
    titles = ("sampled reward (10-step mean)", "held-out greedy accuracy", "loss")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
