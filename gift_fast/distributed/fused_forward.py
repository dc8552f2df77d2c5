"""Run a function of a module's parameters as a forward of that module's FSDP2 unit.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps every parameter as a DTensor shard between
steps and unshards the parameters of a unit only for the duration of that unit's forward; the
gradient of the unsharded weight is then reduce-scattered back to the shards. A fused loss reads
``lm_head.weight`` directly instead of calling ``lm_head``, so it must run inside the root's forward
(lm_head in the root's unit) and, when lm_head is its own ``fully_shard`` unit, inside a forward of
that unit too: :func:`run_in_fsdp_unit`. The adapters built on it (a loss-running root module,
the patched forwards of the Hugging Face and TRL integrations) live in :mod:`gift_fast.integrations`.
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
