"""The benchmark suite's CPU smoke mode: runs in seconds, writes JSON / markdown / PNG with the
documented schema, and reports methods that cannot run instead of dropping them."""
import json

import pytest
import torch

from bench import methods as bench_methods
from bench import run_suite
from bench.report import CPU_LABEL, SCHEMA

RESULT_KEYS = {"method", "kind", "objective", "engine", "peer", "status", "median_ms",
               "peak_mem_bytes", "ratio_to_gemm", "mem_ratio_to_gemm"}
STATUS_PREFIXES = ("ok", "oom", "unavailable: ", "skipped: ", "error: ")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    doc = run_suite.main(["--smoke", "--out", str(out)])
    return out, doc


def test_smoke_writes_json_markdown_and_plots(smoke):
    out, doc = smoke
    for name in ("results.json", "results.md", "ratios.png", "time_vs_n.png", "mem_vs_n.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "time_vs_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema"] == SCHEMA
    assert on_disk["mode"] == "smoke"
    md = (out / "results.md").read_text()
    assert CPU_LABEL in md
    assert " ms |" not in md, "CPU smoke markdown must show ratios only, no timings"


def test_smoke_schema(smoke):
    _, doc = smoke
    assert doc["is_performance_result"] is False and doc["label"] == CPU_LABEL
    for key in ("device", "driver", "torch", "triton", "commit", "date"):
        assert key in doc["env"]
    assert doc["env"]["torch"] == torch.__version__
    assert doc["cases"], "no cases ran"
    layouts = set()
    for case in doc["cases"]:
        assert {"id", "shape", "layout", "inputs", "results", "mean_entropy"} <= set(case)
        layouts.add(case["layout"]["name"])
        for r in case["results"]:
            assert RESULT_KEYS <= set(r), r
            assert r["status"].startswith(STATUS_PREFIXES), r["status"]
            if r["status"] == "ok":
                assert r["median_ms"] > 0 and r["ratio_to_gemm"] > 0
                assert r["repeats"] >= 2
    assert {"dense", "rl-g8"} <= layouts
    assert {c["inputs"] for c in doc["cases"]} == {"random", "peaked"}
    # The bare GEMM, the naive path and gift_fast's op all ran.
    ok = {(r["method"], r["kind"]) for c in doc["cases"] for r in c["results"]
          if r["status"] == "ok"}
    for name in ("gemm", "naive+logp", "gift_fast+logp", "gift_fast.reference+logp"):
        assert (name, "fwd") in ok and (name, "fwd+bwd") in ok, name
    # Audit: float64 reference errors are small for the materialised path.
    audit = {(r["method"], r["layout"]): r for r in doc["audit"]["results"]}
    naive = audit[("naive+logp", "dense")]
    assert naive["status"] == "ok" and naive["rel_err_loss"] < 2e-2 and naive["rel_err_dw"] < 2e-2
    assert len(doc["goals"]) == 3 and all(g["met"] is None for g in doc["goals"])
    # A goal without a verdict says what was not measured and why.
    assert all(g["reason"].startswith("not measured: ") for g in doc["goals"])


def test_cuda_only_peers_are_reported_unavailable(smoke):
    _, doc = smoke
    status = {(r["method"], r["kind"]): r["status"] for c in doc["cases"] for r in c["results"]}
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the CUDA peers run")
    assert status[("cce+logp", "fwd+bwd")] == "unavailable: needs CUDA"
    assert status[("liger_flce+logp", "fwd")] == "unavailable: needs CUDA"
    assert status[("compile+logp", "fwd")].startswith("skipped: ")
    md_rows = [r for c in doc["cases"] for r in c["results"] if r["method"] == "cce+logp"]
    assert md_rows, "an unavailable method must still appear in the results"


def test_import_failure_is_reported_not_dropped(tmp_path, monkeypatch):
    real = bench_methods._try_import

    def fake(module):
        if module == "liger_kernel":
            return "unavailable: cannot import liger_kernel (ImportError: not installed)"
        return real(module)

    monkeypatch.setattr(bench_methods, "_try_import", fake)
    doc = run_suite.main(["--shapes", "32x16x128", "--layouts", "rl-g8", "--methods",
                          "gemm,liger.grpo,naive+grpo,gift_fast.grpo_loss", "--device", "cpu", "--no-audit",
                          "--out", str(tmp_path)])
    rows = {(r["method"], r["kind"]): r for r in doc["cases"][0]["results"]}
    assert rows[("liger.grpo", "fwd+bwd")]["status"].startswith("unavailable: cannot import")
    assert rows[("liger.grpo", "fwd+bwd")]["median_ms"] is None
    assert rows[("naive+grpo", "fwd+bwd")]["status"] == "ok"
    comp = [c for c in doc["comparisons"] if c["baseline"] == "liger.grpo"]
    assert comp and all(c["speedup"] is None for c in comp)
    assert "unavailable: cannot import" in (tmp_path / "results.md").read_text()


def test_oom_and_errors_are_classified():
    from bench.status import classify_exception
    cpu = torch.device("cpu")
    assert classify_exception(RuntimeError("CUDA out of memory. Tried"), cpu) == "oom"
    assert classify_exception(ImportError("no module x"), cpu).startswith("unavailable: ")
    assert classify_exception(ValueError("bad"), cpu) == "error: ValueError: bad"
