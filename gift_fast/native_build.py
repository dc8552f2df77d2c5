"""Ahead-of-time build of the kernels for the native library (driven by CMakeLists.txt).

    python -m gift_fast.native_build --arch "80;90" --set full --out build/generated

For each target it takes the specialisations the launchers really use (recorded exactly as
``gift_fast.compile_targets`` does), compiles each one to a cubin, applies the same judgement
(compile error, spill, shared memory, registers: any problem fails the build), and emits C with
Triton's AOT templates (``triton/tools/extra/cuda/compile.[ch]``) and Triton's linker
(``python -m triton.tools.link``), which writes one dispatcher per kernel and target. Outputs,
all under ``--out``:

    gift_fast_kernels.h           the C header: every dispatcher + the table of algorithms
    gift_fast_kernels_sm<A>.c     one translation unit per target (includes the generated C)
    <kernel>_sm<A>/               Triton's generated launchers and the linked dispatcher

The C entry point of kernel K on target A is Triton's linker's
``CUresult K_sm<A>(CUstream, <non-constexpr arguments>, int algo_id)``; ``algo_id`` picks the
dtype / flags / tiles (listed in ``gift_fast_kernels.h``), and within it the dispatcher picks the
most specialised variant whose divisibility hints hold. The grid is not baked in: call
``gift_fast_set_grid(x, y, z)`` (per thread) before the launch.
"""
from __future__ import annotations

import argparse
import binascii
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Tuple

from . import compile_targets as ct

GRID = ("gift_fast_grid[0]", "gift_fast_grid[1]", "gift_fast_grid[2]")
GRID_DECL = "extern _Thread_local unsigned int gift_fast_grid[3];\n"


def _cpp_type(ty: str) -> str:
    # Triton 3.9's ty_to_cpp maps fp32 to double: passed by address to cuLaunchKernel, a double
    # would be read as garbage by an f32 parameter, so scalars get their real width here.
    if ty.startswith("*"):
        return "CUdeviceptr"
    return {"i1": "int8_t", "i8": "int8_t", "i16": "int16_t", "i32": "int32_t", "i64": "int64_t",
            "u1": "uint8_t", "u8": "uint8_t", "u16": "uint16_t", "u32": "uint32_t",
            "u64": "uint64_t", "fp32": "float", "f32": "float", "fp64": "double"}[ty]


def _short(kernel: str) -> str:
    name = kernel.split(":")[1].strip("_")
    return name[:-len("_kernel")] if name.endswith("_kernel") else name


def _c_value(v) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


def emit_launcher(spec: ct.Spec, kernel, asm: bytes, shared: int,
                  out_dir: Path) -> Tuple[str, Path, str]:
    """Triton's AOT template for one compiled specialisation (as triton.tools.compile writes
    it): returns (algorithm name, header path, readable description)."""
    import triton
    from triton.runtime.jit import JITFunction
    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    names = [n for n, _ in spec.signature]
    declared = {p.name for p in jit.params if p.is_constexpr}
    constexprs = {names[p[0]]: v for p, v in spec.constexprs}
    divisible = {names[p[0]] for p, attrs in spec.attrs
                 if any(a[0] == "tt.divisibility" and a[1] == 16 for a in attrs)}
    sig_words, suffix = [], ""
    for i, (name, ty) in enumerate(spec.signature):
        if name in declared:
            sig_words.append(_c_value(constexprs[name]))
        elif name in constexprs:          # an int specialised because it equals 1
            sig_words.append("i32:1")
            suffix += f"{i}c"
        elif name in divisible:
            sig_words.append(f"{ty}:16")
            suffix += f"{i}d"
        else:
            sig_words.append(ty)
    meta = f"warps{spec.num_warps}xstages{spec.num_stages}"
    sig_hash = hashlib.sha256(" ".join(sig_words + [meta]).encode()).hexdigest()[:8]
    out_name = f"{_short(spec.kernel)}_sm{spec.arch}"
    func_name = "_".join([out_name, sig_hash, suffix])
    # algo_info names the algorithm: dtype, declared constexprs, warps and stages. Variants
    # that differ only in divisibility / unit hints share it and are dispatched at run time.
    algo = "x".join([spec.dtype] + [re.sub(r"\W", "", _c_value(constexprs[n]))
                                    for n in names if n in declared]) + f"_{meta}"
    full_args, args = [], []
    for name, ty in spec.signature:
        if name in declared:
            continue
        if name in constexprs:
            full_args.append(f"int32_t {name}")
        else:
            full_args.append(f"{_cpp_type(ty)} {name}")
            args.append((name, _cpp_type(ty)))
    hex_ = binascii.hexlify(asm).decode()
    doc = [f"{n}={constexprs[n]}" for n in names if n in declared]
    doc += [f"num_warps={spec.num_warps}", f"num_stages={spec.num_stages}", f"sm_{spec.arch}"]
    params = {
        "kernel_name": func_name,
        "triton_kernel_name": spec.name,
        "bin_size": len(asm),
        "bin_data": ", ".join(f"0x{hex_[i:i + 2]}" for i in range(0, len(hex_), 2)),
        "signature": ", ".join(f"{t} {n}" for n, t in args),
        "full_signature": ", ".join(full_args),
        "arg_pointers": ", ".join([f"&{n}" for n, _ in args] + ["&global_scratch",
                                                                "&profile_scratch"]),
        "num_args": len(args) + 2,
        "kernel_docstring": doc,
        "shared": shared,
        "num_warps": spec.num_warps,
        "algo_info": algo,
        "gridX": GRID[0], "gridY": GRID[1], "gridZ": GRID[2],
        "_placeholder": "",
        "warp_size": 32,
        "backend_name": "cuda",
    }
    templates = Path(triton.__file__).parent / "tools" / "extra" / "cuda"
    base = out_dir / out_name
    header = None
    for ext in ("c", "h"):
        text = (templates / f"compile.{ext}").read_text().format(**params)
        if ext == "c":
            text = GRID_DECL + text
        path = base.with_suffix(f".{sig_hash}_{suffix}.{ext}")
        path.write_text(text)
        header = path if ext == "h" else header
    return algo, header, f"{spec.dtype} " + " ".join(doc)


def record(archs: List[int], full: bool, out: Path) -> List[ct.Spec]:
    """The launchers' specialisations, recorded under the interpreter in a subprocess."""
    record_file = out / "specs.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    # --no-tma: Triton's AOT launcher template (emit_launcher) has no tensor-descriptor
    # arguments, so the C library ships the pre-TMA tiles on sm_90 / sm_100.
    subprocess.run([sys.executable, "-m", "gift_fast.compile_targets", "--record-only",
                    str(record_file), "--no-tma", "--arch", ",".join(map(str, archs))]
                   + (["--full"] if full else []), env=env, check=True)
    return [ct.Spec.from_json(d) for d in json.loads(record_file.read_text())]


def build(archs: List[int], full: bool, out: Path, jobs: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    return emit(archs, record(archs, full, out), out, jobs)


def emit(archs: List[int], specs: List[ct.Spec], out: Path, jobs: int) -> int:
    """Compiles and judges ``specs``, then writes the C sources and header into ``out``."""
    # Compile in workers (cubins written next to the results), judge like the checker.
    results = ct.compile_all(specs, jobs, cubin_dir=str(out / "cubin"))
    bad = [f"{s.name} sm_{s.arch} {s.dtype} [{s.flags()}]: {p}"
           for s, r in zip(specs, results) for p in ct.problems(s, r)]
    missing = ct.unexercised({s.kernel for s in specs})
    for line in bad:
        print("FAIL", line, file=sys.stderr)
    for key in missing:
        print("FAIL no recorded launch reaches", key, file=sys.stderr)
    if bad or missing:
        return 1
    groups: Dict[Tuple[str, int], List[Tuple[str, Path]]] = OrderedDict()
    described: Dict[str, str] = {}
    for spec, res in zip(specs, results):
        module, name = spec.kernel.split(":")
        kernel = getattr(importlib.import_module(module), name)
        gdir = out / f"{_short(spec.kernel)}_sm{spec.arch}"
        gdir.mkdir(exist_ok=True)
        asm = Path(res["cubin"]).read_bytes()
        algo, header, about = emit_launcher(spec, kernel, asm, res["shared"], gdir)
        groups.setdefault((_short(spec.kernel), spec.arch), []).append((algo, header))
        described[f"{_short(spec.kernel)}_sm{spec.arch}_{algo}"] = about
    # Triton's linker: one dispatcher per kernel and target, algorithms in first-seen order.
    unit = {arch: ["/* generated by gift_fast.native_build: do not edit */\n",
                   "#include <stdint.h>\n", "_Thread_local unsigned int gift_fast_grid[3];\n"]
            for arch in archs}
    api = ["/* gift_fast native kernels, generated by gift_fast.native_build. */\n",
           "#ifndef GIFT_FAST_KERNELS_H\n#define GIFT_FAST_KERNELS_H\n",
           "#include <cuda.h>\n#include <stdint.h>\n",
           "#ifdef __cplusplus\nextern \"C\" {\n#endif\n",
           "/* Grid of the next launch from this thread (each kernel's launcher computes it from\n"
           "   the problem size; see the Python launchers in gift_fast/kernels). */\n",
           "void gift_fast_set_grid(unsigned int x, unsigned int y, unsigned int z);\n",
           "typedef struct { const char *kernel; int arch; int (*num_algos)(void); }"
           " gift_fast_kernel_info;\n",
           "extern const gift_fast_kernel_info gift_fast_kernels[];\n",
           "extern const int gift_fast_num_kernels;\n"]
    api += [f"#define GIFT_FAST_SM{arch} 1\n" for arch in archs]
    n = 0
    for (short, arch), items in groups.items():
        gdir = out / f"{short}_sm{arch}"
        # Most specialised variants first within an algorithm, as the linker dispatches.
        headers = sorted({h for _, h in items}, key=lambda p: p.name)
        link = gdir / f"{short}_sm{arch}"
        subprocess.run([sys.executable, "-m", "triton.tools.link", *map(str, headers),
                        "-o", str(link)], check=True)
        algos = re.search(r"_kernels\[\] = \{(.*?)\};", link.with_suffix(".c").read_text(),
                          re.S).group(1).split()
        algos = [a.rstrip(",") for a in algos if a.strip(",")]
        for src in sorted(gdir.glob(f"{short}_sm{arch}.*_*.c")):
            n += 1
            unit[arch] += [f"#define gpuAssert gift_fast_gpu_assert_{n}\n",
                           f'#include "{src.relative_to(out)}"\n',
                           "#undef gpuAssert\n#undef CUDA_CHECK\n#undef CUBIN_NAME\n"]
        n += 1
        unit[arch] += [f"#define kernel_func_t gift_fast_kernel_func_{n}\n",
                       f'#include "{link.with_suffix(".c").relative_to(out)}"\n',
                       "#undef kernel_func_t\n"]
        api.append(f'#include "{link.with_suffix(".h").relative_to(out)}"\n')
        api.append(f"/* {short}_sm{arch}(stream, args..., algo_id), algo_id:\n")
        for i, a in enumerate(algos):
            api.append(f" *   {i}: {described[a]}\n")
        api.append(" */\n")
    table = "".join(f'  {{"{short}", {arch}, {short}_sm{arch}_get_num_algos}},\n'
                    for short, arch in groups)
    for arch in archs:
        if arch == archs[0]:
            unit[arch].append('#include "gift_fast_kernels.h"\n'
                              f"const gift_fast_kernel_info gift_fast_kernels[] = {{\n{table}}};\n"
                              f"const int gift_fast_num_kernels = {len(groups)};\n")
            unit[arch].append("void gift_fast_set_grid(unsigned int x, unsigned int y, "
                              "unsigned int z) { gift_fast_grid[0] = x; gift_fast_grid[1] = y; "
                              "gift_fast_grid[2] = z; }\n")
        else:
            unit[arch][2] = "extern _Thread_local unsigned int gift_fast_grid[3];\n"
        (out / f"gift_fast_kernels_sm{arch}.c").write_text("".join(unit[arch]))
    api.append("#ifdef __cplusplus\n}\n#endif\n#endif\n")
    (out / "gift_fast_kernels.h").write_text("".join(api))
    print(ct.table(specs, results))
    print(f"{len(specs)} kernels built for sm_{', sm_'.join(map(str, archs))} into {out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gift_fast.native_build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="80;90", help='capabilities, ";" or "," separated')
    p.add_argument("--set", choices=("full", "fast"), default="full",
                   help="full: every recorded configuration; fast: the CI subset")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 4)))
    args = p.parse_args(argv)
    archs = [int(a) for a in re.split(r"[;,]", args.arch) if a.strip()]
    return build(archs, args.set == "full", args.out.resolve(), args.jobs)


if __name__ == "__main__":
    sys.exit(main())
