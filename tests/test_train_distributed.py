"""``gift-fast train`` data-parallel (train/distributed.py) on CPU with gloo and 2 processes.

- equal learning: a 2-rank run (each rank its own prompts, whole GIFT groups) against one process
  trained on the union of the ranks' prompts (tests/train_dp_cases.py);
- end to end: ``torchrun --nproc-per-node 2 -m gift_fast.cli train`` exits 0 and writes one log
  (``--nproc 2`` builds that command: checked without running it);
- the pieces that need no process group: per-rank streams, batch shares, item counts, records.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

import train_dp_cases  # noqa: E402
from helpers import rendezvous, spawn_and_wait  # noqa: E402
from gift_fast.train import distributed as dp  # noqa: E402
from gift_fast.train.metrics import read_log  # noqa: E402
from gift_fast.train.rollout import Batch  # noqa: E402

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
SPAWN_TIMEOUT_S = 600   # a hang guard on a loaded machine, not a speed check
# float32. Per optimiser step, relative to the single-process value: loss, gradient norm and
# every gradient entry (max |g - g_single| / max |g_single|). Parameters after the run: the norm
# of the difference over the norm of the distance travelled; AdamW divides by sqrt(v), so in
# entries whose gradient is ~0 it turns rounding noise into steps of up to lr, which is why a
# max-abs comparison of parameters says little here.
TOL, GRAD_TOL, PARAM_TOL = 2e-5, 1e-4, 1e-3


def _two_ranks(case, tmp_path, what: str):
    """Runs ``case`` on 2 spawned ranks; returns the JSON each rank wrote."""
    out = str(tmp_path / "report")
    spawn_and_wait(case, (2, rendezvous(tmp_path), out, str(tmp_path)), 2, SPAWN_TIMEOUT_S, what)
    return [json.load(open(f"{out}.rank{r}")) for r in range(2)]


@needs_gloo
def test_two_ranks_learn_like_one_process_on_the_union_of_their_prompts(tmp_path):
    reports = _two_ranks(train_dp_cases.run, tmp_path, "train data-parallel")
    errors = {f"{k} (rank {r})": v for r, rep in enumerate(reports) for k, v in rep["errors"].items()}
    assert not errors, "\n".join(f"{k}:\n{v}" for k, v in errors.items())
    report = reports[0]["report"]
    print("\n" + json.dumps(report, indent=1))
    assert sorted(report) == sorted(loss for loss, _ in train_dp_cases.CASES)
    steps = train_dp_cases.SFT_STEPS + train_dp_cases.RL_STEPS
    for loss, r in report.items():
        assert r["steps"] == [steps, steps], loss
        assert r["updates"][0] == r["updates"][1] > 0, loss
        assert r["moved"] > 1e-3, loss                # the run did learn something
        assert r["ranks_equal"] == 0.0, loss          # DDP keeps the replicas identical
        assert r["grad_steps"][0] == r["grad_steps"][1] == r["updates"][0], loss
        assert r["grad_rel"] < GRAD_TOL, (loss, r)
        assert r["loss"] < TOL, (loss, r)
        assert r["grad_norm"] < TOL, (loss, r)
        assert r["params_rel"] < PARAM_TOL, (loss, r)
        assert r["log_lines"] >= steps, loss           # rank 0's log, every step once


@needs_gloo
def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    outcomes = _two_ranks(train_dp_cases.run_non_finite, tmp_path,
                          "train data-parallel, NaN on rank 1")
    step = train_dp_cases.NAN_STEP
    for rank, o in enumerate(outcomes):
        assert o["error"] and o["error"].startswith(
            f"non-finite values at RL step 1 of gift (step {step} in metrics.jsonl)"), (rank, o)
        assert o["step"] == step and o["phase"] == "rl" and "loss = nan" in o["error"], (rank, o)
    checkpoint = torch.load(tmp_path / "nan-dp" / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == step
    assert all(torch.isfinite(w).all() for w in checkpoint["model"].values())


@needs_gloo
def test_torchrun_cli_end_to_end(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "gift_fast.cli", "train", "--vocab", "64", "--sft-steps", "2", "--sft-batch", "4",
           "--rl-steps", "2", "--prompts-per-step", "4", "--group-size", "2", "--mini-batches", "2",
           "--n-heldout", "8", "--threads", "1", "--no-progress", "--no-plot", "--out-dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("log:  ") == 1, proc.stdout    # rank 0 prints, once
    records = read_log(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records if r["phase"] in ("sft", "rl")] == [0, 1, 2, 3]
    assert all(r["response_tokens"] > 0 for r in records if r["phase"] == "rl")
    assert json.load(open(out / "summary.json"))["processes"] == 2
    assert os.path.exists(out / "checkpoint.pt")


def test_cli_nproc_launches_torchrun(monkeypatch):
    from gift_fast import cli
    calls = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert cli.main(["train", "--nproc", "2", "--prompts-per-step", "4", "--nproc=2",
                     "--no-progress"]) == 0
    assert calls == [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc-per-node=2", "-m", "gift_fast.cli", "train", "--prompts-per-step",
                      "4", "--no-progress"]]


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "3", "--prompts-per-step", "8"],
     "--prompts-per-step: expected a multiple of --nproc (3), got 8"),
    (["--nproc", "2", "--sft-batch", "7"], "--sft-batch: expected a multiple of --nproc (2), got 7"),
    (["--nproc", "2", "--compare", "gift,grpo"], "--compare and --seeds run in one process"),
    (["--nproc", "0"], "--nproc: expected >= 1, got 0"),
])
def test_cli_nproc_bad_arguments(argv, message, capsys, monkeypatch):
    from gift_fast.cli import main
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda cmd: pytest.fail(f"launched {cmd}"))
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv, "--no-progress"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_each_rank_has_its_own_streams():
    rank0 = dp.seed_rank_streams(5, dp.DataParallel(0, 2))
    assert rank0.random() == __import__("random").Random(6).random()  # rank 0 = one process
    draws = [dp.seed_rank_streams(5, dp.DataParallel(r, 4)).random() for r in range(4)]
    assert len(set(draws)) == 4
    assert dp.stream_seed(5, 1, "prompts") != dp.stream_seed(6, 1, "prompts")
    assert dp.stream_seed(5, 1, "prompts") != dp.stream_seed(5, 1, "torch")


def test_batch_shares_and_item_counts():
    assert dp.per_rank(8, "prompts_per_step", None) == 8
    assert dp.per_rank(8, "prompts_per_step", dp.DataParallel(1, 4)) == 2
    with pytest.raises(ValueError, match="prompts_per_step: expected a multiple of the number of "
                                         "processes \\(3\\), got 8"):
        dp.per_rank(8, "prompts_per_step", dp.DataParallel(0, 3))
    targets = torch.tensor([[1, 2, -100], [3, -100, -100], [4, 5, 6], [7, -100, -100]])
    batch = Batch(torch.zeros(4, 5, dtype=torch.long), targets, 2,
                  rewards=torch.tensor([0.0, 1.0, 0.5, 0.5]), group_size=2)
    assert dp.item_count("grpo", batch) == 7          # active tokens
    assert dp.item_count("sft", batch) == 7
    assert dp.item_count("una", batch) == 4           # sequences
    assert dp.item_count("rpo", batch) == 2           # groups
    assert dp.item_count("dpo", batch) == 1           # pairs: the second group is a tie
    with pytest.raises(ValueError, match="loss: no data-parallel normalisation"):
        dp.item_count("nope", batch)


def test_records_combine_across_ranks():
    a = {"step": 3, "phase": "rl", "loss": 0.25, "reward": 0.5, "step_s": 1.0, "updates": 2,
         "response_tokens": 10, "metrics": {"nll": 1.0}}
    b = {"step": 3, "phase": "rl", "loss": 0.5, "reward": 0.7, "step_s": 2.0, "updates": 2,
         "response_tokens": 12, "metrics": {}}
    out = dp._combine([a, b])
    assert out["loss"] == 0.75 and out["response_tokens"] == 22      # shares add up
    assert out["reward"] == pytest.approx(0.6) and out["step_s"] == 2.0
    assert out["step"] == 3 and out["phase"] == "rl" and out["metrics"] == {"nll": 1.0}
