"""Loss epilogues on precomputed per-token log-probs (form (a) of every loss).

Each function takes per-token log-probs of the policy (``logps``, with gradient), the log-probs
the ratio is taken against (``anchor_logps``, no gradient; GRPO's KL term also
``kl_ref_logps``), and per-sequence data, and returns ``(loss, metrics)``: ``loss`` a scalar (or
per-token / per-sequence / per-pair values with ``reduction="none"``), ``metrics`` a dict of
detached 0-dim tensors worth logging (no host sync to produce them). Every loss reports
``nonfinite_rows``: the number of active tokens whose log-prob, or a per-token input at that token
(anchor / KL reference log-prob, per-token advantage), is NaN or +-inf. Non-finite values are
not checked on this path (it would cost a host sync): they propagate into the loss and gradients,
and this count is how to see it. On an empty batch every metric is finite (0).

Per-token log-probs given as data must be float32 or float64 (16-bit ones are refused,
:func:`gift_fast.validation.check_logprob_input`); ``logps`` may be any float dtype; rewards,
scores and advantages of any float dtype are cast.

Layouts: padded ``logps [B, T]`` with an optional ``mask [B, T]`` (nonzero = active token; None =
all active), or packed ``logps [N]`` with ``cu_seqlens [B + 1]``. Ignored tokens contribute
nothing, whatever their log-prob value. All reductions and statistics run in float32 (float64
when an input is float64), whatever the input dtype. The math follows ``docs/losses.md``.

Every loss lives in its family module of :mod:`gift_fast.losses` (as ``<name>_loss_from_logps``);
this module re-exports each one under its loss's name, ``<name>_loss``. These compose with any
engine producing per-token log-probs; the fused front-ends call them on the output of
:func:`gift_fast.linear_logprobs`.
"""
from __future__ import annotations

from .losses import SPECS
from .losses.common import REDUCTIONS, sequence_logratios
from .losses.grpo import GRPO_LOSS_TYPES, group_advantages
from .losses.rpo import RPO_KINDS
from .losses.sft import DIVERGENCES, discounted_suffix_sum, phi_f
from .losses.una import UNA_KINDS

__all__ = ["group_advantages", "sequence_logratios", "discounted_suffix_sum", "phi_f",
           "REDUCTIONS", "GRPO_LOSS_TYPES", "RPO_KINDS", "UNA_KINDS", "DIVERGENCES"]

for _spec in SPECS:
    globals()[f"{_spec.name}_loss"] = _spec.from_logps
    __all__.append(f"{_spec.name}_loss")
del _spec
