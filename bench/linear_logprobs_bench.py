"""Issue 2's first benchmark: ``linear_logprobs`` forward and forward+backward against the
reference backend and the bare ``hidden @ weight.T`` GEMM, on the device at hand.

  python -m bench.linear_logprobs_bench                      # GPU: N=8192 H=4096 V=151936 bf16
  python -m bench.linear_logprobs_bench --shape 256x64x2048  # any shape (CPU: smoke, ratios only)

A thin preset of ``bench.run_suite`` (same timing, memory and outputs: results.json / .md / .png).
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import run_suite

METHODS = "gemm,gift_fast+logp,gift_fast.torch+logp,gift_fast.reference+logp"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.linear_logprobs_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--shape", default="8192x4096x151936" if gpu else "256x64x2048")
    p.add_argument("--inputs", default="random")
    p.add_argument("--out", default="bench/results/linear_logprobs")
    args = p.parse_args(argv)
    doc = run_suite.main(["--shapes", args.shape, "--layouts", "dense", "--inputs", args.inputs,
                          "--methods", METHODS, "--out", args.out, "--no-audit"])
    perf = doc["is_performance_result"]
    print(f"\n{doc['label']} - {doc['env']['device']}, torch {doc['env']['torch']}, triton "
          f"{doc['env']['triton']}, commit {(doc['env']['commit'] or '?')[:12]}")
    print(f"{'method':28s} {'kind':8s} {'ms':>9s} {'x GEMM':>7s} {'peak MiB':>9s}  status")
    for case in doc["cases"]:
        for r in case["results"]:
            ms = f"{r['median_ms']:9.2f}" if (perf and r["median_ms"] is not None) else f"{'-':>9s}"
            mem = (f"{r['peak_mem_bytes'] / 2**20:9.0f}" if (perf and r["peak_mem_bytes"] is not None)
                   else f"{'-':>9s}")
            ratio = f"{r['ratio_to_gemm']:7.2f}" if r.get("ratio_to_gemm") else f"{'-':>7s}"
            print(f"{r['method']:28s} {r['kind']:8s} {ms} {ratio} {mem}  {r['status']}")
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
