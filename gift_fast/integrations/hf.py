"""Hugging Face causal LMs: per-token log-probs through the model's own head, never its logits.

``token_logprobs(model, input_ids)`` runs the model's body, takes the last hidden states and
applies the model's head (lm_head weight and bias, tied embeddings, final-logit softcapping,
logit scaling) through :func:`gift_fast.linear_logprobs`. ``patch_model(model)`` makes the same
computation available inside the model's own ``forward`` (``model(..., token_logprobs=True)``),
which is where FSDP2 unshards the lm_head weight (and, when lm_head is its own ``fully_shard``
unit, the fused head runs as a forward of that unit).

The head of each architecture is described by a small registry keyed by ``config.model_type``; an
architecture not in it raises a ``ValueError`` rather than silently dropping a logit transform.
``register_head`` adds one.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..distributed.fused_forward import is_fsdp_unit, run_in_fsdp_unit
from ..logprobs import linear_logprobs
from ..validation import _is_dtensor, check_not_dtensor


@dataclass
class CausalLMHead:
    """How a model turns its last hidden state ``h`` into logits:
    ``z = softcap(logit_scale * (h @ weight.T + bias))`` (softcap ``c * tanh(z / c)`` if set).
    ``module`` is the head module the weight and bias belong to (``lm_head``), when known."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    softcap: Optional[float] = None
    logit_scale: float = 1.0
    module: Optional[torch.nn.Module] = dataclasses.field(default=None, repr=False, compare=False)

    def fold(self, hidden: torch.Tensor):
        """``(hidden, weight, bias)`` with ``logit_scale`` folded into hidden and bias (the head
        is linear, so scaling the ``[N, H]`` input is exact and avoids copying the ``[V, H]``
        weight). A sharded (FSDP2 DTensor) weight raises: its gradient would bypass FSDP2."""
        weight, bias = self.weight, self.bias
        check_not_dtensor("lm_head weight", weight, "gift_fast.integrations.hf: ")
        check_not_dtensor("lm_head bias", bias, "gift_fast.integrations.hf: ")
        if self.logit_scale != 1.0:
            hidden = hidden * self.logit_scale
            bias = bias * self.logit_scale if bias is not None else None
        if hidden.dtype != weight.dtype:   # autocast / mixed dtypes: compute in the weight's dtype
            hidden = hidden.to(weight.dtype)
        return hidden, weight, bias

    def apply(self, hidden: torch.Tensor, fn: Callable):
        """``fn(*self.fold(hidden))``. When the head module is its own FSDP2 ``fully_shard`` unit,
        ``fn`` runs as a forward of that unit (its weight unsharded, its gradient reduce-scattered
        by FSDP2); ``fn`` should return tensors (or tuples, lists, dicts of them)."""
        module = self.module
        if module is None or not is_fsdp_unit(module):
            return fn(*self.fold(hidden))

        def inside(hidden):   # the module's parameters are the unsharded ones only in here
            head = dataclasses.replace(self, weight=module.weight,
                                       bias=getattr(module, "bias", None))
            return fn(*head.fold(hidden))
        return run_in_fsdp_unit(module, inside, hidden)


def _plain(model, cfg) -> dict:
    return {}


def _softcapped(model, cfg) -> dict:
    return {"softcap": getattr(cfg, "final_logit_softcapping", None)}


def _cohere(model, cfg) -> dict:
    return {"logit_scale": float(getattr(model, "logit_scale", cfg.logit_scale))}


def _granite(model, cfg) -> dict:
    return {"logit_scale": 1.0 / float(cfg.logits_scaling)}


# model_type (of the text config) -> extra head parameters, each checked against the model's
# forward in transformers 5.23 and tested (tests/test_integration_hf.py; the table in
# docs/integrations.md).
_HEADS: dict[str, Callable[[Any, Any], dict]] = {
    "llama": _plain, "mistral": _plain, "qwen2": _plain, "qwen3": _plain, "phi3": _plain,
    "phi": _plain, "gemma": _plain, "gemma2": _softcapped, "gemma3_text": _softcapped,
    "cohere": _cohere, "granite": _granite,
}


def register_head(model_type: str, head_params: Callable[[Any, Any], dict]) -> None:
    """Teach the integration another architecture: ``head_params(model, text_config)`` returns the
    keyword arguments of :class:`CausalLMHead` besides weight and bias (``softcap``,
    ``logit_scale``). Only register what the model's forward really does to its logits."""
    if not isinstance(model_type, str) or not callable(head_params):
        raise TypeError("register_head: expected (model_type: str, head_params: callable)")
    _HEADS[model_type] = head_params


def supported_model_types() -> list[str]:
    return sorted(_HEADS)


def _text_config(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"model: expected a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def lm_head_of(model) -> CausalLMHead:
    """The head of ``model`` as a :class:`CausalLMHead`; ``ValueError`` for an unknown
    architecture."""
    cfg = _text_config(model)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in _HEADS:
        raise ValueError(
            f"model: gift_fast does not know the output head of model_type {model_type!r} "
            f"({type(model).__name__}); known: {supported_model_types()}. If its forward computes "
            "logits as lm_head(h) (optionally scaled / soft-capped), call "
            "gift_fast.integrations.hf.register_head(model_type, fn).")
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"model: expected get_output_embeddings() to hold a [V, H] weight, got "
                         f"{type(head).__name__}")
    return CausalLMHead(weight=weight, bias=getattr(head, "bias", None), module=head,
                        **_HEADS[model_type](model, cfg))


def _body(model):
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise ValueError(f"model: {type(model).__name__} exposes no base model (its body)")
    return body


def next_token_targets(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       ignore_index: int = -100) -> torch.Tensor:
    """``[B, T-1]`` targets: ``input_ids[:, 1:]`` with padded positions set to ``ignore_index``."""
    targets = input_ids[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, ignore_index)
    return targets


def _check_ids(input_ids, attention_mask, logits_to_keep):
    if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
            or input_ids.is_floating_point()):
        raise ValueError(f"input_ids: expected an integer [B, T] tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids: expected T >= 2 (a next token to score), got shape "
                         f"{tuple(input_ids.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    if logits_to_keep is not None and not (isinstance(logits_to_keep, int)
                                           and 1 <= logits_to_keep <= input_ids.shape[1] - 1):
        raise ValueError(f"logits_to_keep: expected an int in [1, {input_ids.shape[1] - 1}] or "
                         f"None, got {logits_to_keep!r}")


def _last_hidden(model, input_ids, attention_mask, model_kwargs):
    """``[B, T, H]`` last hidden states of the model's body, and the model's head."""
    model_kwargs = dict(model_kwargs)
    model_kwargs["use_cache"] = False
    ids = None if model_kwargs.get("inputs_embeds") is not None else input_ids
    out = _body(model)(input_ids=ids, attention_mask=attention_mask, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    head = lm_head_of(model)
    return hidden.to(head.weight.device), head


# model -> (its class, the answer of _sharded_outside_forward): fully_shard swaps the class of the
# module it wraps, so the answer is recomputed after the root is sharded, not on every call.
_SHARDED_OUTSIDE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _sharded_outside_forward(model) -> Optional[str]:
    """Name of a parameter of ``model`` that is an FSDP2 shard and that no forward run by
    ``token_logprobs`` would unshard (one not under a ``fully_shard`` unit strictly inside
    ``model``: the root's own parameters, outside the root's forward), or None.

    The walk over the parameters runs once per model and class: under torch.compile dynamo
    evaluates it while tracing (a constant of the graph), and the cache is not touched there."""
    if torch.compiler.is_compiling():
        return _scan_sharded_outside_forward(model)
    cached = _SHARDED_OUTSIDE.get(model)
    if cached is None or cached[0] is not type(model):
        cached = (type(model), _scan_sharded_outside_forward(model))
        _SHARDED_OUTSIDE[model] = cached
    return cached[1]


def _scan_sharded_outside_forward(model) -> Optional[str]:
    params = list(model.named_parameters())
    if not any(_is_dtensor(p) for _, p in params):
        return None
    covered = set()
    for module in model.modules():
        if module is not model and is_fsdp_unit(module):
            covered.update(id(p) for p in module.parameters())
    return next((name for name, p in params if _is_dtensor(p) and id(p) not in covered), None)


def _hidden_and_targets(model, input_ids, attention_mask, logits_to_keep, model_kwargs):
    """Last hidden states of the positions that predict a kept token, and those tokens."""
    hidden, head = _last_hidden(model, input_ids, attention_mask, model_kwargs)
    targets = next_token_targets(input_ids, attention_mask).to(hidden.device)
    hidden = hidden[:, :-1]
    if logits_to_keep is not None:   # TRL's alignment: the last k next-token predictions
        hidden, targets = hidden[:, -logits_to_keep:], targets[:, -logits_to_keep:]
    return hidden, targets, head


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                   temperature: float = 1.0, return_entropy: bool = False,
                   logits_to_keep: Optional[int] = None, backend: str = "auto", **model_kwargs):
    """Per-token log-probs of a Hugging Face causal LM, through its own head, without logits.

    Args:
        model: a transformers ``*ForCausalLM`` (architectures: :func:`supported_model_types`).
        input_ids: ``[B, T]`` token ids (prompt + completion).
        attention_mask: ``[B, T]``, 0 on padding (left or right); padded targets give 0.
        temperature: divides the model's (soft-capped) logits, like sampling with it.
        return_entropy: also return the entropy of each next-token distribution.
        logits_to_keep: ``k`` keeps the last ``k`` entries (TRL's alignment: the log-probs of
            ``input_ids[:, -k:]``); the body still runs on the whole sequence.
        backend: as in :func:`gift_fast.linear_logprobs`.
        **model_kwargs: passed to the model's body (e.g. ``position_ids``, or ``inputs_embeds``
            to run the body on embeddings; ``input_ids`` still give the targets).

    Returns:
        ``logp`` ``[B, T-1]`` float32 (``[B, k]`` with ``logits_to_keep``), entry ``t`` =
        ``log p(input_ids[:, t+1] | input_ids[:, :t+1])``; or ``(logp, entropy)``. Differentiable
        w.r.t. the model's parameters (and ``inputs_embeds`` when given).
    """
    _check_ids(input_ids, attention_mask, logits_to_keep)
    sharded = _sharded_outside_forward(model)
    if sharded is not None:   # the body would fail in its embedding on a DTensor mix-up
        check_not_dtensor(sharded, model.get_parameter(sharded),
                          "token_logprobs(model) runs outside model's forward, where FSDP2 keeps "
                          "the root's own parameters sharded: ")
    hidden, targets, head = _hidden_and_targets(model, input_ids, attention_mask, logits_to_keep,
                                                model_kwargs)
    return head.apply(hidden, lambda h, w, b: linear_logprobs(
        h, w, targets, b, temperature=temperature, softcap=head.softcap,
        return_entropy=return_entropy, backend=backend))


def positional_ids_and_mask(args, kwargs):
    """``input_ids`` and ``attention_mask`` of a patched forward, given by position or keyword."""
    if len(args) > 2:
        raise TypeError("forward: with the fused head, pass only input_ids and attention_mask "
                        f"by position (got {len(args)} positional arguments); the rest by keyword")
    input_ids = kwargs.pop("input_ids", args[0] if args else None)
    attention_mask = kwargs.pop("attention_mask", args[1] if len(args) > 1 else None)
    return input_ids, attention_mask


@dataclass
class TokenLogprobsOutput:
    """What a patched model returns with ``token_logprobs=True``: ``logprobs`` ``[B, T-1]`` (or
    ``[B, k]``), ``entropy`` (or None), ``mask`` (True where the target is a real token) and
    ``loss`` (whatever ``head_loss`` returned, or None)."""
    logprobs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    loss: Any = None


def patch_model(model):
    """Run the fused head inside ``model``'s own forward. Returns ``model`` (patched in place).

    After patching, ``model(input_ids, attention_mask, token_logprobs=True, temperature=...,
    return_entropy=..., logits_to_keep=..., backend=...)`` returns a :class:`TokenLogprobsOutput`
    instead of logits; with ``head_loss=fn`` it calls ``fn(hidden, weight, targets, bias=...,
    softcap=..., temperature=...)`` on the folded head inside the forward (e.g. a partial of
    :func:`gift_fast.gift_loss`) and returns its result as ``loss``. Without ``token_logprobs``
    the forward is the original one (generation is unchanged). Under FSDP2 the lm_head weight is
    only unsharded inside the root module's forward, so a fused loss must run there: patch the
    model before ``fully_shard`` and call it through the wrapped module. lm_head may be in the
    root's unit or its own ``fully_shard`` unit (the fused head then runs as a forward of that
    unit); ``head_loss`` should then return tensors (or tuples, lists, dicts of them).
    """
    if getattr(model, "_gift_fast_patched", False):
        return model
    lm_head_of(model)   # fail now for an unknown head, not at the first training step
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, token_logprobs=False, temperature=1.0, return_entropy=False,
                backend="auto", head_loss=None, **kwargs):
        if not token_logprobs:
            return original_forward(*args, **kwargs)
        input_ids, attention_mask = positional_ids_and_mask(args, kwargs)
        logits_to_keep = kwargs.pop("logits_to_keep", None)
        logits_to_keep = None if logits_to_keep in (0, None) else logits_to_keep
        _check_ids(input_ids, attention_mask, logits_to_keep)
        hidden, targets, head = _hidden_and_targets(self, input_ids, attention_mask, logits_to_keep,
                                                    kwargs)
        mask = targets != -100
        if head_loss is not None:
            loss = head.apply(hidden, lambda h, w, b: head_loss(
                h, w, targets, bias=b, softcap=head.softcap, temperature=temperature))
            return TokenLogprobsOutput(mask=mask, loss=loss)
        out = head.apply(hidden, lambda h, w, b: linear_logprobs(
            h, w, targets, b, temperature=temperature, softcap=head.softcap,
            return_entropy=return_entropy, backend=backend))
        logp, entropy = out if return_entropy else (out, None)
        return TokenLogprobsOutput(logprobs=logp, entropy=entropy, mask=mask)

    model.forward = types.MethodType(forward, model)
    model._gift_fast_patched = True
    return model
