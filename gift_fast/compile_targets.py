"""Compile every Triton kernel for real GPU targets, without a GPU, in the configs the code uses.

    python -m gift_fast.compile_targets            # fast subset: sm_90 + sm_80, bf16 + fp32
    python -m gift_fast.compile_targets --full     # every dtype, flag and shape, sm_80/90/100

The interpreter (TRITON_INTERPRET=1) never runs Triton's code generator, so it cannot see a
kernel that fails to compile, spills registers or needs more shared memory than a block may have.
This check closes that gap in three steps:

1. Record. The public ops (linear_logprobs forward + backward, the fused GIFT op, the one-pass
   token-local op) run on small CPU tensors under the interpreter, inside
   ``override_target(arch)`` so that every launcher picks the tile config of ``arch``. Each
   launch is intercepted and turned into the specialisation Triton would compile for it
   (argument types, constexprs, divisibility-by-16 attributes, num_warps, num_stages), using
   Triton's own binder. No config is copied by hand: a launcher's change is what gets checked.
2. Compile each distinct specialisation with ``triton.compile`` for ``GPUTarget("cuda", arch,
   32)`` down to a cubin (the ptxas inside the triton wheel), in worker processes without the
   interpreter, reading registers and spills from the ptxas log.
3. Judge: fail on a compile error, any spill, shared memory over the per-block limit, registers
   without headroom, or an ``@triton.jit`` function of ``gift_fast.kernels`` that no recorded
   launch reaches.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import io
import itertools
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List, Optional

# Per-target hardware limits used for the judgement and the blocks-per-SM estimate
# (CUDA programming guide, compute capability tables).
LIMITS = {
    80: dict(smem_per_block=163 * 1024, smem_per_sm=164 * 1024, threads_per_sm=2048),
    90: dict(smem_per_block=227 * 1024, smem_per_sm=228 * 1024, threads_per_sm=2048),
    100: dict(smem_per_block=227 * 1024, smem_per_sm=228 * 1024, threads_per_sm=2048),
}
REGS_PER_SM = 65536
MAX_BLOCKS_PER_SM = 32
# ptxas caps a thread at 255 registers; a kernel at the cap is one tile change away from
# spilling. Require this many registers of headroom.
MAX_REGISTERS = 240
FAST_ARCHS = (90, 80)
FULL_ARCHS = (80, 90, 100)
KERNEL_PACKAGE = "gift_fast.kernels"


# --------------------------------------------------------------------------------------------
# 1. Recording launches
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Spec:
    """One kernel specialisation for one target: what ``triton.compile`` gets."""
    kernel: str                 # "module:function"
    arch: int
    signature: tuple            # ((name, type), ...)
    constexprs: tuple           # ((path, value), ...)
    attrs: tuple                # ((path, ((attr, value), ...)), ...)
    num_warps: int
    num_stages: int

    def to_json(self) -> dict:
        return dict(kernel=self.kernel, arch=self.arch, signature=list(map(list, self.signature)),
                    constexprs=[[list(p), v] for p, v in self.constexprs],
                    attrs=[[list(p), [list(a) for a in v]] for p, v in self.attrs],
                    num_warps=self.num_warps, num_stages=self.num_stages)

    @staticmethod
    def from_json(d: dict) -> "Spec":
        return Spec(d["kernel"], d["arch"], tuple(tuple(x) for x in d["signature"]),
                    tuple((tuple(p), v) for p, v in d["constexprs"]),
                    tuple((tuple(p), tuple(tuple(a) for a in v)) for p, v in d["attrs"]),
                    d["num_warps"], d["num_stages"])

    @property
    def name(self) -> str:
        return self.kernel.split(":")[1]

    @property
    def dtype(self) -> str:
        """The element type of the first pointer argument (the kernel's input dtype)."""
        return next((t[1:] for _, t in self.signature if t.startswith("*")), "-")

    def flags(self) -> str:
        names = dict(self.signature)
        order = list(names)
        out = []
        for path, value in self.constexprs:
            arg = order[path[0]]
            if isinstance(value, bool):
                out.append(f"{arg}={int(value)}")
            elif arg.isupper() and not arg.startswith("BLOCK") and arg != "GROUP_M":
                out.append(f"{arg}={value}")
        return " ".join(out)

    def tiles(self) -> str:
        order = [n for n, _ in self.signature]
        vals = {order[p[0]]: v for p, v in self.constexprs}
        return "x".join(str(vals[k]) for k in order if k.startswith("BLOCK") and k in vals)


_BINDERS: Dict[tuple, tuple] = {}


def _specialise(fn, arch: int, args, kwargs) -> Spec:
    """The specialisation Triton's own binder derives from a launch's arguments for ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    key = (fn, arch)
    if key not in _BINDERS:
        jit = JITFunction(fn)
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _BINDERS[key] = (jit, backend,
                         create_function_from_signature(jit.signature, jit.params, backend))
    jit, backend, binder = _BINDERS[key]
    bound, specialization, options = binder(*args, **kwargs)
    # Triton's own packing (a private helper of JITFunction.run in Triton 3.9).
    _, signature, constexprs, attrs = jit._pack_args(backend, dict(kwargs), bound,
                                                      specialization, options)
    return Spec(
        kernel=f"{fn.__module__}:{fn.__name__}", arch=arch,
        signature=tuple(signature.items()),
        constexprs=tuple(sorted((tuple(p), v) for p, v in constexprs.items())),
        attrs=tuple(sorted((tuple(p), tuple(tuple(a) for a in v)) for p, v in attrs.items())),
        num_warps=int(kwargs.get("num_warps", 4)), num_stages=int(kwargs.get("num_stages", 3)))


@contextlib.contextmanager
def recording(arch: int, sink: List[Spec]):
    """Every kernel launch inside appends its specialisation for ``arch`` to ``sink`` and then
    runs under the interpreter, so data-dependent host code (row skipping) behaves as usual."""
    from triton.runtime.interpreter import InterpretedFunction

    from .kernels.target import override_target

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        sink.append(_specialise(self.fn, arch, args, kwargs))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        with override_target(arch):
            yield
    finally:
        InterpretedFunction.run = original


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: str
    bias: bool
    softcap: bool
    entropy: bool
    n: int
    v: int
    h: int
    chunk_rows: Optional[int]   # backward chunk of this many rows (odd sizes), None = default


def _cases(full: bool) -> List[Case]:
    """Aligned: every size a multiple of 16. Ragged: N, V and H not, odd backward chunks.
    All flags on is the most register-hungry case; the full matrix adds every combination."""
    aligned, ragged = (64, 256, 64, 32), (37, 301, 72, 13)
    if not full:
        return [Case(d, True, True, True, *shape) for d in ("bfloat16", "float32")
                for shape in (aligned, ragged)]
    out = [Case(d, b, s, e, *shape) for d in ("bfloat16", "float16", "float32")
           for b, s, e in itertools.product((False, True), repeat=3)
           for shape in (aligned, ragged)]
    # Edge shapes: a single row (N = 1 is specialised as a constant) and a vocabulary longer
    # than one forward split (so the combine kernel loops over splits).
    for d in ("bfloat16", "float16", "float32"):
        out.append(Case(d, False, False, False, 1, 301, 64, None))
        out.append(Case(d, True, True, True, 3, 0, 64, None))   # v = 0: set per target
    return out


def _vocab_for(case: Case) -> int:
    """``v == 0`` asks for a vocabulary of a bit more than one forward split of the target."""
    if case.v:
        return case.v
    import torch
    from .kernels.logprob_forward import forward_config
    from .kernels.target import launch_target
    split = forward_config(4096, case.h, getattr(torch, case.dtype),
                           launch_target(torch.empty(0)))["v_per_split"]
    return split + 17


@contextlib.contextmanager
def _backward_chunk_rows(rows: Optional[int], n: int, vocab: int, hidden: int,
                         element_size: int):
    """A memory budget under which the rows order of the triton backward takes chunks of about
    ``rows`` rows, and the vocab order still fits (all rows live, or some dead)."""
    from .backends import plan
    if rows is None:
        yield
        return
    budget = max(plan.recompute_extra_bytes(order, step, n, live, vocab, hidden, element_size,
                                            True, True, True)
                 for order, step in (("rows", rows), ("vocab", min(vocab, 256)))
                 for live in (n, n - 1))
    with plan.use_memory_budget(budget):
        yield


@contextlib.contextmanager
def _backward_order(order: str):
    """Forces one loop order of the triton backward (each has its own GEMM variants)."""
    from .backends import triton_op
    saved = triton_op.BACKWARD_ORDER
    triton_op.BACKWARD_ORDER = order
    try:
        yield
    finally:
        triton_op.BACKWARD_ORDER = saved


def _drive(case: Case, full: bool) -> None:
    """Runs the public ops on the triton backend for one case (launches are being recorded)."""
    import torch

    import gift_fast as gf
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(0)
    n, v, h = case.n, _vocab_for(case), case.h
    hidden = (torch.randn(n, h, generator=g) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype).requires_grad_()
    bias = (torch.randn(v, generator=g) * 0.1).to(dtype).requires_grad_() if case.bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -100
    kw = dict(bias=bias, softcap=30.0 if case.softcap else None, temperature=0.7,
              backend="triton")
    elt = torch.empty((), dtype=dtype).element_size()
    with _backward_chunk_rows(case.chunk_rows, n, v, h, elt):
        # Both loop orders of the backward (their dlogits buffers are row chunks or column
        # blocks: different strides), partial and all rows live.
        all_live = torch.randint(0, v, (n,), generator=g)
        runs = [(order, targets) for order in ("rows", "vocab")]
        if dtype != torch.float32:
            runs.append(("vocab", all_live))
        for order, tgt in runs:
            out = gf.linear_logprobs(hidden, weight, tgt, return_entropy=case.entropy, **kw)
            with _backward_order(order):
                if case.entropy:
                    logp, ent = out
                    (logp.sum() + 0.1 * ent.sum()).backward()
                else:
                    out.sum().backward()
        with torch.no_grad():       # inference path: forward only
            gf.linear_logprobs(hidden, weight, targets, return_entropy=case.entropy, **kw)
        # The losses below run the same forward/backward kernels with the entropy off (plus the
        # GIFT epilogue); they need the 8 sequences of ``cu``.
        if n < 34 or (full and case.entropy):
            return
        # Fused GIFT: sequences of unequal length, groups of 2 and 4, both std choices.
        cu = torch.tensor([0, 5, 9, 17, 20, 26, 30, 33, n])
        anchor = torch.randn(n, generator=g) - 3.0
        rewards = torch.randn(8, generator=g)
        for group, std, drop in ((2, "unbiased", False), (4, "biased", True)):
            if not full and group == 4:
                continue
            loss, _ = gf.gift_loss(hidden, weight, targets, anchor, rewards, group_size=group,
                                   cu_seqlens=cu, std=std, drop_uniform_groups=drop, **kw)
            loss.backward()
        # One-pass token-local losses.
        old = torch.randn(n, generator=g) - 3.0
        adv = torch.randn(8, generator=g)
        losses = [lambda: gf.grpo_loss(hidden, weight, targets, old, adv, cu_seqlens=cu, **kw)]
        if full:
            losses += [lambda: gf.fdiv_sft_loss(hidden, weight, targets, old, cu_seqlens=cu, **kw),
                       lambda: gf.dft_loss(hidden, weight, targets, cu_seqlens=cu, **kw)]
        for make in losses:
            loss, _ = make()
            loss.backward()


def record(archs: Iterable[int], full: bool) -> List[Spec]:
    """The distinct specialisations the launchers use for each target (needs the interpreter)."""
    from triton import knobs
    if not knobs.runtime.interpret:
        raise RuntimeError("recording drives the kernels on CPU tensors: set TRITON_INTERPRET=1 "
                           "before triton is imported")
    specs: Dict[Spec, None] = {}
    for arch in archs:
        for case in _cases(full):
            sink: List[Spec] = []
            with recording(arch, sink):
                _drive(case, full)
            specs.update(dict.fromkeys(sink))
    return list(specs)


def jit_functions() -> Dict[str, object]:
    """Every @triton.jit function defined in the modules of gift_fast.kernels, by "module:name"."""
    from triton.runtime.jit import KernelInterface
    package = importlib.import_module(KERNEL_PACKAGE)
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if isinstance(obj, KernelInterface) and fn is not None and fn.__module__ == module.__name__:
                found[f"{module.__name__}:{name}"] = obj
    return found


def unexercised(launched: Iterable[str]) -> List[str]:
    """@triton.jit functions neither launched nor called (transitively) from a launched kernel."""
    funcs = jit_functions()
    by_name = {}
    for key, obj in funcs.items():
        by_name.setdefault(key.split(":")[1], []).append(key)
    reached, todo = set(), [k for k in launched if k in funcs]
    while todo:
        key = todo.pop()
        if key in reached:
            continue
        reached.add(key)
        src = inspect.getsource(funcs[key].fn)
        for word in set(re.findall(r"\b(_?\w+)\s*\(", src)):
            todo.extend(by_name.get(word, []))
    return sorted(set(funcs) - reached)


# --------------------------------------------------------------------------------------------
# 2. Compiling (in worker processes without the interpreter)
# --------------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _mma(ptx: str) -> str:
    if "tcgen05.mma" in ptx:
        return "tcgen05"
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "FMA"


def compile_spec(spec: Spec, cubin_dir: Optional[str] = None) -> dict:
    """Compiles one specialisation to a cubin; returns its resources (or the error), and the
    path of the cubin when ``cubin_dir`` is given."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = spec.kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    src = ASTSource(fn=fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs),
                    attrs={p: [list(a) for a in v] for p, v in spec.attrs})

    def build():
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", spec.arch, 32),
                                    options=dict(num_warps=spec.num_warps,
                                                 num_stages=spec.num_stages))
        return kernel, log.getvalue()

    try:
        kernel, text = build()
        regs, spill = _PTXAS_REGS.search(text), _PTXAS_SPILL.search(text)
        saved = os.path.join(knobs.cache.dir, "gift_fast_ptxas", f"{kernel.hash}.log")
        if regs is None and os.path.exists(saved):
            # Triton's cache had the cubin (no ptxas run): use the log kept when it was built.
            with open(saved) as f:
                text = f.read()
        elif regs is None:
            with knobs.compilation.scope():
                knobs.compilation.always_compile = True
                kernel, text = build()
    except Exception as exc:   # noqa: BLE001 - any compile failure is a finding, reported as such
        return dict(error=f"{type(exc).__name__}: {exc}"[-2000:])
    regs, spill = _PTXAS_REGS.search(text), _PTXAS_SPILL.search(text)
    if regs is None or spill is None:
        return dict(error="no ptxas resource log (is TRITON_DUMP_PTXAS_LOG honoured?)\n" + text[-500:])
    os.makedirs(os.path.dirname(saved), exist_ok=True)
    with open(saved, "w") as f:
        f.write(text)
    ptx = kernel.asm["ptx"]
    out = dict(registers=int(regs.group(1)), stack=int(spill.group(1)),
               spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)),
               shared=int(kernel.metadata.shared), mma=_mma(ptx), tma="cp.async.bulk.tensor" in ptx)
    if cubin_dir is not None:
        path = os.path.join(cubin_dir, f"{kernel.hash}.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out["cubin"] = path
    return out


def _compile_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(TRITON_DUMP_PTXAS_LOG="1",
               TRITON_DEFAULT_FP_FUSION=env.get("TRITON_DEFAULT_FP_FUSION", "1"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def compile_all(specs: List[Spec], jobs: int, cubin_dir: Optional[str] = None) -> List[dict]:
    """Compiles ``specs`` in ``jobs`` worker processes (the interpreter must be off there)."""
    if not specs:
        return []
    if cubin_dir:
        os.makedirs(cubin_dir, exist_ok=True)
    jobs = max(1, min(jobs, len(specs)))
    with tempfile.TemporaryDirectory(prefix="gift_fast_compile_") as tmp:
        procs = []
        for j in range(jobs):
            shard = specs[j::jobs]
            inp, out = os.path.join(tmp, f"in{j}.json"), os.path.join(tmp, f"out{j}.json")
            with open(inp, "w") as f:
                json.dump([s.to_json() for s in shard], f)
            procs.append((j, out, subprocess.Popen(
                [sys.executable, "-m", "gift_fast.compile_targets", "--compile-worker", inp, out]
                + ([cubin_dir] if cubin_dir else []),
                env=_compile_env())))
        results: List[Optional[dict]] = [None] * len(specs)
        for j, out, proc in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"compile worker {j} exited with {proc.returncode}")
            with open(out) as f:
                for k, res in enumerate(json.load(f)):
                    results[j + k * jobs] = res
    return results


def _worker(inp: str, out: str, cubin_dir: Optional[str] = None) -> None:
    with open(inp) as f:
        specs = [Spec.from_json(d) for d in json.load(f)]
    with open(out, "w") as f:
        json.dump([compile_spec(s, cubin_dir) for s in specs], f)


# --------------------------------------------------------------------------------------------
# 3. Judging and reporting
# --------------------------------------------------------------------------------------------

def blocks_per_sm(arch: int, registers: int, shared: int, num_warps: int) -> int:
    """Resident blocks per SM from registers (allocated per warp in units of 256), shared memory
    (plus 1 KiB reserved per block) and threads."""
    lim = LIMITS[arch]
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = (REGS_PER_SM // per_warp) // num_warps if per_warp else MAX_BLOCKS_PER_SM
    by_smem = lim["smem_per_sm"] // (shared + 1024)
    by_threads = lim["threads_per_sm"] // (32 * num_warps)
    return min(by_regs, by_smem, by_threads, MAX_BLOCKS_PER_SM)


def problems(spec: Spec, res: dict) -> List[str]:
    if "error" in res:
        return [f"compile error: {res['error']}"]
    out = []
    if res["spill_stores"] or res["spill_loads"]:
        out.append(f"spills {res['spill_stores']} B stores / {res['spill_loads']} B loads")
    if res["registers"] > MAX_REGISTERS:
        out.append(f"{res['registers']} registers (> {MAX_REGISTERS}: no headroom)")
    if res["shared"] > LIMITS[spec.arch]["smem_per_block"]:
        out.append(f"{res['shared']} B shared memory > {LIMITS[spec.arch]['smem_per_block']} per block")
    return out


def table(specs: List[Spec], results: List[dict]) -> str:
    """One row per kernel, target and dtype: the worst case over its specialisations."""
    rows: Dict[tuple, dict] = {}
    for spec, res in zip(specs, results):
        key = (spec.name, spec.arch, spec.dtype, spec.num_warps, spec.num_stages, spec.tiles())
        r = rows.setdefault(key, dict(n=0, regs=0, spill=0, smem=0, mma=set(), blocks=None, err=0))
        r["n"] += 1
        if "error" in res:
            r["err"] += 1
            continue
        r["regs"] = max(r["regs"], res["registers"])
        r["spill"] = max(r["spill"], res["spill_stores"] + res["spill_loads"])
        r["smem"] = max(r["smem"], res["shared"])
        r["mma"].add(res["mma"])
        b = blocks_per_sm(spec.arch, res["registers"], res["shared"], spec.num_warps)
        r["blocks"] = b if r["blocks"] is None else min(r["blocks"], b)
    head = ("kernel", "sm", "dtype", "tiles", "warps", "stages", "configs", "regs", "spill B",
            "smem B", "mma", "blocks/SM", "errors")
    lines = [head]
    for (name, arch, dtype, warps, stages, tiles), r in sorted(rows.items()):
        lines.append((name, str(arch), dtype, tiles, str(warps), str(stages), str(r["n"]),
                      str(r["regs"]), str(r["spill"]), str(r["smem"]),
                      "/".join(sorted(r["mma"])) or "-", str(r["blocks"]), str(r["err"])))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [fmt(r) for r in lines[1:]])


@dataclasses.dataclass
class Report:
    specs: List[Spec]
    results: List[dict]
    failures: List[str]
    missing: List[str]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.missing


def check(archs: Iterable[int], full: bool, jobs: int = 2) -> Report:
    archs = list(archs)
    for arch in archs:
        if arch not in LIMITS:
            raise ValueError(f"arch: expected some of {sorted(LIMITS)}, got {arch}")
    specs = record(archs, full)
    results = compile_all(specs, jobs)
    failures = [f"{s.name} sm_{s.arch} {s.dtype} [{s.flags()}] warps={s.num_warps} "
                f"stages={s.num_stages}: {p}"
                for s, r in zip(specs, results) for p in problems(s, r)]
    missing = unexercised({s.kernel for s in specs})
    return Report(specs, results, failures, missing)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--compile-worker"]:
        _worker(*argv[1:4])
        return 0
    p = argparse.ArgumentParser(prog="python -m gift_fast.compile_targets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="every dtype, flag combination and shape, on sm_80, sm_90 and sm_100")
    p.add_argument("--arch", default=None, help="comma-separated capabilities, e.g. 80,90,100")
    p.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 4)))
    p.add_argument("--json", default=None, help="also write every spec and result to this file")
    p.add_argument("--record-only", default=None, metavar="FILE",
                   help="only record the specialisations (JSON) to FILE; compile nothing")
    args = p.parse_args(argv)
    from triton import knobs
    if not knobs.runtime.interpret:
        # Recording runs the kernels on CPU tensors: restart under the interpreter.
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "gift_fast.compile_targets", *argv], env=env)
    archs = [int(a) for a in args.arch.split(",")] if args.arch else \
        list(FULL_ARCHS if args.full else FAST_ARCHS)
    if args.record_only:
        with open(args.record_only, "w") as f:
            json.dump([s.to_json() for s in record(archs, args.full)], f)
        return 0
    report = check(archs, args.full, args.jobs)
    print(table(report.specs, report.results))
    tma = sum(1 for r in report.results if r.get("tma"))
    print(f"\n{len(report.specs)} specialisations compiled for sm_{', sm_'.join(map(str, archs))}; "
          f"{len(report.failures)} problems; {tma} use TMA.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(spec=s.to_json(), result=r)
                       for s, r in zip(report.specs, report.results)], f, indent=1)
    for line in report.failures:
        print("FAIL", line)
    for key in report.missing:
        print("FAIL no recorded launch reaches", key)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
