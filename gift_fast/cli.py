"""``gift-fast`` console script. Subcommand ``train``: GIFT (or a baseline) end to end.

Bad arguments end with argparse's usage line and a one-line message (exit status 2), never a
traceback: every setting is checked by ``config.validate`` before anything runs.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .train.config import TrainConfig, validate
from .train.objectives import LOSSES

_DEFAULTS = TrainConfig()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected >= 0, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    what = p.add_argument_group("what to train")
    what.add_argument("--loss", default=d.loss, help=f"one of: {', '.join(LOSSES)} (default {d.loss})")
    what.add_argument("--compare", metavar="L1,L2", default=None,
                      help="train several losses on the same seeds and plot them together, e.g. gift,grpo")
    what.add_argument("--model", default=d.model, choices=["tiny", "qwen2", "gpu"],
                      help="tiny: 2-layer Llama for CPU; qwen2: Qwen2-style body for --vocab 151936; "
                           "gpu: larger Llama in bfloat16 with SDPA / FlashAttention-2")
    what.add_argument("--vocab", type=_positive_int, default=d.vocab,
                      help=f"padded vocabulary size (default {d.vocab}; 151936 for the Qwen2 size)")
    what.add_argument("--seed", type=_positive_int, default=d.seed)
    sft = p.add_argument_group("SFT warm start (gold answers, fused SFT loss)")
    sft.add_argument("--sft-steps", type=_positive_int, default=d.sft_steps)
    sft.add_argument("--sft-batch", type=_positive_int, default=d.sft_batch)
    sft.add_argument("--sft-lr", type=_float, default=d.sft_lr)
    rl = p.add_argument_group("on-policy RL")
    rl.add_argument("--rl-steps", type=_positive_int, default=d.rl_steps)
    rl.add_argument("--prompts-per-step", type=_positive_int, default=d.prompts_per_step)
    rl.add_argument("--group-size", "-G", type=_positive_int, default=d.group_size,
                    help="responses sampled per prompt")
    rl.add_argument("--updates-per-batch", type=_positive_int, default=d.updates_per_batch,
                    help="optimiser steps per rollout batch (the anchor stays the pre-update policy)")
    rl.add_argument("--lr", type=_float, default=d.lr)
    rl.add_argument("--weight-decay", type=_float, default=d.weight_decay)
    rl.add_argument("--grad-clip", type=_float, default=d.grad_clip, help="0 disables")
    rl.add_argument("--temperature", type=_float, default=d.temperature,
                    help="sampling temperature, also the loss temperature")
    rl.add_argument("--beta", type=_float, default=None, help="the loss's beta (default: library default)")
    rl.add_argument("--anchor", default=d.anchor, choices=["old", "ref"],
                    help="old: rollout policy (authors' code); ref: the warm-started model, frozen")
    rl.add_argument("--max-new-tokens", type=_positive_int, default=d.max_new_tokens)
    rl.add_argument("--ift-lambda", type=_float, default=d.ift_lambda)
    out = p.add_argument_group("evaluation, output, checkpoints")
    out.add_argument("--eval-every", type=_positive_int, default=d.eval_every)
    out.add_argument("--n-heldout", type=_positive_int, default=d.n_heldout)
    out.add_argument("--save-every", type=_positive_int, default=d.save_every)
    out.add_argument("--out-dir", default=None, help="default runs/<name>")
    out.add_argument("--name", default=None, help="run name (default <loss>-<timestamp>)")
    out.add_argument("--resume", default=None, metavar="PATH",
                     help="checkpoint file or run directory to continue")
    out.add_argument("--memory-report", action=argparse.BooleanOptionalAction, default=None,
                     help="measure the loss path's peak memory next to materialised logits "
                          "(default: on for --model qwen2)")
    out.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    out.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    out.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    out.add_argument("--no-plot", action="store_true", help="skip the PNG")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gift-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    train = sub.add_parser("train", help="train a small LM on 2-digit addition with GIFT or a baseline",
                           description="On-policy training of a transformers causal LM with a fused "
                                       "gift_fast loss (SFT warm start, then RL).")
    _add_train_arguments(train)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {k: v for k, v in vars(args).items()
              if k not in ("command", "compare", "no_progress", "no_plot")}
    return TrainConfig(**fields, progress=not args.no_progress, plot=not args.no_plot)


def _parse_compare(parser, text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    losses = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in losses if s not in LOSSES]
    if len(losses) < 2 or unknown or len(set(losses)) != len(losses):
        parser.error(f"--compare: expected two or more distinct losses from {', '.join(LOSSES)} "
                     f"separated by commas, got {text!r}")
    return losses


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    cfg = config_from_args(args)
    losses = _parse_compare(train_parser, args.compare)
    if losses and cfg.resume:
        train_parser.error("--resume: resume one run at a time, not with --compare")
    try:
        for loss in losses or [cfg.loss]:
            validate(cfg.replace(loss=loss))
    except ValueError as exc:  # "field: expected ..." -> "--field: expected ..."
        field, _, rest = str(exc).partition(":")
        train_parser.error(f"--{field.replace('_', '-')}:{rest}")

    from .train.trainer import compare, train
    try:
        if losses:
            results = compare(cfg, losses)
            for loss, r in results.items():
                print(_summary_line(loss, r.summary))
            first = next(iter(results.values()))
            print(f"logs: {', '.join(r.log_path for r in results.values())}")
            print(f"plot: {first.compare_plot}")
        else:
            result = train(cfg)
            print(_summary_line(cfg.loss, result.summary))
            if "memory" in result.summary:
                print(result.summary["memory"])
            print(f"log:  {result.log_path}")
            print(f"plot: {result.plot_path}")
    except ValueError as exc:
        train_parser.error(str(exc))
    return 0


def _summary_line(loss: str, s: dict) -> str:
    if "reward_first" not in s:
        return f"{loss}: no RL steps run"
    return (f"{loss}: mean reward first {s['window']} RL steps {s['reward_first']:.3f} -> last "
            f"{s['window']} {s['reward_last']:.3f}; held-out greedy accuracy "
            f"{s.get('heldout_accuracy_start', float('nan')):.3f} -> "
            f"{s.get('heldout_accuracy_end', float('nan')):.3f}; "
            f"wall time {s.get('wall_s_this_process', s['train_s']):.0f} s")


if __name__ == "__main__":
    sys.exit(main())
