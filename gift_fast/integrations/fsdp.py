"""``FusedLossModel``: a root module whose forward runs a fused loss (what FSDP2 needs).

Under FSDP2 the lm_head weight is a plain, unsharded tensor only inside the forward of its unit.
A fused loss reads ``lm_head.weight`` directly instead of calling ``lm_head``, so it must run
inside the root's forward. :class:`FusedLossModel` is the smallest such root: it calls the
backbone, then the loss on the last hidden states and the lm_head weight (inside the lm_head's own
FSDP2 unit when it has one, see :func:`gift_fast.distributed.fused_forward.run_in_fsdp_unit`).
Under DDP or on one device it is just as valid. See docs/distributed.md.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..distributed.fused_forward import run_in_fsdp_unit


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
