"""Cost MODEL of gift_fast's Triton ops and of the peers' algorithms. A model, never a measurement:
every output (table, markdown, JSON) says so (MODEL_LABEL).

    python -m bench.model --n 8192 --h 4096 --v 151936             # markdown tables, bf16, all GPUs
    python -m bench.model --n 8192 --h 4096 --v 151936 --gpu h100 --live-frac 0.5 --json

What it computes, per kernel launch of each op: FLOPs (matrix-multiply FLOPs, on tensor cores for
bf16/fp16, FMA for fp32 since the kernels use ``input_precision="ieee"`` there), exponentials
(special-function unit), HBM bytes read and written, launches, host syncs. Predicted time of a
kernel = max(compute, memory) (a roofline), summed over kernels, plus launch and sync latency.

Launch configurations are read from the code, never copied: ``forward_config``, ``dlogits_config``,
and ``plan_backward`` (gift_fast/backends/triton_op.py, on gift_fast/backends/plan.py; budget
``MODEL_BUDGET``). The plain GEMMs (dX, dW) are cuBLAS, modelled with the tile ``CUBLAS_TILE``.
``_launch_configs`` is the one adapter between this model and those functions' signatures.

Published peak numbers (dense, no sparsity; NVIDIA datasheets):
  H100 SXM5: 989 TFLOP/s bf16/fp16 tensor, 67 TFLOP/s fp32 (non-tensor), 3.35 TB/s HBM3,
             132 SMs, 50 MB L2, 228 KB shared memory per SM, 1.98 GHz boost.
  H200 SXM:  989 TFLOP/s bf16/fp16 tensor, 67 TFLOP/s fp32, 4.8 TB/s HBM3e, 132 SMs, 50 MB L2,
             228 KB shared memory per SM, 1.98 GHz.
  A100 SXM4 80GB: 312 TFLOP/s bf16/fp16 tensor, 19.5 TFLOP/s fp32, 2.039 TB/s HBM2e, 108 SMs,
             40 MB L2, 164 KB shared memory per SM, 1.41 GHz.
  Exponentials: 16 per clock per SM (MUFU, 4 per SM sub-partition) on both architectures.

Assumptions, applied equally to gift_fast and to the peers:
  - GEMM-like work reaches ``EFF_MMA`` = 70% of the peak FLOP rate; HBM traffic reaches
    ``EFF_HBM`` = 80% of the peak bandwidth; exponentials run at the MUFU rate, serialised after
    the matrix work (no overlap: pessimistic for the kernels that have them, ours and Liger's).
  - Operand re-reads: a tiled kernel's programs run in waves of (SMs x blocks per SM); inside a
    wave each distinct operand strip (BLOCK_M x K of A, K x BLOCK_N of B) comes from HBM once
    (L2 shares it), nothing survives between waves. Blocks per SM follow from the tile's shared
    memory (num_stages x (BLOCK_M + BLOCK_N) x BLOCK_K x element size), the 64 warps per SM and a
    register estimate (accumulator tile / threads + 64 per thread). The peers' cuBLAS GEMMs are
    given the same tile traffic, ``CUBLAS_TILE`` (cuBLAS's real tiles are not public).
  - Launch latency ``LAUNCH_S`` = 4 us per kernel, a host sync ``SYNC_S`` = 20 us (the GPU idles
    while the host catches up). Small torch ops (masks, gathers, casts) are counted as memory-bound
    kernels.
  - Cut Cross-Entropy: autotuned tiles taken as BLOCK_B = BLOCK_V = 128; its lock-protected
    read-modify-write adds of dE / dC (in the input dtype) are counted as memory traffic at
    ``CCE_LOCK_BW_FACTOR`` = 2x HBM bandwidth (they mostly hit L2; no published L2 figure), and
    ``--cce-filtered`` (default 0) is the fraction of tiles its gradient filter skips, which
    depends on how peaked the model's softmax is (no skipping is CCE's worst case).
  - Liger's fused linear cross-entropy (liger-kernel 0.8): chunk = next_pow2(ceil(N / ceil(V/H)))
    rows, cuBLAS logits per chunk, gradients in the forward, dW accumulated by ``addmm`` in the
    weight dtype (read + written once per chunk), one ``.item()`` sync in the forward and one
    ``torch.equal(grad_output, 1)`` sync in the backward; it computes every row (no skipping).
  - Naive eager torch: logits in the input dtype, ``.float()``, ``log_softmax`` (two reads, one
    write), ``gather``; backward materialises each [N, V] gradient (float32) as autograd does.

Memory: "extra" is the peak scratch beyond the inputs and the gradients themselves (dX, dW), as
this code allocates it; the goal is at most 2*N*H bytes + 64 MiB, flat in V.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from dataclasses import asdict, dataclass, field

MODEL_LABEL = "COST MODEL (roofline, not a measurement; nothing here ran on a GPU)"
EFF_MMA = 0.70
EFF_HBM = 0.80
LAUNCH_S = 4e-6
SYNC_S = 20e-6
CCE_LOCK_BW_FACTOR = 2.0
CCE_TILE = 128
MIB = 1 << 20
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    tensor_flops: float       # dense bf16/fp16 tensor-core FLOP/s
    fp32_flops: float         # non-tensor fp32 FLOP/s
    hbm_bw: float             # bytes/s
    sms: int
    smem_per_sm: int          # bytes
    clock_hz: float
    capability: int           # compute capability x 10 (for the config functions)

    def mma_rate(self, dtype: str) -> float:
        return (self.fp32_flops if dtype == "fp32" else self.tensor_flops) * EFF_MMA

    @property
    def exp_rate(self) -> float:
        return 16 * self.sms * self.clock_hz


GPUS = {
    "h100": GPU("h100", "H100 SXM", 989e12, 67e12, 3.35e12, 132, 228 << 10, 1.98e9, 90),
    "h200": GPU("h200", "H200 SXM", 989e12, 67e12, 4.8e12, 132, 228 << 10, 1.98e9, 90),
    "a100": GPU("a100", "A100 SXM", 312e12, 19.5e12, 2.039e12, 108, 164 << 10, 1.41e9, 80),
}


# ------------------------------------------------------------------------------------------------
# The one adapter to the code's launch configurations.

def _call_config(fn, **available):
    """Calls a config function with the arguments it declares, from ``available``. A config
    function that gains a parameter this model does not know fails here, loudly: add it to
    ``available`` in :func:`_launch_configs`."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in available.items() if k in params})


# The tile the model gives every cuBLAS GEMM (ours and the peers'): a typical Hopper/Ampere
# 16-bit cuBLAS/CUTLASS tile; an assumption of the model, not a configuration of the code.
CUBLAS_TILE = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def MODEL_BUDGET(n: int, h: int) -> int:
    """The memory budget the model plans with: the issue's recompute goal, 4 N H + 128 MiB."""
    return 4 * n * h + (128 << 20)


def _launch_configs(V: int, H: int, dtype: str, gpu: GPU) -> dict:
    """The launch configurations the code uses on this GPU for these sizes: the config functions of
    gift_fast.kernels take the dtype, the target (a ``kernels.target.Target``, as the launchers get
    it) and whether every operand is 16-byte aligned (large aligned shapes are)."""
    import torch
    from gift_fast.kernels import logprob_backward, logprob_forward
    from gift_fast.kernels.target import target_of
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    available = dict(V=V, H=H, vocab=V, hidden=H, interpreted=False, dtype=torch_dtype,
                     capability=gpu.capability, cc=gpu.capability,
                     target=target_of(gpu.capability), aligned=True, element_size=DTYPE_BYTES[dtype])
    fwd = dict(_call_config(logprob_forward.forward_config, **available))
    fwd["v_per_split"] = math.ceil(fwd["v_per_split"] / fwd["BLOCK_V"]) * fwd["BLOCK_V"]
    return dict(forward=fwd,
                dlogits=dict(_call_config(logprob_backward.dlogits_config, **available)),
                matmul=dict(CUBLAS_TILE))


def _backward_plan(n_rows, n_live, V, H, dtype, budget=None, order=None, need_db=False):
    from gift_fast.backends import triton_op
    budget = MODEL_BUDGET(n_rows, H) if budget is None else budget
    return triton_op.plan_backward(n_rows, n_live, V, H, DTYPE_BYTES[dtype], need_dx=True,
                                   need_dw=True, need_db=need_db, order=order, budget=budget)


# ------------------------------------------------------------------------------------------------
# Kernels and their traffic.

@dataclass
class Kernel:
    name: str
    flops: float = 0.0          # matrix-multiply FLOPs
    exps: float = 0.0           # exponentials
    bytes_read: float = 0.0
    bytes_written: float = 0.0
    launches: int = 1
    syncs: int = 0
    lock_bytes: float = 0.0     # CCE's lock-protected adds (L2-mostly)
    note: str = ""

    def time(self, gpu: GPU, dtype: str) -> tuple[float, str]:
        compute = self.flops / gpu.mma_rate(dtype) + self.exps / gpu.exp_rate
        memory = ((self.bytes_read + self.bytes_written) / (gpu.hbm_bw * EFF_HBM)
                  + self.lock_bytes / (gpu.hbm_bw * EFF_HBM * CCE_LOCK_BW_FACTOR))
        bound = "compute" if compute >= memory else "memory"
        return max(compute, memory) + self.launches * LAUNCH_S + self.syncs * SYNC_S, bound


def _blocks_per_sm(cfg: dict, e: int, gpu: GPU, bm: str, bn: str, bk: str) -> int:
    threads = 32 * cfg["num_warps"]
    smem = cfg["num_stages"] * (cfg[bm] + cfg[bn]) * cfg[bk] * e
    regs = min(255, cfg[bm] * cfg[bn] // threads + 64)
    return max(1, min(gpu.smem_per_sm // max(1, smem), 64 // cfg["num_warps"],
                      65536 // (threads * regs)))


def tiled_operand_bytes(M, N, K, BM, BN, group_m, concurrent, ea, eb) -> float:
    """HBM bytes of A [M, K] and B [K, N] read by a tiled kernel whose programs walk the output
    tiles in grouped order (``group_m`` M-tiles fastest), ``concurrent`` programs at a time."""
    if min(M, N, K) <= 0:
        return 0.0
    tm, tn = math.ceil(M / BM), math.ceil(N / BN)
    programs = tm * tn
    gm = max(1, min(group_m, tm))
    c = max(1, min(concurrent, programs))
    if c <= gm * tn:
        dm, dn = min(gm, c), math.ceil(c / gm)
    else:
        dm, dn = min(tm, gm * math.ceil(c / (gm * tn))), tn
    a_strip, b_strip = min(BM, M) * K * ea, min(BN, N) * K * eb
    total = math.ceil(programs / c) * (dm * a_strip + dn * b_strip)
    compulsory = M * K * ea + N * K * eb
    return min(max(total, compulsory), programs * (a_strip + b_strip))


class Model:
    """All ops at one shape, dtype and live-row fraction, from the code's launch configurations."""

    def __init__(self, n, h, v, dtype="bf16", live_frac=1.0, cce_filtered=0.0, gpu=GPUS["h100"]):
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype: expected one of {list(DTYPE_BYTES)}, got {dtype!r}")
        if not 0.0 <= live_frac <= 1.0:
            raise ValueError(f"live_frac: expected a fraction in [0, 1], got {live_frac}")
        if min(n, h, v) < 1:
            raise ValueError(f"n, h, v: expected positive sizes, got {n}, {h}, {v}")
        self.n, self.h, self.v, self.dtype = n, h, v, dtype
        self.e = DTYPE_BYTES[dtype]
        self.live_frac, self.cce_filtered = live_frac, cce_filtered
        self.n_live = max(1, round(live_frac * n)) if live_frac > 0 else 0
        self.gpu = gpu          # the target whose configs/occupancy shape the traffic
        self.cfg = _launch_configs(v, h, dtype, gpu)

    # -- building blocks ------------------------------------------------------------------------
    def _concurrent(self, cfg, bm, bn, bk):
        return self.gpu.sms * _blocks_per_sm(cfg, self.e, self.gpu, bm, bn, bk)

    def gemm(self, name, M, N, K, out_bytes, accumulate=False, launches=1, ea=None, eb=None):
        """One cuBLAS GEMM (ours and the peers'): C[M, N] (+)= A[M, K] B[K, N]."""
        cfg = self.cfg["matmul"]
        ea = self.e if ea is None else ea
        eb = self.e if eb is None else eb
        conc = self._concurrent(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_K")
        read = tiled_operand_bytes(M, N, K, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["GROUP_M"], conc,
                                   ea, eb)
        if accumulate:
            read += M * N * out_bytes
        return Kernel(name, 2.0 * M * N * K * launches, 0, read * launches,
                      M * N * out_bytes * launches, launches)

    def dlogits(self, rows, cols, launches=1):
        cfg = self.cfg["dlogits"]
        conc = self._concurrent(cfg, "BLOCK_N", "BLOCK_V", "BLOCK_H")
        read = tiled_operand_bytes(rows, cols, self.h, cfg["BLOCK_N"], cfg["BLOCK_V"],
                                   math.ceil(rows / cfg["BLOCK_N"]), conc, self.e, self.e)
        read += rows * 16                                       # y, g, lse
        return Kernel("dlogits", 2.0 * rows * cols * self.h * launches, rows * cols * launches,
                      read * launches, rows * cols * self.e * launches, launches)

    @staticmethod
    def scaled(k: Kernel, times: int) -> Kernel:
        return Kernel(k.name, k.flops * times, k.exps * times, k.bytes_read * times,
                      k.bytes_written * times, k.launches * times, k.syncs * times,
                      k.lock_bytes * times, k.note)

    @staticmethod
    def torch_op(name, read, written, launches=1, syncs=0, exps=0.0, note=""):
        return Kernel(name, 0.0, exps, read, written, launches, syncs, note=note)

    # -- our ops ----------------------------------------------------------------------------------
    def forward_kernels(self, want_entropy=False):
        n, h, v, e = self.n, self.h, self.v, self.e
        cfg = self.cfg["forward"]
        n_split = math.ceil(v / cfg["v_per_split"])
        conc = self._concurrent(cfg, "BLOCK_N", "BLOCK_V", "BLOCK_H")
        read = tiled_operand_bytes(n, v, h, cfg["BLOCK_N"], cfg["v_per_split"],
                                   math.ceil(n / cfg["BLOCK_N"]), conc, e, e) + n * 8
        parts = n_split * n * 24                      # m, s, t, zy, best (fp32) + arg (int32)
        return [
            self.torch_op("targets -> kernel targets (torch)", n * 8, n * 8 + n, launches=2),
            Kernel("logprob_forward", 2.0 * n * h * v, n * v, read, parts, 1,
                   note=f"{n_split} vocabulary slices of {cfg['v_per_split']}"),
            Kernel("combine", 0.0, 2.0 * n * n_split, parts, n * (4 + 4 + 8 + 4 * want_entropy)),
            self.torch_op("logp = zy - lse (torch)", n * 9, n * 4, launches=2),
        ]

    def backward_kernels(self, n_live, plan):
        """The kernels ``triton_op.grad`` launches for this plan (order, step)."""
        n, h, v, e = self.n, self.h, self.v, self.e
        partial = n_live < n
        ks = [self.torch_op("live rows (mask, nonzero: host sync)", n * 8, n * 9, launches=3,
                            syncs=1)]
        if partial:
            ks.append(self.torch_op("gather y, g, lse of live rows", n_live * 32, n_live * 16,
                                    launches=3))
        if plan.order == "vocab":
            full, rest = divmod(v, plan.step)
            blocks = [(plan.step, full)] + ([(rest, 1)] if rest else [])
            if partial:
                ks.append(self.torch_op("gather x (live rows)", n_live * h * e, n_live * h * e))
            for cols, count in blocks:
                if not count:
                    continue
                ks.append(self.dlogits(n_live, cols, count))
                ks.append(self.gemm("dW[block] = D.T @ X (weight dtype)", cols, h, n_live, e,
                                    launches=count))
                ks.append(self.gemm("dX32 += D @ W[block]", n_live, h, cols, 4,
                                    accumulate=True, launches=count))
            # The first block writes the accumulator without reading it.
            ks.append(Kernel("(first dX block does not read dX32)", 0, 0, -n_live * h * 4, 0, 0))
            if e != 4 or partial:
                ks.append(self.torch_op("dX = dX32 (cast / scatter)", n_live * h * 4,
                                        n_live * h * e + (n * h * e if partial else 0),
                                        launches=2 if partial else 1))
        else:
            full, rest = divmod(n_live, plan.step)
            chunks = [(plan.step, full)] + ([(rest, 1)] if rest else [])
            ks.append(self.torch_op("zero dX, zero float32 dW", 0, n * h * e + v * h * 4, 2))
            for rows, count in chunks:
                if not count:
                    continue
                if partial:
                    ks.append(self.torch_op("gather x chunk", rows * h * e * count,
                                            rows * h * e * count, count))
                ks.append(self.dlogits(rows, v, count))
                ks.append(self.gemm("dX[chunk] = D @ W", rows, h, v, e, launches=count))
                if partial:
                    ks.append(self.torch_op("scatter dX chunk", rows * h * e * count,
                                            rows * h * e * count, count))
                ks.append(self.gemm("dW32 += D.T @ X (float32 read+write)", v, h, rows, 4,
                                    accumulate=True, launches=count))
            ks.append(self.torch_op("dW = dW32 (cast)", v * h * 4, v * h * e))
        return ks

    def _merge(self, kernels):
        """Same-named kernels summed (the table stays readable); order of first appearance."""
        out: dict[str, Kernel] = {}
        for k in kernels:
            if k.name.startswith("(first dX block"):
                target = next(x for x in out.values() if x.name.startswith("dX32 +="))
                target.bytes_read += k.bytes_read
                target.bytes_written += k.bytes_written
                continue
            if k.name in out:
                a = out[k.name]
                a.flops += k.flops; a.exps += k.exps; a.bytes_read += k.bytes_read
                a.bytes_written += k.bytes_written; a.launches += k.launches
                a.syncs += k.syncs; a.lock_bytes += k.lock_bytes
            else:
                out[k.name] = Kernel(**asdict(k))
        return list(out.values())

    def forward_extra(self, want_entropy=False):
        n_split = math.ceil(self.v / self.cfg["forward"]["v_per_split"])
        return n_split * self.n * 24 + self.n * (8 + 4 + 4 + 8 + 4 * want_entropy)

    def ops(self):
        n, h, v, e = self.n, self.h, self.v, self.e
        ops = []
        dt = self.dtype
        plan_all = _backward_plan(n, n, v, h, dt)
        plan_live = _backward_plan(n, self.n_live, v, h, dt) if self.n_live else None
        from gift_fast.backends.plan import recompute_extra_bytes

        def old_budget(live):        # the design at 3c51d40: rows order, 256 MiB chunk buffer
            return recompute_extra_bytes("rows", max(1, (256 << 20) // (v * e)), n, live, v, h, e)
        plan_old = _backward_plan(n, n, v, h, dt, budget=old_budget(n), order="rows")
        plan_old_live = (_backward_plan(n, self.n_live, v, h, dt, budget=old_budget(self.n_live),
                                        order="rows") if self.n_live else None)

        fwd = self.forward_kernels()
        ops.append(Op("linear_logprobs forward", "gift_fast", fwd, self.forward_extra()))
        for label, plan in (("", plan_all), (" [old: rows order, 256 MiB chunks]", plan_old)):
            ops.append(Op(f"linear_logprobs fwd+bwd{label}", "gift_fast",
                          fwd + self.backward_kernels(n, plan),
                          self.forward_extra() + plan.extra_bytes,
                          f"backward: {plan.order} order, step {plan.step}"))
        epilogue = [Kernel("gift_epilogue", 0, 0, n * (4 + 4 + 8) + n * 8, n * 4),
                    self.torch_op("loss = err.sum() / kept (torch)", n * 0 + 64, 64, launches=4)]
        for label, plan in (("", plan_live), (" [old: rows order, 256 MiB chunks]",
                                              plan_old_live)):
            bwd = self.backward_kernels(self.n_live, plan) if plan else []
            extra = self.forward_extra() + n * 4 + (plan.extra_bytes if plan else 0)
            ops.append(Op(f"GIFT two-phase fwd+bwd{label}", "gift_fast", fwd + epilogue + bwd,
                          extra, f"live rows {self.n_live}/{n}" + (
                              f"; backward: {plan.order} order, step {plan.step}" if plan else "")))
        # One-pass token-local: the backward runs inside the forward; backward scales by grad_out.
        onepass = fwd + [self.torch_op("epilogue + autograd on [N] (torch)", n * 16, n * 8, 6)]
        onepass += self.backward_kernels(self.n_live, plan_live) if plan_live else []
        onepass.append(self.torch_op("backward: dX, dW *= grad_output (torch, in place)",
                                     n * h * e + v * h * e, n * h * e + v * h * e, launches=2))
        ops.append(Op("one-pass token-local fwd+bwd", "gift_fast", onepass,
                      self.forward_extra() + (plan_live.extra_bytes if plan_live else 0),
                      f"live rows {self.n_live}/{n}; dX, dW computed in the forward"))
        ops += self.peer_ops()
        for op in ops:
            op.kernels = self._merge(op.kernels)
        return ops

    # -- peers ------------------------------------------------------------------------------------
    def peer_ops(self):
        n, h, v, e = self.n, self.h, self.v, self.e
        ops = []
        logits = self.gemm("logits = X @ W.T", n, v, h, e)
        bare_bwd = [self.gemm("dX = D @ W", n, h, v, e), self.gemm("dW = D.T @ X", v, h, n, e)]
        ops.append(Op("bare lm_head GEMM forward", "peer", [logits], n * v * e))
        ops.append(Op("bare lm_head GEMM fwd+bwd", "peer", [logits] + bare_bwd, 2 * n * v * e,
                      "3 GEMMs; the [N, V] logits and their gradient are given"))
        nv = n * v
        naive = [logits,
                 self.torch_op("logits.float()", nv * e, nv * 4),
                 self.torch_op("log_softmax (2 reads, 1 write)", 2 * nv * 4, nv * 4, exps=nv),
                 self.torch_op("gather target", n * 16, n * 4),
                 self.torch_op("gather backward (zeros + scatter)", n * 12, nv * 4, launches=2),
                 self.torch_op("log_softmax backward", 2 * nv * 4, nv * 4, exps=nv),
                 self.torch_op("float() backward (cast)", nv * 4, nv * e)] + bare_bwd
        ops.append(Op("naive eager (materialised logits)", "peer", naive,
                      nv * 4 * 3, "saved log_softmax + two float32 [N, V] gradients at peak"))
        # Liger chunked fused linear cross-entropy.
        chunk = min(n, 2 ** math.ceil(math.log2(math.ceil(n / math.ceil(v / h)))))
        full, rest = divmod(n, chunk)
        liger = [self.torch_op("target_mask.sum().item() (host sync)", n * 8, 8, syncs=1)]
        for rows, count in [(chunk, full)] + ([(rest, 1)] if rest else []):
            if not count:
                continue
            liger += [self.gemm("logits chunk = X_c @ W.T (cuBLAS)", rows, v, h, e, launches=count),
                      self.torch_op("cross-entropy kernel: loss + grad in place",
                                    2 * rows * v * e * count, rows * v * e * count, count,
                                    exps=2 * rows * v * count),
                      self.gemm("dX_c = G_c @ W (cuBLAS)", rows, h, v, e, launches=count),
                      self.gemm("dW += G_c.T @ X_c (addmm, weight dtype)", v, h, rows, e,
                                accumulate=True, launches=count)]
        liger.append(self.torch_op("backward: torch.equal(grad_output, 1) (host sync)", 4, 0,
                                   syncs=1))
        ops.append(Op("Liger fused linear CE", "peer", liger, chunk * v * e,
                      f"chunk {chunk} rows, {math.ceil(n / chunk)} chunks; "
                      "dW accumulated in the weight dtype"))
        # Cut Cross-Entropy.
        nl = self.n_live
        keep = 1.0 - self.cce_filtered
        tiles = math.ceil(nl / CCE_TILE) * math.ceil(v / CCE_TILE)
        cce = [self.torch_op("indexed dot (target logits)", nl * h * e * 2 + n * 8, nl * 4),
               Kernel("lse forward (1 GEMM-eq)", 2.0 * nl * h * v, nl * v,
                      tiled_operand_bytes(nl, v, h, CCE_TILE, CCE_TILE, math.ceil(nl / CCE_TILE),
                                          self.gpu.sms, e, e), nl * 4),
               Kernel("backward: recompute + dE, dC with lock adds",
                      2.0 * nl * h * v * (1 + 2 * keep),
                      nl * v, tiled_operand_bytes(nl, v, h, CCE_TILE, CCE_TILE,
                                                  math.ceil(nl / CCE_TILE), self.gpu.sms, e, e),
                      0, lock_bytes=tiles * keep * 2 * (2 * CCE_TILE * h * e),
                      note=f"{self.cce_filtered:.0%} of tiles filtered")]
        ops.append(Op("Cut Cross-Entropy", "peer", cce, nl * 20 + 2 * n * 4,
                      "dE, dC in the input dtype (the gradients); lock arrays"))
        return ops


@dataclass
class Op:
    name: str
    who: str
    kernels: list
    extra_bytes: float
    note: str = ""
    time_s: dict = field(default_factory=dict)
    kernel_times: dict = field(default_factory=dict)


def evaluate(n, h, v, dtype="bf16", live_frac=1.0, cce_filtered=0.0, gpus=("h100", "h200", "a100")):
    """Model every op on every GPU; returns the JSON-ready result (``kind`` = "model")."""
    gemm_eq = 2.0 * n * h * v
    result = dict(kind="model", label=MODEL_LABEL,
                  inputs=dict(n=n, h=h, v=v, dtype=dtype, live_frac=live_frac,
                              cce_filtered=cce_filtered),
                  assumptions=dict(eff_mma=EFF_MMA, eff_hbm=EFF_HBM, launch_s=LAUNCH_S,
                                   sync_s=SYNC_S, cce_lock_bw_factor=CCE_LOCK_BW_FACTOR,
                                   cce_tile=CCE_TILE),
                  gpus={k: asdict(GPUS[k]) for k in gpus}, configs={}, ops=[], goals=[])
    per_gpu = {}
    for key in gpus:
        model = Model(n, h, v, dtype, live_frac, cce_filtered, GPUS[key])
        result["configs"][key] = model.cfg
        per_gpu[key] = model.ops()
    memory_goal = 2 * n * h + 64 * MIB
    first = per_gpu[gpus[0]]
    for i, op in enumerate(first):
        times = {}
        kernels = []
        for key in gpus:
            o = per_gpu[key][i]
            times[key] = sum(k.time(GPUS[key], dtype)[0] for k in o.kernels)
        bare = {}
        for key in gpus:
            ref = next(o for o in per_gpu[key] if o.name == "bare lm_head GEMM fwd+bwd")
            bare[key] = sum(k.time(GPUS[key], dtype)[0] for k in ref.kernels)
        for k in op.kernels:
            kk = dict(name=k.name, flops=k.flops, exps=k.exps, bytes_read=k.bytes_read,
                      bytes_written=k.bytes_written, lock_bytes=k.lock_bytes,
                      launches=k.launches, host_syncs=k.syncs, note=k.note, time_s={}, bound={})
            for key in gpus:
                kg = next(x for x in per_gpu[key][i].kernels if x.name == k.name)
                kk["time_s"][key], kk["bound"][key] = kg.time(GPUS[key], dtype)
            kernels.append(kk)
        result["ops"].append(dict(
            name=op.name, who=op.who, note=op.note,
            flops=sum(k.flops for k in op.kernels),
            gemm_eq=sum(k.flops for k in op.kernels) / gemm_eq,
            bytes_read=sum(k.bytes_read for k in op.kernels),
            bytes_written=sum(k.bytes_written for k in op.kernels),
            host_syncs=sum(k.syncs for k in op.kernels),
            launches=sum(k.launches for k in op.kernels),
            extra_memory_bytes=op.extra_bytes, memory_goal_bytes=memory_goal,
            time_s=times, ratio_to_bare_gemm_fwd_bwd={k: times[k] / bare[k] for k in gpus},
            kernels=kernels))
    result["goals"] = _goals(n, h, v, dtype, live_frac, cce_filtered)
    return result


def _goals(n, h, v, dtype, live_frac, cce_filtered):
    """The design goals, judged on the H100 model at this shape."""
    h100 = GPUS["h100"]

    def run(nn, vv):
        ops = Model(nn, h, vv, dtype, live_frac, cce_filtered, h100).ops()
        by = {o.name: o for o in ops}
        t = {k: sum(x.time(h100, dtype)[0] for x in o.kernels) for k, o in by.items()}
        return by, t

    by, t = run(n, v)
    bare = t["bare lm_head GEMM fwd+bwd"]
    goal_mem = 2 * n * h + 64 * MIB
    by_2v, _ = run(n, 2 * v)
    goals = []
    for name, limit in (("linear_logprobs fwd+bwd", 1.5), ("GIFT two-phase fwd+bwd", 1.6)):
        r = t[name] / bare
        goals.append(dict(goal=f"{name} <= {limit}x bare GEMM fwd+bwd (H100)", value=r,
                          limit=limit, met=r <= limit))
        extra = by[name].extra_bytes
        goals.append(dict(goal=f"{name}: extra memory <= 2*N*H bytes + 64 MiB", value=extra,
                          limit=goal_mem, met=extra <= goal_mem))
        # Flat in V: doubling V may add only the forward's per-slice partials (N x 24 bytes per
        # vocabulary slice), bounded here by 5% of the memory goal.
        flat = by_2v[name].extra_bytes - extra
        goals.append(dict(goal=f"{name}: extra memory flat in V (V -> 2V adds <= 5% of the "
                               "memory goal)", value=flat, limit=goal_mem / 20,
                          met=flat <= goal_mem / 20))
    return goals


# ------------------------------------------------------------------------------------------------
# Output.

def _fmt_bytes(b):
    return f"{b / MIB:,.0f} MiB" if abs(b) < 10 * 1024 * MIB else f"{b / 2**30:,.1f} GiB"


def markdown(result) -> str:
    i = result["inputs"]
    gpus = list(result["gpus"])
    lines = [f"### {MODEL_LABEL}",
             "",
             f"N={i['n']}, H={i['h']}, V={i['v']}, {i['dtype']}, live rows {i['live_frac']:.0%}, "
             f"CCE tiles filtered {i['cce_filtered']:.0%}; GEMMs at {EFF_MMA:.0%} of peak, HBM at "
             f"{EFF_HBM:.0%} (assumptions in bench/model.py). Predicted times are model output.",
             "",
             "| op | GEMM-eq | HBM read+write | syncs | launches | "
             + " | ".join(f"{GPUS[g].name} model ms (x bare)" for g in gpus)
             + " | extra memory |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(gpus) + "---:|"]
    for op in result["ops"]:
        cells = [f"{op['time_s'][g] * 1e3:,.2f} ({op['ratio_to_bare_gemm_fwd_bwd'][g]:.2f}x)"
                 for g in gpus]
        lines.append(f"| {op['name']} | {op['gemm_eq']:.2f} | "
                     f"{_fmt_bytes(op['bytes_read'] + op['bytes_written'])} | {op['host_syncs']} | "
                     f"{op['launches']} | " + " | ".join(cells)
                     + f" | {_fmt_bytes(op['extra_memory_bytes'])} |")
    notes = [f"- {op['name']}: {op['note']}" for op in result["ops"] if op["note"]]
    lines += ["", "Notes:", ""] + notes
    lines += ["", "Goals (H100 model):", ""]
    for gl in result["goals"]:
        value = (f"{gl['value']:.2f}x" if "bare" in gl["goal"] else _fmt_bytes(gl["value"]))
        limit = (f"{gl['limit']:.2f}x" if "bare" in gl["goal"] else _fmt_bytes(gl["limit"]))
        lines.append(f"- {'MET' if gl['met'] else 'NOT MET'}: {gl['goal']}: model {value} "
                     f"(limit {limit})")
    return "\n".join(lines)


def kernel_markdown(result, gpu: str) -> str:
    lines = [f"### Per kernel, {GPUS[gpu].name} — {MODEL_LABEL}", "",
             "| op | kernel | TFLOP | exp (G) | HBM read | HBM written | launches | syncs | "
             "model ms | bound |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for op in result["ops"]:
        for k in op["kernels"]:
            lines.append(
                f"| {op['name']} | {k['name']} | {k['flops'] / 1e12:.2f} | {k['exps'] / 1e9:.2f} | "
                f"{_fmt_bytes(k['bytes_read'] + k['lock_bytes'])} | "
                f"{_fmt_bytes(k['bytes_written'])} | "
                f"{k['launches']} | {k['host_syncs']} | {k['time_s'][gpu] * 1e3:.3f} | "
                f"{k['bound'][gpu]} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8192, help="tokens (rows)")
    p.add_argument("--h", type=int, default=4096, help="hidden size")
    p.add_argument("--v", type=int, default=151936, help="vocabulary size")
    p.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bf16")
    p.add_argument("--gpu", choices=list(GPUS) + ["all"], default="all",
                   help="roofline tables: which GPUs; --predict: which one (all = h100)")
    p.add_argument("--live-frac", type=float, default=1.0,
                   help="fraction of rows with a gradient (GIFT, one-pass, CCE; e.g. 0.5 when "
                        "half the tokens are prompt)")
    p.add_argument("--cce-filtered", type=float, default=0.0,
                   help="fraction of CCE backward tiles skipped by its gradient filter")
    p.add_argument("--kernels", action="store_true", help="also print the per-kernel table")
    p.add_argument("--json", action="store_true", help="print the JSON result instead")
    cal = p.add_argument_group("calibrated model (bench/calibrated_model.py)")
    cal.add_argument("--validate", action="store_true",
                     help="model vs the published numbers; exit status 1 if one is off by more "
                          "than 15%%")
    cal.add_argument("--goals", action="store_true",
                     help="issue 17's goal table at r = 0.80 .. 1.00 (H100)")
    cal.add_argument("--predict", action="store_true",
                     help="model times for the shapes bench/gpu_run.sh measures (--gpu)")
    cal.add_argument("--compare", metavar="RESULTS_JSON",
                     help="a bench.run_suite results.json next to the model (--gpu-name)")
    cal.add_argument("--gpu-name", help="device name for --compare, e.g. h100-80gb-hbm3")
    a = p.parse_args(argv)
    if a.validate or a.goals or a.predict or a.compare:
        from . import calibrated_model
        name = a.gpu_name or ("h100" if a.gpu == "all" else a.gpu)
        a.gpu_key = calibrated_model.gpu_key_from_name(name)
        if a.gpu_key is None:
            print(f"bench.model: no model for the GPU {name!r} "
                  f"(models: {', '.join(calibrated_model.GPUS)})")
            return 0 if not a.validate else 1
        status = calibrated_model.main(a)
        if status:
            sys.exit(status)
        return status
    gpus = tuple(GPUS) if a.gpu == "all" else (a.gpu,)
    result = evaluate(a.n, a.h, a.v, a.dtype, a.live_frac, a.cce_filtered, gpus)
    if a.json:
        json.dump(result, sys.stdout, indent=1)
        print()
        return result
    print(markdown(result))
    if a.kernels:
        for g in gpus:
            print()
            print(kernel_markdown(result, g))
    return result


if __name__ == "__main__":
    main()
