"""The integration snippets run as written, each on its own: the python blocks of the README's
"Use it with your trainer" section and of docs/integrations.md."""
import math
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
README = os.path.join(ROOT, "README.md")
INTEGRATIONS = os.path.join(ROOT, "docs", "integrations.md")


def _python_blocks(path, title=None):
    text = open(path, encoding="utf-8").read()
    if title is not None:
        start = text.index(title)
        end = text.find("\n## ", start + len(title))
        text = text[start:end if end != -1 else len(text)]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


README_BLOCKS = _python_blocks(README, "## Use it with your trainer")
BLOCKS = README_BLOCKS + _python_blocks(INTEGRATIONS)
LABELS = ([f"README.md[python block {i}]" for i in range(len(README_BLOCKS))]
          + [f"docs/integrations.md[python block {i}]"
             for i in range(len(BLOCKS) - len(README_BLOCKS))])
_NAMESPACES = {}      # block index -> globals after it ran (each block runs once per session)


def _run(index):
    if index not in _NAMESPACES:
        if "trl" in BLOCKS[index]:
            pytest.importorskip("trl")
        namespace = {"__name__": "readme"}
        exec(compile(BLOCKS[index], LABELS[index], "exec"), namespace)
        _NAMESPACES[index] = namespace
    return _NAMESPACES[index]


def test_section_has_hf_and_trl_snippets():
    assert any("token_logprobs" in b for b in README_BLOCKS)
    assert any("GIFTTrainer(" in b for b in README_BLOCKS)
    assert any("use_gift_fast" in b for b in BLOCKS)
    assert any("compute_policy_loss_gift" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=LABELS)
def test_snippet_runs(index):
    _run(index)


GIFT_METRICS = ("gift/adv_mean", "gift/z_mean", "gift/z_abs_mean", "gift/implicit_std",
                "gift/correlation", "gift/uniform_reward_frac", "gift/loss_groups")


def test_trl_snippet_logs_gift_metrics():
    """The GIFTTrainer snippet logs every step, and what it prints is GIFT's metrics: zero on the
    first update after each rollout, where the policy is the anchor, non-zero on the second."""
    index = next(i for i, b in enumerate(README_BLOCKS) if "GIFTTrainer(" in b)
    ns = _run(index)
    args = ns["args"]
    steps = [log for log in ns["trainer"].state.log_history if "loss" in log]
    assert [log["step"] for log in steps] == list(range(1, args.max_steps + 1))
    for log in steps:
        missing = [k for k in GIFT_METRICS if k not in log]
        assert not missing, f"step {log['step']}: {missing} not logged"
        assert all(math.isfinite(log[k]) for k in GIFT_METRICS), log
        assert log["gift/loss_groups"] == 1.0      # one group of num_generations per micro-batch
    for log in steps:
        first = (log["step"] - 1) % args.num_iterations == 0
        if first:
            # anchor = the same batch's no-grad log-probs, bit-identical to the policy pass: s = 0
            assert log["gift/z_abs_mean"] == 0.0 and log["gift/implicit_std"] == 0.0, log
            assert log["gift/correlation"] == 0.0, log    # undefined (s constant) counts as 0
        else:
            # after one update the sequence log-ratios differ within the group
            assert log["gift/z_abs_mean"] > 0.0 and log["gift/implicit_std"] > 0.0, log
            # a Pearson correlation in float32: |rho| <= 1 up to a few roundings of 2^-24
            assert abs(log["gift/correlation"]) <= 1.0 + 1e-5, log
            # the update was a descent step on sum (A - z)^2 from z = 0, which moves z towards A
            assert log["gift/correlation"] > 0.0, log
            prev = next(p for p in steps if p["step"] == log["step"] - 1)
            assert log["loss"] < prev["loss"], (prev, log)
