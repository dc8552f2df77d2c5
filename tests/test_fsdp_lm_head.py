"""FSDP2 (2 ranks, gloo, CPU) with lm_head in the root's unit or in its own fully_shard unit:
hf.patch_model, FusedLossModel and TRL's patched forward give the unwrapped model's values and
gradients; outside the root forward the HF integration refuses sharded weights clearly.

The cases run in tests/fsdp_head_cases.py.
"""
import importlib.util
import json
import os

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
HAS_TRL = importlib.util.find_spec("trl") is not None   # without it, the other cases still run

import fsdp_head_cases  # noqa: E402
from helpers import rendezvous, spawn_and_wait  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

SPAWN_TIMEOUT_S = 600     # a hang guard, not a speed check
WORLD = 2


def test_fsdp2_lm_head_layouts_equal_unwrapped_model(tmp_path):
    out = str(tmp_path / "fsdp_head.json")
    cases = [c for c in fsdp_head_cases.CASES if HAS_TRL or c != "trl"]
    spawn_and_wait(fsdp_head_cases.run, (WORLD, rendezvous(tmp_path), out, cases),
                   WORLD, SPAWN_TIMEOUT_S, "fsdp2 lm_head layouts")
    with open(out) as f:
        report = json.load(f)
    if os.path.exists(f"{out}.rank1"):
        with open(f"{out}.rank1") as f:
            report["errors"].update({f"{k} (rank 1)": v
                                     for k, v in json.load(f)["errors"].items()})
    assert not report["errors"], "\n".join(f"{k}:\n{v}" for k, v in report["errors"].items())
    diffs, scales, flags = report["diffs"], report["scales"], report["flags"]
    print()
    for key in sorted(diffs):
        print(f"{key}: max abs diff {diffs[key]:.3g} (reference max {scales[key]:.3g})")
    # every integration, layout and quantity reported (a case that did nothing fails here)
    integrations = ["patch_model", "fused_loss_model"] + (["trl_fused_lm_head"] if HAS_TRL else [])
    for integration in integrations:
        for layout in fsdp_head_cases.LAYOUTS:
            prefix = f"{integration}/{layout}/"
            assert any(k.startswith(prefix + "lm_head_grad") for k in diffs), prefix
            assert any(k.startswith(prefix) and "worst_param_grad" in k for k in diffs), prefix
            assert flags.get(prefix + "layout"), prefix + "layout"
    for key, value in diffs.items():
        # float32 throughout; the sharded run sums each gradient entry over the ranks' shares in a
        # different order than one process over the whole batch (and through 2 decoder layers):
        # allow 2**7 float32 ulps of the reference's largest magnitude (at least 1). The bug this
        # guards against was an lm_head gradient off by about the gradient's own size.
        tol = 2 ** 7 * torch.finfo(torch.float32).eps * max(1.0, scales[key])
        assert value <= tol, f"{key}: max abs diff {value:.3g} > {tol:.3g}"
    expected_errors = {f"errors/{layout}/{what}" for layout in fsdp_head_cases.LAYOUTS
                       for what in ("token_logprobs_outside_forward", "fold_sharded_weight")}
    assert expected_errors <= set(flags), sorted(expected_errors - set(flags))
    failed = sorted(k for k, ok in flags.items() if not ok)
    assert not failed, failed
