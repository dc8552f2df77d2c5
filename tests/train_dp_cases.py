"""One rank of the data-parallel trainer check (spawned by tests/test_train_distributed.py).

Each rank trains its share of a scripted run (rank r gets its own prompts each step); rank 0 then
trains the same run in one process on the union of the ranks' prompts and compares. Rollouts are
scripted too: sampling is replaced by responses that depend only on (prompt, position in the
group, rollout index), so the two runs see the same responses while everything downstream (anchor
log-probs, rewards, loss, DDP, clipping, AdamW) is the real trainer's.
"""
import json
import traceback

import torch
import torch.distributed as dist

import gift_fast.train.trainer as trainer_module
from gift_fast.train.config import TrainConfig
from gift_fast.train.distributed import DataParallel
from gift_fast.train.tokenizer import CharTokenizer
from helpers import finish_rank, init_gloo

WORLD = 2
PER_RANK = 2            # prompts per rank and step; the single process gets WORLD * PER_RANK
SFT_STEPS, RL_STEPS = 2, 3
BASE = dict(model="tiny", vocab=64, seed=3, sft_steps=SFT_STEPS, sft_batch=WORLD * 3,
            sft_until=None, rl_steps=RL_STEPS, prompts_per_step=WORLD * PER_RANK, group_size=4,
            lr=1e-3, n_heldout=8, eval_every=100, save_every=100, progress=False, plot=False,
            threads=1, device="cpu", memory_report=False,
            eval_samples=0)   # sampled evaluation would draw from _Scripted.generate's stream
# (loss, mini-batches): GIFT through data_parallel_group; GRPO a token mean; DPO a mean over pairs
CASES = [("gift", 2), ("grpo", 1), ("dpo", 1)]
_real_generate = trainer_module.generate
_real_make_optimizer = trainer_module.make_optimizer


def _prompt_script(n_per_rank: int, steps: int, salt: int):
    """``script[step][rank]``: the problems rank ``rank`` trains on at ``step`` (all distinct)."""
    pairs = [((7 * i + salt) % 100, (13 * i + 3 * salt) % 100) for i in range(1000)]
    it = iter(pairs)
    return [[[next(it) for _ in range(n_per_rank)] for _ in range(WORLD)] for _ in range(steps)]


def _single_order(per_rank_lists, mini_batches: int):
    """The single process's prompts of one step: mini-batch k of the single process must hold
    mini-batch k of every rank (each rank splits its own share into ``mini_batches``)."""
    n = len(per_rank_lists[0])
    size = n // mini_batches
    return [p for k in range(mini_batches) for share in per_rank_lists
            for p in share[k * size:(k + 1) * size]]


class _Scripted:
    """Replaces ``task.sample`` (prompts from the script) and sampling in ``generate``."""

    def __init__(self, script, rank, mini_batches, group_size, vocab):
        self.script, self.rank, self.mb, self.G = script, rank, mini_batches, group_size
        self.step = 0
        self.rollouts = 0
        self.tok = CharTokenizer(vocab)

    def sample(self, rng, n):
        shares = self.script[self.step]
        mini_batches = 1 if self.step < SFT_STEPS else self.mb   # SFT: one update per step
        self.step += 1
        problems = shares[self.rank] if self.rank is not None else _single_order(shares,
                                                                                 mini_batches)
        assert len(problems) == n, (len(problems), n)
        return problems

    def generate(self, model, prompts, *, max_new_tokens, pad_id, eos_id, temperature=1.0,
                 sample=True, compute_dtype=torch.float32):
        if not sample:    # greedy evaluation: the real model
            return _real_generate(model, prompts, max_new_tokens=max_new_tokens, pad_id=pad_id,
                                  eos_id=eos_id, sample=False, compute_dtype=compute_dtype)
        self.rollouts += 1
        digits = [self.tok.encode(str(d))[0] for d in range(10)]
        rows = []
        for i, p in enumerate(prompts.tolist()):
            g = torch.Generator().manual_seed(hash((tuple(p), i % self.G, self.rollouts)) % 2**31)
            length = int(torch.randint(1, max_new_tokens + 1, (1,), generator=g))
            row = [digits[int(d)] for d in torch.randint(0, 10, (length,), generator=g)]
            if length < max_new_tokens:
                row[-1] = eos_id
            rows.append(row + [pad_id] * (max_new_tokens - len(row)))
        return torch.tensor(rows, dtype=torch.long)


def _train(cfg, script, rank, parallel, mini_batches):
    """Parameters after the run, the training records, how far the weights moved, and the
    gradient of every optimiser step (after DDP's all-reduce and clipping)."""
    scripted = _Scripted(script, rank, mini_batches, cfg.group_size, cfg.vocab)
    grads = []

    def make_optimizer(model, lr, cfg):
        opt = _real_make_optimizer(model, lr, cfg)
        opt.register_step_pre_hook(lambda *_: grads.append(torch.cat(
            [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).clone()))
        return opt

    trainer_module.generate = scripted.generate
    trainer_module.make_optimizer = make_optimizer
    try:
        t = trainer_module.Trainer(cfg, parallel)
        initial = [p.detach().clone() for p in t.model.parameters()]
        t.task.sample = scripted.sample
        result = t.run()
    finally:
        trainer_module.generate = _real_generate
        trainer_module.make_optimizer = _real_make_optimizer
    params = [p.detach().clone() for p in t.model.parameters()]
    moved = _flat(params) - _flat(initial)
    train_records = [r for r in result.records if r.get("phase") in ("sft", "rl")]
    return params, train_records, moved, grads


def _flat(params):
    return torch.cat([p.reshape(-1) for p in params])


def _max_diff(xs, ys):
    return max((a - b).abs().max().item() for a, b in zip(xs, ys))


def _gather_params(params):
    flat = torch.cat([p.reshape(-1) for p in params])
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat)
    return parts


def run(rank: int, world: int, init_method: str, out_path: str, tmp: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, world, 180, init_method=init_method)
    report, errors = {}, {}
    try:
        parallel = DataParallel(rank, world)
        for salt, (loss, mb) in enumerate(CASES):
            try:
                cfg = TrainConfig(**BASE, loss=loss, mini_batches=mb, out_dir=f"{tmp}/{loss}-dp")
                script = _prompt_script(3, SFT_STEPS, salt) + _prompt_script(PER_RANK, RL_STEPS,
                                                                              salt + 50)
                params, records, moved, grads = _train(cfg, script, rank, parallel, mb)
                parts = _gather_params(params)
                if rank == 0:
                    single_cfg = cfg.replace(out_dir=f"{tmp}/{loss}-single")
                    ref, ref_records, ref_moved, ref_grads = _train(single_cfg, script, None, None,
                                                                    mb)
                    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)
                    report[loss] = {
                        # per optimiser step: max |g - g_single| / max |g_single|
                        "grad_rel": max(((g - h).abs().max() / h.abs().max()).item()
                                        for g, h in zip(grads, ref_grads)),
                        "grad_steps": [len(grads), len(ref_grads)],
                        "params_max_abs": _max_diff(params, ref),
                        # ||theta - theta_single|| / ||theta_single - theta_0||
                        "params_rel": ((moved - ref_moved).norm() / ref_moved.norm()).item(),
                        "ranks_equal": _max_diff([parts[0]], [parts[1]]),
                        "moved": moved.abs().max().item(),
                        "loss": max(rel(a["loss"], b["loss"]) for a, b in
                                    zip(records, ref_records) if b["loss"] is not None),
                        "grad_norm": max(rel(a["grad_norm"], b["grad_norm"]) for a, b in
                                         zip(records, ref_records)),
                        "steps": [len(records), len(ref_records)],
                        "updates": [sum(r["updates"] for r in records),
                                    sum(r["updates"] for r in ref_records)],
                        "log_lines": sum(1 for _ in open(f"{tmp}/{loss}-dp/metrics.jsonl")),
                    }
                dist.barrier()
            except Exception:
                errors[loss] = traceback.format_exc()
                break
        with open(f"{out_path}.rank{rank}", "w") as f:
            json.dump({"report": report, "errors": errors}, f, indent=1)
    except BaseException:       # the traceback goes to the parent; the group goes first
        dist.destroy_process_group()
        raise
    finish_rank()


NAN_STEP = SFT_STEPS + 1   # the second RL step


def run_non_finite(rank: int, world: int, init_method: str, out_path: str, tmp: str) -> None:
    """Rank 1's loss (not its gradient) is NaN at step NAN_STEP: every rank must stop there with
    a NonFiniteError (one rank stopping alone would leave the other waiting in a collective)."""
    from gift_fast.train import distributed
    torch.set_num_threads(1)
    init_gloo(rank, world, 180, init_method=init_method)
    real_loss, real_optimise = distributed.data_parallel_loss, trainer_module.Trainer._optimise

    def nan_share(*args, **kwargs):
        to_backward, share, metrics = real_loss(*args, **kwargs)
        return to_backward, share * float("nan"), metrics

    def optimise(self, *args, **kwargs):
        poison = self.step == NAN_STEP and rank == 1
        distributed.data_parallel_loss = nan_share if poison else real_loss
        try:
            return real_optimise(self, *args, **kwargs)
        finally:
            distributed.data_parallel_loss = real_loss

    outcome = {}
    trainer_module.Trainer._optimise = optimise
    try:
        cfg = TrainConfig(**{**BASE, "save_every": 1}, loss="gift", out_dir=f"{tmp}/nan-dp")
        trainer_module.Trainer(cfg, DataParallel(rank, world)).run()
        outcome["error"] = None
    except trainer_module.NonFiniteError as exc:
        outcome.update(error=str(exc), step=exc.step, phase=exc.phase)
    except Exception:
        outcome["error"] = "not a NonFiniteError: " + traceback.format_exc()
    finally:
        trainer_module.Trainer._optimise = real_optimise
        with open(f"{out_path}.rank{rank}", "w") as f:
            json.dump(outcome, f)
    finish_rank()
