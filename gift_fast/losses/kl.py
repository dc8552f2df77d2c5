"""KL-to-reference penalty: ``L = beta * mean_n k(logp_n, ref_n)`` over active tokens, on samples
of the policy, with ``k`` an estimator of ``KL(pi || pi_ref)`` per token (docs/losses.md,
"KL penalty"). Token-local: on the triton backend the one-pass op applies.

``kl_ref_logps`` is the frozen reference the penalty pulls towards; ``beta`` is the KL
coefficient (>= 0), as in GRPO, whose ``beta`` term is this loss with ``estimator="k3"``.
Estimators: ``k3 = exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased; the default, as in
GRPO) and ``k2 = (logp - ref)^2 / 2`` (>= 0, biased, gradient ``logp - ref``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..sequences import nonfinite_rows
from ..validation import check_choice
from .common import (REDUCTIONS, FusedLossModule, Head, LossResult, LossSpec, check_number,
                     masked, per_token, prepare, reduce, token_local)
from .grpo import k3_kl

__all__ = ["kl_loss", "kl_loss_from_logps", "KLLoss", "KL_ESTIMATORS"]

KL_ESTIMATORS = ("k3", "k2")


def kl_loss_from_logps(logps: torch.Tensor, kl_ref_logps: torch.Tensor, *,
                       mask: Optional[torch.Tensor] = None,
                       cu_seqlens: Optional[torch.Tensor] = None, beta: float = 1.0,
                       estimator: str = "k3", reduction: str = "mean") -> LossResult:
    """``beta * k(logp, ref)`` per active token: token mean (``"mean"``), sum, or per token like
    ``logps`` (``"none"``, 0 at ignored tokens). Metrics: ``kl`` (mean estimator value over
    active tokens, without beta), ``log_ratio_mean`` (mean ``logp - ref``), ``nonfinite_rows``."""
    check_choice("estimator", estimator, KL_ESTIMATORS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_number("beta", beta, 0.0)
    if kl_ref_logps is None:
        raise ValueError("kl_ref_logps: required (the reference's per-token log-probs), got None")
    layout, active, acc, lp, fl = prepare(logps, mask, cu_seqlens, kl_ref_logps=kl_ref_logps)
    ref = masked(active, fl["kl_ref_logps"].detach())
    lpm = masked(active, lp)
    kl = k3_kl(lpm, ref) if estimator == "k3" else (lpm - ref) ** 2 / 2
    n_active = active.to(acc).sum()
    per = masked(active, beta * kl)
    loss = per_token(layout, per) if reduction == "none" else reduce(per, reduction, n_active)
    with torch.no_grad():
        nf = n_active.clamp_min(1)
        metrics = {"kl": (masked(active, kl).sum() / nf).float(),
                   "log_ratio_mean": ((lpm - ref).sum() / nf).float(),
                   "nonfinite_rows": nonfinite_rows(active, lp, fl["kl_ref_logps"])}
    return loss, metrics


def kl_loss(hidden, weight, targets, kl_ref_logps, *, beta=1.0, estimator="k3", cu_seqlens=None,
            bias=None, temperature=1.0, softcap=None, ignore_index=-100, reduction="mean",
            backend="auto", vocab_parallel_group=None) -> LossResult:
    """KL-to-reference penalty on hidden states; see :func:`kl_loss_from_logps`."""
    head = Head(weight, bias, temperature, softcap, ignore_index, backend, vocab_parallel_group)
    return token_local(
        hidden, targets, cu_seqlens, head,
        lambda logps, mask: kl_loss_from_logps(logps, kl_ref_logps, mask=mask,
                                               cu_seqlens=cu_seqlens, beta=beta,
                                               estimator=estimator, reduction=reduction),
        scalar=reduction != "none")


class KLLoss(FusedLossModule):
    """The KL-to-reference penalty as a module; options as :func:`kl_loss`."""

    loss_fn = staticmethod(kl_loss)

    def forward(self, hidden: torch.Tensor, lm_head, targets: torch.Tensor,
                kl_ref_logps: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                **call_options) -> LossResult:
        return self._loss(hidden, lm_head, targets, kl_ref_logps, bias=bias, **call_options)


SPECS = (LossSpec("kl", kl_loss_from_logps, kl_loss, KLLoss, token_local=True,
                  mean_over="tokens"),)
