"""Compile-for-target check (gift_fast.compile_targets): every kernel, in the configurations the
launchers really use, compiled without a GPU for sm_80, sm_90, sm_120 (cubins) and gfx942, gfx1100
(AMD code objects) (fast subset: bf16 and fp32, all flags on, aligned and ragged shapes). Every
target: ``python -m gift_fast.compile_targets --arch all``; every case: ``--full``."""
import json
import os
import re

import torch
import pytest

from gift_fast import compile_targets as ct
from gift_fast.kernels.logprob_forward import forward_config
from gift_fast.kernels.target import INTERPRETER, launch_target, target_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bf16 dots reach each target's matrix instruction.
BF16_MMA = {80: "mma.sync", 90: "wgmma", 120: "mma.sync", "gfx942": "MFMA", "gfx1100": "WMMA"}


@pytest.fixture(scope="module")
def fast_report():
    return ct.check(ct.FAST_ARCHS, full=False, jobs=2)


def test_fast_subset_compiles_with_no_error_spill_or_overflow(fast_report):
    print("\n" + ct.table(fast_report.specs, fast_report.results))
    assert not fast_report.failures, "\n".join(fast_report.failures)
    assert not fast_report.missing, fast_report.missing
    for spec, res in zip(fast_report.specs, fast_report.results):
        assert res["registers"] > 0 and res["mma"] in ("wgmma", "mma.sync", "FMA", "tcgen05",
                                                       "MFMA", "WMMA")
        if spec.dtype == "bf16" and spec.name not in ct._NO_DOT:
            # bf16 GEMM tiles must reach the tensor cores (matrix cores) of each target.
            assert res["mma"] == BF16_MMA[spec.arch], (spec.name, res)
        blocks, waves = ct.occupancy(spec, res)
        assert blocks >= 1 and waves > 0


def test_fast_subset_covers_every_kernel_on_every_target(fast_report):
    launched = {(s.name, s.arch) for s in fast_report.specs}
    kernels = {k.split(":")[1] for k in ct.jit_functions() if k.endswith("_kernel")}
    archs = ct.parse_archs(",".join(ct.FAST_ARCHS))
    assert set(BF16_MMA) == set(archs)
    assert kernels and {(k, a) for k in kernels for a in archs} <= launched
    # Ragged shapes are recorded without divisibility hints on N, aligned ones with them.
    hinted = {bool(dict(s.attrs).get(([n for n, _ in s.signature].index("N"),)))
              for s in fast_report.specs if s.name == "_logprob_forward_kernel"}
    assert hinted == {True, False}


def test_recorded_configs_are_the_launchers_own():
    sink = []
    x = torch.randn(5, 64)
    with ct.recording(90, sink):
        assert launch_target(x) == target_of(90)
        from gift_fast.kernels import logprob_forward_stats
        logprob_forward_stats(x, torch.randn(40, 64), None, torch.zeros(5, dtype=torch.long),
                              1.0, None, False)
    assert launch_target(x) == INTERPRETER
    fwd = next(s for s in sink if s.name == "_logprob_forward_kernel")
    names = [n for n, _ in fwd.signature]
    cx = {names[p[0]]: v for p, v in fwd.constexprs}
    cfg = forward_config(40, 64, torch.float32, target_of(90))
    assert (cx["BLOCK_N"], cx["BLOCK_V"], cx["BLOCK_H"]) == \
        (cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_H"])
    assert (fwd.num_warps, fwd.num_stages) == (cfg["num_warps"], cfg["num_stages"])
    assert dict(fwd.signature)["X"] == "*fp32" and dict(fwd.signature)["N"] == "i32"


@pytest.mark.parametrize("arch, mma", [(90, "wgmma"), (100, "tcgen05")])
def test_16_bit_gemm_kernels_use_tma_and_the_target_mma(arch, mma):
    """sm_90 / sm_100 with aligned 16-bit operands: the forward and dlogits kernels load X and W
    through TMA descriptors (cp.async.bulk.tensor in the PTX) and multiply on the target's MMA
    (wgmma, tcgen05) in 128-row tiles with K step 64, without spills."""
    from gift_fast.kernels import dlogits, logprob_forward_stats
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=g).bfloat16()
    w = torch.randn(256, 64, generator=g).bfloat16()
    y = torch.randint(0, 256, (64,), generator=g)
    sink = []
    with ct.recording(arch, sink):
        lse, _, ent, _ = logprob_forward_stats(x, w, None, y, 1.0, None, True)
        dlogits(x, w, None, y, lse, lse, lse, ent, 1.0, None,
                torch.empty(64, 256, dtype=torch.bfloat16), "ieee")
    specs = [s for s in dict.fromkeys(sink)
             if s.name in ("_logprob_forward_kernel", "_dlogits_kernel")]
    assert len(specs) == 2
    for spec, res in zip(specs, ct.compile_all(specs, jobs=2)):
        assert not ct.problems(spec, res), (spec.name, res)
        assert res["tma"] and res["mma"] == mma, (spec.name, res)
        assert spec.tiles().startswith("128x") and spec.tiles().endswith("x64")


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
    at90 = ct.Spec("m:k", 90, (("X", "*bf16"),), (), (), 8, 3)
    assert ct.occupancy(at90, dict(ok, registers=255, shared=0)) == (1, 2)
    assert ct.occupancy(ct.Spec("m:k", 90, (), (), (), 4, 3),
                        dict(ok, registers=32, shared=0)) == (16, 16)


def test_amd_resources_are_read_from_the_code_object_metadata():
    amdgcn = """
    ; Occupancy: 4
    amdhsa.kernels:
      - .agpr_count:     8
        .group_segment_fixed_size: 0
        .private_segment_fixed_size: 0
        .sgpr_count:     60
        .sgpr_spill_count: 0
        .vgpr_count:     120
        .vgpr_spill_count: 0
        .wavefront_size: 64
    """
    res = ct._amd_resources(amdgcn)
    assert (res["registers"], res["sgprs"], res["waves_by_registers"]) == (128, 60, 4)
    spec = ct.Spec("m:k", "gfx942", (("X", "*bf16"),), (), (), 8, 2)
    res.update(shared=32 * 1024, mma="MFMA", tma=False)
    assert ct.problems(spec, res) == []
    # 4 waves per SIMD x 4 SIMDs = 2 blocks of 8 waves; 64 KiB of LDS also holds 2 of 32 KiB.
    assert ct.occupancy(spec, res) == (2, 4)
    assert "SGPRs" in ct.problems(spec, dict(res, sgpr_spills=3))[0]
    assert "scratch" in ct.problems(spec, dict(res, scratch=16))[0]
    assert ct.problems(spec, dict(res, shared=96 * 1024))           # over 64 KiB of LDS
    assert ct.problems(ct.Spec("m:k", "gfx950", spec.signature, (), (), 8, 2),
                       dict(res, shared=96 * 1024)) == []           # gfx950: 160 KiB
    rdna = ct.Spec("m:k", "gfx1100", spec.signature, (), (), 8, 2)
    assert ct.problems(rdna, dict(res, registers=246))              # 256 VGPRs on RDNA3
    assert ct._mma("v_wmma_f32_16x16x16_bf16 v[0:7]") == "WMMA"


def test_readme_hardware_table_is_the_rendering_of_the_stored_matrix():
    """README's table is what ``--render docs/compile_matrix.json`` prints; the stored rows come
    from ``python -m gift_fast.compile_targets --arch all --save docs/compile_matrix.json``."""
    with open(os.path.join(ROOT, "docs", "compile_matrix.json")) as f:
        rows = json.load(f)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    found = re.search(r"<!-- hardware-table -->\n(.*?)\n<!-- /hardware-table -->", readme, re.S)
    assert found, "README has no generated hardware table"
    assert found.group(1).strip() == ct.render_markdown(rows).strip()
    targets = {r["target"] for r in rows}
    assert {target_of(a).name for a in ct.ALL_ARCHS} <= targets | {"sm_75"}
    assert all(r["errors"] == 0 and r["spills"] == 0 for r in rows)


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
