"""What every loss module shares: input layout and checks, reductions, the fused front-end
plumbing, the nn.Module base, the per-loss spec and the deprecated-name shim.

A loss module (``gift_fast/losses/<family>.py``) holds, for each loss of its family: the
epilogue on per-token log-probs (``<name>_from_logps``, re-exported by
:mod:`gift_fast.functional` under the loss's name), the one function that parses and checks its
options (called by the composed and, where there is one, the fused path), the fused front-end on
hidden states, the ``nn.Module``, and a :class:`LossSpec` saying whether the loss is token-local
and what its ``reduction="mean"`` divides by.

Argument vocabulary, the same in every loss (docs/losses.md, "One vocabulary"):

- ``logps``: per-token log-probs of the policy being trained (with gradient);
- ``anchor_logps``: per-token log-probs the policy's log-ratio is taken against (the rollout
  policy for GIFT / GRPO, the frozen reference for DPO / IPO / RPO / UNA / f-divergence SFT);
  ``None`` where the loss can go without (reference-free, or on-policy: anchor = policy);
- ``kl_ref_logps``: per-token log-probs of the reference a KL penalty pulls towards (GRPO's
  ``beta`` term, :func:`gift_fast.kl_loss`);
- ``length_norm``: p in [0, 1], sequence log-ratios are divided by ``|y|^p``;
- ``reduction``: ``"mean"`` (the loss's own normaliser, :attr:`LossSpec.mean_over`), ``"sum"``
  (the same numerator, undivided) or ``"none"`` (per token, per sequence, per pair or per group).
"""
from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..backends import resolve_backend
from .. import logprobs as op_layer
from ..logprobs import grad_wanted, linear_logprobs
from ..sequences import Layout, acc_dtype, check_like, make_layout, token_mask
from ..validation import check_finite, check_linear_inputs, check_logprob_input

Metrics = Dict[str, torch.Tensor]
REDUCTIONS = ("mean", "sum", "none")
LossResult = Tuple[torch.Tensor, Metrics]


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------

def check_float_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")


def check_number(name: str, value, lo: Optional[float] = None, hi: Optional[float] = None,
                 lo_open: bool = False) -> float:
    """``value`` as given if it is a finite real number in the range, else ValueError."""
    # A comparison, not math.isfinite, which dynamo cannot trace (False for NaN as well).
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and -math.inf < value < math.inf)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        rng = ""
        if lo is not None or hi is not None:
            rng = f" in {'(' if lo_open else '['}{lo if lo is not None else '-inf'}, " \
                  f"{hi if hi is not None else 'inf'}]"
        raise ValueError(f"{name}: expected a finite number{rng}, got {value!r}")
    return value


def check_length_norm(length_norm) -> float:
    return check_number("length_norm", length_norm, 0.0, 1.0)


def check_per_seq(name: str, t, layout: Layout, logps: torch.Tensor,
                  check_values: bool = True) -> None:
    check_float_tensor(name, t)
    if tuple(t.shape) != (layout.n_seq,):
        raise ValueError(f"{name}: expected shape ({layout.n_seq},) (one value per sequence), "
                         f"got {tuple(t.shape)}")
    if t.device != logps.device:
        raise ValueError(f"{name}: expected device {logps.device}, got {t.device}")
    if check_values:
        check_finite(name, t)


def prepare(logps, mask, cu_seqlens, **others):
    """Validates the per-token inputs; returns (layout, flat bool mask, acc dtype, flat logps,
    flat others).

    ``others`` are per-token log-probs given as data (anchor / KL reference): float32 or float64
    only (:func:`gift_fast.validation.check_logprob_input`)."""
    check_float_tensor("logps", logps)
    layout = make_layout(logps, cu_seqlens, "logps")
    for k, v in others.items():
        if v is not None:
            check_logprob_input(k, v)
            check_like(k, v, logps, "one value per token, like logps")
    active = token_mask(logps, mask)
    acc = acc_dtype(logps, *others.values())
    flat = {k: (v.reshape(-1).to(acc) if v is not None else None) for k, v in others.items()}
    return layout, active, acc, logps.reshape(-1).to(acc), flat


def detached(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach()


# --------------------------------------------------------------------------------------------
# reductions
# --------------------------------------------------------------------------------------------

def reduce(per: torch.Tensor, reduction: str, denom=None) -> torch.Tensor:
    """``per`` (``"none"``), its sum, or its sum over ``denom`` (default ``per.numel()``),
    clamped to >= 1 so that an empty batch gives 0."""
    if reduction == "none":
        return per
    total = per.sum()
    if reduction == "sum":
        return total
    n = per.numel() if denom is None else denom
    if isinstance(n, torch.Tensor):
        return total / n.clamp_min(1)
    return total / max(n, 1)


def per_token(layout: Layout, flat: torch.Tensor) -> torch.Tensor:
    """Flat per-token values back in the caller's layout (``[B, T]`` or ``[N]``)."""
    return flat.view(layout.shape)


def masked(active: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(active, x, torch.zeros((), dtype=x.dtype, device=x.device))


def mean_of(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().mean() if x.numel() else torch.zeros((), device=x.device)


def seq_logratios(layout: Layout, active, lp, anchor, length_norm: float):
    """``s_i = sum_{n in i} m_n (lp_n - anchor_n) / |y_i|^p`` and ``|y_i|`` on flat inputs."""
    diff = lp if anchor is None else lp - anchor
    s = layout.seq_sum(masked(active, diff))
    lengths = layout.seq_sum(active.to(lp.dtype))
    if length_norm != 0:
        s = s / lengths.clamp_min(1) ** length_norm
    return s, lengths


def sequence_logratios(logps: torch.Tensor, anchor_logps: Optional[torch.Tensor] = None, *,
                       mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                       length_norm: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``s_i = sum_{n in i} m_n (logp_n - anchor_n) / |y_i|^p`` and ``|y_i|`` (float, >= 0).

    ``anchor_logps=None`` gives plain per-sequence log-likelihoods (SimPO). ``|y_i|`` is clamped
    to >= 1 where it divides (an empty response gives s = 0).
    """
    check_length_norm(length_norm)
    layout, active, acc, lp, fl = prepare(logps, mask, cu_seqlens, anchor_logps=anchor_logps)
    return seq_logratios(layout, active, lp, fl["anchor_logps"], length_norm)


# --------------------------------------------------------------------------------------------
# what a loss declares about itself
# --------------------------------------------------------------------------------------------

MEAN_OVER = ("tokens", "sequences", "pairs", "groups")


@dataclass(frozen=True)
class LossSpec:
    """What the rest of the package needs to know about one loss, declared next to its math.

    ``mean_over``: what ``reduction="mean"`` divides by (``"tokens"``: active tokens,
    ``"sequences"``, ``"pairs"``: B/2, ``"groups"``: B / group_size); a callable of the loss's
    options returns it where it depends on them (GRPO's ``loss_type``, UNA's ``kind``). Data
    parallel training scales a rank's mean by its count over the all-reduced count
    (:meth:`count`), so this is the single place that says it. ``global_statistics``: the loss
    takes ``data_parallel_group=`` and is then exact over the whole batch itself (GIFT).
    """

    name: str
    from_logps: Callable
    fused: Callable
    module: type
    token_local: bool
    mean_over: object
    global_statistics: bool = False

    def mean_kind(self, **options) -> str:
        kind = self.mean_over(**options) if callable(self.mean_over) else self.mean_over
        assert kind in MEAN_OVER, kind
        return kind

    def count(self, active: torch.Tensor, n_seq: int, group_size: Optional[int] = None,
              **options) -> int:
        """How many items this (part of a) batch adds to the ``reduction="mean"`` denominator:
        ``active`` is the token mask, ``n_seq`` the number of sequences."""
        kind = self.mean_kind(**options)
        if kind == "tokens":
            return int(active.sum())
        if kind == "pairs":
            return n_seq // 2
        if kind == "groups":
            return n_seq // max(group_size or 1, 1)
        return n_seq


# --------------------------------------------------------------------------------------------
# deprecated argument names
# --------------------------------------------------------------------------------------------

def renamed(**old_to_new):
    """Decorator: old keyword names keep working for one release with a DeprecationWarning.

    ``old_to_new`` maps an old name to the new name, or to ``(new_name, convert)`` where
    ``convert(old_value)`` gives the new value (IPO's ``length_normalized`` bool -> float)."""
    table = {old: (new if isinstance(new, tuple) else (new, None)) for old, new in old_to_new.items()}

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, (new, convert) in table.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{fn.__name__}: got both {old!r} (deprecated) and {new!r}")
                warnings.warn(f"{fn.__name__}: {old!r} is deprecated, use {new!r} (removed in the "
                              f"next release; see CHANGELOG.md)", DeprecationWarning, stacklevel=2)
                value = kwargs.pop(old)
                kwargs[new] = convert(value) if convert is not None else value
            return fn(*args, **kwargs)
        call.renamed_arguments = dict(table)
        return call
    return wrap


# --------------------------------------------------------------------------------------------
# fused front-ends: hidden states + lm_head weight -> policy log-probs -> epilogue
# --------------------------------------------------------------------------------------------

def policy_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 bias: Optional[torch.Tensor], temperature: float, ignore_index: int,
                 backend: str, softcap: Optional[float] = None,
                 vocab_parallel_group=None) -> torch.Tensor:
    """Per-token log-probs of ``targets`` (float32, 0 at ignored rows, with gradient): the single
    entry point every front-end uses for the policy's log-probs."""
    return linear_logprobs(hidden, weight, targets, bias, temperature=temperature,
                           softcap=softcap, ignore_index=ignore_index, backend=backend,
                           vocab_parallel_group=vocab_parallel_group)


def check_layout(hidden, targets, cu_seqlens) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden: expected a torch.Tensor, got {type(hidden).__name__}")
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(f"hidden: expected shape [B, T, H] (or [N, H] with cu_seqlens), "
                             f"got {tuple(hidden.shape)}")
    elif hidden.dim() != 2:
        raise ValueError(f"hidden: expected packed shape [N, H] when cu_seqlens is given, "
                         f"got {tuple(hidden.shape)}")
    if isinstance(targets, torch.Tensor) and tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets: expected shape {tuple(hidden.shape[:-1])} (hidden.shape[:-1]), "
                         f"got {tuple(targets.shape)}")


class Head(NamedTuple):
    """The options every front-end shares: how hidden states become log-probs (a NamedTuple:
    dynamo traces it in a fullgraph compile)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    temperature: float = 1.0
    softcap: Optional[float] = None
    ignore_index: int = -100
    backend: str = "auto"
    vocab_parallel_group: object = None


def composed(hidden, targets, cu_seqlens, head: Head, epilogue):
    """``epilogue(logps, mask)`` on the policy log-probs from :func:`gift_fast.linear_logprobs`."""
    check_layout(hidden, targets, cu_seqlens)
    logps = policy_logps(hidden, head.weight, targets, head.bias, head.temperature,
                         head.ignore_index, head.backend, head.softcap, head.vocab_parallel_group)
    return epilogue(logps, targets != head.ignore_index)


def token_local(hidden, targets, cu_seqlens, head: Head, epilogue, scalar: bool = True):
    """A token-local loss (dL/dlogp_n depends on row n only): ``epilogue(logps, mask)``.

    On the triton and torch backends, with gradients wanted and a scalar loss, the one-pass op
    computes dX/dW inside the forward (backward only scales them; 3 GEMM-eq when the memory
    budget holds a chunk of logits). Log-probs and epilogue are composed under vocabulary
    parallelism, and under torch.compile or CUDA graph capture, where the one-pass op (a Python
    loop over chunks around autograd calls) is not a graph node: 4 GEMM-eq there.
    """
    check_layout(hidden, targets, cu_seqlens)
    name = resolve_backend(head.backend, hidden.device, hidden.dtype)
    if (scalar and grad_wanted(hidden, head.weight, head.bias)
            and head.vocab_parallel_group is None and name in ("triton", "torch")
            and not op_layer.must_not_sync(hidden)):   # looked up per call: tests patch it
        from ..backends.triton_token_local import one_pass_token_local
        h2, t1, lead = check_linear_inputs(hidden, head.weight, targets, head.bias,
                                           head.temperature, head.softcap, head.ignore_index)
        mask = targets != head.ignore_index
        return one_pass_token_local(h2, head.weight, head.bias, t1,
                                    lambda lp: epilogue(lp.reshape(lead), mask),
                                    temperature=head.temperature, softcap=head.softcap,
                                    ignore_index=head.ignore_index, backend=name)
    return composed(hidden, targets, cu_seqlens, head, epilogue)


# --------------------------------------------------------------------------------------------
# nn.Module base
# --------------------------------------------------------------------------------------------

def weight_and_bias(lm_head, bias):
    if isinstance(lm_head, nn.Linear):
        return lm_head.weight, (bias if bias is not None else lm_head.bias)
    if isinstance(lm_head, torch.Tensor):
        return lm_head, bias
    raise TypeError(f"lm_head: expected a [V, H] weight tensor or an nn.Linear, "
                    f"got {type(lm_head).__name__}")


class FusedLossModule(nn.Module):
    """Holds a loss's options; ``forward(hidden, lm_head, targets, <data>, ...)`` calls its fused
    front-end, with ``lm_head`` the ``[V, H]`` weight or an ``nn.Linear`` (its weight and bias;
    an explicit ``bias=`` wins). Options of the front-end given to ``forward`` override the
    constructor's for that call. Subclasses spell out ``forward``'s data arguments."""

    loss_fn: Callable = None

    def __init__(self, **options):
        super().__init__()
        fn = type(self).loss_fn
        sig = inspect.signature(fn)
        allowed = {n for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY}
        allowed |= set(getattr(fn, "renamed_arguments", {}))
        unknown = set(options) - allowed
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown option(s) {sorted(unknown)}; "
                            f"expected some of {sorted(allowed)}")
        self.hparams = options

    def _loss(self, hidden, lm_head, targets, *data, bias=None, **call_options) -> LossResult:
        weight, bias = weight_and_bias(lm_head, bias)
        while data and data[-1] is None:    # an optional trailing input left out: the default
            data = data[:-1]
        options = {**self.hparams, **call_options}
        return type(self).loss_fn(hidden, weight, targets, *data, bias=bias, **options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


class TokensLossModule(FusedLossModule):
    """A module whose loss needs only the targets (SimPO, DFT, IFT)."""

    def forward(self, hidden: torch.Tensor, lm_head, targets: torch.Tensor, *,
                bias: Optional[torch.Tensor] = None, **call_options) -> LossResult:
        return self._loss(hidden, lm_head, targets, bias=bias, **call_options)


class AnchoredLossModule(FusedLossModule):
    """A module whose loss takes optional anchor log-probs after the targets (DPO, IPO, UNA,
    f-divergence SFT)."""

    def forward(self, hidden: torch.Tensor, lm_head, targets: torch.Tensor,
                anchor_logps: Optional[torch.Tensor] = None, *,
                bias: Optional[torch.Tensor] = None, **call_options) -> LossResult:
        return self._loss(hidden, lm_head, targets, anchor_logps, bias=bias, **call_options)
