"""Calibrated cost model: GPU time of gift_fast's plans and of the peers, in units anchored to a
measured bare cuBLAS GEMM, with our Triton kernels' efficiency an explicit parameter ``r``.
A model, never a measurement: nothing here ran on a GPU.

    python -m bench.model --validate      # model vs every published number it can express
    python -m bench.model --goals         # issue 17's goal table, pass/fail at every r
    python -m bench.model --predict --gpu h100      # the shapes bench/gpu_run.sh measures
    python -m bench.model --compare RESULTS.json --gpu-name h100-80gb-hbm3   # measured vs model

Units and assumptions (the same for gift_fast and the peers):
  - One GEMM of M x N x K costs max(2 M N K / (peak * eff), operand bytes / HBM) for its main
    loop, plus its output (read + written when it accumulates) at HBM speed: the epilogue of a
    tile runs after its K loop, so it is not hidden when K is short (Liger's dW per chunk).
  - ``eff`` (cuBLAS main-loop efficiency) per GPU is solved from a bare-GEMM anchor: the
    published lm_head fwd+bwd (3 GEMMs) time on that GPU. H100: TRL #7244 (42 ms at N=8192,
    H=4096, V=151936, bf16). No bare anchor is published for H200 or A100: H200 (the same GH100
    die and clocks as H100) and A100 take H100's efficiency, an assumption the validation
    table tests (Liger's H200 sweep, CCE's A100 baselines).
  - Our Triton kernels (forward logits GEMM with its online log-sum-exp, the dlogits recompute)
    run at ``r`` times cuBLAS's rate, epilogue included; a peer's fused Triton kernel likewise
    at its own ``r``. Published fused kernels reach r = 0.84 (CCE forward, A100) to 0.96 (Liger
    CuTe, H100; see ``implied_r_liger_cute``).
  - Memory-bound passes (casts, softmax, the loss gradient formed from stored logits) move
    their bytes at ``EFF_HBM`` of the HBM bandwidth; every launch costs ``LAUNCH_S``, every host
    sync ``SYNC_S``.

The plans of gift_fast (issue 17, item 2) are timed by separate functions, written from the
issue's text and the backends' code: ``forward_only``, ``token_local_stream``,
``two_phase_keep``, ``two_phase_recompute``. Their chunk / block widths and extra bytes come from
the library's planner (gift_fast/backends/plan.py, with the triton backend's stored-logits
layout ``triton_op.stream_store``): ``stream_plan``, ``recompute_cols``, ``keep_extra_bytes``
call it, so the model times the plan the library would run (tests/test_cost_model.py checks
that they agree).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from gift_fast.backends import plan as planner

MODEL_LABEL = "CALIBRATED COST MODEL (not a measurement; nothing here ran on a GPU)"
EFF_HBM = 0.80
LAUNCH_S = 4e-6
SYNC_S = 20e-6
R_VALUES = (0.80, 0.85, 0.90, 0.95, 1.00)
TOLERANCE = 0.15            # --validate fails when |model / published - 1| exceeds this
MIB, GIB = 1 << 20, 1 << 30
PER_ROW_BYTES = 32          # per-row ids, targets, g, lse ... (gift_fast's planner)


# ---------------------------------------------------------------------------------------------
# GPUs and their calibration.

@dataclass(frozen=True)
class Anchor:
    source: str
    n: int
    h: int
    v: int
    ms: float               # bare lm_head GEMM fwd+bwd (logits, dX, dW), bf16


TRL_7244_BARE = Anchor("TRL #7244 (H100, bf16)", 8192, 4096, 151936, 42.0)


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    tensor_flops: float     # dense bf16 tensor-core peak, FLOP/s (datasheet)
    hbm_bw: float           # bytes/s (datasheet)
    anchor_gpu: str         # the GPU whose bare-GEMM anchor gives this one's efficiency
    anchor: Anchor
    note: str = ""


def _datasheet(key: str, anchor_gpu: str, note: str = "") -> GPU:
    """Peaks from the datasheet table of bench/model.py (one copy of them)."""
    from .model import GPUS as DATASHEETS
    d = DATASHEETS[key]
    return GPU(key, d.name, d.tensor_flops, d.hbm_bw, anchor_gpu, TRL_7244_BARE, note)


GPUS = {
    "h100": _datasheet("h100", "h100"),
    "h200": _datasheet("h200", "h100",
                       "no published bare anchor: H100's efficiency (same die and clocks)"),
    "a100": _datasheet("a100", "h100", "no published bare anchor: H100's efficiency (tested "
                                       "by CCE's A100 baselines)"),
}


def cublas_efficiency(gpu_key: str) -> float:
    """Main-loop efficiency of cuBLAS on ``gpu_key``: the one value that makes the bare GEMM
    fwd+bwd of the anchor GPU take the anchor's published time."""
    gpu = GPUS[gpu_key]
    ref = GPUS[gpu.anchor_gpu]
    a = ref.anchor
    ops = bare_gemm_fwd_bwd(Shape(a.n, a.h, a.v, 2), eff=1.0, gpu=ref)
    # time = flops / (peak * eff) + the rest (epilogues, launches): solve for eff
    fixed = sum(p.fixed_s for p in ops)
    flops = sum(p.flops for p in ops)
    return flops / (ref.tensor_flops * (a.ms * 1e-3 - fixed))


# ---------------------------------------------------------------------------------------------
# Pieces of work.

@dataclass(frozen=True)
class Shape:
    n: int
    h: int
    v: int
    e: int = 2              # bytes per input element (bf16)

    @property
    def gemm_eq_flops(self) -> float:
        return 2.0 * self.n * self.h * self.v


@dataclass
class Piece:
    """One kernel (or ``launches`` identical ones). ``engine``: "cublas", "ours" (our Triton at
    ``r``), "peer_triton" (a peer's fused Triton kernel at its own r) or "memory" (bandwidth)."""
    name: str
    engine: str
    flops: float = 0.0          # matrix FLOPs of the main loop
    operand_bytes: float = 0.0  # read by the main loop
    epilogue_bytes: float = 0.0 # written (and read back when accumulating) after it
    launches: int = 1
    syncs: int = 0
    rate: float = 0.0           # FLOP/s at r = 1 (filled by the plan functions)
    bw: float = 0.0             # bytes/s

    @property
    def fixed_s(self) -> float:
        """The part that does not depend on the FLOP rate (calibration)."""
        return (self.epilogue_bytes / self.bw if self.bw else 0.0) + \
            self.launches * LAUNCH_S + self.syncs * SYNC_S

    def time(self, r: float = 1.0, r_peer: float = 1.0) -> float:
        scale = r if self.engine == "ours" else r_peer if self.engine == "peer_triton" else 1.0
        main = max(self.flops / (self.rate * scale) if self.flops else 0.0,
                   self.operand_bytes / self.bw if self.bw else 0.0)
        return main + self.fixed_s


def _gpu_rates(gpu: GPU, eff: float) -> Tuple[float, float]:
    return gpu.tensor_flops * eff, gpu.hbm_bw * EFF_HBM


def gemm(name, M, N, K, e_in, e_out, *, engine="cublas", accumulate=False, launches=1,
         gpu: GPU, eff: float) -> Piece:
    """``launches`` GEMMs C[M, N] (+)= A[M, K] @ B[K, N]; ``e_out`` 0: no output written (a fused
    kernel that reduces its tile)."""
    rate, bw = _gpu_rates(gpu, eff)
    return Piece(name, engine, 2.0 * M * N * K * launches, (M * K + K * N) * e_in * launches,
                 M * N * e_out * (2 if accumulate else 1) * launches, launches, 0, rate, bw)


def memory(name, nbytes, *, gpu: GPU, launches=1, syncs=0) -> Piece:
    return Piece(name, "memory", 0.0, nbytes, 0.0, launches, syncs, 1.0, gpu.hbm_bw * EFF_HBM)


@dataclass
class Plan:
    name: str
    pieces: List[Piece]
    extra_bytes: float          # peak scratch beyond inputs and returned gradients
    gemm_eq: float
    note: str = ""

    def time(self, r: float = 1.0, r_peer: float = 1.0) -> float:
        return sum(p.time(r, r_peer) for p in self.pieces)

    def implied_r(self, measured_s: float) -> Optional[float]:
        """The r at which this plan takes ``measured_s`` (None: no r in (0.05, 2] does)."""
        if not any(p.engine == "ours" for p in self.pieces):
            return None
        lo, hi = 0.05, 2.0
        if not self.time(hi) <= measured_s <= self.time(lo):
            return None
        for _ in range(60):                 # time is non-increasing in r
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.time(mid) > measured_s else (lo, mid)
        return (lo + hi) / 2


def _ctx(gpu_key: str):
    gpu = GPUS[gpu_key]
    return dict(gpu=gpu, eff=cublas_efficiency(gpu_key))


# ---------------------------------------------------------------------------------------------
# Baselines and peers, each as its published setup ran.

def bare_gemm_fwd_bwd(s: Shape, *, gpu: GPU, eff: float) -> List[Piece]:
    """logits = X W^T, dX = G W, dW = G^T X, all in the input dtype (the [N, V] G given)."""
    kw = dict(gpu=gpu, eff=eff)
    return [gemm("logits = X @ W.T", s.n, s.v, s.h, s.e, s.e, **kw),
            gemm("dX = G @ W", s.n, s.h, s.v, s.e, s.e, **kw),
            gemm("dW = G.T @ X", s.v, s.h, s.n, s.e, s.e, **kw)]


def bare(s: Shape, gpu_key: str) -> Plan:
    return Plan("bare lm_head GEMM fwd+bwd", bare_gemm_fwd_bwd(s, **_ctx(gpu_key)), 0, 3)


def bare_forward(s: Shape, gpu_key: str) -> Plan:
    return Plan("bare lm_head GEMM forward", bare_gemm_fwd_bwd(s, **_ctx(gpu_key))[:1], 0, 1)


def naive_eager(s: Shape, gpu_key: str, softcap: bool = False) -> Plan:
    """Materialised logits, ``.float()``, log_softmax (two reads, one write), gather; autograd's
    backward writes each [N, V] gradient. ``softcap``: Gemma-2 style tanh(z / c) * c in the
    input dtype before ``.float()`` (three elementwise ops each way)."""
    c = _ctx(gpu_key)
    nv, e = s.n * s.v, s.e
    g = bare_gemm_fwd_bwd(s, **c)
    passes = [(".float()", nv * (e + 4)), ("log_softmax", nv * 12),
              ("nll backward (zeros + scatter)", nv * 4), ("log_softmax backward", nv * 12),
              (".float() backward", nv * (4 + e))]
    if softcap:
        passes += [("softcap forward (/c, tanh, *c)", 3 * nv * 2 * e),
                   ("softcap backward (*c, tanh', /c)", nv * 2 * e * 2 + nv * 3 * e)]
    mem = [memory(n, b, gpu=c["gpu"]) for n, b in passes]
    return Plan("naive eager" + (" (softcap)" if softcap else ""), g[:1] + mem + g[1:],
                nv * (e + 12), 3)


def compiled(s: Shape, gpu_key: str) -> Plan:
    """torch.compile of the naive path: the softcap / cast / log-softmax fuse into one reduction
    that reads the 16-bit logits twice (max, then sum) and a backward kernel that reads them
    once and writes the 16-bit gradient."""
    c = _ctx(gpu_key)
    nv, e = s.n * s.v, s.e
    g = bare_gemm_fwd_bwd(s, **c)
    return Plan("torch.compile", g[:1] + [memory("fused log-softmax (2 reads)", 2 * nv * e,
                                                  gpu=c["gpu"]),
                                           memory("fused backward (read + write)", 2 * nv * e,
                                                  gpu=c["gpu"])] + g[1:], 2 * nv * e, 3)


def liger_flce_chunk_rows(s: Shape) -> int:
    """Liger's FLCE (0.5-0.8) chunk: next power of two of ceil(N / ceil(V / H)) rows."""
    return min(s.n, 2 ** math.ceil(math.log2(math.ceil(s.n / math.ceil(s.v / s.h)))))


def liger_flce(s: Shape, gpu_key: str, chunk_rows: Optional[int] = None) -> Plan:
    """Liger's Triton fused linear cross-entropy: per chunk of rows, cuBLAS logits in the input
    dtype, a Triton CE kernel (one read for max / sum, one read + in-place write of the
    gradient), dX[chunk] = G @ W, dW += G.T @ X (addmm in the weight dtype); dW zeroed first;
    one ``.item()`` sync forward, one ``torch.equal`` sync backward."""
    c = _ctx(gpu_key)
    rows = chunk_rows or liger_flce_chunk_rows(s)
    full, rest = divmod(s.n, rows)
    pieces = [memory("zero dW", s.v * s.h * s.e, gpu=c["gpu"], syncs=2)]
    for r_, k in ((rows, full), (rest, 1)):
        if not (r_ and k):
            continue
        pieces += [gemm("logits chunk (cuBLAS)", r_, s.v, s.h, s.e, s.e, launches=k, **c),
                   memory("CE kernel (2 reads, 1 write)", 3 * r_ * s.v * s.e * k,
                          gpu=c["gpu"], launches=k),
                   gemm("dX chunk (cuBLAS)", r_, s.h, s.v, s.e, s.e, launches=k, **c),
                   gemm("dW += (addmm, weight dtype)", s.v, s.h, r_, s.e, s.e, accumulate=True,
                        launches=k, **c)]
    return Plan(f"Liger FLCE ({math.ceil(s.n / rows)} x {rows} rows)", pieces,
                rows * s.v * s.e, 3)


def cce(s: Shape, gpu_key: str, filtered: float) -> Plan:
    """Cut Cross-Entropy: a fused Triton forward (1 GEMM-eq, online lse) and a fused backward
    that recomputes the logits (1) and forms dE and dC (2) except on the ``filtered`` fraction
    of tiles its gradient filter skips; all at CCE's own r (``r_peer``)."""
    c = _ctx(gpu_key)
    keep = 1.0 - filtered
    return Plan(f"CCE ({filtered:.0%} of tiles filtered)", [
        gemm("lse forward (fused)", s.n, s.v, s.h, s.e, 0, engine="peer_triton", **c),
        gemm("backward: recompute logits (fused)", s.n, s.v, s.h, s.e, 0, engine="peer_triton",
             **c),
        Piece("backward: dE, dC (fused, lock adds)", "peer_triton", 2 * keep * s.gemm_eq_flops,
              0.0, (s.n + s.v) * s.h * s.e, 1, 0, *_gpu_rates(c["gpu"], c["eff"]))],
        s.n * 8, 2 + 2 * keep)


# ---------------------------------------------------------------------------------------------
# gift_fast's plans (issue 17, item 2). The budget arithmetic is the library's own
# (gift_fast/backends/plan.py, with the triton backend's stored-logits layout): the model times
# the plan the library would run, so the two cannot disagree on chunk sizes or bytes.

ALIGN = planner.ALIGN
GPU_ARCH = {"h100": 90, "h200": 90, "a100": 80}     # the kernels' launch target of each GPU


def _dtype(s: Shape):
    import torch
    return {2: torch.bfloat16, 4: torch.float32}[s.e]


def logit_store(s: Shape, gpu_key: str = "h100") -> "planner.LogitStore":
    """The triton backend's stored-logits layout for these inputs on that GPU (library code:
    ``triton_op.stream_store`` for the GPU's target)."""
    from gift_fast.backends import triton_op
    from gift_fast.kernels.target import target_of
    return triton_op.stream_store(s.v, s.h, _dtype(s), target=target_of(GPU_ARCH[gpu_key]))


def stream_plan(s: Shape, budget: float, gpu_key: str = "h100") -> Optional["planner.Plan"]:
    """The library's token-local plan within ``budget`` (``plan.plan_token_local``, triton
    backend, every gradient but db); None when it is not the stream (no chunk fits)."""
    try:
        p = planner.plan_token_local(s.n, s.v, s.h, s.e, budget=int(budget),
                                     store=logit_store(s, gpu_key))
    except planner.BudgetTooSmall:
        return None
    return p if p.kind == "stream" else None


def stream_rows(s: Shape, budget: float, gpu_key: str = "h100") -> int:
    """Rows per chunk of the library's token-local stream within ``budget`` (0: none fits)."""
    p = stream_plan(s, budget, gpu_key)
    return p.step if p else 0


def stream_extra_bytes(s: Shape, rows: int, dw_sum: str = "", gpu_key: str = "h100") -> int:
    """Scratch of the token-local stream with chunks of ``rows`` rows (``plan.stored_logits_bytes``;
    ``dw_sum`` as the plan's, default the library's float32 sum past one chunk)."""
    return planner.stored_logits_bytes(rows, s.v, s.h, s.e, math.ceil(s.n / rows), True, False,
                                       s.n, logit_store(s, gpu_key), dw_sum)


def recompute_extra_bytes(s: Shape, cols: int) -> int:
    """Scratch of the vocabulary-outer recompute backward, every row live
    (``plan.recompute_extra_bytes``): the [N, cols] D block and the float32 dX sum (16-bit)."""
    return planner.recompute_extra_bytes("vocab", cols, s.n, s.n, s.v, s.h, s.e)


def recompute_cols(s: Shape, budget: float) -> int:
    """The library's vocabulary block within ``budget`` (``plan.plan_recompute``, vocab order:
    the one :func:`two_phase_recompute` times); 0 when none fits."""
    try:
        return planner.plan_recompute(s.n, s.n, s.v, s.h, s.e, budget=int(budget),
                                      order="vocab").step
    except planner.BudgetTooSmall:
        return 0


def keep_extra_bytes(s: Shape, gpu_key: str = "h100") -> int:
    """Scratch of the keep plan (``plan.keep_bytes``): the stored logits of every row."""
    return planner.keep_bytes(s.n, s.v, s.h, s.e, store=logit_store(s, gpu_key))


def _stored_bytes(s: Shape, gpu_key: str) -> float:
    """Bytes of one row's stored logits (values, padding, shifts; not a separate D), per logit."""
    st = logit_store(s, gpu_key)
    d = s.v * s.e if s.e != st.value_bytes else 0
    return (st.row_bytes(s.v, s.e) - d) / s.v


def _forward_kernel(s: Shape, c, rows: int, launches: int, logits_bytes: int) -> List[Piece]:
    """Our Triton forward over ``rows`` rows (x ``launches``): logits GEMM + online lse, writing
    the logits when a plan stores them (``logits_bytes`` > 0), then the per-row combine."""
    return [gemm("forward: logits + online lse (Triton)", rows, s.v, s.h, s.e, logits_bytes,
                 engine="ours", launches=launches, **c),
            memory("combine per-row partials", s.n * 64, gpu=c["gpu"], launches=2)]


def forward_only(s: Shape, gpu_key: str) -> Plan:
    """The no-grad anchor pass: log-probs (and entropy) of every row, nothing stored."""
    c = _ctx(gpu_key)
    return Plan("forward only (anchor pass)", _forward_kernel(s, c, s.n, 1, 0),
                s.n * PER_ROW_BYTES, 1)


def token_local_stream(s: Shape, gpu_key: str, rows: int, dw_sum: str = "") -> Plan:
    """Token-local losses, 3 GEMM-eq: per chunk of ``rows`` rows the Triton forward writes the
    logits (the triton backend's layout: 16-bit inputs store 2 bytes and a float32 shift per
    tile of columns), the loss gradient D is formed from them once the chunk's lse is known (a
    pass over the chunk, D written over 16-bit logits in place), dX[chunk] = D @ W and
    dW (+)= D.T @ X run in cuBLAS. ``dw_sum`` as ``plan.plan_token_local`` names it: "once" (one
    chunk), "float32" (a float32 sum, cast at the end) or "gemm" (summed in the weight dtype);
    default: "once" for one chunk, else the library's float32 sum of 16-bit GEMMs."""
    c = _ctx(gpu_key)
    chunks = math.ceil(s.n / rows)
    if not dw_sum:
        dw_sum = "once" if chunks == 1 else "float32" if s.e != 4 else "gemm"
    full, rest = divmod(s.n, rows)
    sizes = [(k, m) for k, m in ((rows, full), (rest, 1)) if k and m]   # (rows, launches)
    stored = _stored_bytes(s, gpu_key)
    in_place = logit_store(s, gpu_key).value_bytes == s.e     # D written over the logits
    summed = dw_sum == "float32" and s.e != 4
    out = 4 if summed else s.e
    pieces = [memory("combine per-row partials", s.n * 64, gpu=c["gpu"], launches=2)]
    for k, m in sizes:
        pieces.append(gemm("forward: logits + online lse (Triton)", k, s.v, s.h, s.e,
                           stored, engine="ours", launches=m, **c))
    pieces.append(memory("loss gradient D from the stored logits (read, D written)",
                         s.n * s.v * (stored + s.e), gpu=c["gpu"], launches=chunks))
    for k, m in sizes:
        pieces.append(gemm("dX[chunk] = D @ W (cuBLAS)", k, s.h, s.v, s.e, s.e, launches=m, **c))
    if chunks == 1:
        pieces.append(gemm("dW = D.T @ X (cuBLAS)", s.v, s.h, s.n, s.e, s.e, **c))
    else:
        # the first chunk writes the sum, every later one reads and rewrites it
        pieces.append(gemm("dW = D.T @ X, first chunk (cuBLAS)", s.v, s.h, rows, s.e, out, **c))
        for k, m in ((rows, full - 1), (rest, 1)):
            if k and m:
                pieces.append(gemm("dW += D.T @ X (cuBLAS)", s.v, s.h, k, s.e, out,
                                   accumulate=True, launches=m, **c))
        if summed:
            pieces.append(memory("dW = float32 sum (cast)", s.v * s.h * (4 + s.e),
                                 gpu=c["gpu"]))
    store = f"{stored:.3g} bytes per logit" + (" (D in place)" if in_place else "")
    note = (f"{chunks} chunk(s) of {rows} rows; logits stored in {store}; dW "
            + ("summed in float32" if summed else "summed in the weight dtype (one more 16-bit "
               "rounding per chunk past the first)" if chunks > 1 and s.e != 4
               else "summed in float32" if chunks > 1 else "written once"))
    return Plan("token-local stream", pieces, stream_extra_bytes(s, rows, dw_sum, gpu_key), 3,
                note)


def two_phase_keep(s: Shape, gpu_key: str) -> Plan:
    """Two-phase losses, 3 GEMM-eq: the forward stores every row's logits (the triton backend's
    layout); after the epilogue the backward forms D from them (one pass, in place for 16-bit
    inputs) and runs dX, dW in cuBLAS."""
    c = _ctx(gpu_key)
    stored = _stored_bytes(s, gpu_key)
    in_place = logit_store(s, gpu_key).value_bytes == s.e
    pieces = [gemm("forward: logits + online lse (Triton)", s.n, s.v, s.h, s.e, stored,
                   engine="ours", **c),
              memory("combine per-row partials", s.n * 64, gpu=c["gpu"], launches=2),
              memory("loss gradient D from the stored logits (read, D written)",
                     s.n * s.v * (stored + s.e), gpu=c["gpu"]),
              gemm("dX = D @ W (cuBLAS)", s.n, s.h, s.v, s.e, s.e, **c),
              gemm("dW = D.T @ X (cuBLAS)", s.v, s.h, s.n, s.e, s.e, **c)]
    return Plan("two-phase keep", pieces, keep_extra_bytes(s, gpu_key), 3,
                f"logits of all rows stored in {stored:.3g} bytes each"
                + (" (D in place)" if in_place else ""))


def two_phase_recompute(s: Shape, gpu_key: str, cols: int) -> Plan:
    """Two-phase losses, 4 GEMM-eq: per block of ``cols`` vocabulary columns the Triton dlogits
    kernel recomputes the logits and writes D in the input dtype; dW[block] = D.T @ X (cuBLAS,
    written once) and dX32 += D @ W[block] (cuBLAS, float32 sum); dX cast at the end."""
    c = _ctx(gpu_key)
    blocks = math.ceil(s.v / cols)
    full, rest = divmod(s.v, cols)
    pieces = _forward_kernel(s, c, s.n, 1, 0)
    pieces.append(memory("live rows (mask, nonzero)", s.n * 16, gpu=c["gpu"], launches=3,
                         syncs=1))
    # (columns, launches, the float32 dX sum is read back): the first block only writes it
    runs = [(cols if full else rest, 1, False), (cols, full - 1, True), (rest, 1 if full else 0,
                                                                         True)]
    for k, m, acc in runs:
        if not (k and m > 0):
            continue
        pieces += [gemm("dlogits: recompute + D (Triton)", s.n, k, s.h, s.e, s.e,
                        engine="ours", launches=m, **c),
                   gemm("dW[block] = D.T @ X (cuBLAS)", k, s.h, s.n, s.e, s.e, launches=m, **c),
                   gemm("dX32 " + ("+= " if acc else "= ") + "D @ W[block] (cuBLAS)", s.n, s.h,
                        k, s.e, 4, accumulate=acc, launches=m, **c)]
    pieces.append(memory("dX = float32 sum (cast)", s.n * s.h * (4 + s.e), gpu=c["gpu"]))
    return Plan("two-phase recompute", pieces, recompute_extra_bytes(s, cols), 4,
                f"{blocks} vocabulary blocks of {cols}")


# ---------------------------------------------------------------------------------------------
# Validation against published numbers.

@dataclass
class Check:
    source: str
    gpu: str
    setup: str
    published_ms: float
    model_ms: Optional[float] = None            # point model
    interval_ms: Optional[Tuple[float, float]] = None   # model range (unknown peer knob)
    kind: str = "check"                          # "check", "anchor", "interval"

    @property
    def error(self) -> Optional[float]:
        return None if self.model_ms is None else self.model_ms / self.published_ms - 1.0

    @property
    def ok(self) -> bool:
        if self.kind == "interval":
            lo, hi = self.interval_ms
            return lo * (1 - TOLERANCE) <= self.published_ms <= hi * (1 + TOLERANCE)
        return abs(self.error) <= TOLERANCE


# Published numbers (../shared/docs/peers.md) and their setups.
PUBLISHED = {
    "trl7244_bare": 42.0, "trl7244_naive": 59.0,
    "liger1472_h200": {256: 53.0, 2048: 37.7, 4096: 35.1},
    "cce_readme_a100": {"cce": 134.8, "torch.compile": 144.0, "eager": 208.8},
    "liger_cute_h100": 50.4,
}
TRL7244 = Shape(8192, 4096, 151936)
LIGER1472 = Shape(8192, 4096, 128256)
GEMMA2_2B = Shape(8192, 2304, 256000)       # CCE README: Gemma-2-2B, softcap 30
LIGER_CUTE = Shape(8192, 4096, 131072)

NOT_EXPRESSIBLE = [
    ("TRL #7244, H100: Liger FLCE 192 ms, TRL chunked NLL 167 ms",
     "versions and flags (accumulation dtype, chunking, what the timer wraps) are not "
     "published; Liger's own H200 sweep at nearly the same shape is 3.6x faster"),
    ("TRL #7244, H100: fused forward-only log-prob + entropy kernel 0.89 ms vs 12.8 ms",
     "the shape is not published"),
    ("Liger CSV, GRPO T=1024, H=4096, V=128256, B=8: Liger 145 ms, eager 44 ms",
     "peers.md gives it on B200 (issue 17 says A100): no bare-GEMM anchor for B200, and the "
     "dtype of Liger's GRPO chunks (two of four GEMM-eq in float32) is not published"),
    ("Liger CuTe SM100 fused linear CE, B200: 17.5 ms at V=128256",
     "no bare-GEMM anchor for B200"),
    ("Liger CuTe SM90 fused CE, H100: 50.4 ms at M=8192, H=4096, V=131072",
     "a fused kernel of unknown r: used to infer r (implied_r_liger_cute), not to validate"),
    ("peak memory (19.9 / 6.1 / 13.1 GiB, 1.16 / 16 / 28 GB)",
     "allocator behaviour (caching, autograd lifetimes) is outside a time model"),
]


def validation() -> List[Check]:
    a = TRL_7244_BARE
    checks = [Check("TRL #7244", "h100", "bare lm_head GEMM fwd+bwd, bf16, N=8192 H=4096 "
                    "V=151936", a.ms, bare(TRL7244, "h100").time() * 1e3, kind="anchor"),
              Check("TRL #7244", "h100", "naive materialised CE fwd+bwd (same shape)",
                    PUBLISHED["trl7244_naive"], naive_eager(TRL7244, "h100").time() * 1e3)]
    for rows, ms in PUBLISHED["liger1472_h200"].items():
        checks.append(Check("Liger PR #1472", "h200",
                            f"Triton FLCE, {8192 // rows} chunks of {rows} rows, bf16, "
                            "N=8192 H=4096 V=128256", ms,
                            liger_flce(LIGER1472, "h200", rows).time() * 1e3))
    cr = PUBLISHED["cce_readme_a100"]
    checks.append(Check("CCE README", "a100", "torch eager, Gemma-2-2B (H=2304, V=256000, "
                        "softcap 30), N=8192, bf16", cr["eager"],
                        naive_eager(GEMMA2_2B, "a100", softcap=True).time() * 1e3))
    checks.append(Check("CCE README", "a100", "torch.compile, same setup", cr["torch.compile"],
                        compiled(GEMMA2_2B, "a100").time() * 1e3))
    lo = cce(GEMMA2_2B, "a100", 1.0).time(r_peer=max(R_VALUES)) * 1e3
    hi = cce(GEMMA2_2B, "a100", 0.0).time(r_peer=min(R_VALUES)) * 1e3
    checks.append(Check("CCE README", "a100", "CCE fwd+bwd, same setup: every tile filtered at "
                        f"r={max(R_VALUES)} .. none filtered at r={min(R_VALUES)} (the filtered "
                        "fraction depends on the real embeddings)", cr["cce"],
                        interval_ms=(lo, hi), kind="interval"))
    return checks


def implied_r_liger_cute() -> float:
    """r of Liger's CuTe SM90 fused CE (fwd+bwd, 4 GEMM-eq fused) against cuBLAS on H100."""
    s = LIGER_CUTE
    c = _ctx("h100")
    fused = Plan("fused CE", [gemm("fused", s.n, s.v, s.h, s.e, 0, engine="ours", launches=4,
                                   **c)], 0, 4)
    return fused.implied_r(PUBLISHED["liger_cute_h100"] * 1e-3) or float("nan")


def validation_markdown(checks: Sequence[Check]) -> str:
    lines = [f"### Validation — {MODEL_LABEL}", "",
             "cuBLAS main-loop efficiency: " + ", ".join(
                 f"{g.name} {cublas_efficiency(k):.3f} of peak"
                 + (f" ({g.note})" if g.note else f" (anchor: {g.anchor.source}, "
                                                  f"{g.anchor.ms} ms)")
                 for k, g in GPUS.items()), "",
             f"| source | GPU | setup | published ms | model ms | model / published | "
             f"within {TOLERANCE:.0%} |", "|---|---|---|---:|---:|---:|---|"]
    for ch in checks:
        if ch.kind == "interval":
            model, err = f"{ch.interval_ms[0]:.1f} .. {ch.interval_ms[1]:.1f}", "inside range"
        else:
            model, err = f"{ch.model_ms:.1f}", f"{ch.error + 1:.3f}"
        verdict = ("yes" if ch.ok else "NO") + (" (calibration anchor)" if ch.kind == "anchor"
                                                 else "")
        lines.append(f"| {ch.source} | {GPUS[ch.gpu].name} | {ch.setup} | "
                     f"{ch.published_ms:.1f} | {model} | {err} | {verdict} |")
    lines += ["", f"Implied r of Liger's CuTe SM90 fused CE on H100 (50.4 ms, M=8192, H=4096, "
                  f"V=131072, 4 GEMM-eq): {implied_r_liger_cute():.3f}", "",
              "Published numbers the model cannot express:", ""]
    lines += [f"- {what}: {why}" for what, why in NOT_EXPRESSIBLE]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Issue 17's goals.

GOAL_SHAPE = Shape(8192, 4096, 151936)
TOKEN_LOCAL_BUDGET = 2 * GIB


def recompute_budget(s: Shape) -> int:
    return 4 * s.n * s.h + 128 * MIB


@dataclass
class Goal:
    name: str
    limit: float
    plan: Optional[Plan]
    budget: Optional[float]
    reason: str = ""
    ratios: Dict[float, float] = field(default_factory=dict)


def _stream_goal(s: Shape, gpu_key: str, budget: float) -> Tuple[Optional[Plan], str]:
    """(the library's token-local stream within ``budget``, timed; why none fits)."""
    p = stream_plan(s, budget, gpu_key)
    if p is None:
        return None, (f"no stream fits {budget / GIB:.2f} GiB: one chunk of all rows needs "
                      f"{stream_extra_bytes(s, s.n, 'once', gpu_key) / GIB:.2f} GiB")
    return token_local_stream(s, gpu_key, p.step, p.dw_sum), ""


def goals(s: Shape = GOAL_SHAPE, gpu_key: str = "h100") -> List[Goal]:
    base = bare(s, gpu_key).time()
    out = []
    tl, reason = _stream_goal(s, gpu_key, TOKEN_LOCAL_BUDGET)
    out.append(Goal("token-local stream <= 1.12x within 2 GiB (the library's plan)", 1.12, tl,
                    TOKEN_LOCAL_BUDGET, reason))
    tl4, reason4 = _stream_goal(s, gpu_key, SUITE_BUDGET)
    out.append(Goal("token-local stream <= 1.12x, the library's plan at its default budget "
                    f"({SUITE_BUDGET / GIB:.0f} GiB)", 1.12, tl4, SUITE_BUDGET, reason4))
    out.append(Goal("two-phase keep <= 1.15x (budget holds the logits)", 1.15,
                    two_phase_keep(s, gpu_key), None))
    cols = recompute_cols(s, recompute_budget(s))
    out.append(Goal("two-phase recompute <= 1.45x within 4*N*H bytes + 128 MiB", 1.45,
                    two_phase_recompute(s, gpu_key, cols) if cols else None,
                    recompute_budget(s), "" if cols else "no block fits the budget"))
    out.append(Goal("forward only (anchor pass) <= 0.37x", 0.37, forward_only(s, gpu_key), None))
    for gl in out:
        if gl.plan is not None:
            gl.ratios = {r: gl.plan.time(r) / base for r in R_VALUES}
    return out


def goals_markdown(s: Shape = GOAL_SHAPE, gpu_key: str = "h100") -> str:
    gs = goals(s, gpu_key)
    lines = [f"### Goals — {MODEL_LABEL}", "",
             f"{GPUS[gpu_key].name}, N={s.n}, H={s.h}, V={s.v}, bf16; ratio to the bare GEMM "
             f"fwd+bwd ({bare(s, gpu_key).time() * 1e3:.1f} ms) at our Triton efficiency r "
             "(relative to cuBLAS).", "",
             "| goal | GEMM-eq | extra memory | budget | "
             + " | ".join(f"r={r:.2f}" for r in R_VALUES) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(R_VALUES)]
    for gl in gs:
        budget = "-" if gl.budget is None else f"{gl.budget / MIB:,.0f} MiB"
        if gl.plan is None:
            lines.append(f"| {gl.name} | - | - | {budget} | "
                         + " | ".join("FAIL" for _ in R_VALUES) + " |")
            continue
        cells = [f"{x:.3f} {'pass' if x <= gl.limit else 'FAIL'}" for x in gl.ratios.values()]
        lines.append(f"| {gl.name} | {gl.plan.gemm_eq:g} | "
                     f"{gl.plan.extra_bytes / MIB:,.0f} MiB | {budget} | " + " | ".join(cells)
                     + " |")
    notes = [f"- {gl.name}: {gl.reason or gl.plan.note}" for gl in gs
             if gl.reason or (gl.plan and gl.plan.note)]
    base = bare(s, gpu_key).time()
    peers = [(p.name, p.time() / base) for p in (naive_eager(s, gpu_key), compiled(s, gpu_key),
                                                 liger_flce(s, gpu_key))]
    cce_lo = cce(s, gpu_key, 1.0).time(r_peer=max(R_VALUES)) / base
    cce_hi = cce(s, gpu_key, 0.0).time(r_peer=min(R_VALUES)) / base
    peer_lines = [f"- {name}: {x:.2f}x" for name, x in peers]
    peer_lines.append(f"- CCE: {cce_lo:.2f}x (every tile filtered, r=1.00) .. {cce_hi:.2f}x "
                      "(none filtered, r=0.80)")
    return "\n".join(lines + ["", "Notes:", ""] + notes
                     + ["", "Peers at the same shape (as their defaults run):", ""] + peer_lines)


# ---------------------------------------------------------------------------------------------
# Predictions for the shapes bench/gpu_run.sh measures, and the comparison with its results.

def suite_shapes() -> List[Shape]:
    """The dense shapes of ``bench.run_suite --full`` (what bench/gpu_run.sh runs)."""
    from .run_suite import FULL_HV, FULL_NS, HEADLINE
    shapes = [Shape(HEADLINE.n, HEADLINE.h, HEADLINE.v)]
    shapes += [Shape(n, h, v) for (h, v) in FULL_HV for n in FULL_NS
               if (n, h, v) != (HEADLINE.n, HEADLINE.h, HEADLINE.v)]
    return shapes


# Default budget of the library on a large GPU (gift_fast/backends/plan.py: a quarter of the
# free memory, capped at 4 GiB).
SUITE_BUDGET = 4 * GIB


def predicted_plans(s: Shape, gpu_key: str) -> Dict[Tuple[str, str], Plan]:
    """(suite method, kind) -> the model's plan for it: the library's plans at its default
    budget (linear_logprobs fwd+bwd keeps the logits when they fit, as the triton backend does
    in eager mode)."""
    cols = recompute_cols(s, SUITE_BUDGET)
    two_phase = (two_phase_keep(s, gpu_key) if keep_extra_bytes(s, gpu_key) <= SUITE_BUDGET
                 else two_phase_recompute(s, gpu_key, cols))
    stream = stream_plan(s, SUITE_BUDGET, gpu_key)
    token_local = (token_local_stream(s, gpu_key, stream.step, stream.dw_sum) if stream
                   else two_phase_recompute(s, gpu_key, cols))
    return {("gemm", "fwd"): bare_forward(s, gpu_key), ("gemm", "fwd+bwd"): bare(s, gpu_key),
            ("naive+logp", "fwd+bwd"): naive_eager(s, gpu_key),
            ("compile+logp", "fwd+bwd"): compiled(s, gpu_key),
            ("liger_flce+logp", "fwd+bwd"): liger_flce(s, gpu_key),
            ("gift_fast+logp", "fwd"): forward_only(s, gpu_key),
            ("gift_fast+logp", "fwd+bwd"): two_phase,
            ("gift_fast.fdiv_sft_loss", "fwd+bwd"): token_local}


def predict_json(gpu_key: str, r_values=R_VALUES) -> dict:
    out = {"kind": "model", "label": MODEL_LABEL, "gpu": gpu_key, "r_values": list(r_values),
           "cases": []}
    for s in suite_shapes():
        rows = [{"method": m, "kind": k, "plan": p.name, "note": p.note,
                 "extra_bytes": p.extra_bytes,
                 "model_ms": {f"{r:.2f}": p.time(r) * 1e3 for r in r_values}}
                for (m, k), p in predicted_plans(s, gpu_key).items()]
        out["cases"].append({"shape": {"n": s.n, "h": s.h, "v": s.v}, "rows": rows})
    return out


def predict_markdown(gpu_key: str) -> str:
    lines = [f"### Predictions for bench/gpu_run.sh — {MODEL_LABEL}", "",
             f"{GPUS[gpu_key].name}, bf16, dense layout, budget {SUITE_BUDGET / GIB:.0f} GiB. "
             "Model ms at our Triton efficiency r.", "",
             "| N | H | V | method | kind | plan | " + " | ".join(f"r={r:.2f}" for r in R_VALUES)
             + " |", "|---:|---:|---:|---|---|---|" + "---:|" * len(R_VALUES)]
    for s in suite_shapes():
        for (m, k), p in predicted_plans(s, gpu_key).items():
            lines.append(f"| {s.n} | {s.h} | {s.v} | {m} | {k} | {p.name} | "
                         + " | ".join(f"{p.time(r) * 1e3:.2f}" for r in R_VALUES) + " |")
    return "\n".join(lines)


def gpu_key_from_name(name: str) -> Optional[str]:
    """'h100-80gb-hbm3' / 'NVIDIA H200' -> 'h100' / 'h200'; None for a GPU without a model."""
    low = name.lower()
    return next((k for k in GPUS if k in low), None)


def compare_markdown(results: dict, gpu_key: str) -> str:
    """Measured (a bench.run_suite results.json) next to the model for the same shapes, with
    the r at which our plans match the measurement: the first GPU run calibrates r."""
    lines = [f"### Measured vs model ({GPUS[gpu_key].name}) — model rows are "
             f"{MODEL_LABEL.lower()}", "",
             "| case | method | kind | measured ms | model ms at r=0.90 | model / measured | "
             "implied r |", "|---|---|---|---:|---:|---:|---:|"]
    for case in results.get("cases", []):
        if not case.get("id", "").startswith("dense/random/"):
            continue
        sh = case["shape"]
        plans = predicted_plans(Shape(sh["n"], sh["h"], sh["v"]), gpu_key)
        for row in case.get("results", []):
            plan = plans.get((row["method"], row["kind"]))
            if plan is None:
                continue
            ms = row.get("median_ms") if row.get("status") == "ok" else None
            model = plan.time(0.90) * 1e3
            r = plan.implied_r(ms * 1e-3) if ms else None
            lines.append(f"| {case['id']} | {row['method']} | {row['kind']} | "
                         f"{'%.2f' % ms if ms else row.get('status') or '-'} | {model:.2f} | "
                         f"{'%.3f' % (model / ms) if ms else '-'} | "
                         f"{'%.3f' % r if r is not None else '-'} |")
    return "\n".join(lines)


def main(args) -> int:
    """Entry from ``python -m bench.model`` (bench/model.py parses the arguments)."""
    status = 0
    if args.validate:
        checks = validation()
        print(validation_markdown(checks))
        bad = [c for c in checks if not c.ok]
        if bad:
            print(f"\nFAIL: {len(bad)} published number(s) off by more than {TOLERANCE:.0%}")
            status = 1
    if args.goals:
        print(goals_markdown())
    if args.predict:
        print(json.dumps(predict_json(args.gpu_key), indent=1) if args.json
              else predict_markdown(args.gpu_key))
    if args.compare:
        with open(args.compare) as f:
            print(compare_markdown(json.load(f), args.gpu_key))
    return status
