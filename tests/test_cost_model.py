"""bench/model.py: the cost model (a model, never a measurement) reads the code's real launch
configurations, counts FLOPs exactly, and prints / serialises what it promises."""
import functools
import json

import pytest

from bench import model as cm
import gift_fast.backends.triton_op as to
from gift_fast.kernels import logprob_backward, logprob_forward

# The kernel-level roofline's tests import the library's config functions inside themselves, so
# that a change there (engine17 removes kernels/gemm.py) breaks only them, not the calibrated
# model's tests below.
# Ragged on purpose: no size is a multiple of a tile, a chunk or a vocabulary block.
N, H, V = 3001, 1000, 50021


def _ops(n=N, h=H, v=V, **kw):
    return {op["name"]: op for op in cm.evaluate(n, h, v, gpus=("h100",), **kw)["ops"]}


def test_flops_are_exact_gemm_equivalents():
    gemm_eq = 2.0 * N * H * V
    ops = _ops()
    expected = {"linear_logprobs forward": 1, "linear_logprobs fwd+bwd": 4,
                "linear_logprobs fwd+bwd [old: rows order, 256 MiB chunks]": 4,
                "GIFT two-phase fwd+bwd": 4, "one-pass token-local fwd+bwd": 4,
                "bare lm_head GEMM forward": 1, "bare lm_head GEMM fwd+bwd": 3,
                "naive eager (materialised logits)": 3, "Liger fused linear CE": 3,
                "Cut Cross-Entropy": 4}
    assert set(expected) <= set(ops)
    for name, k in expected.items():
        assert ops[name]["flops"] == k * gemm_eq, name
        assert ops[name]["gemm_eq"] == k
    # Live rows: the backward's GEMMs scale with them; CCE's filter removes dE / dC work.
    half = _ops(live_frac=0.5, cce_filtered=0.5)
    n_live = round(0.5 * N)
    assert half["GIFT two-phase fwd+bwd"]["flops"] == gemm_eq + 3 * 2.0 * n_live * H * V
    assert half["Cut Cross-Entropy"]["flops"] == 2 * 2.0 * n_live * H * V + 2.0 * n_live * H * V


def _bytes_by_n(ns):
    return [{k: op["bytes_read"] + op["bytes_written"] for k, op in _ops(n=n).items()} for n in ns]


def test_bytes_monotone_in_n():
    liger = "Liger fused linear CE"
    totals = _bytes_by_n((257, 1000, 3001, 8192))
    for name in totals[0]:
        seq = [t[name] for t in totals]
        assert name == liger or seq == sorted(seq), (name, seq)
    # Liger's chunk is a power of two of N / ceil(V / H) rows: its dW traffic drops when the
    # chunk doubles, so its bytes grow with N only between those steps (here 64-row chunks).
    seq = [t[liger] for t in _bytes_by_n((2600, 2800, 3001, 3200))]
    assert seq == sorted(seq), seq


def test_bare_gemm_ratio_is_one_and_times_positive():
    result = cm.evaluate(N, H, V)
    for op in result["ops"]:
        for g in ("h100", "h200", "a100"):
            assert op["time_s"][g] > 0
    bare = next(op for op in result["ops"] if op["name"] == "bare lm_head GEMM fwd+bwd")
    assert bare["ratio_to_bare_gemm_fwd_bwd"] == {"h100": 1.0, "h200": 1.0, "a100": 1.0}


def test_old_design_pays_the_float32_dw_round_trips():
    ops = _ops(n=8192, h=4096, v=151936)
    old = ops["linear_logprobs fwd+bwd [old: rows order, 256 MiB chunks]"]
    new = ops["linear_logprobs fwd+bwd"]
    dw32 = next(k for k in old["kernels"] if k["name"].startswith("dW32"))
    chunks = dw32["launches"]
    assert chunks == 11            # ~768 rows per 256 MiB chunk at V = 151936, bf16
    assert dw32["bytes_written"] >= chunks * 151936 * 4096 * 4
    assert dw32["bound"]["h100"] == "memory"
    assert new["time_s"]["h100"] < old["time_s"]["h100"]
    assert new["extra_memory_bytes"] < 151936 * 4096 * 4 < old["extra_memory_bytes"]


def test_table_prints_and_says_model(capsys):
    cm.main(["--n", "512", "--h", "256", "--v", "3000", "--kernels", "--gpu", "a100"])
    out = capsys.readouterr().out
    assert cm.MODEL_LABEL in out and "not a measurement" in out
    assert "A100 SXM model ms" in out and "Per kernel, A100 SXM" in out
    assert "| Liger fused linear CE |" in out and "Goals (H100 model)" in out


def test_json_schema(capsys):
    cm.main(["--n", "300", "--h", "128", "--v", "1000", "--json", "--dtype", "fp32",
             "--live-frac", "0.25"])
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "model" and "not a measurement" in result["label"]
    assert result["inputs"] == dict(n=300, h=128, v=1000, dtype="fp32", live_frac=0.25,
                                    cce_filtered=0.0)
    assert set(result["gpus"]) == {"h100", "h200", "a100"}
    assert set(result["configs"]["h100"]) == {"forward", "dlogits", "matmul"}
    op_keys = {"name", "who", "note", "flops", "gemm_eq", "bytes_read", "bytes_written",
               "host_syncs", "launches", "extra_memory_bytes", "memory_goal_bytes", "time_s",
               "ratio_to_bare_gemm_fwd_bwd", "kernels"}
    kernel_keys = {"name", "flops", "exps", "bytes_read", "bytes_written", "lock_bytes",
                   "launches", "host_syncs", "note", "time_s", "bound"}
    for op in result["ops"]:
        assert set(op) == op_keys
        for k in op["kernels"]:
            assert set(k) == kernel_keys
    assert all(set(gl) == {"goal", "value", "limit", "met"} for gl in result["goals"])


def _bare(op_name="bare lm_head GEMM fwd+bwd", **kw):
    return _ops(**kw)[op_name]


def _patched(real, **changes):
    """``real`` with some entries of its result changed, same signature (whatever parameters
    the config functions take, the model's adapter sees the real ones)."""
    @functools.wraps(real)
    def config(*args, **kwargs):
        return dict(real(*args, **kwargs), **changes)
    return config


def test_reads_the_real_forward_and_dlogits_configs(monkeypatch):
    from gift_fast.kernels import logprob_backward, logprob_forward
    name = "linear_logprobs forward"
    before = _bare(name)
    monkeypatch.setattr(logprob_forward, "forward_config",
                        _patched(logprob_forward.forward_config, v_per_split=1024))
    after = _bare(name)
    assert after["bytes_written"] > before["bytes_written"]  # more vocabulary slices, partials
    before = _bare("linear_logprobs fwd+bwd")
    monkeypatch.setattr(logprob_backward, "dlogits_config",
                        _patched(logprob_backward.dlogits_config, BLOCK_N=32))
    assert _bare("linear_logprobs fwd+bwd")["bytes_read"] != before["bytes_read"]


def test_reads_the_real_backward_budget(monkeypatch):
    import gift_fast.backends.triton_op as to
    def dlogits_launches():
        op = _bare("linear_logprobs fwd+bwd")
        return next(k for k in op["kernels"] if k["name"] == "dlogits")["launches"]
    before = dlogits_launches()
    real = cm.MODEL_BUDGET
    monkeypatch.setattr(cm, "MODEL_BUDGET", lambda n, h: real(n, h) // 4)
    assert dlogits_launches() > before


def test_config_adapter_fails_loudly_on_an_unknown_parameter():
    def config(V, H, interpreted, brand_new):
        return {}
    with pytest.raises(TypeError):
        cm._call_config(config, V=1, H=1, interpreted=False)


@pytest.mark.parametrize("kw, match", [(dict(dtype="fp8"), "dtype"),
                                       (dict(live_frac=1.5), "live_frac")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        cm.Model(10, 10, 10, **kw)


# ------------------------------------------------------------------------------------------------
# The calibrated model (bench/calibrated_model.py): anchored to a published bare cuBLAS GEMM,
# our Triton efficiency r explicit, validated against the published numbers it can express.

import math
import os
import subprocess
import sys

from bench import calibrated_model as cal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_validate_passes_on_the_published_numbers():
    """What CI runs: exit status 0, every published number printed with the model's."""
    run = subprocess.run([sys.executable, "-m", "bench.model", "--validate"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    for ms in ("42.0", "59.0", "53.0", "37.7", "35.1", "208.8", "144.0", "134.8"):
        assert f"| {ms} |" in run.stdout, ms
    assert "cannot express" in run.stdout and "not a measurement" in run.stdout


@pytest.mark.parametrize("key, change", [("trl7244_naive", None), ("liger1472_h200", 256),
                                         ("cce_readme_a100", "eager")])
def test_validate_fails_when_a_published_number_is_off(monkeypatch, capsys, key, change):
    """A published number 40% higher (the model then 23-29% under it) makes --validate exit
    non-zero."""
    published = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cal.PUBLISHED.items()}
    if change is None:
        published[key] *= 1.4
    else:
        published[key][change] *= 1.4
    monkeypatch.setattr(cal, "PUBLISHED", published)
    with pytest.raises(SystemExit) as stop:
        cm.main(["--validate"])
    assert stop.value.code == 1
    assert "FAIL: 1 published number" in capsys.readouterr().out


def test_efficiency_reproduces_the_anchor():
    a = cal.TRL_7244_BARE
    s = cal.Shape(a.n, a.h, a.v)
    assert cal.bare(s, "h100").time() * 1e3 == pytest.approx(a.ms, rel=1e-12)
    assert 0.7 < cal.cublas_efficiency("h100") < 0.8
    # the bare GEMM is pure cuBLAS: r does not move it
    assert cal.bare(s, "h100").time(0.5) == cal.bare(s, "h100").time(1.0)


def test_plans_count_gemm_equivalents():
    s = cal.Shape(3001, 1000, 50021)
    plans = {"stream one chunk": (cal.token_local_stream(s, "h100", s.n), 3),
             "stream ragged chunks": (cal.token_local_stream(s, "h100", 1280), 3),
             "keep": (cal.two_phase_keep(s, "h100"), 3),
             "recompute": (cal.two_phase_recompute(s, "h100", 4096), 4),
             "recompute one block": (cal.two_phase_recompute(s, "h100", s.v), 4),
             "forward only": (cal.forward_only(s, "h100"), 1),
             "bare": (cal.bare(s, "h100"), 3), "liger": (cal.liger_flce(s, "h100"), 3)}
    for name, (plan, k) in plans.items():
        flops = sum(p.flops for p in plan.pieces)
        assert flops == pytest.approx(k * s.gemm_eq_flops, rel=1e-12), name
        assert plan.gemm_eq == k, name


def test_r_scales_only_our_triton_kernels():
    s = cal.GOAL_SHAPE
    plan = cal.two_phase_recompute(s, "h100", 8064)
    ours = [p for p in plan.pieces if p.engine == "ours"]
    assert {p.name for p in ours} == {"forward: logits + online lse (Triton)",
                                      "dlogits: recompute + D (Triton)"}
    assert sum(p.flops for p in ours) == pytest.approx(2 * s.gemm_eq_flops, rel=1e-12)
    times = [plan.time(r) for r in cal.R_VALUES]
    assert times == sorted(times, reverse=True)
    # at r = 1 the two Triton GEMM-eq cost what cuBLAS's do: 4 GEMM-eq > 4/3 of the bare 3
    assert plan.time(1.0) > 4 / 3 * cal.bare(s, "h100").time() * 0.99
    r = 0.87
    assert plan.implied_r(plan.time(r)) == pytest.approx(r, rel=1e-6)
    assert cal.bare(s, "h100").implied_r(0.04) is None


def test_budget_arithmetic_picks_the_widest_fitting_step():
    s = cal.GOAL_SHAPE
    budget = cal.recompute_budget(s)
    cols = cal.recompute_cols(s, budget)
    assert cols % cal.ALIGN == 0
    assert cal.recompute_extra_bytes(s, cols) <= budget < cal.recompute_extra_bytes(
        s, cols + cal.ALIGN)
    # bf16 stored in 2 bytes (+ shifts): 2 chunks within 2 GiB, dW summed in bf16 (the float32
    # sum alone is V*H*4 = 2.32 GiB); one chunk within the 4 GiB default.
    p2 = cal.stream_plan(s, 2 * cal.GIB)
    assert (math.ceil(s.n / p2.step), p2.dw_sum) == (2, "gemm")
    assert cal.stream_extra_bytes(s, p2.step, "gemm") <= 2 * cal.GIB
    assert cal.stream_extra_bytes(s, p2.step + cal.ALIGN, "gemm") > 2 * cal.GIB
    assert cal.stream_rows(s, 4 * cal.GIB) == s.n
    assert cal.stream_rows(s, cal.stream_extra_bytes(s, s.n, "once")) == s.n
    assert cal.keep_extra_bytes(s) <= 4 * cal.GIB < s.n * s.v * 6    # was 6 bytes per logit


# (shape, budget): the goal shape at 2 and 4 GiB, a budget between the float32 sum's 2 chunks
# and one chunk, float32 inputs, ragged sizes, too small for any stream.
AGREEMENT = [(cal.GOAL_SHAPE, 2 * cal.GIB), (cal.GOAL_SHAPE, 4 * cal.GIB),
             (cal.Shape(32768, 4096, 151936), 15 * cal.GIB // 2),
             (cal.Shape(32768, 4096, 151936), 5 * cal.GIB),
             (cal.Shape(8192, 4096, 151936, 4), 4 * cal.GIB),
             (cal.Shape(3001, 1000, 50021), 256 * cal.MIB),
             (cal.Shape(16384, 8192, 262144), 2 * cal.GIB)]


@pytest.mark.parametrize("s, budget", AGREEMENT)
def test_model_plans_are_the_librarys(s, budget):
    """The model's chunk rows, dW sum and extra bytes are those gift_fast's planner chooses for
    the triton backend on the GPU's target (plan.py with triton_op.stream_store)."""
    import torch
    from gift_fast.backends import plan as planner
    from gift_fast.backends import triton_op
    from gift_fast.kernels.target import target_of
    dtype = {2: torch.bfloat16, 4: torch.float32}[s.e]
    store = triton_op.stream_store(s.v, s.h, dtype, target=target_of(90))
    lib = planner.plan_token_local(s.n, s.v, s.h, s.e, budget=budget, store=store)
    model = cal.stream_plan(s, budget, "h100")
    if lib.kind != "stream":
        assert model is None and cal.stream_rows(s, budget) == 0
    else:
        assert (model.step, model.dw_sum, model.extra_bytes) == (lib.step, lib.dw_sum,
                                                                 lib.extra_bytes)
        timed = cal.token_local_stream(s, "h100", model.step, model.dw_sum)
        assert timed.extra_bytes == lib.extra_bytes
    keep = planner.keep_bytes(s.n, s.v, s.h, s.e, store=store)
    assert cal.keep_extra_bytes(s) == keep == cal.two_phase_keep(s, "h100").extra_bytes
    rec = planner.plan_recompute(s.n, s.n, s.v, s.h, s.e, budget=budget, order="vocab")
    assert cal.recompute_cols(s, budget) == rec.step
    assert cal.two_phase_recompute(s, "h100", rec.step).extra_bytes == rec.extra_bytes


def test_goal_table_has_every_r_and_judges_each(capsys):
    cm.main(["--goals"])
    out = capsys.readouterr().out
    assert all(f"r={r:.2f}" in out for r in cal.R_VALUES)
    for gl in cal.goals():
        if gl.plan is None:
            assert gl.reason
            continue
        for r, x in gl.ratios.items():
            assert x == pytest.approx(gl.plan.time(r) / cal.bare(cal.GOAL_SHAPE, "h100").time())
            assert f"{x:.3f} {'pass' if x <= gl.limit else 'FAIL'}" in out


def test_predictions_cover_the_shapes_gpu_run_measures():
    from bench.run_suite import full_plan
    measured = {(c.shape.n, c.shape.h, c.shape.v) for c in full_plan() if c.layout == "dense"}
    predicted = {(s.n, s.h, s.v) for s in cal.suite_shapes()}
    assert predicted == measured
    script = open(os.path.join(ROOT, "bench", "gpu_run.sh")).read()
    assert "bench.model --predict" in script and "bench.model --compare" in script
    assert "bench.run_suite --full" in script
    # every method the model predicts is one the suite runs at those shapes
    names = {m for c in full_plan() if c.layout == "dense" for m in c.methods}
    assert {m for (m, _k) in cal.predicted_plans(cal.GOAL_SHAPE, "h100")} <= names


def test_compare_prints_measured_next_to_model_and_the_implied_r(tmp_path, capsys):
    s = cal.GOAL_SHAPE
    plans = cal.predicted_plans(s, "h100")
    measured = plans[("gift_fast+logp", "fwd+bwd")].time(0.85) * 1e3
    results = {"cases": [{"id": f"dense/random/N{s.n}_H{s.h}_V{s.v}",
                          "shape": {"n": s.n, "h": s.h, "v": s.v}, "results": [
                              {"method": "gift_fast+logp", "kind": "fwd+bwd", "status": "ok",
                               "median_ms": measured},
                              {"method": "gemm", "kind": "fwd+bwd", "status": "ok",
                               "median_ms": 40.0},
                              {"method": "cce+logp", "kind": "fwd+bwd", "status": "ok",
                               "median_ms": 1.0}]}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    cm.main(["--compare", str(path), "--gpu-name", "h100-80gb-hbm3"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "gift_fast+logp" in line)
    assert f"{measured:.2f}" in row and row.rstrip(" |").endswith("0.850")
    assert "| gemm | fwd+bwd | 40.00 |" in out and "cce+logp" not in out
    assert cal.gpu_key_from_name("nvidia-rtx-4090") is None
