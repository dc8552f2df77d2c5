"""The training loop (gift_fast.train) and the ``gift-fast train`` CLI, on CPU with tiny shapes."""
import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from gift_fast.cli import main  # noqa: E402
from gift_fast.train.config import TrainConfig  # noqa: E402
from gift_fast.train.metrics import read_log  # noqa: E402
from gift_fast.train.objectives import LOSSES  # noqa: E402
from gift_fast.train.task import reward  # noqa: E402
from gift_fast.train.trainer import summarise, train  # noqa: E402

# Small enough for seconds per run; threads=1 keeps it deterministic and polite on shared cores.
TINY = dict(model="tiny", vocab=64, sft_steps=3, sft_batch=8, rl_steps=4, prompts_per_step=2,
            group_size=4, n_heldout=16, eval_every=2, progress=False, threads=1, device="cpu")


def test_reward_is_format_gated():
    assert reward("42", 12, 12, ended=True) == 1.0           # 24 written "42", LSD first
    assert reward("42", 12, 12, ended=False) == 0.0          # no EOS: not well formed
    assert reward("4+", 12, 12, ended=True) == 0.0           # not digits
    assert reward("", 12, 12, ended=True) == 0.0
    assert reward("4200", 12, 12, ended=True) == 0.0         # more than 3 digits
    assert reward("43", 12, 12, ended=True) == pytest.approx(0.1 + 0.9 * 0.5)
    assert reward("421", 12, 12, ended=True) == pytest.approx(0.1 + 0.9 * 2 / 3)
    assert reward("891", 99, 99, ended=True) == 1.0          # 198


def test_short_training_improves_reward(tmp_path):
    """A short fixed-seed run: a brief SFT warm start leaves the answer format half learned, and
    GIFT's on-policy updates must raise the sampled reward (seeds 0-2 all go from ~0.16-0.18 to
    ~0.29-0.32 over these 120 steps)."""
    cfg = TrainConfig(loss="gift", vocab=512, sft_steps=20, rl_steps=120, eval_every=60,
                      n_heldout=64, progress=False, threads=1, device="cpu", seed=0,
                      out_dir=str(tmp_path / "run"))
    result = train(cfg)
    s = summarise(result.records, window=30)
    assert s["rl_steps"] == 120
    assert s["reward_last"] > s["reward_first"] + 0.05, s


def test_log_plot_and_resume_round_trip(tmp_path):
    straight = train(TrainConfig(**TINY, out_dir=str(tmp_path / "a"), save_every=100))
    # JSONL: one record per step plus eval records, with the fields users look for.
    records = read_log(straight.log_path)
    rl = [r for r in records if r["phase"] == "rl"]
    assert [r["phase"] for r in records].count("sft") == 3 and len(rl) == 4
    for key in ("step", "reward", "accuracy", "loss", "metrics", "tokens_per_s", "peak_mem_mib"):
        assert all(key in r for r in rl), key
    assert any(r["phase"] == "eval" and "heldout_accuracy" in r for r in records)
    assert rl[0]["metrics"], "the loss's metrics dict is logged"
    with open(straight.plot_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(os.path.join(straight.out_dir, "checkpoint.pt"))

    # Stop after 2 RL steps, resume to 4: the same run as the uninterrupted one.
    half = TrainConfig(**{**TINY, "rl_steps": 2}, out_dir=str(tmp_path / "b"), save_every=100)
    train(half)
    resumed = train(TrainConfig(**TINY, resume=str(tmp_path / "b")))
    assert resumed.out_dir == str(tmp_path / "b")
    a = [(r["reward"], r["loss"]) for r in rl]
    b = [(r["reward"], r["loss"]) for r in read_log(resumed.log_path) if r["phase"] == "rl"]
    assert b == a


@pytest.mark.parametrize("loss", [l for l in LOSSES if l not in ("gift",)])
def test_every_loss_trains(loss, tmp_path):
    result = train(TrainConfig(**{**TINY, "sft_steps": 1, "rl_steps": 2, "plot": False},
                               loss=loss, out_dir=str(tmp_path / loss)))
    rl = [r for r in result.records if r["phase"] == "rl"]
    assert len(rl) == 2
    assert all(r["loss"] is None or r["loss"] == r["loss"] for r in rl)  # finite or skipped (DPO ties)


def test_updates_per_batch_and_ref_anchor(tmp_path):
    result = train(TrainConfig(**{**TINY, "plot": False}, updates_per_batch=2, anchor="ref",
                               out_dir=str(tmp_path / "r")))
    assert all(r["updates"] == 2 for r in result.records if r["phase"] == "rl")


def test_memory_report_in_the_same_run(tmp_path):
    result = train(TrainConfig(**{**TINY, "rl_steps": 1, "plot": False}, memory_report=True,
                               out_dir=str(tmp_path / "m")))
    with open(os.path.join(result.out_dir, "memory.json")) as f:
        report = json.load(f)
    assert report["fused_peak_mib"] > 0 and report["naive_peak_mib"] > 0
    assert "memory" in result.summary


def test_cli_runs_and_prints_paths(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--vocab", "64", "--sft-steps", "2", "--rl-steps", "2",
                 "--prompts-per-step", "2", "--group-size", "2", "--n-heldout", "8",
                 "--threads", "1", "--no-progress", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"log:  {out / 'metrics.jsonl'}" in printed
    assert f"plot: {out / 'curves.png'}" in printed


def test_cli_compare_plots_together(tmp_path, capsys):
    out = tmp_path / "cmp"
    main(["train", "--compare", "gift,grpo", "--vocab", "64", "--sft-steps", "1", "--rl-steps",
          "2", "--prompts-per-step", "2", "--group-size", "2", "--n-heldout", "8", "--threads",
          "1", "--no-progress", "--out-dir", str(out)])
    assert os.path.isfile(out / "compare.png")
    assert set(json.load(open(out / "compare.json"))) == {"gift", "grpo"}
    assert "plot: " in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--loss", "nope"], "--loss: expected one of"),
    (["--vocab", "8"], "--vocab: expected >= 16"),
    (["--group-size", "1"], "--group-size: loss 'gift' compares responses"),
    (["--lr", "fast"], "expected a number"),
    (["--temperature", "0"], "--temperature: expected > 0"),
    (["--compare", "gift"], "--compare: expected two or more"),
    (["--compare", "gift,bogus"], "--compare: expected two or more"),
    (["--resume", "/no/such/run"], "--resume: no checkpoint found"),
    (["--device", "tpu"], "--device: expected auto, cpu or cuda"),
    (["--model", "huge"], "invalid choice"),
])
def test_cli_bad_arguments_give_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
