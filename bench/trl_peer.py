"""gift_fast's ``linear_logprobs`` against TRL 1.16's fused LM head (``ChunkedLogProbFunction``,
what ``add_fused_lm_head`` runs inside GRPOTrainer / DPOTrainer), on the same batch, in one run.

  python -m bench.trl_peer                                   # N=2048 H=896, V=32768 and 151936, fp32
  python -m bench.trl_peer --n 512 --vocabs 32768 --repeats 2    # quicker

Per vocabulary, with and without entropy, forward + backward (gradients w.r.t. hidden and weight):
- time: min over interleaved repeats (methods alternate inside each repeat, so machine load hits
  all of them alike), and its ratio to the bare GEMM fwd+bwd (``h @ W.T``, ``G @ W``, ``G.T @ h``)
  measured in the same run;
- peak memory above the inputs (torch profiler on CPU, the caching allocator on CUDA);
- max |log-prob| difference between the two, and of each against float64 on the first 256 rows.
Also the eager path TRL used before 1.16 (materialised logits -> log_softmax -> gather) for memory.
Writes JSON and a markdown table (``--out``). On CPU this measures the torch paths of both
libraries; it is not a GPU result.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch


def _inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5 * 2).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight, targets


def _methods(hidden, weight, targets, entropy):
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from gift_fast import linear_logprobs

    def leaves():
        return hidden.detach().requires_grad_(), weight.detach().requires_grad_()

    def gemm():
        h, w = hidden, weight
        logits = h @ w.T
        grad = torch.ones_like(logits)
        _ = grad @ w, grad.T @ h

    def trl():
        h, w = leaves()
        outs = ("log_probs", "entropy") if entropy else ("log_probs",)
        lp, ent, *_ = ChunkedLogProbFunction.apply(h, w, None, targets, 1.0,
                                                   _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outs)
        (lp.sum() + (ent.sum() if entropy else 0)).backward()
        return lp.detach()

    def ours():
        h, w = leaves()
        out = linear_logprobs(h, w, targets, return_entropy=entropy)
        lp, ent = out if entropy else (out, None)
        (lp.sum() + (ent.sum() if entropy else 0)).backward()
        return lp.detach()

    def eager():
        h, w = leaves()
        logp_all = (h @ w.T).float().log_softmax(-1)
        lp = logp_all.gather(-1, targets[:, None])[:, 0]
        loss = lp.sum()
        if entropy:
            loss = loss - (logp_all.exp() * logp_all).sum()
        loss.backward()
        return lp.detach()

    return {"gemm": gemm, "trl": trl, "gift_fast": ours, "eager": eager}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(n, h, v, entropy, dtype, device, repeats, eager_memory):
    from gift_fast.train.memory import peak_bytes
    hidden, weight, targets = _inputs(n, h, v, dtype, device)
    methods = _methods(hidden, weight, targets, entropy)
    timed = ["gemm", "trl", "gift_fast"]
    best = {m: float("inf") for m in timed}
    if device.type == "cuda":   # warm-up (kernel compilation); on CPU every call costs the same
        for name in timed:
            methods[name]()
    for _ in range(repeats):
        for name in timed:
            _sync(device)
            t0 = time.perf_counter()
            methods[name]()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    logps = {}

    def keep(name):
        def call():
            logps[name] = methods[name]()
        return call
    peak = {m: peak_bytes(keep(m), device) / 2**20 for m in ("trl", "gift_fast")}
    if eager_memory:
        peak["eager"] = peak_bytes(methods["eager"], device) / 2**20
    lp_trl, lp_ours = logps["trl"], logps["gift_fast"]
    rows = min(n, 256)
    ref = (hidden[:rows].double() @ weight.double().T).log_softmax(-1).gather(
        -1, targets[:rows, None])[:, 0]
    return {
        "n": n, "h": h, "v": v, "entropy": entropy, "dtype": str(dtype).replace("torch.", ""),
        "ms": {m: best[m] * 1e3 for m in timed},
        "ratio_to_gemm": {m: best[m] / best["gemm"] for m in ("trl", "gift_fast")},
        "gift_fast_speedup_vs_trl": best["trl"] / best["gift_fast"],
        "peak_mib": peak,
        "max_abs_diff_logp": (lp_trl - lp_ours).abs().max().item(),
        "max_abs_err_f64": {"trl": (lp_trl[:rows].double() - ref).abs().max().item(),
                            "gift_fast": (lp_ours[:rows].double() - ref).abs().max().item()},
    }


def _machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, no GPU")


def markdown(doc) -> str:
    lines = [f"Machine: {doc['machine']}; torch {doc['torch']}, trl {doc['trl']}; command: "
             f"`{doc['command']}`", "",
             "| V | entropy | TRL ms (x GEMM) | gift_fast ms (x GEMM) | gift_fast speed-up | "
             "peak MiB TRL / gift_fast / eager | max abs diff logp |",
             "|---|---|---|---|---|---|---|"]
    for c in doc["cases"]:
        eager = f" / {c['peak_mib']['eager']:.0f}" if "eager" in c["peak_mib"] else ""
        lines.append(
            f"| {c['v']} | {'yes' if c['entropy'] else 'no'} | {c['ms']['trl']:.0f} "
            f"({c['ratio_to_gemm']['trl']:.2f}x) | {c['ms']['gift_fast']:.0f} "
            f"({c['ratio_to_gemm']['gift_fast']:.2f}x) | {c['gift_fast_speedup_vs_trl']:.2f}x | "
            f"{c['peak_mib']['trl']:.0f} / {c['peak_mib']['gift_fast']:.0f}{eager} | "
            f"{c['max_abs_diff_logp']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.trl_peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--h", type=int, default=896)
    p.add_argument("--vocabs", default="32768,151936")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-eager", action="store_true", help="skip the materialised-logits memory run")
    p.add_argument("--out", default="bench/results/trl_peer")
    args = p.parse_args(argv)
    import trl
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    doc = {"machine": _machine(device), "torch": torch.__version__, "trl": trl.__version__,
           "command": "python -m bench.trl_peer " + " ".join(argv if argv is not None
                                                             else sys.argv[1:]),
           "is_gpu_result": device.type == "cuda", "cases": []}
    for v in (int(x) for x in args.vocabs.split(",")):
        for entropy in (False, True):
            # the materialised path's memory once per vocabulary (its logits dominate either way)
            case = run_case(args.n, args.h, v, entropy, dtype, device, args.repeats,
                            not args.no_eager and not entropy)
            doc["cases"].append(case)
            print(json.dumps(case), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    table = markdown(doc)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    return doc


if __name__ == "__main__":
    main()
