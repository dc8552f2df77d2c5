"""Outputs of a suite run: ``results.json`` (everything), ``results.md`` (tables), and two PNGs
(``time_vs_n.png``, ``mem_vs_n.png``: fwd+bwd time and peak memory against N per method).

The CPU smoke mode is a test, not a performance result: the markdown then shows ratios only, under
the label "CPU smoke (not a performance result)", and the JSON says ``is_performance_result:
false``. The ``--cpu`` mode is a CPU measurement (label ``CPU_MEASURED_LABEL``): times are the
minimum of round-robin repeats, every ratio is to the bare CPU GEMM of the same run, and the
machine (CPU model, cores, threads) is named; it says nothing about GPU speed.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import List, Optional

import torch

SCHEMA = "gift_fast.bench/1"
CPU_LABEL = "CPU smoke (not a performance result)"
CPU_MEASURED_LABEL = "CPU measurement (not a GPU result)"


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001
        return None


def _git(*args) -> Optional[str]:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def _driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return None


def environment(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    commit = os.environ.get("GIFT_FAST_COMMIT") or _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": (torch.cuda.get_device_name(device) if cuda else
                   f"CPU {_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "device_type": device.type,
        "driver": _driver() if cuda else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "gift_fast": _version("gift_fast"),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy") or _version("cut_cross_entropy"),
        "commit": commit,
        "tree_dirty": None if dirty is None else bool(dirty),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
    }


def new_document(mode: str, device: torch.device, budget: float, repeats: dict,
                 dtype: torch.dtype = torch.bfloat16) -> dict:
    gpu = device.type == "cuda"
    cpu_measured = mode == "cpu" and not gpu
    perf = gpu or cpu_measured
    if gpu:
        label, timing = f"{mode} on GPU", "CUDA events, median after warm-up"
    elif cpu_measured:
        label = CPU_MEASURED_LABEL
        timing = ("time.perf_counter, minimum of round-robin repeats after one warm-up call "
                  "(process CPU time kept too)")
    else:
        label, timing = CPU_LABEL, "time.perf_counter, median after warm-up (CPU smoke)"
    return {"schema": SCHEMA, "mode": mode,
            "label": label,
            "is_performance_result": perf,
            "env": environment(device),
            "config": {"dtype": str(dtype).replace("torch.", ""), "time_budget_s": budget,
                       "repeats": repeats, "timing": timing,
                       "memory": ("peak incremental: max_memory_allocated - allocated before"
                                  if gpu else "CPU resident-set high-water rise (approximate)")},
            "cases": [], "audit": None, "comparisons": [], "goals": []}


def write_json(doc: dict, out_dir: Path) -> Path:
    path = Path(out_dir) / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)
    return path


def write_all(doc: dict, out_dir: Path) -> List[Path]:
    out_dir = Path(out_dir)
    paths = [write_json(doc, out_dir)]
    md = out_dir / "results.md"
    md.write_text(markdown(doc))
    paths.append(md)
    paths += plots(doc, out_dir)
    return paths


# ------------------------------------------------------------------------------------ markdown

def _f(x, fmt="{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _mib(b) -> str:
    return "–" if b is None else f"{b / 2**20:.0f}"


def markdown(doc: dict) -> str:
    perf = doc["is_performance_result"]
    env = doc["env"]
    lines = [f"# gift_fast benchmark — {doc['label']}", ""]
    if not perf:
        lines += [f"**{CPU_LABEL}.** Tiny shapes on CPU check that the suite runs; only ratios "
                  "are shown, and they say nothing about GPU performance.", ""]
    elif env.get("device_type") == "cpu":
        lines += [f"**{CPU_MEASURED_LABEL}.** Every method ran in one process on the same "
                  "tensors, repeats round-robin; ms = the minimum wall time over the repeats, "
                  "×GEMM = that time / the bare CPU GEMM's. It says nothing about GPU speed.", ""]
    lines += [f"Device: {env['device']} · driver {env['driver']} · CUDA {env['cuda']} · torch "
              f"{env['torch']} · triton {env['triton']} · liger-kernel {env['liger_kernel']} · "
              f"cut-cross-entropy {env['cut_cross_entropy']} · commit "
              f"{(env['commit'] or '?')[:12]}{' (dirty)' if env['tree_dirty'] else ''} · "
              f"{env['date']}" + (f" · load average {env['load_average_start'][0]:.1f} at start, "
                                  f"{env.get('load_average_end', [float('nan')])[0]:.1f} at end"
                                  if env.get("load_average_start") else ""), "",
              f"Timing: {doc['config']['timing']}. Memory: {doc['config']['memory']}. dtype "
              f"{doc['config'].get('dtype', 'bfloat16')}. ×GEMM = time / the bare lm_head GEMM of the same kind (fwd: 1 GEMM; "
              f"fwd+bwd: logits, dX, dW = 3 GEMMs).", ""]
    if doc.get("goals"):
        lines += ["## Goals", "", "| goal | value | target | met |", "|---|---|---|---|"]
        for g in doc["goals"]:
            met = {True: "yes", False: "**no**"}.get(g["met"]) or g.get("reason") or "not measured"
            lines.append(f"| {g['goal']} | {_f(g['value'], '{:.3f}')} | {g['target']} | {met} |")
        lines.append("")
    for case in doc["cases"]:
        lines += _case_table(case, perf, doc.get("comparisons", []))
    audit = doc.get("audit")
    if audit:
        s = audit["shape"]
        lines += [f"## Error audit (N={s['n']} H={s['h']} V={s['v']}, {audit['dtype']}, vs "
                  f"{audit['reference']})", "",
                  "| method | layout | inputs | rel err loss | rel err dX | rel err dW | status |",
                  "|---|---|---|---|---|---|---|"]
        for r in audit["results"]:
            lines.append(f"| {r['method']} | {r.get('layout', '')} | {r['inputs']} | "
                         f"{_f(r.get('rel_err_loss'), '{:.1e}')} | {_f(r.get('rel_err_dx'), '{:.1e}')} | "
                         f"{_f(r.get('rel_err_dw'), '{:.1e}')} | {r['status']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def doc_is_cpu(case: dict) -> bool:
    """True for cases timed in the --cpu mode (minimum of round-robin repeats)."""
    return any(r.get("time_statistic") == "min" for r in case["results"])


def _case_table(case: dict, perf: bool, comps: List[dict]) -> List[str]:
    lay = case.get("layout", {})
    ent = case.get("mean_entropy")
    head = [f"## {case['id']}", "",
            f"layout {lay.get('name')} (B={lay.get('n_seq')}, T={lay.get('seq_len')}, G="
            f"{lay.get('group_size')}, active {_f(lay.get('active_fraction'), '{:.0%}')}), "
            f"{case['inputs']} inputs, mean entropy {_f(ent)} nats", ""]
    if case.get("status") != "ok":
        head += [f"Case not run: {case.get('status')}", ""]
    speed = {(c["baseline"], c["kind"]): c for c in comps if c["case"] == case["id"]}
    rows = {}
    for r in case["results"]:
        rows.setdefault(r["method"], {})[r["kind"]] = r
    cpu = perf and doc_is_cpu(case)
    if cpu:
        gemm = next((r for r in case["results"] if r["method"] == "gemm" and r["status"] == "ok"
                     and r.get("cpu_min_ms")), None)
        cols = ["method", "fwd+bwd min ms", "×GEMM", "median ms", "×GEMM (process CPU time)",
                "peak MiB", "gift_fast speed-up", "status"]
    elif perf:
        cols = ["method", "fwd ms", "fwd ×GEMM", "fwd+bwd ms", "fwd+bwd ×GEMM",
                "peak MiB (fwd+bwd)", "gift_fast speed-up", "gift_fast mem ratio", "status"]
    else:
        cols = ["method", "fwd ×GEMM", "fwd+bwd ×GEMM", "mem ×GEMM (fwd+bwd)",
                "gift_fast speed-up", "status"]
    out = head + ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, by_kind in rows.items():
        f, fb = by_kind.get("fwd", {}), by_kind.get("fwd+bwd", {})
        sp = speed.get((name, "fwd+bwd")) or speed.get((name, "fwd"))
        statuses = sorted({x["status"] for x in (f, fb) if x})
        status = "; ".join(s for s in statuses if s != "ok") or "ok"
        if cpu:
            cpu_ratio = (fb["cpu_min_ms"] / gemm["cpu_min_ms"]
                         if gemm and fb.get("cpu_min_ms") else None)
            cells = [name, _f(fb.get("median_ms"), "{:.0f}"), _f(fb.get("ratio_to_gemm")),
                     _f(fb.get("median_of_repeats_ms"), "{:.0f}"), _f(cpu_ratio),
                     _mib(fb.get("peak_mem_bytes")), _f(sp and sp["speedup"]), status]
        elif perf:
            cells = [name, _f(f.get("median_ms")), _f(f.get("ratio_to_gemm")),
                     _f(fb.get("median_ms")), _f(fb.get("ratio_to_gemm")),
                     _mib(fb.get("peak_mem_bytes")),
                     _f(sp and sp["speedup"]), _f(sp and sp["mem_ratio"]), status]
        else:
            cells = [name, _f(f.get("ratio_to_gemm")), _f(fb.get("ratio_to_gemm")),
                     _f(fb.get("mem_ratio_to_gemm")), _f(sp and sp["speedup"]), status]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


# --------------------------------------------------------------------------------------- plots

def plots(doc: dict, out_dir: Path) -> List[Path]:
    """time_vs_n.png and mem_vs_n.png: one panel per (layout, inputs, H, V), fwd+bwd, per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for case in doc["cases"]:
        s = case["shape"]
        key = (case.get("layout", {}).get("name"), case["inputs"], s["h"], s["v"])
        for r in case["results"]:
            if r["kind"] != "fwd+bwd" or r["status"] != "ok":
                continue
            groups.setdefault(key, {}).setdefault(r["method"], []).append(
                (s["n"], r["median_ms"], r["peak_mem_bytes"]))
    paths = [_ratio_bars(doc, out_dir, plt)]
    suffix = "" if doc["is_performance_result"] else f" — {CPU_LABEL}"
    for fname, idx, ylabel in (("time_vs_n.png", 1, "median ms (fwd+bwd)"),
                               ("mem_vs_n.png", 2, "peak incremental MiB (fwd+bwd)")):
        keys = sorted(groups, key=str) or [None]
        cols = min(3, len(keys))
        rows = (len(keys) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            if key is None:
                ax.text(0.5, 0.5, "no successful runs", ha="center")
                continue
            for method, pts in sorted(groups[key].items()):
                pts = sorted(p for p in pts if p[idx] is not None and p[idx] > 0)
                if not pts:
                    continue
                ys = [p[idx] if idx == 1 else p[idx] / 2**20 for p in pts]
                style = "-" if method.startswith(("gift_fast", "gemm")) else "--"
                ax.plot([p[0] for p in pts], ys, style, marker="o", ms=3, label=method)
            ax.set_title(f"{key[0]} / {key[1]} / H={key[2]} V={key[3]}", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N tokens")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle(f"gift_fast bench: {doc['env']['device']}{suffix}", fontsize=11)
        fig.tight_layout()
        path = Path(out_dir) / fname
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _ratio_bars(doc: dict, out_dir: Path, plt) -> Path:
    """ratios.png: fwd+bwd time / the bare GEMM's, one panel per case (what a sweep over one N
    cannot show on the time-vs-N plot)."""
    cases = [c for c in doc["cases"] if any(r["kind"] == "fwd+bwd" and r.get("ratio_to_gemm")
                                            for r in c["results"])]
    fig, axes = plt.subplots(max(1, len(cases)), 1, figsize=(8, 0.4 + 2.9 * max(1, len(cases))),
                             squeeze=False)
    for ax, case in zip(axes.flat, cases):
        rows = [r for r in case["results"] if r["kind"] == "fwd+bwd" and r.get("ratio_to_gemm")]
        names = [r["method"] for r in rows]
        vals = [r["ratio_to_gemm"] for r in rows]
        colors = ["tab:blue" if n.startswith(("gift_fast", "gemm")) else "tab:gray" for n in names]
        ax.barh(range(len(rows)), vals, color=colors)
        ax.set_yticks(range(len(rows)), names, fontsize=7)
        ax.invert_yaxis()
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=7)
        ax.axvline(1.0, color="k", lw=0.5)
        ax.set_title(case["id"], fontsize=9)
        ax.set_xlabel("fwd+bwd time / bare GEMM fwd+bwd (same run)", fontsize=8)
    if not cases:
        axes[0, 0].text(0.5, 0.5, "no successful runs", ha="center")
    fig.suptitle(f"gift_fast bench: {doc['env']['device']} — {doc['label']}", fontsize=9)
    fig.tight_layout()
    path = Path(out_dir) / "ratios.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summary_text(doc: dict) -> str:
    """A short table for the end of a log: per case and method the fwd+bwd ratio, then the goals."""
    perf = doc["is_performance_result"]
    lines = [f"== {doc['label']} on {doc['env']['device']} (sweep {doc.get('sweep_seconds', 0):.0f} s)"]
    for case in doc["cases"]:
        for r in case["results"]:
            if r["kind"] != "fwd+bwd":
                continue
            t = f"{r['median_ms']:.2f} ms " if (perf and r["median_ms"] is not None) else ""
            lines.append(f"{case['id']:38s} {r['method']:28s} {t}x{_f(r.get('ratio_to_gemm'))} "
                         f"{'' if r['status'] == 'ok' else r['status'][:60]}")
    for g in doc.get("goals", []):
        verdict = {True: "met", False: "NOT met"}.get(g["met"]) or g.get("reason") or "not measured"
        lines.append(f"GOAL {g['goal'][:70]}: value {_f(g['value'], '{:.3f}')} "
                     f"(target {g['target']}): {verdict}")
    return "\n".join(lines)
