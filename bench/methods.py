"""The registry of benchmarked methods.

A method computes one *objective* on a case's shared :class:`~bench.inputs.Inputs`:

- ``logp``: per-token log-probs with an arbitrary upstream gradient, ``sum(grad_tok * logp)``
  (what any user loss on top of ``linear_logprobs`` needs);
- ``sft``: token-mean NLL (f-divergence SFT with ``tv`` equals it);
- ``gift``, ``grpo``, ``dpo``: the losses of docs/losses.md (GIFT: anchor = old log-probs,
  beta 1, detached group statistics; GRPO: DAPO aggregation, clip 0.2, no KL; DPO: beta 0.1,
  chosen first half, rejected second half, mean over pairs).

Most methods are an *engine* that yields per-token log-probs (naive materialised logits,
torch.compile of it, PyTorch's ``F.linear_cross_entropy``, Liger FLCE, CCE, gift_fast's
``linear_logprobs``) followed by the same float32 torch *epilogue* from this module. The fused
losses (gift_fast's own, Liger's chunked GRPO / DPO) compute the objective in one call. ``gemm``
is the bare lm_head GEMM (logits, dX, dW): the roofline anchor every time is divided by.

Peers are called through their public APIs only.

Each :class:`Method` has ``setup(inputs, kind, ctx) -> fn``. ``fn()`` runs the method once:
kind ``fwd`` returns the loss computed under ``no_grad``; kind ``fwd+bwd`` returns
``(loss, dX, dW)``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .inputs import IGNORE_INDEX, Inputs, Shape

KINDS = ("fwd", "fwd+bwd")
OBJECTIVES = ("logp", "sft", "gift", "grpo", "dpo")
GIFT_BETA, GIFT_EPS = 1.0, 1e-6
GRPO_CLIP = 0.2
DPO_BETA = 0.1


@dataclass
class Context:
    """Where and how the suite runs (set once by run_suite)."""
    device: torch.device
    smoke: bool = False          # CPU smoke mode: no torch.compile (compile time is not seconds)
    dtype: torch.dtype = torch.bfloat16   # of hidden and weight (the --cpu mode uses float32)
    interleave_repeats: int = 0  # > 0: CPU mode, repeats of all methods of a case round-robin

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# ----------------------------------------------------------------------------------- epilogues
# Written once, dtype-generic: float32 in the benchmark, float64 in the audit's reference.

def _seq_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(-1)


def epilogue_logp(lp: torch.Tensor, inp: Inputs) -> torch.Tensor:
    return (lp * inp.grad_tok.to(lp.dtype)).sum()


def epilogue_sft(lp: torch.Tensor, inp: Inputs) -> torch.Tensor:
    m = inp.mask.to(lp.dtype)
    return -(lp * m).sum() / m.sum().clamp_min(1)


def epilogue_gift(lp: torch.Tensor, inp: Inputs) -> torch.Tensor:
    """docs/losses.md, GIFT, authors' defaults: anchor = old log-probs, beta 1, eps 1e-6, unbiased
    std, sum over tokens (p = 0), detached group statistics, mean over sequences. The group
    statistics are the library's (gift_fast.losses.gift), the one implementation of the
    authors' rules."""
    from gift_fast.losses.gift import gift_advantages, gift_implicit_z
    m = inp.mask.to(lp.dtype)
    s = _seq_sum(lp - inp.anchor_logps.to(lp.dtype), m)
    r = inp.rewards.to(lp.dtype)
    grp = torch.arange(s.shape[0], device=s.device) // inp.layout.group_size
    n_groups = s.shape[0] // inp.layout.group_size
    a = gift_advantages(r, grp, n_groups, GIFT_EPS).value
    z = gift_implicit_z(s, grp, n_groups, GIFT_EPS).value
    return ((a - GIFT_BETA * z) ** 2).mean()


def epilogue_grpo(lp: torch.Tensor, inp: Inputs) -> torch.Tensor:
    """docs/losses.md, GRPO: clipped ratio, DAPO aggregation (sum / active tokens), beta = 0."""
    m = inp.mask.to(lp.dtype)
    ratio = torch.exp(lp - inp.anchor_logps.to(lp.dtype))
    adv = inp.advantages.to(lp.dtype)[:, None]
    per_tok = -torch.minimum(ratio * adv, ratio.clamp(1 - GRPO_CLIP, 1 + GRPO_CLIP) * adv)
    return (per_tok * m).sum() / m.sum().clamp_min(1)


def epilogue_dpo(lp: torch.Tensor, inp: Inputs, ref: Optional[torch.Tensor] = None) -> torch.Tensor:
    """docs/losses.md, DPO: -log sigmoid(beta (d_chosen - d_rejected)), mean over pairs."""
    m = inp.mask.to(lp.dtype)
    ref = inp.ref_logps if ref is None else ref
    s = _seq_sum(lp - ref.to(lp.dtype), m)
    half = s.shape[0] // 2
    return -F.logsigmoid(DPO_BETA * (s[:half] - s[half:2 * half])).mean()


EPILOGUES: Dict[str, Callable] = {"logp": epilogue_logp, "sft": epilogue_sft,
                                  "gift": epilogue_gift, "grpo": epilogue_grpo,
                                  "dpo": epilogue_dpo}


# ------------------------------------------------------------------------------------- engines
# Each returns per-token log-probs [B, T] in float32, 0 on ignored rows (no gradient there).

def _masked(lp_flat: torch.Tensor, inp: Inputs) -> torch.Tensor:
    lp = lp_flat.float().view(inp.layout.n_seq, inp.layout.seq_len)
    return torch.where(inp.mask, lp, torch.zeros_like(lp))


def naive_logps(hidden2d, weight, targets1d):
    """Materialised logits, float32 log_softmax, gather: the textbook eager path."""
    logits = hidden2d @ weight.T
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    return logp_all.gather(1, targets1d.clamp_min(0)[:, None]).squeeze(1)


def _engine_naive(inp: Inputs, ctx: Context):
    return lambda: _masked(naive_logps(inp.hidden2d, inp.weight, inp.targets1d), inp)


_COMPILED = {}


def _engine_compile(inp: Inputs, ctx: Context):
    if "fn" not in _COMPILED:   # one compiled function per process; dynamic shapes avoid recompiles
        _COMPILED["fn"] = torch.compile(naive_logps, dynamic=True)
    fn = _COMPILED["fn"]
    return lambda: _masked(fn(inp.hidden2d, inp.weight, inp.targets1d), inp)


def _lce_options(chunking: Optional[str]):
    """None: PyTorch's reference path (materialised logits); else its chunked implementation."""
    if chunking is None:
        return None
    return torch.nn.LinearCrossEntropyOptions(chunking_method=chunking)


def _engine_torch_lce(chunking: Optional[str]):
    def make(inp: Inputs, ctx: Context):
        opts = _lce_options(chunking)
        return lambda: _masked(-F.linear_cross_entropy(
            inp.hidden2d, inp.weight, inp.targets1d, reduction="none",
            ignore_index=IGNORE_INDEX, options=opts), inp)
    return make


def _torch_lce_mean(chunking: Optional[str]):
    """The SFT objective in one call: F.linear_cross_entropy with reduction="mean" (the chunked
    path computes the gradients inside the forward for the scalar reductions)."""
    def make(inp: Inputs, ctx: Context):
        opts = _lce_options(chunking)
        return lambda: F.linear_cross_entropy(inp.hidden2d, inp.weight, inp.targets1d,
                                              reduction="mean", ignore_index=IGNORE_INDEX,
                                              options=opts)
    return make


def _engine_liger_flce(inp: Inputs, ctx: Context):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="none", ignore_index=IGNORE_INDEX)
    return lambda: _masked(-loss_fn(inp.weight, inp.hidden2d, inp.targets1d), inp)


def _engine_cce(inp: Inputs, ctx: Context):
    from cut_cross_entropy import linear_cross_entropy
    return lambda: _masked(-linear_cross_entropy(inp.hidden2d, inp.weight, inp.targets1d,
                                                 ignore_index=IGNORE_INDEX, reduction="none"), inp)


def _engine_gift(backend: str):
    def make(inp: Inputs, ctx: Context):
        from gift_fast import linear_logprobs
        return lambda: _masked(linear_logprobs(inp.hidden2d, inp.weight, inp.targets1d,
                                               backend=backend), inp)
    return make


# ------------------------------------------------------------------------------- fused losses

def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _gift_fast_loss(name: str):
    def make(inp: Inputs, ctx: Context):
        import gift_fast
        fn = getattr(gift_fast, name)
        h, w, t = inp.hidden, inp.weight, inp.targets
        if name == "gift_loss":
            return lambda: _first(fn(h, w, t, inp.anchor_logps, inp.rewards,
                                     group_size=inp.layout.group_size))
        if name == "grpo_loss":
            return lambda: _first(fn(h, w, t, inp.anchor_logps, inp.advantages, beta=0.0,
                                     loss_type="dapo"))
        if name == "dpo_loss":
            return lambda: _first(fn(h, w, t, inp.ref_logps, beta=DPO_BETA))
        if name == "fdiv_sft_loss":
            return lambda: _first(fn(h, w, t, divergence="tv"))
        raise KeyError(name)
    return make


def _liger_grpo(inp: Inputs, ctx: Context):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                       epsilon_low=GRPO_CLIP, epsilon_high=GRPO_CLIP,
                                       compiled=ctx.cuda)
    ids = inp.targets.clamp_min(0)
    attn = inp.mask.to(torch.int64)
    return lambda: _first(loss_fn(inp.hidden, inp.weight, ids, attn, inp.advantages,
                                  old_per_token_logps=inp.anchor_logps))


def _liger_dpo(inp: Inputs, ctx: Context):
    # Liger's DPO cannot take precomputed reference log-probs: without a reference model it uses
    # none, so the audit compares it with the DPO objective at zero reference log-probs.
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    loss_fn = LigerFusedLinearDPOLoss(beta=DPO_BETA, use_ref_model=False, compiled=ctx.cuda,
                                      ignore_index=IGNORE_INDEX)
    return lambda: _first(loss_fn(inp.weight, inp.hidden, inp.targets))


# -------------------------------------------------------------------------------- the registry

@dataclass
class Method:
    name: str
    objective: str
    build: Callable[[Inputs, Context], Callable[[], torch.Tensor]]   # -> loss closure
    requires: Tuple[str, ...] = ()
    peer: bool = False            # a library users would otherwise pick (or a plain-torch path)
    engine: str = ""              # the per-token engine, "" for fused losses
    mem_factor: float = 0.0       # estimated extra bytes per N*V element (OOM pre-check)
    note: str = ""
    audit_ref_zero: bool = False  # audit: the method computes the objective without ref log-probs

    def estimate_bytes(self, shape: Shape) -> int:
        return int(self.mem_factor * shape.n * shape.v)


def _gemm_method() -> Method:
    return Method("gemm", "gemm", None, mem_factor=4.0,
                  note="bare lm_head GEMM: logits = X W^T; fwd+bwd adds dX = G W, dW = G^T X")


ENGINES = {
    # name: (builder, requires, peer, mem_factor bytes per N*V, note)
    "naive": (_engine_naive, (), True, 12.0, "materialised logits + float32 log_softmax + gather"),
    "compile": (_engine_compile, ("compile",), True, 8.0, "torch.compile(dynamic=True) of naive"),
    "torch_lce": (_engine_torch_lce("auto"), ("torch_lce",), True, 1.0,
                  "F.linear_cross_entropy reduction=none, chunking_method=auto"),
    "torch_lce_ar1": (_engine_torch_lce("aspect_ratio:1"), ("torch_lce",), True, 1.0,
                      "F.linear_cross_entropy reduction=none, chunking_method=aspect_ratio:1"),
    "torch_lce_unchunked": (_engine_torch_lce(None), ("torch_lce",), True, 12.0,
                            "F.linear_cross_entropy reduction=none, options=None (reference "
                            "path, materialised logits)"),
    "liger_flce": (_engine_liger_flce, ("cuda", "liger_kernel"), True, 0.5,
                   "Liger LigerFusedLinearCrossEntropyLoss reduction=none"),
    "cce": (_engine_cce, ("cuda", "cut_cross_entropy"), True, 0.5,
            "CCE linear_cross_entropy reduction=none (default filter_eps)"),
    "gift_fast": (_engine_gift("auto"), ("gift_fast",), False, 0.0,
                  "gift_fast.linear_logprobs backend=auto (triton on CUDA)"),
    "gift_fast.torch": (_engine_gift("torch"), ("gift_fast",), False, 0.0,
                        "gift_fast.linear_logprobs backend=torch (chunked)"),
    "gift_fast.reference": (_engine_gift("reference"), ("gift_fast",), False, 12.0,
                            "gift_fast.linear_logprobs backend=reference (materialised)"),
}

FUSED = [
    Method("gift_fast.gift_loss", "gift", _gift_fast_loss("gift_loss"), ("gift_fast.losses",)),
    Method("gift_fast.grpo_loss", "grpo", _gift_fast_loss("grpo_loss"), ("gift_fast.losses",)),
    Method("gift_fast.dpo_loss", "dpo", _gift_fast_loss("dpo_loss"), ("gift_fast.losses",)),
    Method("gift_fast.fdiv_sft_loss", "sft", _gift_fast_loss("fdiv_sft_loss"),
           ("gift_fast.losses",)),
    Method("torch_lce.sft", "sft", _torch_lce_mean("auto"), ("torch_lce",), peer=True,
           mem_factor=1.0, note="F.linear_cross_entropy reduction=mean, chunking_method=auto"),
    Method("torch_lce_unchunked.sft", "sft", _torch_lce_mean(None), ("torch_lce",), peer=True,
           mem_factor=12.0, note="F.linear_cross_entropy reduction=mean, options=None"),
    Method("liger.grpo", "grpo", _liger_grpo, ("liger_kernel",), peer=True, mem_factor=0.5,
           note="Liger LigerFusedLinearGRPOLoss (chunk = 1 sequence; compiled on CUDA only)"),
    Method("liger.dpo", "dpo", _liger_dpo, ("liger_kernel",), peer=True, mem_factor=0.5,
           note="Liger LigerFusedLinearDPOLoss without reference model (compiled on CUDA only)",
           audit_ref_zero=True),
]


def build_registry() -> Dict[str, Method]:
    reg = {"gemm": _gemm_method()}
    for obj in OBJECTIVES:
        for eng, (builder, req, peer, mem, note) in ENGINES.items():
            name = f"{eng}+{obj}"
            reg[name] = Method(name, obj, _compose(builder, obj), req, peer, eng, mem,
                               note + ("" if obj == "logp" else f", then the torch {obj} epilogue"))
    for m in FUSED:
        reg[m.name] = m
    return reg


def _compose(engine_builder, objective: str):
    epi = EPILOGUES[objective]

    def make(inp: Inputs, ctx: Context):
        lp_fn = engine_builder(inp, ctx)
        return lambda: epi(lp_fn(), inp)
    return make


REGISTRY = build_registry()

# The gift_fast method every peer is compared with, per objective.
GIFT_FAST_FOR = {"logp": "gift_fast+logp", "sft": "gift_fast.fdiv_sft_loss",
                 "gift": "gift_fast.gift_loss", "grpo": "gift_fast.grpo_loss",
                 "dpo": "gift_fast.dpo_loss"}


# -------------------------------------------------------------------------------- availability

def _try_import(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
        return None
    except Exception as e:  # noqa: BLE001 - any import failure makes the method unavailable
        return f"unavailable: cannot import {module} ({type(e).__name__}: {e})"


def unavailable_reason(method: Method, ctx: Context) -> Optional[str]:
    """None when the method can run here, else ``"unavailable: ..."`` / ``"skipped: ..."``."""
    for req in method.requires:
        if req == "cuda" and not ctx.cuda:
            return "unavailable: needs CUDA"
        if req == "liger_kernel":
            r = _try_import("liger_kernel")
            if r:
                return r
        if req == "cut_cross_entropy":
            r = _try_import("cut_cross_entropy")
            if r:
                return r
        if req == "torch_lce" and not (hasattr(F, "linear_cross_entropy")
                                       and hasattr(torch.nn, "LinearCrossEntropyOptions")):
            return f"unavailable: torch {torch.__version__} has no F.linear_cross_entropy options"
        if req == "compile" and ctx.smoke:
            return "skipped: torch.compile is not run in CPU smoke mode (compile time)"
        if req == "gift_fast":
            r = _try_import("gift_fast")
            if r:
                return r
        if req == "gift_fast.losses":
            try:
                import gift_fast
                getattr(gift_fast, method.name.split(".", 1)[1])
            except Exception as e:  # noqa: BLE001
                return f"unavailable: {type(e).__name__}: {e}"
    return None


# ----------------------------------------------------------------------------------- runners

def make_runner(method: Method, inp: Inputs, kind: str, ctx: Context) -> Callable:
    """The callable that is timed: one forward (``fwd``) or forward + backward (``fwd+bwd``)."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if method.name == "gemm":
        return _gemm_runner(inp, kind)
    loss_fn = method.build(inp, ctx)
    leaves = [inp.hidden, inp.weight]
    if kind == "fwd":
        def run_fwd():
            with torch.no_grad():
                return loss_fn()
        return run_fwd

    def run_fwd_bwd():
        loss = loss_fn()
        dx, dw = torch.autograd.grad(loss, leaves)
        return loss.detach(), dx, dw
    return run_fwd_bwd


def _gemm_runner(inp: Inputs, kind: str) -> Callable:
    x = inp.hidden2d.detach()
    w = inp.weight.detach()
    if kind == "fwd":
        return lambda: x @ w.T
    # A fixed upstream gradient of the logits, allocated once outside the timed region.
    g = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)

    def run():
        logits = x @ w.T
        dx = g @ w
        dw = g.T @ x
        return logits, dx, dw
    return run


def method_names(patterns: Optional[List[str]] = None) -> List[str]:
    """Registry names matching any of the comma-separated fnmatch patterns (all when None)."""
    import fnmatch
    if not patterns:
        return list(REGISTRY)
    out = []
    for name in REGISTRY:
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            out.append(name)
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in REGISTRY)]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(REGISTRY)}")
    return out
