"""Several losses over several seeds from one shared warm start per seed (``--compare``,
``--seeds``): the runs, the KL of each final policy to its warm start, a summary table and a plot
with the mean and the min-max band over seeds of each loss."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .config import TrainConfig
from .model import build_model
from .reuse import finished_run
from .rollout import Batch, fixed_seed, generate, policy_logprobs, response_targets
from .run_dir import RunDir, StudyDir, timestamped
from .task import PROMPT_LEN, AdditionTask
from .tokenizer import CharTokenizer
from .trainer import Trainer, TrainResult, resolve_device, train

KL_SAMPLES_PER_PROMPT = 4


@dataclass
class StudyResult:
    out_dir: str
    runs: Dict[str, Dict[int, TrainResult]]       # loss -> seed
    table: str                                    # markdown
    summary: Dict = field(default_factory=dict)   # loss -> aggregated numbers
    plot_path: Optional[str] = None


def study_dir(cfg: TrainConfig, losses: Sequence[str]) -> str:
    """``--out-dir``, else ``runs/<name or compare-...>-<timestamp>``: a second study never
    overwrites the first."""
    if cfg.out_dir:
        return cfg.out_dir
    return timestamped(cfg.name or "compare-" + "-".join(losses))


def make_warm_start(cfg: TrainConfig, run: RunDir) -> str:
    """The SFT phase alone (``rl_steps=0``), run once and shared by every loss of this seed."""
    out_dir = run.path
    # overwrite: an unfinished warm start in the study's own directory is run again
    cfg = cfg.replace(rl_steps=0, out_dir=out_dir, plot=False, memory_report=False,
                      warm_start=None, resume=None, overwrite=True)
    if finished_run(cfg, run) is not None and os.path.isfile(run.checkpoint):
        return out_dir
    trainer = Trainer(cfg)
    if cfg.sft_steps == 0:
        trainer.save()  # no SFT: the warm start is the initial model of this seed
    else:
        trainer.run()
    return out_dir


@torch.no_grad()
def kl_to_warm_start(run_dir: str, warm_dir: str, cfg: TrainConfig,
                     samples_per_prompt: int = KL_SAMPLES_PER_PROMPT) -> float:
    """Monte-Carlo KL(final || warm start) per response on the held-out prompts: responses
    sampled from the final policy at the loss temperature, ``mean(sum_t log pi - log pi_0)``.
    A forgetting measure: how far RL moved the policy from where it started."""
    device = resolve_device(cfg.device)
    tok = CharTokenizer(cfg.vocab)
    task = AdditionTask(tok, seed=cfg.seed, n_heldout=cfg.n_heldout)
    models = []
    for path in (run_dir, warm_dir):
        model, dtype = build_model(cfg.model, cfg.vocab, tok.pad_id, tok.bos_id, tok.eos_id, device)
        model.load_state_dict(load_checkpoint(path)["model"])
        models.append(model.eval())
    final, warm = models
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    prompts = task.prompt_ids(task.heldout).repeat_interleave(samples_per_prompt, 0).to(device)
    with fixed_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)), device):
        responses = generate(final, prompts, max_new_tokens=cfg.max_new_tokens,
                             pad_id=tok.pad_id, eos_id=tok.eos_id, temperature=cfg.temperature,
                             compute_dtype=dtype)
    batch = Batch(torch.cat([prompts, responses], 1), response_targets(responses, tok.eos_id),
                  PROMPT_LEN)
    diff = (policy_logprobs(final, batch, cfg.temperature, dtype)
            - policy_logprobs(warm, batch, cfg.temperature, dtype))
    return float(diff.sum(1).mean())


def warm_start_facts(warm: RunDir) -> Dict:
    """Where the shared warm start ended (``sft_until`` may stop SFT early) and its wall time."""
    out: Dict = {}
    config, summary = warm.read_json(RunDir.CONFIG), warm.read_json(RunDir.SUMMARY)
    if config is not None and "sft_steps" in config:
        out["sft_steps"] = config["sft_steps"]
    if summary is not None:
        out["sft_s"] = summary.get("train_s")
    return out


def run_summary(records: List[Dict], window: int) -> Dict:
    """Per-run numbers the table aggregates: at each evaluation the held-out greedy accuracy and
    the held-out sampled reward (``--eval-samples`` responses per problem at the training
    temperature); the gains from the start of RL to the best of the last three evaluations; and
    the training batches' reward (mean over the first and last ``window`` RL steps)."""
    rl = [r for r in records if r.get("phase") == "rl"]
    evals = [r for r in records if r.get("phase") == "eval"]
    rewards = np.array([r["reward"] for r in rl])
    out = {"eval_steps": [r["rl_step"] for r in evals],
           "heldout_accuracy": [r["heldout_accuracy"] for r in evals],
           "sampled_reward": [r.get("heldout_sampled_reward") for r in evals]}
    acc, sampled = out["heldout_accuracy"], out["sampled_reward"]
    if acc:
        out["accuracy_gain"] = max(acc[-3:]) - acc[0]   # best of the last three evals vs start
    if sampled and None not in sampled:
        out["sampled_reward_gain"] = max(sampled[-3:]) - sampled[0]
    if len(rewards):
        w = min(window, len(rewards))
        out["reward_first"] = float(rewards[:w].mean())
        out["reward_last"] = float(rewards[-w:].mean())
        out["reward_gain"] = out["reward_last"] - out["reward_first"]
    return out


def steps_to_reach(summary: Dict, rise: float) -> Optional[int]:
    """First RL step whose held-out accuracy is at least ``rise`` above the start of RL."""
    acc, steps = summary["heldout_accuracy"], summary["eval_steps"]
    for s, a in zip(steps[1:], acc[1:]):
        if a >= acc[0] + rise:
            return s
    return None


def _stats(values: Sequence[float]) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return "n/a"
    return f"{v.mean():.3f} [{v.min():.3f}, {v.max():.3f}]"


def summary_table(per_run: Dict[str, Dict[int, Dict]], rise: float = 0.15) -> str:
    """Markdown: per loss, the mean [min, max] over seeds of each number."""
    any_run = next(iter(next(iter(per_run.values())).values()))
    steps = any_run["eval_steps"]
    fixed = sorted({steps[len(steps) // 3], steps[2 * len(steps) // 3], steps[-1]}) if steps else []
    head = (["loss", "seeds", "held-out acc, RL start"]
            + [f"held-out acc, step {s}" for s in fixed]
            + ["held-out sampled reward, RL start"]
            + [f"held-out sampled reward, step {s}" for s in fixed]
            + ["acc gain (best of last 3 evals - start)",
               "sampled reward gain (best of last 3 evals - start)",
               f"RL steps to +{rise:.2f} acc (per seed)", "KL(final || warm start), nats"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for loss, seeds in per_run.items():
        runs = list(seeds.values())

        def at(key, s):
            return [r[key][r["eval_steps"].index(s)] if s in r["eval_steps"] else None
                    for r in runs]
        reach = [steps_to_reach(r, rise) for r in runs]
        row = ([loss, ",".join(str(s) for s in seeds), _stats([r["heldout_accuracy"][0]
                                                               for r in runs])]
               + [_stats(at("heldout_accuracy", s)) for s in fixed]
               + [_stats([r["sampled_reward"][0] if r["sampled_reward"] else None for r in runs])]
               + [_stats(at("sampled_reward", s)) for s in fixed]
               + [_stats([r.get("accuracy_gain") for r in runs]),
                  _stats([r.get("sampled_reward_gain") for r in runs]),
                  ", ".join("never" if x is None else str(x) for x in reach),
                  _stats([r.get("kl_to_warm_start") for r in runs])])
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def per_run_table(per_run: Dict[str, Dict[int, Dict]], acc_rise: float = 0.15,
                  reward_rise: float = 0.1) -> str:
    """Markdown, one row per (loss, seed): start of RL, best of the last three evaluations and the
    gain, for held-out greedy accuracy and held-out sampled reward, against the bars of the
    default recipe's acceptance check (``acc_rise``, ``reward_rise``)."""
    head = ["loss", "seed", "SFT steps", "held-out acc, RL start", "best of last 3", "gain",
            "sampled reward, RL start", "best of last 3", "gain", "SFT s", "RL s",
            f"gains >= +{acc_rise:.2f} and +{reward_rise:.2f}"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for loss, seeds in per_run.items():
        for seed, r in seeds.items():
            acc, sampled = r["heldout_accuracy"], r["sampled_reward"]
            if not acc or not sampled or None in sampled:
                continue
            ok = r["accuracy_gain"] >= acc_rise and r["sampled_reward_gain"] >= reward_rise
            rows.append("| " + " | ".join([
                loss, str(seed), str(r.get("sft_steps", "?")), f"{acc[0]:.3f}",
                f"{max(acc[-3:]):.3f}", f"{r['accuracy_gain']:+.3f}", f"{sampled[0]:.3f}",
                f"{max(sampled[-3:]):.3f}", f"{r['sampled_reward_gain']:+.3f}",
                f"{r.get('sft_s') or float('nan'):.0f}", f"{r.get('train_s', float('nan')):.0f}",
                "yes" if ok else "NO"]) + " |")
    return "\n".join(rows)


def plot_study(records: Dict[str, Dict[int, List[Dict]]], path: str, window: int = 10) -> str:
    """Three panels over RL steps, one colour per loss: the mean over seeds and the min-max band
    of the training batches' reward (``window``-step running mean), the held-out greedy accuracy
    and the held-out sampled reward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .plotting import smooth

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for loss, seeds in records.items():
        curves = []
        for key, ax_i, phase in (("reward", 0, "rl"), ("heldout_accuracy", 1, "eval"),
                                 ("heldout_sampled_reward", 2, "eval")):
            per_seed = []
            for recs in seeds.values():
                rows = [r for r in recs if r.get("phase") == phase]
                x = [r["rl_step"] for r in rows]
                y = [r.get(key, np.nan) for r in rows]
                per_seed.append((x, smooth(y, window) if phase == "rl" else np.asarray(y)))
            n = min(len(y) for _, y in per_seed)
            x = per_seed[0][0][:n]
            ys = np.stack([y[:n] for _, y in per_seed])
            line, = axes[ax_i].plot(x, ys.mean(0), label=f"{loss} (mean of {len(ys)} seeds)",
                                    marker="o" if phase == "eval" else None, markersize=3,
                                    color=curves[0].get_color() if curves else None)
            curves.append(line)
            axes[ax_i].fill_between(x, ys.min(0), ys.max(0), alpha=0.2, color=line.get_color())
    titles = (f"sampled reward ({window}-step running mean)", "held-out greedy accuracy",
              "held-out sampled reward (at the training temperature)")
    ylabels = ("mean reward per response (0 to 1)", "exact-match accuracy",
               "mean reward per response (0 to 1)")
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_title(title + "\nmean over seeds, band = min-max")
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_study(cfg: TrainConfig, losses: Sequence[str], seeds: Sequence[int]) -> StudyResult:
    """For each seed: one warm start (SFT only), then every loss from it, each in
    ``<out>/<loss>-s<seed>``; then ``compare.md`` (table), ``compare.json`` and ``compare.png``."""
    study = StudyDir(study_dir(cfg, losses))
    os.makedirs(study.path, exist_ok=True)
    runs: Dict[str, Dict[int, TrainResult]] = {loss: {} for loss in losses}
    per_run: Dict[str, Dict[int, Dict]] = {loss: {} for loss in losses}
    for seed in seeds:
        seed_cfg = cfg.replace(seed=seed, resume=None, name=None)
        warm = study.warm_start(seed)
        make_warm_start(seed_cfg.replace(loss=losses[0]), warm)
        for loss in losses:
            run = study.run(loss, seed)
            # overwrite: a finished run is reused below; an unfinished one is run again
            run_cfg = seed_cfg.replace(loss=loss, warm_start=warm.path, plot=False,
                                       overwrite=True, out_dir=run.path)
            records = finished_run(run_cfg, run)
            if records is None:
                result = train(run_cfg)
            else:
                result = TrainResult(run.path, run.metrics, None, records)
            s = run_summary(result.records, window=cfg.eval_every)
            s["kl_to_warm_start"] = kl_to_warm_start(result.out_dir, warm.path, run_cfg)
            s["train_s"] = float(sum(r.get("step_s", 0.0) for r in result.records))
            s.update(warm_start_facts(warm))
            runs[loss][seed], per_run[loss][seed] = result, s
    table = summary_table(per_run) + "\n\nPer run:\n\n" + per_run_table(per_run)
    aggregate = {loss: {str(seed): s for seed, s in seeds_.items()}
                 for loss, seeds_ in per_run.items()}
    study.write_json(StudyDir.NUMBERS, aggregate)
    with open(study.file(StudyDir.TABLE), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    plot = None
    if cfg.plot:
        plot = plot_study({loss: {seed: r.records for seed, r in seeds_.items()}
                           for loss, seeds_ in runs.items()}, study.file(StudyDir.PLOT))
    return StudyResult(study.path, runs, table, aggregate, plot)


def compare(cfg: TrainConfig, losses: List[str], seeds: Optional[List[int]] = None) -> StudyResult:
    """Every loss from one shared warm start per seed (default: ``cfg.seed``): the runs, the
    table and the plot (see :func:`run_study`)."""
    return run_study(cfg, losses, seeds or [cfg.seed])
