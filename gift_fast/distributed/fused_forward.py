"""Run a fused loss inside the root module's forward (what FSDP2 needs).

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps every parameter as a DTensor shard between
steps and unshards the parameters of a unit only for the duration of that unit's forward; the
gradient of the unsharded weight is then reduce-scattered back to the shards. A fused loss reads
``lm_head.weight`` directly instead of calling ``lm_head``, so it must run inside the root's forward
(lm_head in the root's unit) and, when lm_head is its own ``fully_shard`` unit, inside a forward of
that unit too: :func:`run_in_fsdp_unit`. :class:`FusedLossModel` is the smallest such root: it
calls the backbone, then the loss on the last hidden states and the lm_head weight. Under DDP or on
one device it is just as valid.
"""
from __future__ import annotations

import sys
import types
from typing import Callable

import torch
from torch import nn

_UNIT_METHOD = "_gift_fast_unit_call"


def is_fsdp_unit(module) -> bool:
    """True if ``module`` was given its own ``fully_shard`` (an FSDP2 ``FSDPModule``)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")   # never imported: no module is sharded
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def _no_views(out):
    """``out`` with each view that requires grad cloned (per-token or scalar results: cheap).
    FSDP2 hooks the unit's outputs to all-gather the weight again for the backward; an in-place
    op on a returned view would drop that hook (FSDP2 warns about every view it is given)."""
    if isinstance(out, torch.Tensor):
        return out.clone() if out.requires_grad and out._is_view() else out
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(_no_views(x) for x in out)
    if isinstance(out, list):
        return [_no_views(x) for x in out]
    if isinstance(out, dict):
        return {k: _no_views(v) for k, v in out.items()}
    return out


def _unit_call(module, hidden, fn):
    return _no_views(fn(hidden))


def run_in_fsdp_unit(module: nn.Module, fn: Callable, hidden):
    """``fn(hidden)`` run as a forward of ``module``'s FSDP2 unit if it has one, else plainly.

    ``fn`` must read ``module``'s parameters inside (e.g. ``module.weight``): FSDP2's pre-forward
    swaps in the unsharded parameters, registers the reduce-scatter of their gradients on
    ``hidden`` and, through the tensors ``fn`` returns (tensors, tuples, lists, dicts or
    dataclasses of them), the all-gather its backward needs. This is what ``module(hidden)`` does
    for its own forward; the call goes through ``register_fsdp_forward_method`` on a temporary
    method, so ``module`` is left as it was.
    """
    if not is_fsdp_unit(module):
        return fn(hidden)
    from torch.distributed.fsdp import register_fsdp_forward_method
    setattr(module, _UNIT_METHOD, types.MethodType(_unit_call, module))
    try:
        register_fsdp_forward_method(module, _UNIT_METHOD)
        return getattr(module, _UNIT_METHOD)(hidden, fn)
    finally:
        delattr(module, _UNIT_METHOD)


class FusedLossModel(nn.Module):
    """``forward(input_ids, targets, *loss_args, **kwargs) -> loss_fn(hidden, lm_head.weight, ...)``.

    Args:
        model: a causal LM with a backbone attribute (``backbone_attr``, ``"model"`` in transformers
            models) returning the last hidden states (a tensor, a tuple whose first item they are,
            or an object with ``last_hidden_state``) and an ``nn.Linear`` head (``head_attr``).
        loss_fn: a fused front-end of :mod:`gift_fast` (``gift_loss``, ``grpo_loss``, ...) or a
            loss module of :mod:`gift_fast.modules`; called as
            ``loss_fn(hidden, weight, targets, *loss_args, bias=head.bias, **loss_kwargs)``.

    Keyword arguments of ``forward`` named in ``backbone_kwargs`` (default ``attention_mask``,
    ``position_ids``) go to the backbone, the others to the loss. Shard it with ``fully_shard`` on
    the transformer blocks (and, if wanted, on the head) and then on this wrapper (the root).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, *, backbone_attr: str = "model",
                 head_attr: str = "lm_head",
                 backbone_kwargs: tuple = ("attention_mask", "position_ids")):
        super().__init__()
        for attr in (backbone_attr, head_attr):
            if not isinstance(getattr(model, attr, None), nn.Module):
                raise ValueError(f"model: expected a submodule named {attr!r} "
                                 f"(backbone_attr / head_attr), found none on {type(model).__name__}")
        if not isinstance(getattr(model, head_attr), nn.Linear):
            raise TypeError(f"model.{head_attr}: expected an nn.Linear lm_head, "
                            f"got {type(getattr(model, head_attr)).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.backbone_attr = backbone_attr
        self.head_attr = head_attr
        self.backbone_kwargs = tuple(backbone_kwargs)

    def forward(self, input_ids, targets, *loss_args, **kwargs):
        to_backbone = {k: kwargs.pop(k) for k in self.backbone_kwargs if k in kwargs}
        out = getattr(self.model, self.backbone_attr)(input_ids, **to_backbone)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        head = getattr(self.model, self.head_attr)

        def loss_on_head(hidden):   # reads the head's parameters inside its own FSDP2 unit, if any
            return self.loss_fn(hidden, head.weight, targets, *loss_args, bias=head.bias, **kwargs)
        return run_in_fsdp_unit(head, loss_on_head, hidden)
