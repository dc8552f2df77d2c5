"""The ``--sft-until`` probe schedule: every SFT_PROBE_EVERY steps, every SFT_PROBE_EVERY_NEAR
once a probe has reached half the target (SFT's accuracy jumps, and probing only every 10 steps
let warm starts overshoot the target)."""
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from gift_fast.train import trainer as trainer_mod  # noqa: E402
from gift_fast.train.config import TrainConfig  # noqa: E402
from gift_fast.train.trainer import train  # noqa: E402

TINY = dict(model="tiny", vocab=64, sft_batch=8, rl_steps=2, prompts_per_step=2, group_size=4,
            n_heldout=16, eval_every=2, progress=False, plot=False, threads=1, device="cpu")


REAL_EVALUATE = trainer_mod.evaluate


def scripted_probe(monkeypatch, accuracies):
    """The probe returns ``accuracies`` in turn (the held-out evaluation is left alone)."""
    real = REAL_EVALUATE
    calls = []

    def fake(*args, prefix="heldout", **kw):
        out = real(*args, prefix=prefix, **kw)
        if prefix == "probe":
            value = accuracies[len(calls)]
            if value is Killed:
                raise Killed
            out["probe_accuracy"] = value
            calls.append(out["probe_accuracy"])
        return out
    monkeypatch.setattr(trainer_mod, "evaluate", fake)
    return calls


def test_probe_runs_every_near_steps_once_half_the_target_is_reached(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "SFT_PROBE_EVERY", 4)
    monkeypatch.setattr(trainer_mod, "SFT_PROBE_EVERY_NEAR", 2)
    # Target 0.5: 0.2 is below half (next probe 4 steps on), 0.3 is above (then every 2 steps).
    scripted_probe(monkeypatch, [0.2, 0.3, 0.4, 0.6])
    result = train(TrainConfig(**TINY, sft_steps=50, sft_until=0.5, out_dir=str(tmp_path / "r")))
    probes = [r["step"] for r in result.records if r["phase"] == "sft_probe"]
    assert probes == [4, 8, 10, 12]
    assert result.records[-1]["step"] == 12 + 2   # RL started at step 12 and ran its 2 steps
    assert sum(r["phase"] == "sft" for r in result.records) == 12


class Killed(Exception):
    pass


def test_probe_schedule_survives_resume(tmp_path, monkeypatch):
    """A run whose checkpoint was written right after a near-target probe keeps probing every
    SFT_PROBE_EVERY_NEAR steps when resumed: that probe's record is kept in the log."""
    monkeypatch.setattr(trainer_mod, "SFT_PROBE_EVERY", 4)
    monkeypatch.setattr(trainer_mod, "SFT_PROBE_EVERY_NEAR", 2)
    cfg = TrainConfig(**TINY, sft_steps=50, sft_until=0.5, save_every=8,
                      out_dir=str(tmp_path / "r"))
    # Probes at steps 4 (0.0: not near) and 8 (0.3: near; checkpoint at 8); dies at the next one.
    scripted_probe(monkeypatch, [0.0, 0.3, Killed])
    with pytest.raises(Killed):
        train(cfg)
    scripted_probe(monkeypatch, [0.6])
    result = train(cfg.replace(resume=str(tmp_path / "r")))
    probes = [r["step"] for r in result.records if r["phase"] == "sft_probe"]
    assert probes == [4, 8, 10]   # 12 if the resumed run had forgotten the probe at step 8
