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
from gift_fast.train.trainer import train  # noqa: E402

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


# The CI learning test: the default recipe (SFT until 0.5 training accuracy, then GIFT with the
# default RL settings), stopped after its first CI_RL_STEPS RL steps, on seeds 0 and 1. Held-out
# greedy accuracy and held-out sampled reward must rise from the start of RL to the best of the
# evaluations at steps 50, 75 and 100 by the margins below. They are set from the runs of the
# default recipe in docs/training.md ("Acceptance check", "CI learning test"): the same
# statistic at step 100 was at least +0.047 (accuracy) and +0.059 (sampled reward) in every run
# that reached RL from a warm start at the target, the smallest on the AVX2-emulated path of
# seed 0; the margins are about 60 % and 50 % of those, so another CPU's rounding changes the
# path, not the verdict. Never an exact value.
CI_RL_STEPS = 100
ACC_MARGIN, SAMPLED_REWARD_MARGIN = 0.03, 0.03


@pytest.mark.parametrize("seed", [0, 1])
def test_default_recipe_learns(seed, tmp_path):
    from gift_fast.train.study import run_summary
    cfg = TrainConfig(seed=seed, rl_steps=CI_RL_STEPS, progress=False, plot=False, device="cpu",
                      out_dir=str(tmp_path / "run"))
    s = run_summary(train(cfg).records, window=cfg.eval_every)
    assert s["eval_steps"] == [0, 25, 50, 75, 100], s
    assert s["accuracy_gain"] >= ACC_MARGIN, s
    assert s["sampled_reward_gain"] >= SAMPLED_REWARD_MARGIN, s


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


def test_curves_show_both_acceptance_metrics_smoothed_losses_and_the_phase_boundary(
        tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from gift_fast.train.plotting import plot_runs
    # A run whose SFT stopped early at step 30 (sft_until), then 40 RL steps.
    records = ([{"step": s, "phase": "sft", "loss": 3.0 / (1 + s) + 0.1 * (s % 2)}
                for s in range(30)]
               + [{"step": s, "phase": "sft_probe", "probe_accuracy": s / 60} for s in (10, 20, 30)]
               + [{"step": 30 + k, "phase": "rl", "rl_step": k, "reward": 0.5 + 0.1 * (k % 3),
                   "loss": 1.0 - 0.2 * (k % 2)} for k in range(40)]
               + [{"step": 30 + k, "phase": "eval", "rl_step": k, "heldout_accuracy": 0.4 + k / 100,
                   "heldout_reward": 0.5, "heldout_sampled_reward": 0.45 + k / 200}
                  for k in (0, 20, 40)])
    figures = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda fig, *a, **kw: figures.append(fig) or real_savefig(fig, *a, **kw))
    path = plot_runs({"gift": records}, str(tmp_path / "curves.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    axes = figures[0].axes
    assert all(ax.get_ylabel() for ax in axes)            # every panel (and the twin axis)
    lines = {line.get_label(): line for ax in axes for line in ax.get_lines()}
    evals = [r for r in records if r["phase"] == "eval"]
    assert list(lines["held-out problems, sampled (evaluations)"].get_ydata()) == \
        [r["heldout_sampled_reward"] for r in evals]
    assert list(lines["held-out, greedy"].get_ydata()) == [r["heldout_accuracy"] for r in evals]
    assert lines["RL starts at step 30 (probe accuracy 0.50)"].get_xdata()[0] == 30
    # Losses: the running mean drawn over the raw values (which stay, faint, behind it).
    smoothed = lines["gift loss (10-step mean)"].get_ydata()
    raw = [r["loss"] for r in records if r["phase"] == "rl"]
    assert any(list(line.get_ydata()) == raw for line in lines.values())
    assert max(smoothed[10:]) - min(smoothed[10:]) < 0.05 < max(raw) - min(raw)


@pytest.mark.parametrize("loss", [l for l in LOSSES if l not in ("gift",)])
def test_every_loss_trains(loss, tmp_path):
    result = train(TrainConfig(**{**TINY, "sft_steps": 1, "rl_steps": 2, "plot": False},
                               loss=loss, out_dir=str(tmp_path / loss)))
    rl = [r for r in result.records if r["phase"] == "rl"]
    assert len(rl) == 2
    assert all(r["loss"] is None or r["loss"] == r["loss"] for r in rl)  # finite or skipped (DPO ties)


def test_updates_per_batch_mini_batches_and_ref_anchor(tmp_path):
    result = train(TrainConfig(**{**TINY, "plot": False}, updates_per_batch=2, mini_batches=2,
                               anchor="ref", out_dir=str(tmp_path / "r")))
    rl = [r for r in result.records if r["phase"] == "rl"]
    assert all(r["updates"] == 4 for r in rl)       # 2 passes x 2 mini-batches
    # From the second mini-batch on the policy differs from the anchor: GIFT's implicit reward
    # is no longer identically zero (with one full-batch update it always is).
    assert any(r["metrics"]["implicit_std"] > 0 for r in rl)
    assert all(r["grad_norm_clipped"] <= 1.0 + 1e-6 for r in rl)


def test_split_groups_keeps_groups_whole():
    import torch
    from gift_fast.train.rollout import Batch
    from gift_fast.train.trainer import split_groups
    B, G = 5 * 3, 3
    batch = Batch(torch.arange(B)[:, None].repeat(1, 4), torch.zeros(B, 2, dtype=torch.long), 2,
                  torch.arange(B, dtype=torch.float), torch.zeros(B, 2), G)
    parts = split_groups(batch, 2)
    assert [p.sequences.shape[0] for p in parts] in ([6, 9], [9, 6])
    assert torch.equal(torch.cat([p.rewards for p in parts]), batch.rewards)
    assert all(p.group_size == G for p in parts)
    assert len(split_groups(batch, 99)) == 5          # at most one mini-batch per group


def test_warm_start_reproduces_the_straight_run(tmp_path):
    straight = train(TrainConfig(**{**TINY, "plot": False}, out_dir=str(tmp_path / "a")))
    train(TrainConfig(**{**TINY, "rl_steps": 0, "plot": False}, out_dir=str(tmp_path / "w")))
    warm = train(TrainConfig(**{**TINY, "plot": False}, warm_start=str(tmp_path / "w"),
                             out_dir=str(tmp_path / "b")))
    key = lambda recs: [(r["reward"], r["loss"]) for r in recs if r["phase"] == "rl"]
    assert key(warm.records) == key(straight.records) and key(warm.records)
    assert not [r for r in warm.records if r["phase"] == "sft"]
    with pytest.raises(ValueError, match="warm_start: .* other settings: seed=1"):
        train(TrainConfig(**TINY, seed=1, warm_start=str(tmp_path / "w"),
                          out_dir=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="warm_start: .* not at the end of its SFT phase"):
        train(TrainConfig(**TINY, warm_start=str(tmp_path / "a"), out_dir=str(tmp_path / "d")))


def test_sft_until_ends_the_warm_start_at_the_target(tmp_path, monkeypatch):
    from gift_fast.train import trainer as trainer_mod
    monkeypatch.setattr(trainer_mod, "SFT_PROBE_EVERY", 2)
    real = trainer_mod.evaluate

    def fake(*args, prefix="heldout", **kw):   # the probe "reaches" the target at step 4
        out = real(*args, prefix=prefix, **kw)
        if prefix == "probe":
            out["probe_accuracy"] = 1.0 if fake.calls else 0.0
            fake.calls += 1
        return out
    fake.calls = 0
    monkeypatch.setattr(trainer_mod, "evaluate", fake)
    bars = []
    real_bar = trainer_mod.Trainer._progress_bar
    monkeypatch.setattr(trainer_mod.Trainer, "_progress_bar",
                        lambda self, phase: bars.append(real_bar(self, phase)) or bars[-1])
    cfg = TrainConfig(**{**TINY, "sft_steps": 50, "plot": False, "progress": True},
                      sft_until=0.5, out_dir=str(tmp_path / "u"))
    result = train(cfg)
    phases = [r["phase"] for r in result.records]
    assert phases.count("sft") == 4 and phases.count("sft_probe") == 2 and phases.count("rl") == 4
    with open(tmp_path / "u" / "config.json") as f:
        assert json.load(f)["sft_steps"] == 4   # where RL started, for resume and warm starts
    assert result.config.sft_steps == 4 and cfg.sft_steps == 50   # the caller's config unchanged
    # One bar per phase: SFT's counts to its limit and closes where SFT stopped; RL's is exact.
    assert [(b.total, b.n) for b in bars] == [(50, 4), (4, 4)]
    assert bars[0].desc.startswith("SFT reached train acc >= 0.5 at step 4")
    assert bars[1].desc == "RL gift"



def _at_step(monkeypatch, step, poison):
    """Runs ``poison(trainer)`` (a context manager) around the optimisation of step ``step``."""
    from gift_fast.train.trainer import Trainer
    real = Trainer._optimise

    def optimise(self, *args, **kwargs):
        if self.step != step:
            return real(self, *args, **kwargs)
        with poison(self):
            return real(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, "_optimise", optimise)


def _nan_loss(monkeypatch, seen):
    """Poison: the loss (and so every gradient) of the step is NaN; records the bytes of the
    checkpoint on disk just before, i.e. the last good one."""
    import contextlib
    from gift_fast.train import distributed

    @contextlib.contextmanager
    def poison(trainer):
        path = os.path.join(trainer.cfg.out_dir, "checkpoint.pt")
        seen["checkpoint"] = open(path, "rb").read() if os.path.exists(path) else None
        real = distributed.data_parallel_loss

        def nan_loss(*args, **kwargs):
            to_backward, loss, metrics = real(*args, **kwargs)
            return to_backward * float("nan"), loss * float("nan"), metrics
        monkeypatch.setattr(distributed, "data_parallel_loss", nan_loss)
        try:
            yield
        finally:
            monkeypatch.setattr(distributed, "data_parallel_loss", real)
    return poison


# TINY has 3 SFT steps and 4 RL steps (2 mini-batches each); save_every=2 writes checkpoints
# after steps 1, 3 and 5 (at step counts 2, 4, 6): the poisoned step comes right after one.
@pytest.mark.parametrize("bad_step, saved_step, phase, where", [
    (2, 2, "sft", "SFT step 2:"), (5, 4, "rl", "RL step 2 of gift (step 5 in metrics.jsonl)")])
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
        bad_step, saved_step, phase, where, tmp_path, monkeypatch):
    import torch
    from gift_fast.train import NonFiniteError
    seen = {}
    _at_step(monkeypatch, bad_step, _nan_loss(monkeypatch, seen))
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteError) as exc:
        train(TrainConfig(**{**TINY, "plot": False}, save_every=2, out_dir=str(run)))
    message = str(exc.value)
    assert message.startswith(f"non-finite values at {where}") and ": loss = nan;" in message, \
        message
    assert "gradient non-finite in all " in message
    assert f"(step {saved_step}), holds the last good weights" in message, message
    assert exc.value.step == bad_step and exc.value.phase == phase
    # The checkpoint is byte for byte the one written before the poisoned step (without the
    # check, the NaN step would be taken and the next save, at step count 4 or 6, poisoned).
    assert seen["checkpoint"] is not None
    assert (run / "checkpoint.pt").read_bytes() == seen["checkpoint"]
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == saved_step
    assert all(torch.isfinite(w).all() for w in state["model"].values())
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]
    records = read_log(run / "metrics.jsonl")
    assert records[-1]["phase"] == "stopped" and records[-1]["error"] == message
    assert [r["step"] for r in records if r["phase"] in ("sft", "rl")] == list(range(bad_step))


def test_non_finite_gradient_is_named(tmp_path, monkeypatch):
    """A finite loss with one parameter's gradient NaN: the error names that parameter."""
    import contextlib
    from gift_fast.train import NonFiniteError
    name = "model.layers.1.mlp.down_proj.weight"

    @contextlib.contextmanager
    def poison(trainer):
        handle = dict(trainer.model.named_parameters())[name].register_hook(
            lambda g: g * float("nan"))
        try:
            yield
        finally:
            handle.remove()
    _at_step(monkeypatch, 1, poison)
    with pytest.raises(NonFiniteError) as exc:
        train(TrainConfig(**{**TINY, "plot": False}, out_dir=str(tmp_path / "g")))
    message = str(exc.value)
    assert message.startswith(f"non-finite values at SFT step 1: gradient non-finite in 1 of "), \
        message
    assert f"parameters ({name})." in message and "no checkpoint was written yet" in message
    assert "loss =" not in message
    assert not (tmp_path / "g" / "checkpoint.pt").exists()


def test_checkpoints_refuse_non_finite_weights_and_are_written_atomically(tmp_path, monkeypatch):
    import torch
    from gift_fast.train import NonFiniteError, checkpoint
    from gift_fast.train.trainer import Trainer
    trainer = Trainer(TrainConfig(**{**TINY, "plot": False}, out_dir=str(tmp_path / "c")))
    path = trainer.save()
    good = open(path, "rb").read()
    # A crash mid-write (here: after half the bytes) leaves the previous checkpoint intact.
    real_save = torch.save

    def crash(state, f):
        real_save(state, f)
        f.truncate(f.tell() // 2)
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert open(path, "rb").read() == good
    assert os.listdir(tmp_path / "c").count("checkpoint.pt") == 1
    assert not [f for f in os.listdir(tmp_path / "c") if f.endswith(".tmp")]
    # Non-finite weights are never written.
    with torch.no_grad():
        trainer.model.model.norm.weight[3] = float("inf")
    with pytest.raises(NonFiniteError, match="non-finite weights .*model.norm.weight"):
        trainer.save()
    assert open(path, "rb").read() == good


def test_cli_reports_a_non_finite_loss_in_one_line(tmp_path, monkeypatch, capsys):
    _at_step(monkeypatch, 2, _nan_loss(monkeypatch, {}))
    code = main(["train", "--vocab", "64", "--sft-steps", "1", "--rl-steps", "2",
                 "--prompts-per-step", "2", "--group-size", "2", "--n-heldout", "4",
                 "--threads", "1", "--no-progress", "--no-plot", "--save-every", "1",
                 "--out-dir", str(tmp_path / "cli")])
    assert code == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err and len(err) == 1, captured.err
    assert err[0].startswith("gift-fast train: error: non-finite values at RL step 1 of gift "
                             "(step 2 in metrics.jsonl), update 1 of 2: loss = nan;"), err
    assert "log:" not in captured.out


def test_train_twice_with_one_config_makes_two_runs(tmp_path, monkeypatch):
    """The trainer resolves its output directory and SFT length into its own copy of the config
    (TrainConfig is frozen): a second run from the same object is a new run in a new directory."""
    import copy
    import dataclasses
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(**{**TINY, "plot": False}, name="twice")
    before = copy.deepcopy(cfg)
    first = train(cfg)
    files = {f: (tmp_path / first.out_dir / f).read_bytes()
             for f in ("metrics.jsonl", "checkpoint.pt", "config.json")}
    second = train(cfg)
    assert cfg == before and cfg.out_dir is None
    assert first.out_dir == os.path.join("runs", "twice") == first.config.out_dir
    assert second.out_dir == os.path.join("runs", "twice-2") == second.config.out_dir
    assert all((tmp_path / first.out_dir / f).read_bytes() == b for f, b in files.items())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.out_dir = "elsewhere"


def test_memory_report_in_the_same_run(tmp_path):
    result = train(TrainConfig(**{**TINY, "rl_steps": 1, "plot": False}, memory_report=True,
                               out_dir=str(tmp_path / "m")))
    with open(os.path.join(result.out_dir, "memory.json")) as f:
        report = json.load(f)
    assert report["fused_peak_mib"] > 0 and report["naive_peak_mib"] > 0
    assert "memory" in result.summary


def test_cli_no_plot_prints_no_plot_path(tmp_path, capsys):
    assert main(["train", "--vocab", "64", "--sft-steps", "1", "--rl-steps", "1",
                 "--prompts-per-step", "2", "--group-size", "2", "--n-heldout", "4",
                 "--threads", "1", "--no-progress", "--no-plot",
                 "--out-dir", str(tmp_path / "np")]) == 0
    printed = capsys.readouterr().out
    assert not [l for l in printed.splitlines() if l.startswith("plot")], printed
    assert "None" not in printed


def test_resume_refuses_changes_and_bad_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig(**{**TINY, "plot": False}, out_dir=str(run)))   # 4 RL steps done
    cases = [
        (["--resume", str(run), "--loss", "grpo", "--lr", "0.5"],
         ["--resume: a resumed run keeps its settings", "loss='grpo'", "lr=0.5"]),
        (["--resume", str(run), "--rl-steps", "2"],
         ["--rl-steps: the run being resumed has done 4 RL steps already; expected >= 4"]),
    ]
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("12\nhello\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    import torch
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    for path in (not_ckpt, empty, other):
        cases.append((["--resume", str(path)], [f"--resume: '{path}' is not a gift-fast checkpoint"]))
    for argv, messages in cases:
        with pytest.raises(SystemExit) as exc:
            main(["train", "--threads", "1", "--no-progress", *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]           # usage lines, then one error line
        assert "Traceback" not in err and last.startswith("gift-fast train: error: "), err
        for m in messages:
            assert m in last, (m, err)
    with open(run / "config.json") as f:
        assert json.load(f)["rl_steps"] == 4       # the refused resumes changed nothing


def test_study_dirs_are_timestamped_and_never_reused(tmp_path, monkeypatch):
    from gift_fast.train.study import study_dir
    monkeypatch.chdir(tmp_path)
    first = study_dir(TrainConfig(), ["gift", "grpo"])
    os.makedirs(first)
    second = study_dir(TrainConfig(), ["gift", "grpo"])
    assert first.startswith(os.path.join("runs", "compare-gift-grpo-")) and second != first
    assert study_dir(TrainConfig(out_dir="x"), ["gift", "grpo"]) == "x"


def test_help_shows_defaults_without_markup(capsys):
    for argv in (["--help"], ["train", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "``" not in out and "`" not in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"(default: {TrainConfig().rl_steps})" in out and f"(default: {TrainConfig().lr})" in out


def test_gift_loss_rejects_non_positive_beta():
    import torch
    import gift_fast
    from gift_fast import functional as Fn
    h, w = torch.randn(4, 3, 8), torch.randn(16, 8)
    t = torch.randint(0, 16, (4, 3))
    anchor, r = torch.zeros(4, 3), torch.rand(4)
    for beta in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="beta: expected a finite number in \\(0.0, inf\\]"):
            gift_fast.gift_loss(h, w, t, anchor, r, group_size=2, beta=beta)
        with pytest.raises(ValueError, match="beta"):
            Fn.gift_loss(torch.zeros(4, 3), anchor, r, group_size=2, beta=beta)


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
    (["--beta", "0"], "--beta: expected > 0"),
    (["--beta", "-1"], "--beta: expected > 0"),
    (["--beta", "nan"], "--beta: expected a finite number"),
    (["--sft-until", "1.5"], "--sft-until: expected a fraction in (0, 1]"),
    (["--seeds", "0,x"], "--seeds: expected comma-separated integers"),
    (["--warm-start", "/no/such/run"], "--warm-start: no checkpoint found"),
    (["--model", "huge"], "invalid choice"),
])
def test_cli_bad_arguments_give_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_ift_loss_pushes_confident_late_tokens_down():
    """Why IFT lowers the sampled reward in the loop (docs/training.md, "IFT"): with its
    gamma-weights not detached (the spec), dL/dlogp_t is positive for a confident late token
    (EOS) when earlier tokens are unsure, so a descent step lowers the gold EOS's probability.
    Plain SFT (gamma=0) never does."""
    import torch
    from gift_fast.functional import ift_loss
    nll = torch.tensor([[2.0, 0.1, 0.1, 0.01]], dtype=torch.float64)   # digit unsure, EOS sure
    lp = (-nll).requires_grad_()
    grad, = torch.autograd.grad(ift_loss(lp, gamma=0.95)[0], lp)
    assert grad[0, -1] > 0 and grad[0, 0] < 0
    lp0 = (-nll).requires_grad_()
    grad0, = torch.autograd.grad(ift_loss(lp0, gamma=0.0)[0], lp0)
    assert (grad0 < 0).all()


def test_a_new_run_never_replaces_another_run(tmp_path):
    """An explicit out_dir that holds a run is refused (its log and checkpoint stay as they were)
    unless the caller asks for --overwrite; a resume continues it instead."""
    run = tmp_path / "kept"
    cfg = TrainConfig(**{**TINY, "plot": False}, out_dir=str(run))
    train(cfg)
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "checkpoint.pt")}
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg)
    assert {name: (run / name).read_bytes() for name in before} == before
    with pytest.raises(SystemExit):
        main(["train", "--vocab", "64", "--sft-steps", "2", "--rl-steps", "2", "--threads", "1",
              "--no-progress", "--no-plot", "--out-dir", str(run)])
    assert {name: (run / name).read_bytes() for name in before} == before
    replaced = train(cfg.replace(overwrite=True, seed=1))
    assert replaced.out_dir == str(run)
    assert (run / "metrics.jsonl").read_bytes() != before["metrics.jsonl"]


def test_compile_trains_like_eager_without_graph_breaks(tmp_path, monkeypatch):
    """``--compile`` (``TrainConfig(compile=True)``) compiles the training step: the model body
    and gift_fast's fused loss head. Compiled with ``aot_eager`` (dynamo and AOTAutograd decide
    graphs and breaks as for inductor; inductor's C++ code generation would cost minutes here, see
    tests/test_compile.py). What is asserted, and why:

    - no graph break anywhere in the compiled step, and both steps ran compiled (one graph for
      the SFT step, one for the GIFT step, at least);
    - the first SFT step's loss equals eager's exactly: the same weights and the same batch, and
      aot_eager runs the forward graph with eager's ATen kernels in eager's order;
    - at the first RL update the policy is the rollout policy whose (eager, no_grad) log-probs are
      the anchor, so GIFT's implicit reward beta * (log pi - log pi_anchor) is exactly 0 only if
      the compiled forward gives eager's log-probs bit for bit: its std must be 0;
    - the whole run: the same records with the same metric keys, every number finite. Later
      steps are not compared by value: they sample from weights updated by a backward whose
      accumulation order the compiled graph may change, and one ulp can change a sample.
    """
    import math
    import torch
    from torch._dynamo.utils import counters
    from gift_fast.train import trainer as trainer_mod
    monkeypatch.setattr(trainer_mod, "COMPILE_BACKEND", "aot_eager")
    cfg = TrainConfig(**{**TINY, "sft_steps": 2, "rl_steps": 1, "mini_batches": 1,
                         "eval_samples": 0, "n_heldout": 8, "plot": False}, sft_until=None)
    eager = train(cfg.replace(out_dir=str(tmp_path / "eager")))
    torch._dynamo.reset()
    counters.clear()
    compiled = train(cfg.replace(out_dir=str(tmp_path / "compiled"), compile=True))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])

    def numbers(record):
        for value in record.values():
            if isinstance(value, dict):
                yield from numbers(value)
            elif isinstance(value, float):
                yield value
    assert [r["phase"] for r in compiled.records] == [r["phase"] for r in eager.records]
    for a, b in zip(eager.records, compiled.records):
        assert a.keys() == b.keys() and a.get("metrics", {}).keys() == b.get("metrics", {}).keys()
        assert all(math.isfinite(x) for x in numbers(b)), b
    sft = [r for r in compiled.records if r["phase"] == "sft"]
    assert sft[0]["loss"] == [r for r in eager.records if r["phase"] == "sft"][0]["loss"]
    rl = [r for r in compiled.records if r["phase"] == "rl"]
    assert rl[0]["metrics"]["implicit_std"] == 0.0, rl[0]["metrics"]
    assert compiled.config.compile and not eager.config.compile


def test_cli_compile_flag_sets_the_config():
    from gift_fast.cli import build_parser, config_from_args
    parse = lambda *argv: config_from_args(build_parser().parse_args(["train", *argv]))
    assert parse("--compile").compile is True and parse().compile is False


def test_run_directory_file_names_are_spelled_only_in_run_dir():
    """One owner of the run-directory layout: no string in gift_fast's code (docstrings aside)
    names a file of a run or study directory except in gift_fast/train/run_dir.py."""
    import ast
    import pathlib
    from gift_fast.train.run_dir import RunDir, StudyDir
    names = [RunDir.METRICS, RunDir.SUMMARY, RunDir.CONFIG, RunDir.TOKENIZER, RunDir.CURVES,
             RunDir.MEMORY, RunDir.CHECKPOINT, StudyDir.TABLE, StudyDir.NUMBERS, StudyDir.PLOT,
             "warmstart-s"]
    package = pathlib.Path(__file__).resolve().parent.parent / "gift_fast"
    found = []
    for path in package.rglob("*.py"):
        if path.name == "run_dir.py" and path.parent.name == "train":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                           ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docstrings:
                found += [f"{path.relative_to(package.parent)}:{node.lineno}: {name}"
                          for name in names if name in node.value]
    assert not found, found
