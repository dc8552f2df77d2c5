"""bench/model.py: the cost model (a model, never a measurement) reads the code's real launch
configurations, counts FLOPs exactly, and prints / serialises what it promises."""
import functools
import json

import pytest

from bench import model as cm
import gift_fast.backends.triton_op as to
from gift_fast.kernels import logprob_backward, logprob_forward

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
