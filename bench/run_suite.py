"""Runs the benchmark suite and writes JSON + markdown + PNG.

  python -m bench.run_suite --smoke                      # CPU, seconds; CI runs it
  python -m bench.run_suite --cpu --out bench/results/cpu-<machine>-<date>   # CPU numbers, minutes
  python -m bench.run_suite --full --out bench/results/<gpu>-<date>   # GPU sweep, ~8 min on an H100
  python -m bench.run_suite --shapes 8192x4096x151936 --layouts dense --methods 'gemm,gift_fast*'

Every method of a case runs in this one process on the same tensors, so every ratio is fair.
A method that cannot run is reported with its status (``unavailable: ...``, ``oom``,
``skipped: ...``, ``error: ...``), never dropped.
"""
from __future__ import annotations

import argparse
import fnmatch
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from . import report
from .audit import audit_method
from .inputs import Shape, make_inputs, make_layout
from .methods import (GIFT_FAST_FOR, KINDS, REGISTRY, Context, make_runner, method_names,
                      unavailable_reason)
from .status import classify_exception
from .timing import measure, measure_interleaved_cpu

LAYOUT_OBJECTIVES = {"dense": ("gemm", "logp", "sft"), "rl": ("gemm", "gift", "grpo", "dpo")}

# Methods of the N sweep outside the headline shape (all registry methods run at the headline).
CORE = ["gemm", "naive+*", "compile+*", "torch_lce+*", "liger_flce+*", "cce+*", "gift_fast+*",
        "gift_fast.*_loss", "liger.*"]
EXTENDED_ONLY = ["torch_lce_ar1+*", "gift_fast.torch+*", "gift_fast.reference+*"]

HEADLINE = Shape(8192, 4096, 151936)
FULL_NS = (2048, 8192, 16384, 32768)
FULL_HV = ((4096, 151936), (4096, 128256), (2304, 256000))


@dataclass
class CaseSpec:
    shape: Shape
    layout: str
    inputs: str
    methods: List[str]
    kinds: Sequence[str] = KINDS
    objectives: Optional[Sequence[str]] = None   # None: all the layout allows

    @property
    def case_id(self) -> str:
        s = self.shape
        return f"{self.layout}/{self.inputs}/N{s.n}_H{s.h}_V{s.v}"


def _layout_kind(layout: str) -> str:
    return "dense" if layout == "dense" else "rl"


def _filter(names: List[str], patterns: Optional[List[str]]) -> List[str]:
    if not patterns:
        return names
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def methods_for(layout: str, names: List[str], objectives: Optional[Sequence[str]] = None):
    allowed = LAYOUT_OBJECTIVES[_layout_kind(layout)]
    if objectives:
        allowed = [o for o in allowed if o in objectives or o == "gemm"]
    return [n for n in names if REGISTRY[n].objective in allowed]


# ------------------------------------------------------------------------------------ presets

SMOKE_EXCLUDE = ["torch_lce_ar1+*", "gift_fast.torch+*", "gift_fast.reference+sft",
                 "gift_fast.reference+g*", "gift_fast.reference+dpo"]


def smoke_plan(method_patterns=None) -> List[CaseSpec]:
    """Tiny CPU cases: two N for the plots, both layouts, peaked inputs once."""
    names = method_names(method_patterns)
    if not method_patterns:
        names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in SMOKE_EXCLUDE)]
    plan = [CaseSpec(Shape(n, 16, 128), "dense", "random", methods_for("dense", names))
            for n in (32, 64)]
    plan.append(CaseSpec(Shape(64, 16, 128), "rl-g8", "random", methods_for("rl-g8", names)))
    plan.append(CaseSpec(Shape(64, 16, 128), "dense", "peaked", methods_for("dense", names, ["logp"])))
    return plan


def full_plan(method_patterns=None) -> List[CaseSpec]:
    """Priority order: what the goals need first, so a time-budget cut loses the least."""
    every = method_names(method_patterns)
    core = _filter(every, CORE)
    plan: List[CaseSpec] = []
    # Tier A: the headline shape, every method, both input kinds, both group sizes.
    for layout, kind, objectives in (("dense", "random", None), ("rl-g8", "random", None),
                                     ("dense", "peaked", ["logp"]), ("rl-g8", "peaked", ["gift"]),
                                     ("rl-g16", "random", ["gift"])):
        plan.append(CaseSpec(HEADLINE, layout, kind, methods_for(layout, every, objectives)))
    # Tier B: the N sweep and the other vocabularies, core methods, random inputs.
    sweep = [Shape(n, h, v) for (h, v) in FULL_HV for n in FULL_NS]
    sweep = [s for s in sweep if s != HEADLINE]
    for s in sweep:
        plan.append(CaseSpec(s, "dense", "random", methods_for("dense", core, ["logp"])))
        plan.append(CaseSpec(s, "rl-g8", "random", methods_for("rl-g8", core, ["gift"]),
                             kinds=("fwd+bwd",)))
    # Tier C: peaked inputs and the other RL losses across the sweep.
    for s in sweep:
        plan.append(CaseSpec(s, "dense", "peaked", methods_for("dense", core, ["logp"]),
                             kinds=("fwd+bwd",)))
        plan.append(CaseSpec(s, "rl-g8", "random", methods_for("rl-g8", core, ["grpo", "dpo"]),
                             kinds=("fwd+bwd",)))
    return plan


# CPU mode: a small model's lm_head (H=896) at two vocabularies, float32.
CPU_SHAPES = (Shape(2048, 896, 32768), Shape(2048, 896, 151936))
CPU_DENSE = ["gemm", "naive+logp", "torch_lce_unchunked+logp", "torch_lce+logp", "gift_fast+logp",
             "torch_lce.sft", "gift_fast.fdiv_sft_loss"]
CPU_RL = ["gemm", "naive+gift", "gift_fast.gift_loss", "naive+grpo", "liger.grpo",
          "gift_fast.grpo_loss", "naive+dpo", "liger.dpo", "gift_fast.dpo_loss"]
CPU_BIG_V = ["gemm", "naive+logp", "torch_lce+logp", "gift_fast+logp"]


def cpu_plan(method_patterns=None, shapes=CPU_SHAPES) -> List[CaseSpec]:
    """fwd+bwd only; every ratio is to the bare GEMM timed round-robin with the others.
    ``shapes``: (the shape of the dense and RL cases, the large-vocabulary shape)."""
    allowed = set(method_names(method_patterns))
    pick = lambda names: [n for n in names if n in allowed]  # noqa: E731
    small, big = shapes
    return [CaseSpec(small, "dense", "random", pick(CPU_DENSE), kinds=("fwd+bwd",)),
            CaseSpec(small, "rl-g8", "random", pick(CPU_RL), kinds=("fwd+bwd",)),
            CaseSpec(big, "dense", "random", pick(CPU_BIG_V), kinds=("fwd+bwd",))]


def custom_plan(shapes, layouts, inputs, method_patterns, kinds) -> List[CaseSpec]:
    names = method_names(method_patterns)
    return [CaseSpec(s, lay, kind, methods_for(lay, names), kinds)
            for s in shapes for lay in layouts for kind in inputs]


# ------------------------------------------------------------------------------------ running

def _free_bytes(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free


def run_case(spec: CaseSpec, ctx: Context, *, deadline: float, repeats: dict, progress,
             seed: int = 0) -> dict:
    shape = spec.shape
    case = {"id": spec.case_id, "shape": {"n": shape.n, "h": shape.h, "v": shape.v},
            "inputs": spec.inputs, "results": []}
    try:
        layout = make_layout(spec.layout, shape.n)
        inp = make_inputs(shape, layout, spec.inputs, device=ctx.device, seed=seed,
                          dtype=ctx.dtype)
    except Exception as e:  # noqa: BLE001
        status = classify_exception(e, ctx.device)
        case["layout"] = {"name": spec.layout}
        case["status"] = f"inputs: {status}"
        for name in spec.methods:
            for kind in spec.kinds:
                case["results"].append(_result_row(name, kind, f"skipped: inputs {status}"))
                progress.update(1)
        return case
    case["layout"] = layout.to_json()
    case["layout"]["active_fraction"] = float(inp.mask.float().mean())
    case["mean_entropy"] = inp.mean_entropy
    case["status"] = "ok"
    big = shape.n * shape.v >= 8192 * 151936
    if ctx.interleave_repeats:
        _run_interleaved(spec, ctx, inp, case, deadline, progress)
        del inp
        gc.collect()
        return case
    for name in spec.methods:
        method = REGISTRY[name]
        for kind in spec.kinds:
            progress.set_postfix_str(f"{spec.case_id} {name} {kind}"[-70:])
            row = _result_row(name, kind, None)
            status = unavailable_reason(method, ctx)
            free = _free_bytes(ctx.device)
            need = method.estimate_bytes(shape)
            if status is None and free is not None and need > 0.9 * free:
                status = (f"skipped: would need ~{need / 2**30:.1f} GiB "
                          f"(free {free / 2**30:.1f} GiB)")
            if status is None and time.perf_counter() > deadline:
                status = "skipped: time budget of the sweep spent"
            if status is None:
                try:
                    fn = make_runner(method, inp, kind, ctx)
                    m = measure(fn, ctx.device, min_repeats=repeats["min"],
                                max_repeats=repeats["max_big"] if big else repeats["max"],
                                target_ms=repeats["target_ms"])
                    row.update(m.to_json())
                    status = "ok"
                except Exception as e:  # noqa: BLE001 - reported per method, never dropped
                    status = classify_exception(e, ctx.device)
                finally:
                    fn = None
                    if ctx.device.type == "cuda":   # gc is slow; only worth it for GPU memory
                        gc.collect()
                        torch.cuda.empty_cache()
            row["status"] = status
            case["results"].append(row)
            progress.update(1)
    del inp
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return case


def _run_interleaved(spec: CaseSpec, ctx: Context, inp, case: dict, deadline: float,
                     progress) -> None:
    """CPU mode: all methods of the case, repeats round-robin, minimum wall time kept."""
    for kind in spec.kinds:
        rows, fns = {}, {}
        for name in spec.methods:
            rows[name] = _result_row(name, kind, None)
            status = unavailable_reason(REGISTRY[name], ctx)
            if status is None and time.perf_counter() > deadline:
                status = "skipped: time budget of the sweep spent"
            if status is None:
                try:
                    fns[name] = make_runner(REGISTRY[name], inp, kind, ctx)
                except Exception as e:  # noqa: BLE001
                    status = classify_exception(e, ctx.device)
            rows[name]["status"] = status
        progress.set_postfix_str(f"{spec.case_id} {len(fns)} methods {kind} round-robin")
        for name, m in measure_interleaved_cpu(fns, ctx.interleave_repeats).items():
            if isinstance(m, Exception):
                rows[name]["status"] = classify_exception(m, ctx.device)
            else:
                rows[name].update(m.to_json())
                rows[name]["status"] = "ok"
        for name in spec.methods:
            case["results"].append(rows[name])
            progress.update(1)


def _result_row(name: str, kind: str, status: Optional[str]) -> dict:
    m = REGISTRY[name]
    return {"method": name, "kind": kind, "objective": m.objective, "engine": m.engine,
            "peer": m.peer, "note": m.note, "status": status, "median_ms": None,
            "peak_mem_bytes": None}


# --------------------------------------------------------------------------------- derived

def add_ratios(case: dict) -> None:
    """ratio_to_gemm / mem_ratio_to_gemm per result (same kind, same case)."""
    gemm = {r["kind"]: r for r in case["results"] if r["method"] == "gemm" and r["status"] == "ok"}
    for r in case["results"]:
        g = gemm.get(r["kind"])
        r["ratio_to_gemm"] = _ratio(r.get("median_ms"), g and g["median_ms"]) if r["status"] == "ok" else None
        r["mem_ratio_to_gemm"] = (_ratio(r.get("peak_mem_bytes"), g and g["peak_mem_bytes"])
                                  if r["status"] == "ok" else None)


def _ratio(a, b) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def comparisons(cases: List[dict]) -> List[dict]:
    """gift_fast against every peer path on the same objective, case and kind."""
    out = []
    for case in cases:
        by_name = {(r["method"], r["kind"]): r for r in case["results"]}
        for r in case["results"]:
            if not r["peer"]:
                continue
            ours_name = GIFT_FAST_FOR.get(r["objective"])
            ours = by_name.get((ours_name, r["kind"]))
            if ours is None:
                continue
            both = r["status"] == "ok" and ours["status"] == "ok"
            out.append({"case": case["id"], "kind": r["kind"], "objective": r["objective"],
                        "method": ours_name, "baseline": r["method"],
                        "method_status": ours["status"], "baseline_status": r["status"],
                        "speedup": _ratio(r["median_ms"], ours["median_ms"]) if both else None,
                        "mem_ratio": (_ratio(ours["peak_mem_bytes"], r["peak_mem_bytes"])
                                      if both else None)})
    return out


def _not_measured(is_perf: bool, mode: str, device: torch.device, value) -> Optional[str]:
    """Why a GPU goal has no verdict in this run (None when it has one)."""
    if device.type != "cuda":
        return (f"not measured: a GPU goal, and this {mode} run is on {device.type} "
                "(run bench/gpu_run.sh on a CUDA machine)")
    if not is_perf:
        return f"not measured: {mode} mode is not a performance run"
    if value is None:
        return "not measured: the cases this goal needs did not run (or failed) in this run"
    return None


def goals(cases: List[dict], is_perf: bool, mode: str = "full",
          device: torch.device = torch.device("cuda")) -> List[dict]:
    """The performance goals (GPU ones always, the CPU goal in ``--cpu`` mode), judged on whatever
    this run measured. A goal that this run cannot judge has ``met: None`` and a ``reason`` saying
    why."""
    def find(case_id, method, kind):
        for c in cases:
            if c["id"] == case_id:
                for r in c["results"]:
                    if r["method"] == method and r["kind"] == kind:
                        return r
        return None

    def verdict(goal: dict, value, ok) -> dict:
        reason = _not_measured(is_perf, mode, device, value)
        goal.update(value=value, met=None if reason else ok, reason=reason)
        return goal

    res = []
    hl = f"dense/random/N{HEADLINE.n}_H{HEADLINE.h}_V{HEADLINE.v}"
    r = find(hl, "gift_fast+logp", "fwd+bwd")
    val = r and r.get("ratio_to_gemm")
    res.append(verdict({"goal": "linear_logprobs dense fwd+bwd <= 1.5x bare GEMM at N=8192 "
                                "H=4096 V=151936", "case": hl, "target": 1.5},
                       val, val is not None and val <= 1.5))
    # gift_loss faster than every peer path (fwd+bwd), per RL case.
    per_case = []
    for c in cases:
        by = {(x["method"], x["kind"]): x for x in c["results"]}
        ours = by.get(("gift_fast.gift_loss", "fwd+bwd"))
        if ours is None:
            continue
        peers = [x for x in c["results"] if x["peer"] and x["objective"] == "gift"
                 and x["kind"] == "fwd+bwd" and x["status"] == "ok"]
        if ours["status"] != "ok" or not peers:
            per_case.append({"case": c["id"], "gift_loss_status": ours["status"],
                             "fastest_peer": None, "speedup_vs_fastest_peer": None})
            continue
        best = min(peers, key=lambda x: x["median_ms"])
        per_case.append({"case": c["id"], "gift_loss_status": "ok", "fastest_peer": best["method"],
                         "speedup_vs_fastest_peer": best["median_ms"] / ours["median_ms"]})
    sp = [p["speedup_vs_fastest_peer"] for p in per_case]
    val = min([s for s in sp if s is not None], default=None)
    goal = verdict({"goal": "gift_loss faster than every peer path on the same work (fwd+bwd)",
                    "target": 1.0, "per_case": per_case},
                   val, bool(sp) and all(s is not None and s > 1 for s in sp))
    res.append(goal)
    # Extra memory flat in V: scratch bytes (peak minus returned loss/dX/dW) of linear_logprobs.
    flat = []
    for c in cases:
        if not c["id"].startswith("dense/random/"):
            continue
        r = next((x for x in c["results"] if x["method"] == "gift_fast+logp"
                  and x["kind"] == "fwd+bwd" and x["status"] == "ok"), None)
        if r is not None and r.get("scratch_bytes") is not None:
            flat.append({"n": c["shape"]["n"], "h": c["shape"]["h"], "v": c["shape"]["v"],
                         "scratch_bytes": r["scratch_bytes"], "peak_mem_bytes": r["peak_mem_bytes"]})
    ratio = None
    for n in sorted({f["n"] for f in flat}):
        rows = [f for f in flat if f["n"] == n and f["h"] == 4096]
        if len(rows) >= 2:
            lo, hi = min(rows, key=lambda f: f["v"]), max(rows, key=lambda f: f["v"])
            if lo["scratch_bytes"]:
                ratio = max(ratio or 0.0, hi["scratch_bytes"] / lo["scratch_bytes"])
    res.append(verdict({"goal": "extra memory of linear_logprobs fwd+bwd flat in V (scratch "
                                "ratio across V=128256..151936 at H=4096, same N, <= 1.1)",
                        "target": 1.1, "points": flat}, ratio, ratio is not None and ratio <= 1.1))
    if mode == "cpu":
        res += cpu_goals(cases)
    return res


def cpu_goals(cases: List[dict]) -> List[dict]:
    """The CPU goal: the torch backend within 1.4x of the bare CPU GEMM fwd+bwd, per shape."""
    out = []
    shapes = [Shape(c["shape"]["n"], c["shape"]["h"], c["shape"]["v"]) for c in cases
              if c["id"].startswith("dense/random/")] or list(CPU_SHAPES)
    for shape in shapes:
        cid = f"dense/random/N{shape.n}_H{shape.h}_V{shape.v}"
        r = next((x for c in cases if c["id"] == cid for x in c["results"]
                  if x["method"] == "gift_fast+logp" and x["kind"] == "fwd+bwd"), None)
        val = r.get("ratio_to_gemm") if r else None
        out.append({"goal": f"torch backend (CPU) fwd+bwd <= 1.4x the bare CPU GEMM fwd+bwd at "
                            f"N={shape.n} H={shape.h} V={shape.v}, float32",
                    "case": cid, "target": 1.4, "value": val,
                    "met": None if val is None else val <= 1.4,
                    "reason": None if val is not None else
                    f"not measured: {'case not in this run' if r is None else r['status']}"})
    return out


# ------------------------------------------------------------------------------------ main

def _progress(total: int):
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
            return tqdm(total=total, unit="run", file=sys.stderr, mininterval=1.0)
        except ImportError:  # pragma: no cover
            pass

    class Plain:
        """One line per case on logs (a tqdm bar in a log file is unreadable)."""
        def __init__(self):
            self.n, self.t0, self.last = 0, time.perf_counter(), ""

        def update(self, k):
            self.n += k

        def set_postfix_str(self, s):
            case = s.split(" ")[0]
            if case != self.last:
                self.last = case
                print(f"[bench {time.perf_counter() - self.t0:6.0f} s] {self.n}/{total} {case}",
                      file=sys.stderr, flush=True)

        def close(self):
            print(f"[bench {time.perf_counter() - self.t0:6.0f} s] {self.n}/{total} done",
                  file=sys.stderr, flush=True)
    return Plain()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.run_suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="CPU smoke run, seconds (CI)")
    mode.add_argument("--cpu", action="store_true",
                      help="CPU numbers: float32 fwd+bwd at N=2048 H=896, V=32768 and 151936, "
                           "repeats round-robin, minimum kept (minutes on 2 cores)")
    mode.add_argument("--full", action="store_true", help="the GPU sweep (about 8 min on an H100)")
    p.add_argument("--shapes", help="comma list of NxHxV, e.g. 8192x4096x151936")
    p.add_argument("--layouts", default="dense,rl-g8", help="comma list: dense, rl-g8, rl-g16")
    p.add_argument("--inputs", default="random", help="comma list: random, peaked")
    p.add_argument("--methods", help="comma list of method names or fnmatch patterns")
    p.add_argument("--kinds", default="fwd,fwd+bwd", help="comma list: fwd, fwd+bwd")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default=None,
                   help="output folder (default bench/results/local/<mode>, git-ignored)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the timed sweep; later runs are reported as skipped")
    p.add_argument("--no-audit", action="store_true", help="skip the float64 error audit")
    p.add_argument("--audit-shape", default=None, help="NxHxV of the audit (small)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 1 in --smoke, every core in --cpu)")
    p.add_argument("--repeats", type=int, default=2,
                   help="--cpu: timed round-robin repeats per method, after one warm-up call")
    p.add_argument("--cases", default=None,
                   help="comma list of fnmatch patterns over case ids (layout/inputs/NxxHxxVxx): "
                        "run only the matching cases of the plan")
    p.add_argument("--list", action="store_true", help="list the methods and exit")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.list:
        for name, m in REGISTRY.items():
            print(f"{name:32s} {m.objective:5s} requires={','.join(m.requires) or '-':28s} {m.note}")
        return {}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke or args.cpu:
        device = torch.device(args.device or "cpu")
    if device.type == "cpu":
        # Smoke: 1 thread (thread spinning dominates tiny shapes on shared CPUs); --cpu: all cores.
        torch.set_num_threads(args.threads or (os.cpu_count() if args.cpu else 1))
    ctx = Context(device=device, smoke=args.smoke)
    patterns = [p.strip() for p in args.methods.split(",")] if args.methods else None

    if args.cpu:
        shapes = [Shape.parse(x) for x in args.shapes.split(",")] if args.shapes else CPU_SHAPES
        if len(shapes) != 2:
            raise SystemExit("--cpu --shapes: expected two shapes (small V, large V)")
        mode, plan = "cpu", cpu_plan(patterns, shapes)
        ctx.dtype = torch.float32
        ctx.interleave_repeats = max(1, args.repeats)
        budget = args.time_budget or 1e9
        repeats = {"interleaved": ctx.interleave_repeats, "statistic": "min of round-robin repeats"}
        audit_shape = Shape.parse(args.audit_shape or "32x16x128")
    elif args.smoke:
        mode, plan = "smoke", smoke_plan(patterns)
        budget = args.time_budget or 60.0
        repeats = {"min": 2, "max": 3, "max_big": 3, "target_ms": 5.0}
        audit_shape = Shape.parse(args.audit_shape or "32x16x128")
    elif args.full:
        mode, plan = "full", full_plan(patterns)
        budget = args.time_budget or 400.0
        repeats = {"min": 3, "max": 20, "max_big": 5, "target_ms": 300.0}
        audit_shape = Shape.parse(args.audit_shape or "1024x512x8192")
    else:
        if not args.shapes:
            raise SystemExit("give --smoke, --cpu, --full, or --shapes")
        mode = "custom"
        shapes = [Shape.parse(s) for s in args.shapes.split(",")]
        plan = custom_plan(shapes, args.layouts.split(","), args.inputs.split(","), patterns,
                           tuple(args.kinds.split(",")))
        budget = args.time_budget or 1e9
        cpu = device.type != "cuda"
        repeats = ({"min": 2, "max": 5, "max_big": 3, "target_ms": 50.0} if cpu else
                   {"min": 3, "max": 20, "max_big": 5, "target_ms": 300.0})
        audit_shape = Shape.parse(args.audit_shape or ("32x16x128" if cpu else "1024x512x8192"))
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",")]
        plan = [c for c in plan if any(fnmatch.fnmatchcase(c.case_id, w) for w in wanted)]
        if not plan:
            raise SystemExit(f"--cases: no case of the {mode} plan matches {wanted}")
    # Without --out, results go to bench/results/local/ (git-ignored); a result set meant to be
    # committed is named for its machine and date: bench/results/<machine>-<YYYYMMDD>/.
    out_dir = Path(args.out or f"bench/results/local/{mode}")
    out_dir.mkdir(parents=True, exist_ok=True)

    doc = report.new_document(mode, device, budget, repeats, dtype=ctx.dtype)
    if hasattr(os, "getloadavg"):
        doc["env"]["load_average_start"] = list(os.getloadavg())
    total = sum(len(c.methods) * len(c.kinds) for c in plan)
    print(f"[bench] {doc['label']}: {len(plan)} cases, {total} runs on {doc['env']['device']}; "
          f"budget {budget:.0f} s -> {out_dir}", file=sys.stderr, flush=True)
    t_start = time.perf_counter()
    deadline = t_start + budget
    progress = _progress(total)
    for spec in plan:
        case = run_case(spec, ctx, deadline=deadline, repeats=repeats, progress=progress)
        add_ratios(case)
        doc["cases"].append(case)
        report.write_json(doc, out_dir)          # partial results survive a killed run
    progress.close()
    doc["sweep_seconds"] = time.perf_counter() - t_start

    if not args.no_audit:
        names = [n for n in method_names(patterns) if n != "gemm"]
        names = [n for n in names if n in {m for c in plan for m in c.methods}]
        doc["audit"] = run_audit(audit_shape, names, ctx,
                                 kinds=("random",) if (args.smoke or args.cpu) else ("random", "peaked"))
    doc["comparisons"] = comparisons(doc["cases"])
    doc["goals"] = goals(doc["cases"], doc["is_performance_result"], mode, device)
    doc["total_seconds"] = time.perf_counter() - t_start
    if hasattr(os, "getloadavg"):        # other processes on the machine during the run
        doc["env"]["load_average_end"] = list(os.getloadavg())
    paths = report.write_all(doc, out_dir)
    print(report.summary_text(doc), flush=True)
    print(f"[bench] wrote {', '.join(str(p) for p in paths)}", file=sys.stderr, flush=True)
    return doc


def run_audit(shape: Shape, names: List[str], ctx: Context, kinds=("random", "peaked")) -> dict:
    """Every method against float64 on a small shape. The anchor / reference log-probs are drawn
    further from the current policy than in the timed cases (noise 0.5 instead of 0.02): GIFT's
    z-score of near-equal sequence log-ratios is ill-conditioned, and bf16 logit rounding would
    then dominate every method's error, the float64 path's own inputs included."""
    rows = []
    for kind in kinds:
        for layout_name in ("dense", "rl-g8"):
            try:
                layout = make_layout(layout_name, shape.n)
                inp = make_inputs(shape, layout, kind, device=ctx.device, seed=1,
                                  anchor_noise=0.5)
            except Exception as e:  # noqa: BLE001
                rows.append({"method": "*", "inputs": kind, "layout": layout_name,
                             "status": f"inputs: {classify_exception(e, ctx.device)}"})
                continue
            for name in methods_for(layout_name, names):
                method = REGISTRY[name]
                reason = unavailable_reason(method, ctx)
                if reason:
                    rows.append({"method": name, "objective": method.objective, "inputs": kind,
                                 "layout": layout_name, "status": reason, "rel_err_loss": None,
                                 "rel_err_dx": None, "rel_err_dw": None})
                    continue
                rows.append(audit_method(method, inp, ctx))
    return {"shape": {"n": shape.n, "h": shape.h, "v": shape.v}, "dtype": "bfloat16",
            "reference": "float64 materialised logits, same epilogue", "results": rows}


if __name__ == "__main__":
    main()
