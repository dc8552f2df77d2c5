"""CPU ratios of the torch backend's fwd+bwd to the bare GEMM fwd+bwd, in one run:
``linear_logprobs`` (two-phase: recompute plan, 4 GEMM-eq) and the token-local losses
``grpo_loss`` / ``fdiv_sft_loss`` (stream plan, 3 GEMM-eq, when the memory budget holds a chunk).

    OMP_NUM_THREADS=1 python -m bench.token_local_cpu --shape 2048x896x32768 --repeats 3

float32, every row live, round-robin repeats, min wall time of the repeats
(``bench.timing.measure_interleaved_cpu``). The bare GEMM fwd+bwd is logits = X @ W.T,
dX = G @ W, dW = G.T @ X with a given G [N, V] (3 GEMM-eq); the losses' leaves are made once,
outside the timed calls. CPU timings: ratios only, never a GPU claim.
"""
from __future__ import annotations

import argparse
import json

import torch

from .timing import measure_interleaved_cpu


def _cases(n, h, v, seed=0):
    import gift_fast as gf
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * h ** -0.5
    targets = torch.randint(0, v, (1, n), generator=g)
    old = torch.full((1, n), -10.0)
    adv = torch.ones(1)
    grad_logits = torch.randn(n, v, generator=g) * 1e-4

    # The same leaves in every call, their gradients dropped first: a fresh copy of W per call
    # (V x H, a few per cent of the bare GEMM on CPU) would be timed with the losses
    # and not with the bare GEMM.
    h_leaf, w_leaf = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    def leaves():
        h_leaf.grad = w_leaf.grad = None
        return h_leaf, w_leaf

    def bare():
        h_, w_ = hidden[0], weight
        logits = h_ @ w_.T
        return logits.sum() + (grad_logits @ w_).sum() + (grad_logits.T @ h_).sum()

    def logprobs():
        h_, w_ = leaves()
        gf.linear_logprobs(h_, w_, targets, backend="torch").sum().backward()
        return h_.grad, w_.grad

    def grpo():
        h_, w_ = leaves()
        gf.grpo_loss(h_, w_, targets, old, adv, backend="torch")[0].backward()
        return h_.grad, w_.grad

    def fdiv():
        h_, w_ = leaves()
        gf.fdiv_sft_loss(h_, w_, targets, backend="torch")[0].backward()
        return h_.grad, w_.grad

    return {"bare GEMM fwd+bwd": bare, "linear_logprobs": logprobs, "grpo_loss": grpo,
            "fdiv_sft_loss": fdiv}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.token_local_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="2048x896x32768", help="NxHxV")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated subset of the methods")
    args = p.parse_args(argv)
    n, h, v = (int(x) for x in args.shape.split("x"))
    fns = _cases(n, h, v)
    if args.only:
        keep = {"bare GEMM fwd+bwd", *args.only.split(",")}
        fns = {k: f for k, f in fns.items() if k in keep}
    res = measure_interleaved_cpu(fns, args.repeats)
    base = res["bare GEMM fwd+bwd"].median_ms
    out = {}
    print(f"N={n} H={h} V={v} float32, threads={torch.get_num_threads()}, "
          f"min of {args.repeats} round-robin repeats")
    for name, m in res.items():
        if isinstance(m, Exception):
            print(f"{name:20s} failed: {m!r}")
            continue
        out[name] = dict(min_ms=m.median_ms, ratio=m.median_ms / base, peak_mib=(
            None if m.peak_mem_bytes is None else m.peak_mem_bytes / 2**20))
        peak = "-" if m.peak_mem_bytes is None else f"{m.peak_mem_bytes / 2**20:.0f}"
        print(f"{name:20s} {m.median_ms:10.0f} ms  {m.median_ms / base:5.2f}x  peak +{peak} MiB")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
