"""Launch configurations of every kernel, per target family (``gift_fast.kernels.target``).

One table per kernel: ``{family: {case: config}}`` where case is "fp32" (FMA: no TF32, full
precision), "unaligned" (16-bit operands with a row stride or pointer not 16-aligned, loaded one
element at a time with a 64-bit address each) or "16bit" (aligned, tensor cores). A function of
(dtype, target family, alignment) only, never of N: the forward stays batch-invariant. Every entry
is compiled for its targets by ``python -m gift_fast.compile_targets`` (0 errors, 0 spills); the
comments say what the check found when an entry was changed.
"""
from __future__ import annotations

import math

import torch

from .target import (AMPERE, BLACKWELL, BLACKWELL_CONSUMER, CDNA2, CDNA3, CDNA4, HOPPER,
                     INTERPRETER, RDNA3, TURING)

_INTERPRETER_TILE = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, num_warps=1, num_stages=1)


def _case(dtype, aligned: bool) -> str:
    if dtype == torch.float32:
        return "fp32"
    return "16bit" if aligned else "unaligned"


def _pick(table: dict, target, case: str) -> dict:
    return dict(table[target.family][case])


# ---- forward (logits tile + online log-sum-exp) ---------------------------------------------
# float32: the dot operands live in registers; with bias, softcap and entropy a 64-row tile sat
# at 255 registers and spilled on NVIDIA, so 32 x 64. On sm_80 a second stage spilled with
# unaligned rows (one stage: 168 registers). Unaligned 16-bit: a thin K step (16) keeps the
# address registers few; on sm_100 bias + entropy spilled 12-16 B at 4 warps, and on sm_80 bias +
# softcap + the logits store reached 255 registers: 8 warps on NVIDIA halve each thread's share.
# Aligned 16-bit: BLOCK_H=64 reached 254 registers with every flag on; 32 needs about half.
_FWD_FP32 = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=16, num_warps=4, v_per_split=8192)
_FWD_UNALIGNED = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=16, num_stages=2, v_per_split=8192)
_FWD_16 = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=3, v_per_split=8192)
# sm_90 / sm_100, aligned 16-bit: the shape of the fastest published Triton GEMMs (Triton's
# persistent-matmul tutorial: 128 x 128 tiles, K step 64, TMA, grouped tile order). USE_TMA: X and
# W tiles through tensor descriptors (no address registers); GROUP_N: a 1-D grid whose programs
# run GROUP_N row blocks against every vocabulary slice before the next GROUP_N (the X rows of a
# group stay in L2 while each W tile is read by GROUP_N programs at once). No persistent grid: a
# program already owns a whole slice (v_per_split / BLOCK_V tiles): few, long programs.
# sm_90: at 8 warps the logits store spilled 20-32 B at 255 registers; 16 warps (4 warpgroups,
# 128 registers per thread at most) compile with none, the store at that cap, the rest at <= 107.
_FWD_TMA = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=16, num_stages=3,
                v_per_split=8192, USE_TMA=True, GROUP_N=8)
# sm_100: 128 x 128 at 8 warps spilled 64-88 B with the entropy even without the store, and at 16
# warps Triton falls back from tcgen05 to mma.sync; 128 x 64 keeps tcgen05's 128-row MMA. With
# the 16-bit store's arguments in the kernel, bias + softcap spilled 12 B at 3 stages: 2 stages.
_FWD_TMA_SM100 = dict(_FWD_TMA, BLOCK_V=64, num_warps=8, num_stages=2)
# With V % 16 != 0 the logits-store variant writes float32 rows that are not 16-byte aligned (one
# 64-bit address per element): at these tiles it spilled 80-500 B. Such vocabularies keep the
# previous tiles, statistics-only forward included (same tiles, same bits as the store variant).
_FWD_PRE_TMA = {HOPPER: _FWD_16, BLACKWELL: dict(_FWD_16, num_stages=2)}
# AMD: on CDNA float32 dots run on MFMA, and the 32 x 64 tile with bias and softcap needed all
# 106 SGPRs and spilled 26 (gfx942); 16 x 128 needs 74 SGPRs and 71 VGPRs (7 waves per SIMD).
# RDNA3 runs float32 on FMA: 32 x 64 compiles without spills there.
_FWD_AMD = {"fp32": dict(_FWD_FP32, num_stages=1),
            "unaligned": dict(_FWD_UNALIGNED, num_warps=4),
            "16bit": dict(_FWD_16, num_stages=2)}
_FWD_CDNA = dict(_FWD_AMD, fp32=dict(_FWD_FP32, BLOCK_N=16, BLOCK_V=128, num_stages=1))
FORWARD = {
    TURING: {"fp32": dict(_FWD_FP32, num_stages=1), "unaligned": dict(_FWD_UNALIGNED, num_warps=8),
             "16bit": _FWD_16},
    AMPERE: {"fp32": dict(_FWD_FP32, num_stages=1), "unaligned": dict(_FWD_UNALIGNED, num_warps=8),
             "16bit": _FWD_16},
    HOPPER: {"fp32": dict(_FWD_FP32, num_stages=2), "unaligned": dict(_FWD_UNALIGNED, num_warps=8),
             "16bit": _FWD_TMA},
    # sm_100: with the logits-store arguments in the kernel, bias + softcap spilled 24 B at 3
    # stages (tcgen05); 2 stages do not (stages only pipeline the loads: same tiles, same bits).
    BLACKWELL: {"fp32": dict(_FWD_FP32, num_stages=2),
                "unaligned": dict(_FWD_UNALIGNED, num_warps=8),
                "16bit": _FWD_TMA_SM100},
    BLACKWELL_CONSUMER: {"fp32": dict(_FWD_FP32, num_stages=2),
                         "unaligned": dict(_FWD_UNALIGNED, num_warps=8), "16bit": _FWD_16},
    CDNA2: _FWD_CDNA, CDNA3: _FWD_CDNA, CDNA4: _FWD_CDNA, RDNA3: _FWD_AMD,
}

# ---- dlogits (logits tile recomputed, gradient of the logits written) ----------------------
# float32 / unaligned: see the forward. On sm_100 the float32 tile spilled 8-20 B at 4 warps;
# 8 warps halve each thread's share of the 64 x 64 accumulator. Aligned 16-bit: 128 x 128
# spilled at 255 registers with softcap, bias and the entropy gradient; 64 x 128 keeps them near
# 150 (one 8-warp block per SM, W tile loads shared by 64 rows).
_DL_THIN = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=16, num_warps=4, num_stages=2)
_DL_16 = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)
# sm_90 / sm_100, aligned 16-bit: as the forward (TMA loads, 1-D grid in grouped order, one
# program per output tile). 128 x 128 did not fit with bias + softcap + the entropy gradient and a
# row count not a multiple of 16: 8 B spilled on sm_90 at 16 warps (255 registers + 8 B at 8) and
# on sm_100 at 8 warps. 128 x 64 at 8 warps: at most 172 registers on either.
_DL_TMA = dict(BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, num_warps=8, num_stages=3, USE_TMA=True,
               GROUP_N=8)
_DL_AMD = {"fp32": dict(_DL_THIN, num_stages=1), "unaligned": dict(_DL_THIN, num_stages=1),
           "16bit": dict(_DL_16, num_stages=2)}
DLOGITS = {
    TURING: {"fp32": _DL_THIN, "unaligned": _DL_THIN, "16bit": _DL_16},
    AMPERE: {"fp32": _DL_THIN, "unaligned": _DL_THIN, "16bit": _DL_16},
    HOPPER: {"fp32": _DL_THIN, "unaligned": _DL_THIN, "16bit": _DL_TMA},
    BLACKWELL: {"fp32": dict(_DL_THIN, num_warps=8), "unaligned": _DL_THIN, "16bit": _DL_TMA},
    BLACKWELL_CONSUMER: {"fp32": dict(_DL_THIN, num_warps=8), "unaligned": _DL_THIN,
                         "16bit": _DL_16},
    CDNA2: _DL_AMD, CDNA3: _DL_AMD, CDNA4: _DL_AMD, RDNA3: _DL_AMD,
}

# False: the TMA entries above are replaced by the previous tiles (pointer loads). The native
# build sets it (gift_fast/native_build.py): Triton's AOT launcher template has no
# tensor-descriptor arguments.
TMA_TILES = True


def forward_config(V: int, H: int, dtype, target, aligned: bool = True,
                   store_logits: bool = False) -> dict:
    """Tile sizes and vocabulary split of the forward kernel (never a function of N).
    ``store_logits`` (the kernel also writes the logits) may change stages and where the
    16-bit store sits in the loop body (``store_late``), never the tiles: stages only pipeline
    the loads and the store writes values already computed, so the sums and their bits are the
    same."""
    if target == INTERPRETER:
        return dict(_INTERPRETER_TILE, v_per_split=64)
    cfg = _pick(FORWARD, target, _case(dtype, aligned))
    if cfg.get("USE_TMA") and (V % 16 or not TMA_TILES):
        cfg = dict(_FWD_PRE_TMA[target.family])
    if store_logits and dtype == torch.float32:
        # A second stage spilled on sm_90 with bias + softcap + the logits store.
        cfg["num_stages"] = 1
    if store_logits and dtype != torch.float32:
        # Where the 16-bit store sits in the loop body (the same values either way) moves the
        # register allocation: after the tile's statistics on NVIDIA (right after the tile max,
        # sm_80 with unaligned rows, bias and softcap spilled 16 B), after the tile max on AMD
        # (at the end, gfx942 spilled 28 SGPRs).
        cfg["store_late"] = not target.is_amd
    return cfg


def shift_columns(dtype, target) -> int:
    """Columns per stored tile maximum of the forward's 16-bit logits store (``Z_SHIFT``): the
    gcd of the BLOCK_V of every 16-bit case, so a chunk whose rows happen to be unaligned (other
    tiles) writes the same layout and the reader needs no per-launch tile width."""
    if target == INTERPRETER:
        return _INTERPRETER_TILE["BLOCK_V"]
    if dtype == torch.float32:
        return _pick(FORWARD, target, "fp32")["BLOCK_V"]
    widths = [_pick(FORWARD, target, c)["BLOCK_V"] for c in ("16bit", "unaligned")]
    if target.family in _FWD_PRE_TMA:          # the TMA families' fallback tiles (V % 16)
        widths.append(_FWD_PRE_TMA[target.family]["BLOCK_V"])
    return math.gcd(*widths)


def dlogits_config(dtype, target, aligned: bool = True) -> dict:
    if target == INTERPRETER:
        return dict(_INTERPRETER_TILE)
    cfg = _pick(DLOGITS, target, _case(dtype, aligned))
    return dict(_DL_16) if cfg.get("USE_TMA") and not TMA_TILES else cfg


def from_logits_config(target) -> dict:
    """Elementwise tile of ``dlogits_from_logits``: 16 KiB of float32 logits per program."""
    if target == INTERPRETER:
        return dict(BLOCK_N=16, BLOCK_V=32, num_warps=1, num_stages=1)
    return dict(BLOCK_N=8, BLOCK_V=512, num_warps=4, num_stages=1)


def combine_config(target) -> dict:
    return dict(BLOCK=128, num_warps=4, num_stages=1)


def epilogue_config(target) -> dict:
    if target == INTERPRETER:
        return dict(BLOCK_T=32, num_warps=1, num_stages=1)
    return dict(BLOCK_T=256, num_warps=4, num_stages=1)


def dot_precision(dtype) -> str:
    """Always "ieee". float32 inputs keep full precision (no TF32), as torch's default matmul
    does. For 16-bit inputs the tensor cores multiply exactly whatever is asked (the sm_80-120
    PTX is identical for "tf32" and "ieee"), and the AMD backends reject "tf32" for them."""
    return "ieee"


# ---- where the forward's 16-bit logits store is not taken -----------------------------------
# (family, case): with bias and softcap the store variant spills there, whatever the tiles
# (docs/hardware.md lists what was tried); the stored-logits plans (stream, keep) are not taken
# and the recompute plan runs instead (4 GEMM-eq).
STORE_SPILLS = {(CDNA4, "unaligned")}


def store_supported(dtype, target, aligned: bool, has_bias: bool, has_softcap: bool) -> bool:
    """Whether the stored-logits plans may run the forward's logits store for these inputs."""
    if target is None or target == INTERPRETER or dtype == torch.float32:
        return True
    return not (has_bias and has_softcap
                and (target.family, _case(dtype, aligned)) in STORE_SPILLS)


# ---- what the triton backend does not run ---------------------------------------------------
# (family, dtype) -> why. backend="auto" takes the torch backend there (cuBLAS / rocBLAS through
# torch.mm); backend="triton" still runs but is not what the compile check vouches for.
UNSUPPORTED = {
    (TURING, torch.bfloat16): "no bf16 tensor cores on sm_75 (the dots compile to FMA)",
    (TURING, torch.float16): "Triton's fp16 dots compile to FMA on sm_75; cuBLAS uses its "
                             "tensor cores",
}


def unsupported_reason(target, dtype):
    """Why the triton backend should not run ``dtype`` on ``target``, or None when it should."""
    if target is None:
        return "no launch configurations for this GPU"
    return UNSUPPORTED.get((target.family, dtype))
