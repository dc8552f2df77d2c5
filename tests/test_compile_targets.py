"""Compile-for-target check (gift_fast.compile_targets): every kernel, in the configurations the
launchers really use, compiled to a cubin for sm_90 and sm_80 without a GPU (fast subset: bf16 and
fp32, all flags on, aligned and ragged shapes). The full matrix is
``python -m gift_fast.compile_targets --full``."""
import torch
import pytest

from gift_fast import compile_targets as ct
from gift_fast.kernels.logprob_forward import forward_config
from gift_fast.kernels.target import INTERPRETER, launch_target


@pytest.fixture(scope="module")
def fast_report():
    return ct.check(ct.FAST_ARCHS, full=False, jobs=2)


def test_fast_subset_compiles_with_no_error_spill_or_overflow(fast_report):
    print("\n" + ct.table(fast_report.specs, fast_report.results))
    assert not fast_report.failures, "\n".join(fast_report.failures)
    assert not fast_report.missing, fast_report.missing
    for spec, res in zip(fast_report.specs, fast_report.results):
        assert res["registers"] > 0 and res["mma"] in ("wgmma", "mma.sync", "FMA", "tcgen05")
        if spec.dtype == "bf16" and spec.name != "_gift_epilogue_kernel":
            # bf16 GEMM tiles must reach the tensor cores of each target.
            assert res["mma"] == {90: "wgmma", 80: "mma.sync"}[spec.arch], (spec.name, res)


def test_fast_subset_covers_every_kernel_on_every_target(fast_report):
    launched = {(s.name, s.arch) for s in fast_report.specs}
    kernels = {k.split(":")[1] for k in ct.jit_functions() if k.endswith("_kernel")}
    assert kernels and {(k, a) for k in kernels for a in ct.FAST_ARCHS} <= launched
    # Ragged shapes are recorded without divisibility hints on N, aligned ones with them.
    hinted = {bool(dict(s.attrs).get(([n for n, _ in s.signature].index("N"),)))
              for s in fast_report.specs if s.name == "_logprob_forward_kernel"}
    assert hinted == {True, False}


def test_recorded_configs_are_the_launchers_own():
    sink = []
    x = torch.randn(5, 64)
    with ct.recording(90, sink):
        assert launch_target(x) == 90
        from gift_fast.kernels import logprob_forward_stats
        logprob_forward_stats(x, torch.randn(40, 64), None, torch.zeros(5, dtype=torch.long),
                              1.0, None, False)
    assert launch_target(x) == INTERPRETER
    fwd = next(s for s in sink if s.name == "_logprob_forward_kernel")
    names = [n for n, _ in fwd.signature]
    cx = {names[p[0]]: v for p, v in fwd.constexprs}
    cfg = forward_config(40, 64, torch.float32, 90)
    assert (cx["BLOCK_N"], cx["BLOCK_V"], cx["BLOCK_H"]) == \
        (cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_H"])
    assert (fwd.num_warps, fwd.num_stages) == (cfg["num_warps"], cfg["num_stages"])
    assert dict(fwd.signature)["X"] == "*fp32" and dict(fwd.signature)["N"] == "i32"


def test_unreached_jit_function_is_reported():
    every = set(ct.jit_functions())
    assert set(ct.unexercised(())) == every
    left = ct.unexercised({"gift_fast.kernels.logprob_forward:_logprob_forward_kernel"})
    assert "gift_fast.kernels.logprob_forward:_logit_tile" not in left      # called by it
    assert "gift_fast.kernels.logprob_backward:_dlogits_kernel" in left


def test_problems_catch_spills_shared_memory_and_register_pressure():
    spec = ct.Spec("m:k", 80, (("X", "*bf16"),), (), (), 8, 3)
    ok = dict(registers=128, stack=0, spill_stores=0, spill_loads=0, shared=1024, mma="wgmma")
    assert ct.problems(spec, ok) == []
    assert ct.problems(spec, dict(ok, spill_stores=4))
    assert ct.problems(spec, dict(ok, registers=255))
    assert ct.problems(spec, dict(ok, shared=200 * 1024))          # over sm_80's 163 KiB
    assert ct.problems(spec, dict(error="NameError: boom")) == ["compile error: NameError: boom"]
    assert ct.blocks_per_sm(90, 255, 0, 8) == 1
    assert ct.blocks_per_sm(90, 32, 0, 4) == 16


def test_a_kernel_that_does_not_compile_fails_the_check():
    sink = []
    with ct.recording(90, sink):
        from gift_fast.kernels import logprob_forward_stats
        logprob_forward_stats(torch.randn(3, 16), torch.randn(20, 16), None,
                              torch.zeros(3, dtype=torch.long), 1.0, None, False)
    spec = next(s for s in sink if s.name == "_combine_kernel")
    names = [n for n, _ in spec.signature]
    broken = ct.Spec(spec.kernel, 90, spec.signature,
                     tuple((p, 3 if names[p[0]] == "BLOCK" else v) for p, v in spec.constexprs),
                     spec.attrs, spec.num_warps, spec.num_stages)   # arange of 3: not a power of 2
    (res,) = ct.compile_all([broken], jobs=1)
    assert ct.problems(broken, res)[0].startswith("compile error")
