"""The training loop: SFT warm start on gold answers, then on-policy RL with a fused loss.

Everything a step needs to be reproduced lives in the checkpoint (model, optimiser, step, all RNG
streams), so ``train(cfg.replace(resume=run_dir))`` continues the same run.
"""
from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from .checkpoint import load_checkpoint, restore_rng, save_checkpoint
from .config import TrainConfig, validate
from . import distributed as dp
from .evaluation import evaluate, summarise
from .metrics import MetricsLog, peak_memory_mib
from .model import build_model
from .objectives import SUPERVISED, metrics_to_floats
from .reuse import check_warm_start, resumed_config
from .rollout import Batch, generate, gold_batch, policy_logprobs, response_targets
from .run_dir import RunDir, checkpoint_path, new_run_path
from .task import PROMPT_LEN, AdditionTask
from .tokenizer import CharTokenizer


@dataclass
class TrainResult:
    out_dir: str
    log_path: str
    plot_path: Optional[str]
    records: List[Dict]
    summary: Dict = field(default_factory=dict)
    config: Optional[TrainConfig] = None   # the run's settings as resolved (out_dir, sft_steps)


class NonFiniteError(RuntimeError):
    """A training step produced a non-finite loss or gradient. Raised before the optimiser step,
    so the weights, the optimiser state and every checkpoint written so far are those of the
    last good step. ``phase`` is "sft" or "rl", ``step`` the step's index in metrics.jsonl."""

    def __init__(self, message: str, phase: str, step: int, checkpoint: Optional[str] = None):
        super().__init__(message)
        self.phase, self.step, self.checkpoint = phase, step, checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return device


# Every 10 steps, and every 2 once a probe has reached half the target: SFT accuracy can jump
# from 0.1 to 0.5 within 20 steps, and an overshooting warm start leaves RL little to learn.
SFT_PROBE_PROBLEMS, SFT_PROBE_EVERY, SFT_PROBE_EVERY_NEAR = 256, 10, 2


# torch.compile's default; the tests compile with "aot_eager" (dynamo and AOTAutograd decide the
# graphs and breaks as for inductor, without inductor's C++ code generation).
COMPILE_BACKEND = "inductor"


def compile_step(root: torch.nn.Module) -> torch.nn.Module:
    """``--compile``: the training step's forward (the model body and the fused loss head, and
    under DDP the DDP wrapper, whose graphs torch splits at its gradient buckets) compiled with
    torch.compile. Shapes change between SFT, RL and mini-batches of different sizes: dynamo marks
    a dimension dynamic the second time it changes, instead of compiling once per shape."""
    return torch.compile(root, backend=COMPILE_BACKEND)


def make_optimizer(model, lr: float, cfg: TrainConfig):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)


class Trainer:
    """One training run; ``parallel`` (train/distributed.py) makes it one rank of a data-parallel
    run: this rank's share of every batch, DDP, metrics reduced, files written by rank 0 only."""

    def __init__(self, cfg: TrainConfig, parallel: Optional[dp.DataParallel] = None):
        validate(cfg)
        self.parallel = parallel
        self.is_main = parallel is None or parallel.is_main
        self.sft_batch = dp.per_rank(cfg.sft_batch, "sft_batch", parallel)
        self.prompts_per_step = dp.per_rank(cfg.prompts_per_step, "prompts_per_step", parallel)
        if parallel is not None and cfg.resume is not None:
            raise ValueError("resume: resuming a multi-process run is not supported (the checkpoint "
                             "holds rank 0's random streams only); resume it with one process")
        self.resume_state = self.warm_state = None
        if cfg.resume is not None:
            self.resume_state = load_checkpoint(cfg.resume)
            cfg = resumed_config(cfg, self.resume_state)
        elif cfg.warm_start is not None:
            self.warm_state = load_checkpoint(cfg.warm_start, "warm_start")
            cfg = check_warm_start(cfg, self.warm_state)
        # The run's own copy (TrainConfig is frozen): out_dir and, when sft_until ends SFT early,
        # sft_steps are resolved into it, never into the caller's config.
        self.cfg = cfg
        self.device = dp.local_device(resolve_device(cfg.device), parallel)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.tok = CharTokenizer(cfg.vocab)
        self.task = AdditionTask(self.tok, seed=cfg.seed, n_heldout=cfg.n_heldout)
        self.model, self.compute_dtype = build_model(
            cfg.model, cfg.vocab, self.tok.pad_id, self.tok.bos_id, self.tok.eos_id, self.device)
        self.model.train()
        # Same initial weights everywhere; then each rank its own prompt and sampling streams.
        self.data_rng = dp.seed_rank_streams(cfg.seed, parallel)
        self.loss_root = dp.wrap(self.model, parallel, self.device)
        if cfg.compile:
            self.loss_root = compile_step(self.loss_root)
        self.ref_model = None
        self.step = 0
        self.saved_step: Optional[int] = None   # the step of the last checkpoint this run wrote
        self.last_eval: Optional[Dict] = None
        self.optimizer = make_optimizer(self.model, cfg.sft_lr if cfg.sft_steps else cfg.lr, cfg)
        self.cfg = cfg = cfg.replace(out_dir=dp.broadcast_object(
            cfg.out_dir or new_run_path(cfg.name, cfg.loss), parallel))
        self.run_dir = RunDir(cfg.out_dir)
        if self.resume_state is None and not cfg.overwrite:   # rank 0's verdict on every rank
            self.run_dir.refuse_replacing(dp.broadcast_object(
                self.run_dir.held_run_files() if self.is_main else None, parallel))
        if self.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
        if self.resume_state is not None:
            self._restore(self.resume_state)
        elif self.warm_state is not None:
            self._restore_warm_start(self.warm_state)
        self.log = MetricsLog(self.run_dir.metrics if self.is_main else None,
                              keep_before=self.step)
        self._write_config()
        if self.is_main:
            self.tok.save(self.run_dir.file(RunDir.TOKENIZER))

    def _write_config(self) -> None:
        if self.is_main:
            self.run_dir.write_json(RunDir.CONFIG, self.cfg.to_dict())

    def _sft_target_reached(self) -> bool:
        """``sft_until``: every SFT_PROBE_EVERY steps, greedy accuracy on a fixed sample of the
        training pool (never the held-out set). SFT's accuracy jumps after a plateau whose length
        depends on the seed and on the CPU's rounding; stopping at a target accuracy rather than
        a fixed step gives RL the same kind of warm start everywhere."""
        if self.cfg.sft_until is None:
            return False
        # The last probe comes from the log, so a resumed run probes where the straight one did.
        last = next((r["probe_accuracy"] for r in reversed(self.log.records)
                     if r.get("phase") == "sft_probe"), 0.0)
        every = SFT_PROBE_EVERY_NEAR if last >= self.cfg.sft_until / 2 else SFT_PROBE_EVERY
        if self.step % every:
            return False
        problems = self.task.sample(random.Random(self.cfg.seed + 4), SFT_PROBE_PROBLEMS)
        was_training = self.model.training
        probe = evaluate(self.model, self.task, self.device, self.cfg, self.compute_dtype,
                         problems=problems, prefix="probe", parallel=self.parallel)
        self.model.train(was_training)
        self.log.write({"step": self.step, "phase": "sft_probe", **probe})
        return probe["probe_accuracy"] >= self.cfg.sft_until

    # -- checkpoints -------------------------------------------------------------------------
    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.step = state["step"]
        if os.path.abspath(checkpoint_path(self.cfg.resume)) == os.path.abspath(self.saved_path):
            self.saved_step = self.step
        if self.step >= self.cfg.sft_steps:
            self._start_rl(log_eval=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("ref_model") is not None:
            self.ref_model.load_state_dict(state["ref_model"])
        restore_rng(state, self.data_rng)

    def _restore_warm_start(self, state: dict) -> None:
        """The model and RNG streams at the end of a finished SFT-only run of the same seed:
        the run continues as if it had done that SFT phase itself. Data-parallel: the weights
        only; every rank keeps its own fresh streams (the checkpoint holds one process's)."""
        self.model.load_state_dict(state["model"])
        self.step = self.cfg.sft_steps
        if self.parallel is None:
            restore_rng(state, self.data_rng)

    @property
    def saved_path(self) -> str:
        return self.run_dir.checkpoint

    def save(self) -> Optional[str]:
        # Every rank checks (the weights are the same on all), so all of them stop together.
        # The gradient check in _optimise makes this unreachable short of an overflowing update;
        # it is what guarantees that no checkpoint ever holds non-finite weights.
        bad = [name for name, p in self.model.named_parameters()
               if not bool(torch.isfinite(p).all())]
        if bad:
            phase = "sft" if self.step <= self.cfg.sft_steps else "rl"
            kept = ("no checkpoint was written yet" if self.saved_step is None else
                    f"{self.saved_path} still holds step {self.saved_step}")
            raise NonFiniteError(
                f"non-finite weights after step {self.step - 1} in {RunDir.METRICS} "
                f"({', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''}); the checkpoint "
                f"was not written, {kept}.", phase, self.step - 1,
                None if self.saved_step is None else self.saved_path)
        if not self.is_main:   # the weights are the same on every rank
            return None
        path = self.saved_path
        save_checkpoint(path, model=self.model, optimizer=self.optimizer, step=self.step,
                        config=self.cfg.to_dict(), data_rng=self.data_rng,
                        ref_model=self.ref_model)
        self.saved_step = self.step
        return path

    # -- phases ------------------------------------------------------------------------------
    def _start_rl(self, log_eval: bool = True) -> None:
        """Fresh optimiser state for RL (SFT's moments describe another objective); a frozen
        copy of the warm-started model when the anchor is the reference policy."""
        self.optimizer = make_optimizer(self.model, self.cfg.lr, self.cfg)
        if self.cfg.anchor == "ref":
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        if log_eval:
            self._eval()

    def _eval(self) -> Dict:
        rl_step = self.step - self.cfg.sft_steps
        record = {"step": self.step, "phase": "eval", "rl_step": rl_step,
                  **evaluate(self.model, self.task, self.device, self.cfg, self.compute_dtype,
                             parallel=self.parallel, samples=self.cfg.eval_samples)}
        self.log.write(record)
        self.last_eval = record
        return record

    def _optimise(self, batch: Batch, loss_name: str, passes: int = 1,
                  mini_batches: int = 1) -> Dict:
        """``passes`` passes over ``batch``, each split into ``mini_batches`` mini-batches of whole
        groups with one optimiser step each (verl's ppo_epochs x ppo_mini_batch_size). The anchor
        log-probs stay those of the rollout policy, so from the second step on the policy differs
        from the anchor and GIFT's implicit reward is no longer identically zero.
        Data-parallel: ``batch`` is this rank's share and ``loss`` its share of the whole-batch
        loss (train/distributed.py)."""
        losses, metrics, norms, clip = [], {}, [], self.cfg.grad_clip
        for pass_index in range(passes):
            parts = split_groups(batch, mini_batches)
            for part_index, part in enumerate(parts):
                self.optimizer.zero_grad(set_to_none=True)
                to_backward, loss, part_metrics = dp.data_parallel_loss(
                    self.loss_root, loss_name, part, self.cfg, self.compute_dtype, self.parallel)
                if to_backward is None:
                    continue
                to_backward.backward()
                # One host sync per update (the loss and the gradient norm are logged anyway):
                # a non-finite loss or gradient stops the run here, before the optimiser step,
                # so neither the weights nor any checkpoint ever see it. error_if_nonfinite
                # raises before the gradients are scaled, so they still show which one it was.
                try:
                    norm = float(torch.nn.utils.clip_grad_norm_(
                        self.model.parameters(), clip if clip > 0 else float("inf"),
                        error_if_nonfinite=True))
                except RuntimeError as exc:
                    if "non-finite" not in str(exc):
                        raise
                    norm = float("nan")
                loss_value = float(loss.detach())
                # Data-parallel: the gradients are the same on every rank after DDP's
                # all-reduce, the loss share is not; its sum over ranks is non-finite if any is.
                whole_loss = dp.all_reduce_sums([loss_value], self.parallel)[0]
                if not (math.isfinite(whole_loss) and math.isfinite(norm)):
                    where = ("" if passes * len(parts) == 1 else
                             f", update {pass_index * len(parts) + part_index + 1} of "
                             f"{passes * len(parts)}")
                    raise self._non_finite(whole_loss, norm, where)
                self.optimizer.step()
                metrics = metrics_to_floats(part_metrics) if part_metrics else metrics
                losses.append(loss_value)
                norms.append(norm)
        # grad_norm is the norm before clipping; grad_norm_clipped is the norm of the step taken.
        return {"loss": float(np.mean(losses)) if losses else None,
                "loss_first": losses[0] if losses else None,
                "grad_norm": float(np.mean(norms)) if norms else 0.0,
                "grad_norm_clipped": float(np.mean([min(n, clip) if clip > 0 else n
                                                    for n in norms])) if norms else 0.0,
                "updates": len(losses), "metrics": metrics}

    def _non_finite(self, loss: float, norm: float, where: str) -> NonFiniteError:
        """The error for a non-finite loss or gradient at the current step: what, where, and
        what was kept."""
        phase = "sft" if self.step < self.cfg.sft_steps else "rl"
        what = []
        if not math.isfinite(loss):
            what.append(f"loss = {loss}")
        bad = [name for name, p in self.model.named_parameters()
               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            n = sum(1 for _ in self.model.parameters())
            what.append(f"gradient non-finite in {'all ' if len(bad) == n else ''}{len(bad)} of "
                        f"{n} parameters ({shown})")
        elif not math.isfinite(norm):
            what.append(f"gradient norm = {norm} (every gradient finite: the norm overflowed)")
        step = (f"SFT step {self.step}" if phase == "sft" else
                f"RL step {self.step - self.cfg.sft_steps} of {self.cfg.loss} "
                f"(step {self.step} in {RunDir.METRICS})")
        if self.saved_step is None:
            kept = "no checkpoint was written yet"
        else:
            kept = (f"the last checkpoint, {self.saved_path} (step {self.saved_step}), holds the "
                    "last good weights")
        message = (f"non-finite values at {step}{where}: {'; '.join(what)}. Training stopped "
                   f"before the optimiser step; {kept}.")
        return NonFiniteError(message, phase, self.step,
                              self.saved_path if self.saved_step is not None else None)

    def _sft_step(self) -> Dict:
        problems = self.task.sample(self.data_rng, self.sft_batch)
        seqs = self.task.gold_sequences(problems).to(self.device)
        batch = gold_batch(seqs, PROMPT_LEN, self.tok.pad_id, self.tok.eos_id)
        out = self._optimise(batch, "sft")
        return {"phase": "sft", **out, "_tokens": seqs.numel()}

    def _rollout(self, problems) -> Batch:
        cfg, tok, G = self.cfg, self.tok, self.cfg.group_size
        prompts = self.task.prompt_ids(problems).to(self.device).repeat_interleave(G, 0)
        responses = generate(self.model, prompts, max_new_tokens=cfg.max_new_tokens,
                             pad_id=tok.pad_id, eos_id=tok.eos_id, temperature=cfg.temperature,
                             compute_dtype=self.compute_dtype)
        rewards, exact = self.task.score([p for p in problems for _ in range(G)], responses.cpu())
        batch = Batch(torch.cat([prompts, responses], 1), response_targets(responses, tok.eos_id),
                      PROMPT_LEN, rewards.to(self.device), None, G)
        # Anchor log-probs through the fused op under no_grad: the rollout policy (or reference).
        anchor = self.ref_model if self.ref_model is not None else self.model
        batch.anchor_logps = policy_logprobs(anchor, batch, cfg.temperature, self.compute_dtype)
        batch.exact = exact
        batch.no_eos = (responses != tok.eos_id).all(1).float().mean().item()
        return batch

    def _rl_step(self) -> Dict:
        """One RL step: a rollout of fresh prompts, then the policy update on it."""
        problems = self.task.sample(self.data_rng, self.prompts_per_step)
        batch = self._rollout(problems)
        return self._rl_update(problems, batch)

    def _rl_update(self, problems, batch: Batch) -> Dict:
        cfg = self.cfg
        if cfg.loss in SUPERVISED:
            train_batch = gold_batch(self.task.gold_sequences(problems).to(self.device),
                                     PROMPT_LEN, self.tok.pad_id, self.tok.eos_id)
        else:
            train_batch = batch
        out = self._optimise(train_batch, cfg.loss, cfg.updates_per_batch, cfg.mini_batches)
        return {"phase": "rl", "rl_step": self.step - cfg.sft_steps,
                "reward": batch.rewards.mean().item(), "accuracy": batch.exact.mean().item(),
                "no_eos_frac": batch.no_eos, "response_tokens": batch.n_tokens, **out,
                "_tokens": batch.sequences.numel() + train_batch.sequences.numel()}

    # -- the loop ----------------------------------------------------------------------------
    def _progress_bar(self, phase: str):
        """One bar per phase, each with its exact length: SFT's total is its limit (sft_until
        usually ends it earlier; the bar then closes where it stopped), RL's is rl_steps."""
        from tqdm.auto import tqdm
        cfg = self.cfg
        if phase == "sft":
            until = (f" until train acc >= {cfg.sft_until:g}, at most {cfg.sft_steps} steps"
                     if cfg.sft_until is not None else "")
            desc, total, done = f"SFT{until}", cfg.sft_steps, self.step
        else:
            desc, total, done = f"RL {cfg.loss}", cfg.rl_steps, self.step - cfg.sft_steps
        return tqdm(total=total, initial=done, desc=desc, dynamic_ncols=True,
                    disable=not (cfg.progress and self.is_main))

    def run(self) -> TrainResult:
        cfg = self.cfg
        start_time = time.perf_counter()
        bar, bar_phase = None, None
        try:
            if self.step == cfg.sft_steps and cfg.rl_steps and self.resume_state is None:
                self._start_rl()  # no warm start at all
            while self.step < cfg.sft_steps + cfg.rl_steps:
                phase = "sft" if self.step < cfg.sft_steps else "rl"
                if phase != bar_phase:
                    if bar is not None:
                        bar.close()
                    bar, bar_phase = self._progress_bar(phase), phase
                t0 = time.perf_counter()
                record = self._sft_step() if phase == "sft" else self._rl_step()
                seconds = time.perf_counter() - t0
                tokens = record.pop("_tokens")
                record = {"step": self.step, **record, "tokens_per_s": tokens / seconds,
                          "step_s": seconds, "peak_mem_mib": peak_memory_mib(self.device)}
                record = dp.reduce_record(record, self.parallel)
                self.log.write(record)
                self.step += 1
                bar.update(1)
                bar.set_postfix(_postfix(record, self.last_eval), refresh=False)
                if self.step < cfg.sft_steps and self._sft_target_reached():
                    # The warm start is good enough: RL starts now; sft_steps records where.
                    self.cfg = cfg = cfg.replace(sft_steps=self.step)
                    self._write_config()
                    bar.set_description(f"SFT reached train acc >= {cfg.sft_until:g} at step "
                                        f"{self.step}", refresh=False)
                if self.step == cfg.sft_steps:
                    self._start_rl()
                rl_step = self.step - cfg.sft_steps
                total = cfg.sft_steps + cfg.rl_steps
                if rl_step > 0 and (rl_step % cfg.eval_every == 0 or self.step == total):
                    self._eval()
                if self.step % cfg.save_every == 0 or self.step == total:
                    self.save()
        except NonFiniteError as exc:
            # The log ends with why the run stopped (a resume cuts it back to the checkpoint).
            self.log.write({"step": exc.step, "phase": "stopped", "error": str(exc)})
            raise
        finally:
            if bar is not None:
                bar.close()
        memory = None
        if self.is_main and (cfg.memory_report or
                             (cfg.memory_report is None and cfg.model == "qwen2")):
            memory = self._memory_report()
        result = TrainResult(cfg.out_dir, self.log.path, None, self.log.records,
                             summarise(self.log.records), config=cfg)
        if memory is not None:
            from .memory import format_report
            result.summary["memory"] = format_report(memory)
        # Wall time of this call (after --resume, only the resumed part).
        result.summary["wall_s_this_process"] = time.perf_counter() - start_time
        if self.parallel is not None:
            result.summary["processes"] = self.parallel.world
        dp.barrier(self.parallel)
        if not self.is_main:
            return result
        self.run_dir.write_json(RunDir.SUMMARY, result.summary)
        if cfg.plot:
            from .plotting import plot_runs
            result.plot_path = plot_runs({cfg.loss: self.log.records},
                                         self.run_dir.file(RunDir.CURVES))
        return result

    def _memory_report(self) -> Dict:
        """Peak memory and time of the loss path (fused) next to the naive path (materialised
        logits), on one real rollout batch of this run."""
        from .memory import compare_loss_memory
        problems = self.task.sample(random.Random(self.cfg.seed + 2), self.cfg.prompts_per_step)
        report = compare_loss_memory(self.cfg.loss, self.model, self._rollout(problems),
                                     self.cfg, self.compute_dtype)
        self.run_dir.write_json(RunDir.MEMORY, report)
        self.log.write({"step": self.step, "phase": "memory", **report})
        return report


def split_groups(batch: Batch, parts: int) -> List[Batch]:
    """``batch`` cut into ``parts`` contiguous mini-batches of whole groups (sizes differ by at
    most one group)."""
    if parts <= 1:
        return [batch]
    g = max(batch.group_size, 1)
    n_groups = batch.sequences.shape[0] // g
    bounds = np.linspace(0, n_groups, min(parts, n_groups) + 1).round().astype(int)
    return [batch.select(torch.arange(lo * g, hi * g, device=batch.sequences.device),
                         batch.group_size) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _postfix(record: Dict, last_eval: Optional[Dict]) -> Dict:
    out = {}
    if record.get("loss") is not None:
        out["loss"] = f"{record['loss']:.3f}"
    if "reward" in record:
        out["reward"] = f"{record['reward']:.3f}"
    if last_eval:
        out["heldout_acc"] = f"{last_eval['heldout_accuracy']:.3f}"
    return out


def train(cfg: TrainConfig) -> TrainResult:
    """Runs (or resumes) one training run; returns its records, summary and file paths. Under
    ``torchrun`` (``WORLD_SIZE`` > 1) this process is one rank of a data-parallel run."""
    parallel = dp.from_environment(resolve_device(cfg.device))
    try:
        return Trainer(cfg, parallel).run()
    finally:
        dp.shutdown(parallel)
