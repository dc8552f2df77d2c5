"""Compile every Triton kernel for real GPU targets, without a GPU, in the configs the code uses.

    python -m gift_fast.compile_targets             # fast subset: sm_80/90/120, gfx942, gfx1100
    python -m gift_fast.compile_targets --arch all  # sm_75 ... sm_120, gfx90a ... gfx1100
    python -m gift_fast.compile_targets --full      # every dtype, flag and shape, sm_80/90/100

The interpreter (TRITON_INTERPRET=1) never runs Triton's code generator, so it cannot see a
kernel that fails to compile, spills registers or needs more shared memory than a block may have.
This check closes that gap in three steps:

1. Record. The public ops (linear_logprobs forward + backward, the fused GIFT op, the one-pass
   token-local op) run on small CPU tensors under the interpreter, inside
   ``override_target(arch)`` so that every launcher picks the tile config of ``arch``. Each
   launch is intercepted and turned into the specialisation Triton would compile for it
   (argument types, constexprs, divisibility-by-16 attributes, num_warps, num_stages), using
   Triton's own binder. No config is copied by hand: a launcher's change is what gets checked.
2. Compile each distinct specialisation with ``triton.compile`` for the target's ``GPUTarget``
   (a cubin with the wheel's ptxas; an AMD code object with its bundled AMD backend), in worker
   processes without the interpreter, reading registers and spills from the ptxas log (NVIDIA)
   or the code object's metadata (AMD).
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
from typing import Dict, Iterable, List, Optional, Union

# Per-target hardware limits for the judgement and the occupancy estimate, from the vendors'
# published tables. NVIDIA: CUDA C++ Programming Guide, "Technical Specifications per Compute
# Capability" (shared memory per SM / per block, resident threads and blocks per SM, 64 K 32-bit
# registers per SM, 255 registers per thread, 4 warp schedulers per SM). AMD: ROCm "AMD GPU
# specifications" table (rocm.docs.amd.com/en/latest/reference/gpu-specs.html: LDS per CU, 64 KiB
# on MI250/MI300, 160 KiB on MI355X, 128 KiB per WGP on RX 7900; VGPR file 512 KiB per CU on CDNA)
# and the CDNA2/CDNA3/CDNA4/RDNA3 ISA reference guides (4 SIMDs per CU or, for RDNA3 in WGP mode,
# per WGP; waves per SIMD: 8 on CDNA, 16 on RDNA3; VGPRs per lane: 512 arch+acc on CDNA, 256 on
# RDNA3; 1024 work-items per workgroup, 64 KiB of LDS per workgroup except 160 KiB on gfx950).
_NV = dict(regs_per_sm=65536, max_registers=255, schedulers=4, max_threads_per_block=1024)
_CDNA = dict(simds=4, max_waves_per_simd=8, max_registers=512, max_threads_per_block=1024,
             lds_per_cu=64 * 1024, lds_per_block=64 * 1024)
LIMITS = {
    "sm_75": dict(_NV, smem_per_block=64 * 1024, smem_per_sm=64 * 1024, threads_per_sm=1024,
                  blocks_per_sm=16),
    "sm_80": dict(_NV, smem_per_block=163 * 1024, smem_per_sm=164 * 1024, threads_per_sm=2048,
                  blocks_per_sm=32),
    "sm_86": dict(_NV, smem_per_block=99 * 1024, smem_per_sm=100 * 1024, threads_per_sm=1536,
                  blocks_per_sm=16),
    "sm_89": dict(_NV, smem_per_block=99 * 1024, smem_per_sm=100 * 1024, threads_per_sm=1536,
                  blocks_per_sm=24),
    "sm_90": dict(_NV, smem_per_block=227 * 1024, smem_per_sm=228 * 1024, threads_per_sm=2048,
                  blocks_per_sm=32),
    "sm_100": dict(_NV, smem_per_block=227 * 1024, smem_per_sm=228 * 1024, threads_per_sm=2048,
                   blocks_per_sm=32),
    "sm_120": dict(_NV, smem_per_block=99 * 1024, smem_per_sm=100 * 1024, threads_per_sm=1536,
                   blocks_per_sm=32),
    "gfx90a": dict(_CDNA),
    "gfx942": dict(_CDNA),
    "gfx950": dict(_CDNA, lds_per_cu=160 * 1024, lds_per_block=160 * 1024),
    "gfx1100": dict(simds=4, max_waves_per_simd=16, max_registers=256, max_threads_per_block=1024,
                    lds_per_cu=128 * 1024, lds_per_block=64 * 1024),
}
# A kernel within this many registers of its target's cap is one tile change away from
# spilling (ptxas caps a thread at 255: 240 is the NVIDIA bar).
REGISTER_HEADROOM = 15
FAST_ARCHS = ("80", "90", "120", "gfx942", "gfx1100")
FULL_ARCHS = ("80", "90", "100")     # --full without --arch: every case on these
ALL_ARCHS = ("75", "80", "86", "89", "90", "100", "120", "gfx90a", "gfx942", "gfx950", "gfx1100")
KERNEL_PACKAGE = "gift_fast.kernels"


# --------------------------------------------------------------------------------------------
# 1. Recording launches
# --------------------------------------------------------------------------------------------

# Kernels whose first pointer is not in the op's input dtype (the stored float16 logits of a
# 16-bit op): the argument that is (its D, written in the input dtype).
_DTYPE_ARG = {"_dlogits_from_logits_kernel": "D"}
# Elementwise kernels: no dot, so no MMA column of their own in the hardware table.
_NO_DOT = ("_gift_epilogue_kernel", "_combine_kernel", "_dlogits_from_logits_kernel")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One kernel specialisation for one target: what ``triton.compile`` gets."""
    kernel: str                 # "module:function"
    arch: Union[int, str]       # CUDA capability (90) or AMD gfx name ("gfx942")
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
    def target(self):
        from .kernels.target import target_of
        return target_of(self.arch)

    @property
    def dtype(self) -> str:
        """The op's input dtype: the element type of the first pointer argument, or of the
        argument ``_DTYPE_ARG`` names for kernels whose first pointer has another type."""
        names = dict(self.signature)
        arg = names.get(_DTYPE_ARG.get(self.name, ""), "")
        if arg.startswith("*"):
            return arg[1:]
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


def _specialise(fn, target, args, kwargs) -> Spec:
    """The specialisation Triton's own binder derives from a launch's arguments for ``target``
    (a kernels.target.Target: the AMD backends specialise differently from the NVIDIA one)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    key = (fn, target)
    if key not in _BINDERS:
        jit = JITFunction(fn)
        backend = make_backend(target.gpu_target())
        _BINDERS[key] = (jit, backend,
                         create_function_from_signature(jit.signature, jit.params, backend))
    jit, backend, binder = _BINDERS[key]
    bound, specialization, options = binder(*args, **kwargs)
    # Triton's own packing (a private helper of JITFunction.run in Triton 3.9).
    _, signature, constexprs, attrs = jit._pack_args(backend, dict(kwargs), bound,
                                                      specialization, options)
    return Spec(
        kernel=f"{fn.__module__}:{fn.__name__}", arch=target.arch,
        signature=tuple(signature.items()),
        constexprs=tuple(sorted((tuple(p), v) for p, v in constexprs.items())),
        attrs=tuple(sorted((tuple(p), tuple(tuple(a) for a in v)) for p, v in attrs.items())),
        num_warps=int(kwargs.get("num_warps", 4)), num_stages=int(kwargs.get("num_stages", 3)))


@contextlib.contextmanager
def recording(arch, sink: List[Spec]):
    """Every kernel launch inside appends its specialisation for ``arch`` to ``sink`` and then
    runs under the interpreter, so data-dependent host code (row skipping) behaves as usual."""
    from triton.runtime.interpreter import InterpretedFunction

    from .kernels.target import override_target, target_of

    original = InterpretedFunction.run
    target = target_of(arch)

    def run(self, *args, grid, warmup, **kwargs):
        sink.append(_specialise(self.fn, target, args, kwargs))
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


def record(archs: Iterable, full: bool) -> List[Spec]:
    """The distinct specialisations the launchers use for each target (needs the interpreter).
    A dtype declared unsupported on a target (kernels.configs.unsupported_reason) is skipped:
    the triton backend never launches it there."""
    from triton import knobs

    from .kernels.configs import unsupported_reason
    from .kernels.target import target_of
    if not knobs.runtime.interpret:
        raise RuntimeError("recording drives the kernels on CPU tensors: set TRITON_INTERPRET=1 "
                           "before triton is imported")
    import torch
    specs: Dict[Spec, None] = {}
    for arch in archs:
        for case in _cases(full):
            if unsupported_reason(target_of(arch), getattr(torch, case.dtype)):
                continue
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


def _mma(asm: str) -> str:
    """The matrix instruction a kernel's PTX or AMDGCN uses for its dots (FMA: none)."""
    for needle, name in (("tcgen05.mma", "tcgen05"), ("wgmma.mma_async", "wgmma"),
                         ("mma.sync", "mma.sync"), ("v_mfma", "MFMA"), ("v_wmma", "WMMA")):
        if needle in asm:
            return name
    return "FMA"


# The code object's metadata (amdhsa.kernels, emitted into the AMDGCN text by the backend).
_AMD_META = {key: re.compile(rf"\.{key}:\s+(\d+)") for key in (
    "vgpr_count", "agpr_count", "sgpr_count", "vgpr_spill_count", "sgpr_spill_count",
    "private_segment_fixed_size", "group_segment_fixed_size")}
_AMD_OCCUPANCY = re.compile(r"; Occupancy: (\d+)")


def _amd_resources(amdgcn: str) -> dict:
    meta = {}
    for key, pattern in _AMD_META.items():
        m = pattern.search(amdgcn)
        if m is None and key != "agpr_count":      # RDNA has no accumulation registers
            raise ValueError(f"no .{key} in the code object metadata")
        meta[key] = int(m.group(1)) if m else 0
    occ = _AMD_OCCUPANCY.search(amdgcn)
    return dict(vgprs=meta["vgpr_count"], agprs=meta["agpr_count"], sgprs=meta["sgpr_count"],
                registers=meta["vgpr_count"] + meta["agpr_count"],
                vgpr_spills=meta["vgpr_spill_count"], sgpr_spills=meta["sgpr_spill_count"],
                scratch=meta["private_segment_fixed_size"],
                static_lds=meta["group_segment_fixed_size"],
                waves_by_registers=int(occ.group(1)) if occ else None)


def _build(spec: Spec):
    import triton
    from triton.compiler import ASTSource

    module, name = spec.kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    src = ASTSource(fn=fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs),
                    attrs={p: [list(a) for a in v] for p, v in spec.attrs})
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=spec.target.gpu_target(),
                                options=dict(num_warps=spec.num_warps,
                                             num_stages=spec.num_stages))
    return kernel, log.getvalue()


def _compile_amd(spec: Spec, binary_dir: Optional[str]) -> dict:
    try:
        kernel, _ = _build(spec)
        out = _amd_resources(kernel.asm["amdgcn"])
    except Exception as exc:   # noqa: BLE001 - any compile failure is a finding, reported as such
        return dict(error=f"{type(exc).__name__}: {exc}"[-2000:])
    out.update(shared=int(kernel.metadata.shared), mma=_mma(kernel.asm["amdgcn"]), tma=False,
               spill_stores=out["scratch"], spill_loads=0)
    if binary_dir is not None:
        path = os.path.join(binary_dir, f"{kernel.hash}.hsaco")
        with open(path, "wb") as f:
            f.write(kernel.asm["hsaco"])
        out["binary"] = path
    return out


def compile_spec(spec: Spec, cubin_dir: Optional[str] = None) -> dict:
    """Compiles one specialisation to a cubin (NVIDIA) or code object (AMD); returns its
    resources (or the error), and the path of the binary when ``cubin_dir`` is given."""
    if spec.target.is_amd:
        return _compile_amd(spec, cubin_dir)
    from triton import knobs

    try:
        kernel, text = _build(spec)
        regs = _PTXAS_REGS.search(text)
        saved = os.path.join(knobs.cache.dir, "gift_fast_ptxas", f"{kernel.hash}.log")
        if regs is None and os.path.exists(saved):
            # Triton's cache had the cubin (no ptxas run): use the log kept when it was built.
            with open(saved) as f:
                text = f.read()
        elif regs is None:
            with knobs.compilation.scope():
                knobs.compilation.always_compile = True
                kernel, text = _build(spec)
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

def occupancy(spec: Spec, res: dict) -> tuple:
    """(resident blocks per SM or CU, resident warps per scheduler or waves per SIMD).

    NVIDIA: registers are allocated per warp in units of 256, 1 KiB of shared memory is reserved
    per block, and 4 schedulers share an SM. AMD: the compiler's waves-per-SIMD bound from
    VGPRs/AGPRs/SGPRs (``; Occupancy``), the LDS of a CU (of a WGP on RDNA3) and its SIMDs."""
    lim = LIMITS[spec.target.name]
    warps = spec.num_warps
    if spec.target.is_amd:
        simds = lim["simds"]
        waves = min(res["waves_by_registers"] or lim["max_waves_per_simd"],
                    lim["max_waves_per_simd"])
        by_waves = waves * simds // warps
        by_lds = lim["lds_per_cu"] // res["shared"] if res["shared"] else by_waves
        blocks = min(by_waves, by_lds)
        return blocks, blocks * warps / simds
    per_warp = -(-res["registers"] * 32 // 256) * 256
    by_regs = (lim["regs_per_sm"] // per_warp) // warps if per_warp else lim["blocks_per_sm"]
    by_smem = lim["smem_per_sm"] // (res["shared"] + 1024)
    by_threads = lim["threads_per_sm"] // (32 * warps)
    blocks = min(by_regs, by_smem, by_threads, lim["blocks_per_sm"])
    return blocks, blocks * warps / lim["schedulers"]


def spills(res: dict) -> int:
    """NVIDIA: spill bytes (stores + loads); AMD: spilled VGPRs + SGPRs + scratch bytes."""
    if "vgprs" in res:
        return res["vgpr_spills"] + res["sgpr_spills"] + res["scratch"]
    return res["spill_stores"] + res["spill_loads"]


def problems(spec: Spec, res: dict) -> List[str]:
    if "error" in res:
        return [f"compile error: {res['error']}"]
    lim = LIMITS[spec.target.name]
    out = []
    if "vgprs" in res:
        if res["vgpr_spills"] or res["sgpr_spills"] or res["scratch"]:
            out.append(f"spills {res['vgpr_spills']} VGPRs, {res['sgpr_spills']} SGPRs, "
                       f"{res['scratch']} B scratch")
    elif res["spill_stores"] or res["spill_loads"]:
        out.append(f"spills {res['spill_stores']} B stores / {res['spill_loads']} B loads")
    cap = lim["max_registers"]
    if res["registers"] > cap - REGISTER_HEADROOM:
        out.append(f"{res['registers']} registers (> {cap - REGISTER_HEADROOM}: no headroom "
                   f"below {cap})")
    per_block = lim.get("smem_per_block", lim.get("lds_per_block"))
    if res["shared"] > per_block:
        out.append(f"{res['shared']} B shared memory > {per_block} per block")
    elif occupancy(spec, res)[0] < 1:
        out.append("not one block fits an SM/CU")
    return out


def summarise(specs: List[Spec], results: List[dict]) -> List[dict]:
    """One row per kernel, target, dtype and launch config: the worst case over its
    specialisations. This is what ``--save`` stores and the tables render."""
    rows: Dict[tuple, dict] = {}
    for spec, res in zip(specs, results):
        key = (spec.name, spec.target.name, spec.dtype, spec.tiles(), spec.num_warps,
               spec.num_stages)
        r = rows.setdefault(key, dict(
            kernel=key[0], target=key[1], dtype=key[2], tiles=key[3], warps=key[4],
            stages=key[5], configs=0, errors=0, registers=0, sgprs=0, spills=0, shared=0,
            mma=[], tma=False, blocks=None, waves=None))
        r["configs"] += 1
        if "error" in res:
            r["errors"] += 1
            continue
        r["registers"] = max(r["registers"], res["registers"])
        r["sgprs"] = max(r["sgprs"], res.get("sgprs", 0))
        r["spills"] = max(r["spills"], spills(res))
        r["shared"] = max(r["shared"], res["shared"])
        r["mma"] = sorted(set(r["mma"]) | {res["mma"]})
        r["tma"] = r["tma"] or bool(res.get("tma"))
        blocks, waves = occupancy(spec, res)
        if r["blocks"] is None or blocks < r["blocks"]:
            r["blocks"], r["waves"] = blocks, waves
    order = {t: i for i, t in enumerate(_target_order())}
    return sorted(rows.values(), key=lambda r: (order.get(r["target"], 99), r["dtype"],
                                                r["kernel"], r["tiles"], r["warps"]))


def _target_order() -> List[str]:
    from .kernels.target import target_of
    return [target_of(a).name for a in ALL_ARCHS]


def _render(head, lines) -> str:
    widths = [max(len(row[i]) for row in [head] + lines) for i in range(len(head))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [fmt(r) for r in lines])


def _note(rows: List[dict]) -> str:
    """A hardware-table row's note: which kernels spill or fail, when any does."""
    bad = sorted({r["kernel"].strip("_") for r in rows if r["spills"] or r["errors"]})
    return ("compiled, not run; spills or errors in " + ", ".join(bad)) if bad else \
        "compiled, not run"


def _regs(r: dict) -> str:
    return f"{r['registers']}v/{r['sgprs']}s" if r["sgprs"] else str(r["registers"])


def render_rows(rows: List[dict]) -> str:
    """The detailed table: every kernel config on every target."""
    head = ("kernel", "target", "dtype", "tiles", "warps", "stages", "configs", "regs", "spills",
            "smem B", "mma", "tma", "blocks/SM", "waves/SIMD", "errors")
    lines = [(r["kernel"], r["target"], r["dtype"], r["tiles"], str(r["warps"]), str(r["stages"]),
              str(r["configs"]), _regs(r), str(r["spills"]), str(r["shared"]),
              "/".join(r["mma"]) or "-", "yes" if r["tma"] else "no", str(r["blocks"]),
              "-" if r["waves"] is None else f"{r['waves']:g}", str(r["errors"])) for r in rows]
    return _render(head, lines)


def table(specs: List[Spec], results: List[dict]) -> str:
    return render_rows(summarise(specs, results))


_DTYPES = ("bf16", "fp16", "fp32")


def render_markdown(rows: List[dict]) -> str:
    """The supported-hardware table (README): one line per target and dtype, from the rows of
    :func:`summarise` plus the declared unsupported (target, dtype) pairs."""
    import torch

    from .kernels.configs import unsupported_reason
    from .kernels.target import target_of
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    targets = [t for t in _target_order() if any(r["target"] == t for r in rows)]
    head = ("target", "family", "dtype", "backend", "MMA (dot kernels)", "max registers",
            "spills", "min occupancy (blocks/SM·CU, waves/SIMD)", "errors", "note")
    lines = []
    for name in targets:
        target = target_of(name.replace("sm_", ""))
        for dtype in _DTYPES:
            reason = unsupported_reason(target, names[dtype])
            if reason:
                lines.append((name, target.family, dtype, "torch", "-", "-", "-", "-", "-",
                              f"not run by triton: {reason}"))
                continue
            mine = [r for r in rows if r["target"] == name and r["dtype"] == dtype]
            if not mine:
                continue
            dots = [r for r in mine if r["kernel"] not in _NO_DOT]
            mma = sorted({m for r in dots for m in r["mma"]})
            worst = min((r for r in mine if r["blocks"] is not None),
                        key=lambda r: (r["blocks"], r["waves"]), default=None)
            top = max(mine, key=lambda r: r["registers"])
            lines.append((name, target.family, dtype, "triton", "/".join(mma) or "-", _regs(top),
                          str(max(r["spills"] for r in mine)),
                          "-" if worst is None else f"{worst['blocks']}, {worst['waves']:g}",
                          str(sum(r["errors"] for r in mine)), _note(mine)))
    return _render(head, lines)


@dataclasses.dataclass
class Report:
    specs: List[Spec]
    results: List[dict]
    failures: List[str]
    missing: List[str]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.missing


def parse_archs(text: str) -> list:
    """"75,80,gfx942" -> [75, 80, "gfx942"] (the Spec.arch of each target)."""
    from .kernels.target import target_of
    archs = []
    for word in text.split(","):
        if word.strip():
            target = target_of(word.strip())
            if target.name not in LIMITS:
                raise ValueError(f"arch: no hardware limits for {target.name}; "
                                 f"expected some of {sorted(LIMITS)}")
            archs.append(target.arch)
    return archs


def check(archs: Iterable, full: bool, jobs: int = 2) -> Report:
    archs = parse_archs(",".join(map(str, archs)))
    specs = record(archs, full)
    results = compile_all(specs, jobs)
    failures = [f"{s.name} {s.target.name} {s.dtype} [{s.flags()}] warps={s.num_warps} "
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
                   help="every dtype, flag combination and shape (default targets sm_80, sm_90, "
                        "sm_100)")
    p.add_argument("--arch", default=None,
                   help="comma-separated targets, e.g. 80,90,120,gfx942,gfx1100; 'all' for "
                        + ",".join(ALL_ARCHS))
    p.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 4)))
    p.add_argument("--json", default=None, help="also write every spec and result to this file")
    p.add_argument("--save", default=None, metavar="FILE",
                   help="write the summary rows (the detailed table) as JSON to FILE")
    p.add_argument("--markdown", action="store_true",
                   help="also print the supported-hardware table (README)")
    p.add_argument("--render", default=None, metavar="FILE",
                   help="print the supported-hardware table from rows saved by --save; compile "
                        "nothing")
    p.add_argument("--record-only", default=None, metavar="FILE",
                   help="only record the specialisations (JSON) to FILE; compile nothing")
    p.add_argument("--no-tma", action="store_true",
                   help="record the launchers with the pre-TMA tiles (kernels.configs.TMA_TILES "
                        "= False), as the native build does")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(render_markdown(json.load(f)))
        return 0
    from triton import knobs
    if not knobs.runtime.interpret:
        # Recording runs the kernels on CPU tensors: restart under the interpreter.
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "gift_fast.compile_targets", *argv], env=env)
    text = ",".join(ALL_ARCHS) if args.arch == "all" else args.arch
    archs = parse_archs(text) if text else \
        parse_archs(",".join(FULL_ARCHS if args.full else FAST_ARCHS))
    if args.no_tma:
        from .kernels import configs
        configs.TMA_TILES = False
    if args.record_only:
        with open(args.record_only, "w") as f:
            json.dump([s.to_json() for s in record(archs, args.full)], f)
        return 0
    report = check(archs, args.full, args.jobs)
    rows = summarise(report.specs, report.results)
    print(render_rows(rows))
    tma = sum(1 for r in report.results if r.get("tma"))
    names = ", ".join(sorted({s.target.name for s in report.specs}, key=_target_order().index))
    print(f"\n{len(report.specs)} specialisations compiled for {names}; "
          f"{len(report.failures)} problems; {tma} use TMA.")
    if args.markdown:
        print("\n" + render_markdown(rows))
    if args.save:
        with open(args.save, "w") as f:
            json.dump(rows, f, indent=0)
            f.write("\n")
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
