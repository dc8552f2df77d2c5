"""nn.Module wrappers (form (c)): hold the hyper-parameters, call the fused front-ends.

``forward(hidden, lm_head, targets, ...)`` where ``lm_head`` is the ``[V, H]`` weight tensor or an
``nn.Linear`` (its weight and bias are used; an explicit ``bias=`` keyword wins). Returns
``(loss, metrics)`` like the front-ends in :mod:`gift_fast.losses`.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from . import losses as L

__all__ = ["GIFTLoss", "GRPOLoss", "DPOLoss", "IPOLoss", "SimPOLoss", "RPOLoss", "UNALoss",
           "FDivSFTLoss", "DFTLoss", "IFTLoss"]


def _weight_bias(lm_head, bias):
    if isinstance(lm_head, nn.Linear):
        return lm_head.weight, (bias if bias is not None else lm_head.bias)
    if isinstance(lm_head, torch.Tensor):
        return lm_head, bias
    raise TypeError(f"lm_head: expected a [V, H] weight tensor or an nn.Linear, "
                    f"got {type(lm_head).__name__}")


class _FusedLoss(nn.Module):
    _fn = None          # the front-end in gift_fast.losses
    _n_data = 0         # positional per-batch tensors after targets (anchor, rewards, ...)

    def __init__(self, **hparams):
        super().__init__()
        sig = inspect.signature(type(self)._fn)
        allowed = {n for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY}
        unknown = set(hparams) - allowed
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown option(s) {sorted(unknown)}; "
                            f"expected some of {sorted(allowed)}")
        self.hparams = hparams

    def forward(self, hidden, lm_head, targets, *data, bias=None, **batch_kwargs):
        if len(data) > self._n_data:
            raise TypeError(f"{type(self).__name__}.forward: expected at most {self._n_data} "
                            f"positional tensors after targets, got {len(data)}")
        weight, bias = _weight_bias(lm_head, bias)
        kwargs = dict(self.hparams)
        kwargs.update(batch_kwargs)
        return type(self)._fn(hidden, weight, targets, *data, bias=bias, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


def _make(name, fn, n_data, doc):
    cls = type(name, (_FusedLoss,), {"_fn": staticmethod(fn), "_n_data": n_data, "__doc__": doc})
    cls.__module__ = __name__
    return cls


GIFTLoss = _make("GIFTLoss", L.gift_loss, 2,
                 "GIFT. forward(hidden, lm_head, targets, anchor_logps, rewards, **batch_kwargs); "
                 "options as gift_fast.gift_loss (group_size, beta, eps, std, ...).")
GRPOLoss = _make("GRPOLoss", L.grpo_loss, 2,
                 "GRPO. forward(hidden, lm_head, targets, old_logps, advantages, ref_logps=None, ...).")
DPOLoss = _make("DPOLoss", L.dpo_loss, 1, "DPO. forward(hidden, lm_head, targets, ref_logps).")
IPOLoss = _make("IPOLoss", L.ipo_loss, 1, "IPO. forward(hidden, lm_head, targets, ref_logps).")
SimPOLoss = _make("SimPOLoss", L.simpo_loss, 0, "SimPO. forward(hidden, lm_head, targets).")
RPOLoss = _make("RPOLoss", L.rpo_loss, 2, "RPO. forward(hidden, lm_head, targets, ref_logps, rewards).")
UNALoss = _make("UNALoss", L.una_loss, 1,
                "UNA. forward(hidden, lm_head, targets, anchor_logps, labels=..., scores=...).")
FDivSFTLoss = _make("FDivSFTLoss", L.fdiv_sft_loss, 1,
                    "f-divergence SFT. forward(hidden, lm_head, targets, ref_logps=None).")
DFTLoss = _make("DFTLoss", L.dft_loss, 0, "DFT. forward(hidden, lm_head, targets).")
IFTLoss = _make("IFTLoss", L.ift_loss, 0,
                "IFT. forward(hidden_from_mixed_inputs, lm_head, targets).")
