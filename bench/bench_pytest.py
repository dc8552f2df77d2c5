"""pytest-benchmark module for the suite's operations (not collected by the default ``pytest``
run, whose testpaths is tests/). Run it explicitly:

  python -m pytest bench/bench_pytest.py --benchmark-only            # small CPU shape
  GIFT_BENCH_SHAPE=16384x4096x151936 python -m pytest bench/bench_pytest.py --benchmark-only  # GPU

Every benchmark uses the same shared inputs (``bench.inputs``) and the same callables as
``bench.run_suite`` (``bench.methods.make_runner``); on CUDA each call is synchronised so the
wall-clock time is device time. Methods that cannot run here are skipped with their reason.
"""
import os

import pytest
import torch

from bench.inputs import Shape, make_inputs, make_layout
from bench.methods import REGISTRY, Context, make_runner, unavailable_reason

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = Shape.parse(os.environ.get("GIFT_BENCH_SHAPE",
                                   "8192x4096x151936" if DEVICE.type == "cuda" else "64x32x512"))
DENSE = ["gemm", "naive+logp", "compile+logp", "torch_lce+logp", "liger_flce+logp", "cce+logp",
         "gift_fast+logp", "gift_fast.reference+logp", "gift_fast.fdiv_sft_loss"]
RL = ["naive+gift", "liger_flce+gift", "cce+gift", "gift_fast+gift", "gift_fast.gift_loss",
      "naive+grpo", "liger.grpo", "gift_fast.grpo_loss", "naive+dpo", "liger.dpo",
      "gift_fast.dpo_loss"]
CTX = Context(device=DEVICE, smoke=DEVICE.type != "cuda")
_INPUTS = {}


def _inputs(layout_name: str):
    if layout_name not in _INPUTS:
        _INPUTS.clear()   # one case's tensors at a time (GPU memory)
        layout = make_layout(layout_name, SHAPE.n)
        _INPUTS[layout_name] = make_inputs(SHAPE, layout, "random", device=DEVICE)
    return _INPUTS[layout_name]


def _bench(benchmark, name: str, layout: str, kind: str):
    method = REGISTRY[name]
    reason = unavailable_reason(method, CTX)
    if reason:
        pytest.skip(reason)
    fn = make_runner(method, _inputs(layout), kind, CTX)

    def call():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{layout} {SHAPE.label} {kind}"
    benchmark.extra_info.update(method=name, kind=kind, device=str(DEVICE),
                                cpu_smoke=DEVICE.type != "cuda")
    benchmark.pedantic(call, warmup_rounds=1, rounds=5 if DEVICE.type == "cuda" else 3,
                       iterations=1)


@pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", DENSE)
def test_dense(benchmark, name, kind):
    _bench(benchmark, name, "dense", kind)


@pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", ["gemm"] + RL)
def test_rl_g8(benchmark, name, kind):
    _bench(benchmark, name, "rl-g8", kind)
