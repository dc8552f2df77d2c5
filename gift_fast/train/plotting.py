"""PNG curves of one run (``curves.png``), or of several runs on the same axes."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np


def smooth(values: List[float], window: int = 10) -> np.ndarray:
    """Running mean over the last ``window`` values (over all values so far for the first ones),
    the same length as ``values``."""
    v = np.asarray(values, dtype=float)
    if len(v) < window:
        return np.cumsum(v) / np.arange(1, len(v) + 1)
    kernel = np.ones(window) / window
    head = np.cumsum(v[:window - 1]) / np.arange(1, window)  # running mean until a full window
    return np.concatenate([head, np.convolve(v, kernel, mode="valid")])


def _window(n: int) -> int:
    """Smoothing window of a curve of ``n`` points: about 1/20 of it, at least 10 steps."""
    return max(10, n // 20)


def _raw_and_smoothed(ax, x, y, color, label: str) -> None:
    """The raw values faint behind their running mean."""
    ax.plot(x, y, color=color, alpha=0.2, linewidth=0.8)
    w = _window(len(y))
    ax.plot(x, smooth(y, w), color=color, linewidth=1.8, label=f"{label} ({w}-step mean)")


def rl_start(records: List[Dict]) -> Optional[int]:
    """The run's step at which RL started (where ``sft_until`` ended SFT), None without RL."""
    for r in records:
        if r.get("phase") in ("rl", "eval") and "rl_step" in r:
            return r["step"] - r["rl_step"]
    return None


def plot_runs(runs: Dict[str, List[Dict]], path: str) -> str:
    """Four panels (several runs share them, one colour each): the reward of the training rollouts and the held-out sampled reward,
    the held-out greedy accuracy (the two acceptance metrics, over RL steps), the SFT warm start
    (loss and the ``sft_until`` probe's accuracy, with the step where RL started) and the RL
    loss. Losses are drawn raw (faint) behind a running mean. Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    (ax_reward, ax_acc), (ax_sft, ax_loss) = axes
    ax_probe = None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    titles = []
    for i, (name, records) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        # One run: a second colour for the second series of a panel; several: one colour each.
        other = color if len(runs) > 1 else colors[1]
        prefix = f"{name}: " if len(runs) > 1 else ""
        sft = [r for r in records if r.get("phase") == "sft"]
        probes = [r for r in records if r.get("phase") == "sft_probe"]
        rl = [r for r in records if r.get("phase") == "rl"]
        ev = [r for r in records if r.get("phase") == "eval"]
        start = rl_start(records)

        if rl:
            x = [r["rl_step"] for r in rl]
            _raw_and_smoothed(ax_reward, x, [r["reward"] for r in rl], color,
                              f"{prefix}training rollouts")
            losses = [(r["rl_step"], r["loss"]) for r in rl if r.get("loss") is not None]
            if losses:
                lx, ly = zip(*losses)
                _raw_and_smoothed(ax_loss, lx, ly, color, f"{prefix}{name} loss")
        if ev and "heldout_sampled_reward" in ev[0]:
            ax_reward.plot([r["rl_step"] for r in ev], [r["heldout_sampled_reward"] for r in ev],
                           color=other, linestyle="--", marker="o", markersize=5,
                           label=f"{prefix}held-out problems, sampled (evaluations)")
        if ev:
            ax_acc.plot([r["rl_step"] for r in ev], [r["heldout_accuracy"] for r in ev],
                        color=color, marker="o", markersize=5, label=f"{prefix}held-out, greedy")

        if sft:
            _raw_and_smoothed(ax_sft, [r["step"] for r in sft], [r["loss"] for r in sft], color,
                              f"{prefix}SFT loss")
        if probes:
            if ax_probe is None:
                ax_probe = ax_sft.twinx()
            ax_probe.plot([r["step"] for r in probes], [r["probe_accuracy"] for r in probes],
                          color=other, marker=".", linestyle=":", alpha=0.8,
                          label=f"{prefix}greedy accuracy, 256 training problems")
        if start is not None and sft:
            reached = (f" (probe accuracy {probes[-1]['probe_accuracy']:.2f})"
                       if probes and probes[-1]["step"] == start else "")
            ax_sft.axvline(start, color="black" if len(runs) == 1 else color, linestyle="--",
                           linewidth=1, label=f"{prefix}RL starts at step {start}{reached}")
        titles.append(f"{name}: {len(sft)} SFT steps, then {len(rl)} RL steps"
                      + (f" (RL step 0 = step {start} of the run)" if start and rl else ""))

    ax_reward.set_title("Reward (sampled at the training temperature)")
    ax_reward.set_ylabel("mean reward per response (0 to 1)")
    ax_acc.set_title("Held-out greedy accuracy")
    ax_acc.set_ylabel("exact-match accuracy")
    ax_sft.set_title("SFT warm start")
    ax_sft.set_ylabel("SFT loss (token NLL, log scale)")
    ax_sft.set_xlabel("step")
    ax_loss.set_title("RL loss" + (f" ({next(iter(runs))})" if len(runs) == 1 else ""))
    ax_loss.set_ylabel("loss (mean over the step's updates)")
    if ax_sft.lines:
        from matplotlib.ticker import FuncFormatter
        ax_sft.set_yscale("log")
        # Plain numbers, and of the minor ticks only 2, 3 and 5 x 10^k (not 6 x 10^0).
        ax_sft.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax_sft.yaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else ""))
    else:
        ax_sft.text(0.5, 0.5, "no SFT steps in this run\n(--sft-steps 0 or --warm-start)",
                    transform=ax_sft.transAxes, ha="center", va="center", color="gray")
        ax_sft.set_xticks([])
        ax_sft.set_yticks([])
    handles, labels = ax_sft.get_legend_handles_labels()
    if ax_probe is not None:
        ax_probe.set_ylabel("greedy accuracy (sft_until probe)")
        ax_probe.set_ylim(-0.02, 1.02)
        more = ax_probe.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax_sft.legend(handles, labels, fontsize=8, loc="upper center")
    for ax in (ax_reward, ax_acc, ax_loss):
        ax.set_xlabel("RL step (0 = end of SFT)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax is not ax_sft and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("; ".join(titles), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
