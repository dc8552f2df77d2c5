"""verl integration: GIFT as a verl advantage estimator and policy loss.

The two functions keep the names, signatures and semantics of the GIFT authors' verl code (their
fork ZhichaoWang970201/verl, ``verl/trainer/ppo/core_algos.py``, behind verl PR #4933):

- :func:`compute_gift_outcome_advantage` — per-response reward = sum of ``token_level_rewards``,
  standardised within each prompt group (``index`` = the uid of each response's prompt):
  ``A = (R - mean R) / (std R + epsilon)`` (unbiased std); a group of one gets ``R / (1 + epsilon)``.
  Broadcast over the response tokens (times ``response_mask``), returned as ``(advantages, returns)``.
- :func:`compute_policy_loss_gift` — ``s_i = sum_t m_t (log_prob - old_log_prob)``, standardised
  within each group with detached statistics, ``z = (s - mean s) / (std s + eps)`` (a group of one:
  ``(s - stopgrad(s)) / (1 + eps)``, 0 in value with gradient ``1 / (1 + eps)``), and
  ``loss = mean_i (A_i - beta z_i)^2`` with ``A_i = advantages[i, 0]``, ``beta`` =
  ``config.kl_loss_coef`` (1.0 when the config has none), ``eps`` = ``config.epsilon`` (1e-6).

One deliberate difference: a group whose rewards are all equal gets ``A = 0`` exactly; the authors'
float32 ``torch.mean`` / ``torch.std`` leave rounding noise there (see docs/losses.md).

Both are vectorised (no Python loop over responses, except to map uids to group numbers) and, when
verl is importable, registered with verl's registries under ``"gift_fast"`` (and under ``"gift"``
unless that name is already taken, e.g. by the authors' fork).

The actor's log-probs: :func:`forward_for_ppo` is a causal LM ``forward`` under verl's fused-kernel
contract (``output.log_probs`` / ``output.entropy`` from the hidden states, no logits) through
:func:`gift_fast.linear_logprobs`; :func:`install_fused_forward` makes verl install it for
``fused_kernel_options.impl_backend=gift_fast``.

When gift_fast is installed, verl (0.9.1) imports this module on ``import verl`` (the
``verl.plugins`` entry point in setup.py), which registers both functions, installs the fused
forward hook and a ``ppo_loss`` wrapper that hands the micro-batch's uids to the policy loss
(:func:`install_uid_passing`). See docs/verl.md. Importing this module never requires verl.
"""
from __future__ import annotations

import contextvars
import functools
import warnings
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from ..losses.common import check_number
from ..losses.gift import gift_advantages, gift_implicit_z
from ..sequences import acc_dtype
from ..validation import check_finite

__all__ = ["compute_gift_outcome_advantage", "compute_policy_loss_gift", "gift_group_ids",
           "forward_for_ppo", "install_fused_forward", "install_uid_passing", "register",
           "REGISTERED_NAMES"]

REGISTERED_NAMES = ("gift_fast", "gift")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                  "seq-mean-token-sum-norm")


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------

def gift_group_ids(index, n: int, device=None) -> Tuple[torch.Tensor, int]:
    """Group number ``[n]`` (int64, first-appearance order) and group count from verl's ``index``.

    ``index`` is what verl passes: a numpy array (usually ``dtype=object`` of uid strings) or any
    sequence / 1-D tensor of hashable labels, one per response.
    """
    if index is None:
        raise ValueError(
            "index: expected the uid of each response's prompt (verl: data.non_tensor_batch['uid']), "
            "got None. The GIFT authors' verl fork passes it to the policy loss as index=uid; with "
            "verl 0.9.1, gift_fast's plugin passes the micro-batch's data['uid'] when it is there "
            "(see docs/verl.md)")
    if isinstance(index, torch.Tensor):
        if index.dim() != 1:
            raise ValueError(f"index: expected a 1-D tensor of group labels, got shape {tuple(index.shape)}")
        labels = index.tolist()
    elif isinstance(index, (str, bytes)):
        raise TypeError("index: expected one label per response (array or list), got a single string")
    else:
        try:
            arr = np.asarray(index, dtype=object)
        except Exception as e:  # pragma: no cover - exotic containers
            raise TypeError(f"index: expected an array of labels, got {type(index).__name__}") from e
        if arr.ndim != 1:
            raise ValueError(f"index: expected a 1-D array of labels, got shape {arr.shape}")
        labels = arr.tolist()
    if len(labels) != n:
        raise ValueError(f"index: expected {n} labels (one per response), got {len(labels)}")
    numbers: Dict[Any, int] = {}
    try:
        ids = [numbers.setdefault(lab, len(numbers)) for lab in labels]
    except TypeError as e:
        raise TypeError(f"index: labels must be hashable (uid strings or ints): {e}") from None
    return torch.tensor(ids, dtype=torch.long, device=device), len(numbers)


def _check_matrix(name: str, t, shape=None, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if t.dim() != 2 or t.shape[1] == 0:
        raise ValueError(f"{name}: expected shape (batch, response_length >= 1), got {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (like response_mask), got {tuple(t.shape)}")


def _config_value(config, key: str, default):
    """``config.key`` for dataclass / DictConfig / dict configs, ``default`` when absent or None."""
    if config is None:
        return default
    if isinstance(config, dict):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


# --------------------------------------------------------------------------------------------
# the two verl functions
# --------------------------------------------------------------------------------------------

def compute_gift_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                   index, epsilon: float = 1e-6, config=None,
                                   **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """GIFT's explicit advantage for verl (``algorithm.adv_estimator=gift_fast``).

    Args:
        token_level_rewards: ``(bs, response_length)``; a response's reward is the sum of its row.
        response_mask: ``(bs, response_length)``, nonzero on response tokens.
        index: the uid of each response's prompt (``data.non_tensor_batch["uid"]``), any labels.
        epsilon: added to the group std (the authors' default 1e-6).
        config: verl's ``AlgoConfig`` (unused, as in the authors' code).

    Returns ``(advantages, returns)``, both the same ``(bs, response_length)`` tensor: the
    response's standardised reward on its response tokens, 0 elsewhere, in the rewards' dtype.
    """
    _check_matrix("response_mask", response_mask, floating=False)
    _check_matrix("token_level_rewards", token_level_rewards, response_mask.shape)
    check_finite("token_level_rewards", token_level_rewards)
    eps = float(check_number("epsilon", epsilon, 0.0))
    acc = acc_dtype(token_level_rewards)
    with torch.no_grad():
        r = token_level_rewards.detach().to(acc).sum(dim=-1)
        grp, n_groups = gift_group_ids(index, r.numel(), r.device)
        a = gift_advantages(r, grp, n_groups, eps).value
        adv = (a.unsqueeze(-1) * (response_mask != 0).to(acc)).to(token_level_rewards.dtype)
    return adv, adv


def compute_policy_loss_gift(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                             advantages: torch.Tensor, response_mask: torch.Tensor, index=None,
                             loss_agg_mode: str = "token-mean", config=None,
                             **kwargs) -> Tuple[torch.Tensor, Dict[str, float]]:
    """GIFT's policy loss for verl (``actor_rollout_ref.actor.policy_loss.loss_mode=gift_fast``).

    Args:
        old_log_prob, log_prob: ``(bs, response_length)`` per-token log-probs of the rollout
            (anchor, no gradient) and current policy (with gradient).
        advantages: ``(bs, response_length)`` from :func:`compute_gift_outcome_advantage`; as in
            the authors' code the response's advantage is read from column 0.
        response_mask: ``(bs, response_length)``.
        index: the uid of each response's prompt: passed by keyword (``index=uid``, the authors'
            fork; ``uid=`` is accepted too), else taken from the micro-batch by the ``ppo_loss``
            wrapper of :func:`install_uid_passing` (verl 0.9.1).
        loss_agg_mode: accepted and ignored: GIFT is a mean over responses (as the authors').
            When ``config.global_batch_info["global_batch_size"]`` is set (verl 0.9.1's ppo_loss
            sets it), the sum over the call's responses is divided by it and multiplied by
            ``dp_size``, like verl's own sequence-mean aggregation, so that micro-batch losses
            add up to the mean over the mini-batch; otherwise the mean over the call.
        config: verl's actor config: ``kl_loss_coef`` is beta (1.0 if absent), ``epsilon`` the eps
            (1e-6 if absent), ``response_length_penalty`` p (0 if absent: ``s`` is divided by
            ``max(|y|, 1) ** p``), and ``policy_loss.kl_source == "reference"`` anchors at
            ``ref_log_prob`` (a keyword argument) instead of ``old_log_prob``.
        kwargs: anything else verl passes (``rollout_is_weights`` is ignored, as the authors do).

    Returns ``(loss, metrics)``: a 0-dim tensor and a dict of floats (verl's metric names plus
    ``actor/gift_*``).
    """
    _check_matrix("response_mask", response_mask, floating=False)
    _check_matrix("log_prob", log_prob, response_mask.shape)
    _check_matrix("advantages", advantages, response_mask.shape)
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode: expected one of {list(LOSS_AGG_MODES)}, got {loss_agg_mode!r}")
    beta = float(check_number("config.kl_loss_coef", _config_value(config, "kl_loss_coef", 1.0)))
    eps = float(check_number("config.epsilon", _config_value(config, "epsilon", 1e-6), 0.0))
    p = float(check_number("config.response_length_penalty",
                           _config_value(config, "response_length_penalty", 0.0), 0.0))
    anchor, anchor_name = old_log_prob, "old_log_prob"
    kl_source = _config_value(_config_value(config, "policy_loss", None), "kl_source", "rollout")
    if kl_source == "reference":
        anchor, anchor_name = kwargs.get("ref_log_prob"), "ref_log_prob"
        if anchor is None:
            raise ValueError("ref_log_prob: required when config.policy_loss.kl_source == 'reference', "
                             "got None")
    elif kl_source != "rollout":
        raise ValueError("config.policy_loss.kl_source: expected 'rollout' or 'reference', "
                         f"got {kl_source!r}")
    _check_matrix(anchor_name, anchor, response_mask.shape)
    if index is None:
        index = kwargs.get("uid")
    if index is None:
        index = _MICRO_BATCH_UID.get()       # set by install_uid_passing's ppo_loss wrapper

    acc = acc_dtype(log_prob, anchor)
    active = response_mask != 0
    diff = torch.where(active, log_prob.to(acc) - anchor.detach().to(acc),
                       torch.zeros((), dtype=acc, device=log_prob.device))
    s_sum = diff.sum(dim=-1)
    s = s_sum
    if p != 0:
        s = s / active.sum(dim=-1).clamp_min(1).to(acc) ** p
    grp, n_groups = gift_group_ids(index, s.numel(), s.device)
    z, _, s_std, counts = gift_implicit_z(s, grp, n_groups, eps)
    a = advantages[:, 0].detach().to(acc)
    per = (a - beta * z) ** 2
    loss = per.mean()                                               # the authors' code
    batch_info = _config_value(config, "global_batch_info", None) or {}
    global_batch_size = batch_info.get("global_batch_size") if hasattr(batch_info, "get") else None
    if global_batch_size:
        # verl 0.9.1's engine sums micro-batch losses without rescaling and expects each to be
        # normalised over the global mini-batch (its seq-mean: sum / global_batch_size * dp_size),
        # so the accumulated gradient is that of the mean over the mini-batch, whatever the
        # micro-batch size (what the authors' per-call mean gave with 1/n_micro accumulation).
        loss = per.sum() / float(global_batch_size) * float(batch_info.get("dp_size") or 1)

    with torch.no_grad():
        multi = (counts > 1).to(acc)
        metrics = {
            "actor/pg_clipfrac": 0.0,
            "actor/ppo_kl": float(s_sum.mean()),
            "actor/pg_clipfrac_lower": 0.0,
            "actor/gift_adv_mean": float(a.mean()),
            "actor/gift_z_abs_mean": float(z.abs().mean()),
            "actor/gift_implicit_std": float((s_std * multi).sum() / multi.sum().clamp_min(1)),
            "actor/gift_groups": float(n_groups),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# the fused log-prob op inside verl's actor (verl's use_fused_kernels contract)
# --------------------------------------------------------------------------------------------

FUSED_BACKEND = "gift_fast"
_OUTPUT_CLASS = None


def _output_class():
    """A transformers ModelOutput with verl's two extra fields (``log_probs``, ``entropy``)."""
    global _OUTPUT_CLASS
    if _OUTPUT_CLASS is None:
        from dataclasses import dataclass  # noqa: PLC0415

        from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: PLC0415

        @dataclass
        class CausalLMOutputWithLogProbs(CausalLMOutputWithPast):
            log_probs: Optional[torch.FloatTensor] = None
            entropy: Optional[torch.FloatTensor] = None

        _OUTPUT_CLASS = CausalLMOutputWithLogProbs
    return _OUTPUT_CLASS


def forward_for_ppo(self, input_ids=None, attention_mask=None, position_ids=None,
                    past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                    output_attentions=None, output_hidden_states=None, return_dict=None,
                    cache_position=None, logits_to_keep=0, temperature=1.0, shift_labels=None,
                    **unused):
    """A causal LM's ``forward`` under verl's fused-kernel contract, through gift_fast.

    Runs the model's body, then :func:`gift_fast.linear_logprobs` on the last hidden states and
    the model's lm_head (weight, bias, ``config.final_logit_softcapping``): returns an output with
    ``log_probs`` and ``entropy`` ``[B, L]`` where entry t scores the rolled label t (``shift_labels``
    if given, else ``labels`` or ``input_ids`` rolled left by one), at ``temperature``; the logits
    are never built. What verl's ``forward_with_torch_backend`` / ``_triton_backend`` return, with
    gift_fast's guarantees (batch-invariant bits, float32 dW, no [tokens, vocab] buffer).
    """
    from ..logprobs import linear_logprobs  # noqa: PLC0415

    if getattr(self.config, "logit_scale", None) not in (None, 1, 1.0):
        raise ValueError(f"model: {type(self).__name__} scales its logits (config.logit_scale); "
                         "fused_kernels_backend='gift_fast' supports lm_head (+ bias, + final "
                         "logit softcapping) heads only")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError("temperature: gift_fast's fused forward needs one temperature per "
                             f"batch, got a tensor of {temperature.numel()} values")
        temperature = float(temperature)
    body = self.get_decoder() if hasattr(self, "get_decoder") else self.model
    outputs = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                   use_cache=use_cache, output_attentions=output_attentions,
                   output_hidden_states=output_hidden_states, cache_position=cache_position)
    hidden = outputs[0]
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("input_ids: the fused forward needs labels, shift_labels or input_ids")
    head = self.get_output_embeddings()
    log_probs, entropy = linear_logprobs(
        hidden, head.weight, rolled, getattr(head, "bias", None), temperature=temperature,
        softcap=getattr(self.config, "final_logit_softcapping", None), return_entropy=True)
    return _output_class()(log_probs=log_probs, entropy=entropy,
                           past_key_values=getattr(outputs, "past_key_values", None),
                           hidden_states=getattr(outputs, "hidden_states", None),
                           attentions=getattr(outputs, "attentions", None))


VISION_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5",
                      "qwen3_5_moe")


def install_fused_forward(monkey_patch_module=None) -> bool:
    """Teaches verl's ``patch_forward_with_backends`` the backend ``"gift_fast"``.

    With ``actor_rollout_ref.model.use_fused_kernels=True`` and
    ``actor_rollout_ref.model.fused_kernel_options.impl_backend=gift_fast`` verl then installs
    :func:`forward_for_ppo` as the model's forward; every other backend goes to verl's own code.
    Returns True if it patched (False if already patched).
    """
    if monkey_patch_module is None:
        from verl.models.transformers import monkey_patch as monkey_patch_module  # noqa: PLC0415
    original = monkey_patch_module.patch_forward_with_backends
    if getattr(original, "_gift_fast_original", None) is not None:
        return False

    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        if not (use_fused_kernels and fused_kernels_backend == FUSED_BACKEND):
            return original(model, use_fused_kernels=use_fused_kernels,
                            fused_kernels_backend=fused_kernels_backend)
        if getattr(model.config, "model_type", None) in VISION_MODEL_TYPES:
            raise ValueError(f"fused_kernels_backend: 'gift_fast' supports text-only causal LMs, "
                             f"got model_type {model.config.model_type!r}")
        model._verl_fused_kernels_backend = FUSED_BACKEND
        model.__class__.forward = forward_for_ppo

    patch_forward_with_backends._gift_fast_original = original
    monkey_patch_module.patch_forward_with_backends = patch_forward_with_backends
    return True


# --------------------------------------------------------------------------------------------
# the uid of the micro-batch, for verl releases whose ppo_loss does not pass it
# --------------------------------------------------------------------------------------------

_MICRO_BATCH_UID = contextvars.ContextVar("gift_fast_verl_micro_batch_uid", default=None)


def _uid_of(data):
    """The ``uid`` column of a verl micro-batch (TensorDict with a NonTensorStack), or None."""
    try:
        if data is None or "uid" not in data.keys():
            return None
        uid = data["uid"]
        return uid.tolist() if hasattr(uid, "tolist") else list(uid)
    except Exception:  # a layout we do not know: the loss then asks for index explicitly
        return None


def install_uid_passing(losses_module=None) -> bool:
    """Wraps verl's ``ppo_loss`` so that :func:`compute_policy_loss_gift` finds the micro-batch's
    uids when verl calls it without ``index`` (verl 0.9.1). The wrapper only publishes
    ``data["uid"]`` (when present) for the duration of the call; every loss mode is unchanged.
    Returns True if it patched (False if already patched)."""
    if losses_module is None:
        from verl.workers.utils import losses as losses_module  # noqa: PLC0415
    original = losses_module.ppo_loss
    if getattr(original, "_gift_fast_original", None) is not None:
        return False

    @functools.wraps(original)
    def ppo_loss(*args, **kwargs):
        data = kwargs["data"] if "data" in kwargs else (args[2] if len(args) > 2 else None)
        token = _MICRO_BATCH_UID.set(_uid_of(data))
        try:
            return original(*args, **kwargs)
        finally:
            _MICRO_BATCH_UID.reset(token)

    ppo_loss._gift_fast_original = original
    losses_module.ppo_loss = ppo_loss
    return True


# --------------------------------------------------------------------------------------------
# registration with verl
# --------------------------------------------------------------------------------------------

def register(core_algos=None) -> Tuple[str, ...]:
    """Registers both functions with verl's registries; returns the names registered.

    Always under ``"gift_fast"``; under ``"gift"`` too unless verl already has a different
    function by that name (the authors' fork does; theirs is kept). ``core_algos`` defaults to
    ``verl.trainer.ppo.core_algos`` (ImportError if verl is not installed).
    """
    if core_algos is None:
        from verl.trainer.ppo import core_algos  # noqa: PLC0415 - optional dependency
    losses = getattr(core_algos, "POLICY_LOSS_REGISTRY", {})
    estimators = getattr(core_algos, "ADV_ESTIMATOR_REGISTRY", {})
    done = []
    for name in REGISTERED_NAMES:
        taken = (losses.get(name) not in (None, compute_policy_loss_gift)
                 or estimators.get(name) not in (None, compute_gift_outcome_advantage))
        if name != "gift_fast" and taken:
            continue
        core_algos.register_policy_loss(name)(compute_policy_loss_gift)
        core_algos.register_adv_est(name)(compute_gift_outcome_advantage)
        done.append(name)
    return tuple(done)


def _register_if_verl_present() -> None:
    try:
        from verl.trainer.ppo import core_algos  # noqa: PLC0415
    except ImportError:
        return                                    # verl not installed: the functions still work
    for what, hook in (("register GIFT with", lambda: register(core_algos)),
                       ("pass the micro-batch uids to the policy loss in", install_uid_passing),
                       ("add the fused forward to", install_fused_forward)):
        try:
            hook()
        except Exception as e:  # an incompatible verl must not break importing the functions
            warnings.warn(f"gift_fast: could not {what} verl ({type(e).__name__}: {e}); call "
                          "gift_fast.integrations.verl.register() / install_fused_forward() to see "
                          "the error", RuntimeWarning)


_register_if_verl_present()
