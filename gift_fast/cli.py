"""The gift-fast command. Subcommand train: GIFT (or a baseline) end to end on a small LM.

Bad arguments end with argparse's usage line and a one-line message naming the option (exit
status 2), never a traceback: every setting is checked by ``config.validate`` before anything runs.
A run stopped by a non-finite loss or gradient ends with one message naming the step (exit
status 1).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .train.config import TrainConfig, validate
from .train.trainer import NonFiniteError
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
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _seed_list(text: str) -> List[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(
            f"expected distinct non-negative integers such as 0,1,2, got {text!r}")
    return seeds


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where there is a default worth showing."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    what = p.add_argument_group("what to train")
    what.add_argument("--loss", default=d.loss, help=f"one of: {', '.join(LOSSES)}")
    what.add_argument("--compare", metavar="L1,L2", default=None,
                      help="train several losses from the same warm start per seed, then one plot and "
                           "one table (e.g. gift,grpo)")
    what.add_argument("--model", default=d.model, choices=["tiny", "qwen2", "gpu"],
                      help="tiny: 2-layer Llama for CPU; qwen2: Qwen2-style body for --vocab 151936; "
                           "gpu: larger Llama in bfloat16 with SDPA / FlashAttention-2")
    what.add_argument("--vocab", type=_positive_int, default=d.vocab,
                      help="padded vocabulary size (151936 for the Qwen2 size)")
    what.add_argument("--seed", type=_positive_int, default=d.seed,
                      help="model init, data order, held-out split and sampling")
    what.add_argument("--seeds", type=_seed_list, default=None, metavar="S1,S2",
                      help="several seeds (e.g. 0,1,2): one warm start per seed, every loss of "
                           "--compare from it, mean and min-max band over seeds")
    sft = p.add_argument_group("SFT warm start (gold answers, fused SFT loss)")
    sft.add_argument("--sft-steps", type=_positive_int, default=d.sft_steps,
                     help="supervised steps before RL (0: no warm start)")
    sft.add_argument("--sft-batch", type=_positive_int, default=d.sft_batch, help="problems per SFT step")
    sft.add_argument("--sft-lr", type=_float, default=d.sft_lr, help="AdamW learning rate of the SFT phase")
    sft.add_argument("--sft-until", type=_float, default=d.sft_until, metavar="ACC",
                     help="end SFT early, at the first probe where greedy accuracy on 256 training "
                          "problems reaches ACC (a probe every 10 steps, every 2 once a probe reached "
                          "ACC/2; 0: off); --sft-steps is then the limit")
    sft.add_argument("--warm-start", default=None, metavar="PATH",
                     help="start RL from the checkpoint of an SFT-only run (--rl-steps 0) with the same "
                          "seed and SFT settings instead of repeating its SFT phase")
    rl = p.add_argument_group("on-policy RL")
    rl.add_argument("--rl-steps", type=_positive_int, default=d.rl_steps, help="rollout + update steps")
    rl.add_argument("--prompts-per-step", type=_positive_int, default=d.prompts_per_step,
                    help="problems per rollout")
    rl.add_argument("--group-size", "-G", type=_positive_int, default=d.group_size,
                    help="responses sampled per prompt")
    rl.add_argument("--mini-batches", type=_positive_int, default=d.mini_batches,
                    help="split each rollout into this many mini-batches of whole groups, one optimiser "
                         "step each (verl's ppo_mini_batch_size)")
    rl.add_argument("--updates-per-batch", type=_positive_int, default=d.updates_per_batch,
                    help="passes over each rollout (verl's ppo_epochs); the anchor stays the rollout policy")
    rl.add_argument("--lr", type=_float, default=d.lr, help="AdamW learning rate of the RL phase")
    rl.add_argument("--weight-decay", type=_float, default=d.weight_decay, help="AdamW weight decay")
    rl.add_argument("--grad-clip", type=_float, default=d.grad_clip, help="max gradient norm of every optimiser step; 0 disables")
    rl.add_argument("--temperature", type=_float, default=d.temperature,
                    help="sampling temperature, also the loss temperature")
    rl.add_argument("--beta", type=_float, default=None,
                    help="the loss's beta, > 0 (unset: the library's default for that loss)")
    rl.add_argument("--anchor", default=d.anchor, choices=["old", "ref"],
                    help="old: rollout policy (authors' code); ref: the warm-started model, frozen")
    rl.add_argument("--max-new-tokens", type=_positive_int, default=d.max_new_tokens,
                    help="response length limit")
    rl.add_argument("--ift-lambda", type=_float, default=d.ift_lambda,
                    help="IFT: weight of the predicted token in the mixed input embeddings")
    out = p.add_argument_group("evaluation, output, checkpoints")
    out.add_argument("--eval-every", type=_positive_int, default=d.eval_every,
                     help="RL steps between greedy evaluations on the held-out problems")
    out.add_argument("--eval-samples", type=_positive_int, default=d.eval_samples,
                     help="responses per held-out problem sampled at --temperature at each "
                          "evaluation (the held-out sampled reward; 0: greedy only)")
    out.add_argument("--n-heldout", type=_positive_int, default=d.n_heldout, help="held-out problems")
    out.add_argument("--save-every", type=_positive_int, default=d.save_every,
                     help="steps between checkpoints (also written at the end)")
    out.add_argument("--out-dir", default=None, help="output directory (unset: runs/<name>-<timestamp>)")
    out.add_argument("--overwrite", action="store_true",
                     help="let a new run replace the run already in --out-dir (default: refuse)")
    out.add_argument("--name", default=None, help="run name (unset: <loss>-<timestamp>)")
    out.add_argument("--resume", default=None, metavar="PATH",
                     help="checkpoint file or run directory to continue; only --rl-steps (longer) "
                          "and the output/evaluation options may change")
    out.add_argument("--memory-report", action=argparse.BooleanOptionalAction, default=None,
                     help="measure the loss path's peak memory next to materialised logits "
                          "(default: on for --model qwen2)")
    out.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    out.add_argument("--threads", type=_positive_int, default=None,
                     help="torch CPU threads (unset: torch's default); results differ in the last "
                          "bits between thread counts")
    out.add_argument("--compile", action="store_true",
                     help="torch.compile the training step (model forward + fused loss head); the "
                          "first steps of each phase pay the compilation")
    out.add_argument("--nproc", type=_positive_int, default=None, metavar="N",
                     help="data-parallel over N processes: launches torchrun --standalone "
                          "--nproc-per-node N (the same as running this command under torchrun); "
                          "--prompts-per-step and --sft-batch are the totals over all processes")
    out.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    out.add_argument("--no-plot", action="store_true", help="skip the PNG")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gift-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    train = sub.add_parser("train", help="train a small LM on 2-digit addition with GIFT or a baseline",
                           description="On-policy training of a transformers causal LM with a fused "
                                       "gift_fast loss (SFT warm start, then RL).",
                           formatter_class=_HelpFormatter)
    _add_train_arguments(train)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {k: v for k, v in vars(args).items()
              if k not in ("command", "compare", "seeds", "no_progress", "no_plot", "nproc")}
    if fields.get("sft_until") == 0:
        fields["sft_until"] = None    # --sft-until 0: always run --sft-steps
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
    seeds = args.seeds
    if (losses or seeds) and cfg.resume:
        train_parser.error("--resume: resume one run at a time, not with --compare or --seeds")
    if (losses or seeds) and cfg.warm_start:
        train_parser.error("--warm-start: --compare and --seeds make their own warm starts")
    try:
        for loss in losses or [cfg.loss]:
            for seed in seeds or [cfg.seed]:
                validate(cfg.replace(loss=loss, seed=seed))
    except ValueError as exc:  # "field: expected ..." -> "--field: expected ..."
        train_parser.error(_flag_message(str(exc)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.nproc == 0:
        train_parser.error("--nproc: expected >= 1, got 0")
    if (losses or seeds) and (world > 1 or (args.nproc or 1) > 1):
        train_parser.error("--nproc: --compare and --seeds run in one process; "
                           "drop --nproc / torchrun")
    if (args.nproc or 1) > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(train_parser, cfg, args.nproc,
                                sys.argv[1:] if argv is None else list(argv))
    is_main = int(os.environ.get("RANK", "0")) == 0

    try:
        if losses or seeds:
            from .train.run_dir import StudyDir
            from .train.study import run_study
            study = run_study(cfg, losses or [cfg.loss], seeds or [cfg.seed])
            print(study.table)
            print(f"table: {StudyDir(study.out_dir).file(StudyDir.TABLE)}")
            print(f"runs:  {study.out_dir}")
            if study.plot_path:
                print(f"plot:  {study.plot_path}")
        else:
            from .train.trainer import train
            result = train(cfg)
            if not is_main:
                return 0
            print(_summary_line(cfg.loss, result.summary))
            if "memory" in result.summary:
                print(result.summary["memory"])
            print(f"log:  {result.log_path}")
            if result.plot_path:
                print(f"plot: {result.plot_path}")
    except ValueError as exc:
        train_parser.error(_flag_message(str(exc)))
    except NonFiniteError as exc:   # not a usage error: no usage line, exit status 1
        if is_main:
            print(f"{train_parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _launch_torchrun(parser, cfg: TrainConfig, nproc: int, argv: List[str]) -> int:
    """``--nproc N``: the same command under ``torchrun --standalone --nproc-per-node N`` (each
    process sees ``WORLD_SIZE`` and trains its share; see gift_fast/train/distributed.py)."""
    import subprocess
    for name in ("prompts_per_step", "sft_batch"):
        if getattr(cfg, name) % nproc:
            parser.error(f"--{name.replace('_', '-')}: expected a multiple of --nproc ({nproc}), "
                         f"got {getattr(cfg, name)}")
    if cfg.resume:
        parser.error("--resume: resuming a multi-process run is not supported; resume with one process")
    # Without --nproc (torchrun would read it as an abbreviation of its own --nproc-per-node).
    rest, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "gift_fast.cli", *rest]
    return subprocess.call(command)


def _flag_message(message: str) -> str:
    """``"rl_steps: expected ..."`` (config.validate's form) -> ``"--rl-steps: expected ..."``."""
    field, sep, rest = message.partition(":")
    if sep and field.isidentifier() and field in TrainConfig.__dataclass_fields__:
        return f"--{field.replace('_', '-')}:{rest}"
    return message


def _summary_line(loss: str, s: dict) -> str:
    if "reward_first" not in s:
        return f"{loss}: no RL steps run"
    return (f"{loss}: mean reward first {s['window']} RL steps {s['reward_first']:.3f} -> last "
            f"{s['window']} {s['reward_last']:.3f}; held-out greedy accuracy "
            f"{s.get('heldout_accuracy_start', float('nan')):.3f} -> "
            f"{s.get('heldout_accuracy_end', float('nan')):.3f}; "
            + (f"held-out sampled reward {s['heldout_sampled_reward_start']:.3f} -> "
               f"{s['heldout_sampled_reward_end']:.3f}; " if "heldout_sampled_reward_start" in s
               else "")
            + f"wall time {s.get('wall_s_this_process', s['train_s']):.0f} s")


if __name__ == "__main__":
    sys.exit(main())
