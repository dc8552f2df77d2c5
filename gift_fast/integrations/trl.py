"""TRL: GIFT as a GRPO-style trainer, and gift_fast's fused log-probs inside TRL's own trainers.

- :class:`GIFTTrainer` / :class:`GIFTConfig` subclass TRL's ``GRPOTrainer`` / ``GRPOConfig``:
  generation, reward functions, datasets and logging stay TRL's; the policy log-probs come from
  gift_fast's fused op and the loss from :func:`gift_fast.gift_loss` (anchor = the old-policy
  log-probs TRL computes, groups = ``num_generations``).
- :func:`add_gift_fast_lm_head` is a drop-in for ``trl.trainer.utils.add_fused_lm_head``:
  ``model(..., labels=labels, fused_lm_head=True)`` returns TRL's ``FusedCausalLMOutput``, computed
  by :func:`gift_fast.linear_logprobs`. :func:`use_gift_fast` applies it to a constructed
  ``GRPOTrainer`` / ``DPOTrainer`` (policy and reference model); :func:`patch_trl` makes every
  trainer constructed afterwards use it. The losses stay TRL's own code on those per-token
  log-probs, so every TRL option keeps its exact meaning; only the engine that would otherwise
  produce the ``[tokens, vocab]`` logits changes.

Tested with TRL 1.16 (extra ``trl``: ``trl>=1.16,<2``).
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field
from typing import Optional

import torch
from trl import DPOTrainer, GRPOConfig, GRPOTrainer
from trl.trainer.utils import (FusedCausalLMOutput, split_pixel_values_by_grid, split_tensor_dict,
                               unsplit_pixel_values_by_grid)

from .. import gift_loss, linear_logprobs
from .hf import _check_ids, _last_hidden, lm_head_of, positional_ids_and_mask

SUPPORTED_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_VOCAB_CHUNK = 8192   # vocabulary rows per step of the (no-grad) mean-logit pass under softcapping


def _mean_logits(hidden, weight, bias, softcap, temperature):
    """Mean over the vocabulary of each row's final logits (no gradient; used for logging)."""
    with torch.no_grad():
        h = hidden.float()
        if softcap is None:   # linear: the mean of the logits is the logit of the mean row
            z = h @ weight.float().mean(0)
            z = z + bias.float().mean() if bias is not None else z
            return z / temperature
        total = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        for start in range(0, weight.shape[0], _VOCAB_CHUNK):
            z = h @ weight[start:start + _VOCAB_CHUNK].float().T
            if bias is not None:
                z += bias[start:start + _VOCAB_CHUNK].float()
            total += (softcap * torch.tanh(z / softcap)).sum(-1)
        return total / (weight.shape[0] * temperature)


def _fused_head_outputs(hidden, weight, bias, targets, mask, softcap, temperature, outputs,
                        backend):
    """Per-token fields of TRL's ``FusedCausalLMOutput`` for every row, zero where not ``mask``.

    Every row goes through the op (the ignored ones as ``-100`` targets, which it skips in eager
    mode and runs with zero gradient under compile): compacting the rows here (``hidden[mask]``)
    would give a data-dependent shape, a graph break and a host sync under ``torch.compile``."""
    want_entropy, want_top1 = "entropy" in outputs, "is_top1" in outputs
    res = linear_logprobs(hidden, weight, targets, bias, temperature=temperature, softcap=softcap,
                          return_entropy=want_entropy, return_argmax=want_top1, backend=backend)
    res = list(res) if isinstance(res, tuple) else [res]
    logp = res.pop(0)
    entropy = res.pop(0) if want_entropy else None
    is_top1 = (res.pop(0) == targets) & mask if want_top1 else None
    log_sum_sq = mean_logits = None
    if "log_sum_sq_probs" in outputs:
        # log sum_v p_v^2 = lse(2z) - 2 lse(z) = 2 logp(T) - logp(T/2): one more no-grad pass
        with torch.no_grad():
            half = linear_logprobs(hidden, weight, targets, bias, temperature=temperature / 2,
                                   softcap=softcap, backend=backend)
            log_sum_sq = 2 * logp.detach() - half
    if "mean_logits" in outputs:
        mean_logits = _mean_logits(hidden, weight, bias, softcap, temperature)
    # where(), not a multiply: a masked row's value is not used, even if it is not finite
    return tuple(None if x is None else torch.where(mask, x, 0.0)
                 for x in (logp, entropy, log_sum_sq, mean_logits)) + (is_top1,)


def _check_not_zero3():
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return
    if is_deepspeed_zero3_enabled():
        raise NotImplementedError(
            "gift_fast fused head: DeepSpeed ZeRO-3 is not supported (the backward reads the saved "
            "lm_head weight outside any gather); use FSDP2 or ZeRO-2, or keep TRL's own head.")


def add_gift_fast_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                          outputs: tuple = ("log_probs",), backend: str = "auto") -> None:
    """Drop-in for ``trl.trainer.utils.add_fused_lm_head`` computed by gift_fast.

    ``model(..., labels=labels, fused_lm_head=True)`` (or ``shift_labels=``) returns TRL's
    ``FusedCausalLMOutput`` (``loss``, ``log_probs``, ``entropy``, ``log_sum_sq_probs``,
    ``mean_logits``, ``is_top1``, ``label_mask``), zero where the label is -100. Only labelled
    positions are scored. Also accepts ``head_loss=fn`` (with ``logits_to_keep=k``): ``fn(hidden,
    weight, targets, bias=, softcap=, temperature=)`` runs on the last ``k`` positions inside the
    forward and its result is returned as ``loss`` (used by :class:`GIFTTrainer`). Without
    ``fused_lm_head`` the forward is the previous one, so generation is unchanged.
    """
    bad = [o for o in outputs if o not in SUPPORTED_OUTPUTS]
    if bad:
        raise ValueError(f"outputs: expected names among {SUPPORTED_OUTPUTS}, got {bad}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    _check_not_zero3()
    lm_head_of(model)   # unknown architecture: fail at patch time
    previous_forward = model.forward
    outputs = tuple(outputs)

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                num_items_in_batch=None, head_loss=None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return previous_forward(*args, **kwargs)
        input_ids, attention_mask = positional_ids_and_mask(args, kwargs)
        logits_to_keep = kwargs.pop("logits_to_keep", None) or None
        _check_ids(input_ids, attention_mask, logits_to_keep)
        # Unshifted labels: labels[:, 1:] are the next tokens; pre-shifted: scored as given
        if shift_labels is None and labels is None:
            raise ValueError("labels: expected [B, T] labels (-100 where not scored) with "
                             "fused_lm_head=True")
        hidden, head = _last_hidden(self, input_ids, attention_mask, kwargs)
        if shift_labels is not None:   # hidden[t] predicts shift_labels[t]
            targets = shift_labels
        else:
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        targets = targets.to(hidden.device)
        if logits_to_keep is not None:
            hidden, targets = hidden[:, -logits_to_keep:], targets[:, -logits_to_keep:]
        mask = targets != -100

        def fused_head(h, w, b):   # runs inside lm_head's own FSDP2 unit when it has one
            with torch.autocast(h.device.type, enabled=False):   # dtypes are the inputs' own
                if cast_lm_head_to_fp32:
                    h, w = h.float(), w.float()
                    b = b.float() if b is not None else None
                if head_loss is not None:
                    return head_loss(h, w, targets, bias=b, softcap=head.softcap,
                                     temperature=temperature)
                return _fused_head_outputs(h, w, b, targets, mask, head.softcap, temperature,
                                           outputs, backend)
        if head_loss is not None:
            return FusedCausalLMOutput(loss=head.apply(hidden, fused_head), label_mask=mask)
        log_probs, entropy, log_sum_sq, mean_logits, is_top1 = head.apply(hidden, fused_head)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denom, log_probs=log_probs,
                                   entropy=entropy, log_sum_sq_probs=log_sum_sq,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    forward.gift_fast_head = True   # marks the patched forward (its name is the model's own)
    model.forward = types.MethodType(forward, model)


def _uncompiled(model):
    """The module a ``torch.compile`` wrapper runs (accelerate compiles the reference model when
    the trainer is built with ``torch_compile=True``): patching the wrapper's own ``forward``
    would replace the compiled call with an eager one."""
    return model._orig_mod if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model


def _policy(model):
    """The model TRL patched: the base model under PEFT (as TRL does), else the model."""
    model = _uncompiled(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_gift_fast(trainer, backend: str = "auto"):
    """Make a constructed TRL ``GRPOTrainer`` or ``DPOTrainer`` compute its per-token log-probs
    (policy and reference) with gift_fast; its losses and options are unchanged. Returns it."""
    if isinstance(trainer, GRPOTrainer):
        policy = dict(temperature=trainer.temperature, outputs=("log_probs", "entropy"),
                      cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32)
        ref = dict(temperature=trainer.temperature,
                   cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32)
    elif isinstance(trainer, DPOTrainer):
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
        if getattr(trainer, "use_weighting", False):
            outputs += ("log_sum_sq_probs",)
        policy, ref = dict(outputs=outputs), {}
    else:
        raise TypeError(f"trainer: expected a trl GRPOTrainer or DPOTrainer, got "
                        f"{type(trainer).__name__}")
    add_gift_fast_lm_head(_policy(trainer.model), backend=backend, **policy)
    if getattr(trainer, "ref_model", None) is not None:
        add_gift_fast_lm_head(_uncompiled(trainer.ref_model), backend=backend, **ref)
    return trainer


def patch_trl(backend: str = "auto"):
    """Every TRL GRPO / DPO trainer constructed after this call computes its log-probs with
    gift_fast (the module-level ``add_fused_lm_head`` those trainers call is replaced). Returns a
    function that undoes the patch."""
    import trl.trainer.dpo_trainer as dpo_mod
    import trl.trainer.grpo_trainer as grpo_mod
    saved = {mod: mod.add_fused_lm_head for mod in (grpo_mod, dpo_mod)}
    replacement = functools.partial(add_gift_fast_lm_head, backend=backend)
    for mod in saved:
        mod.add_fused_lm_head = replacement

    def undo():
        for mod, fn in saved.items():
            mod.add_fused_lm_head = fn
    return undo


@dataclass
class GIFTConfig(GRPOConfig):
    """``GRPOConfig`` plus GIFT's parameters (names as in the GIFT authors' code).

    ``beta`` and ``epsilon`` keep TRL's names but take GIFT's meaning: ``beta`` scales the implicit
    reward (the authors' ``kl_loss_coef``, default 1.0), ``epsilon`` is added to the group standard
    deviations (default 1e-6). TRL's KL penalty and clipping are not used by the GIFT loss.
    """
    beta: float = field(default=1.0, metadata={"help": "GIFT beta (implicit-reward scale)."})
    epsilon: float = field(default=1e-6, metadata={"help": "GIFT eps added to group stds."})
    anchor: str = field(default="old", metadata={
        "help": "'old': rollout-policy log-probs (the authors' default); 'ref': reference model."})
    detach_stats: bool = field(default=True, metadata={"help": "Detach the group mean/std of s."})
    std: str = field(default="unbiased", metadata={"help": "'unbiased' or 'biased' group std."})
    length_norm: float = field(default=0.0, metadata={"help": "s_i / |y_i|^p (0: sum, 1: mean)."})
    drop_uniform_groups: bool = field(default=False, metadata={
        "help": "Skip groups whose rewards are all equal (DAPO-style filter)."})
    gift_backend: str = field(default="auto", metadata={"help": "gift_fast backend."})

    def __post_init__(self):
        super().__post_init__()
        if self.anchor not in ("old", "ref"):
            raise ValueError(f"anchor: expected 'old' or 'ref', got {self.anchor!r}")
        if self.anchor == "ref" and self.beta == 0.0:
            raise ValueError("beta: must be non-zero with anchor='ref'")
        if self.std not in ("unbiased", "biased"):
            raise ValueError(f"std: expected 'unbiased' or 'biased', got {self.std!r}")


class GIFTTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is GIFT: ``mean_i (A_i - beta z_i)^2`` per group of
    ``num_generations`` completions, with ``A`` the group-normalised rewards and ``z`` the
    group-normalised implicit rewards ``s_i = sum_t (log pi - log pi_anchor)`` over completion
    tokens (see docs/losses.md). Groups are kept whole in every micro-batch, so
    ``per_device_train_batch_size`` must be a multiple of ``num_generations``."""

    def __init__(self, model, reward_funcs, args: Optional[GIFTConfig] = None, **kwargs):
        if args is None or not isinstance(args, GIFTConfig):
            raise TypeError(f"args: expected a GIFTConfig, got {type(args).__name__}")
        if args.per_device_train_batch_size % args.num_generations:
            raise ValueError(
                f"per_device_train_batch_size: expected a multiple of num_generations "
                f"({args.num_generations}) so every micro-batch holds whole groups, got "
                f"{args.per_device_train_batch_size}")
        gift_beta = args.beta
        if args.anchor == "old":   # TRL builds a reference model and its log-probs iff beta != 0
            args.beta = 0.0
        try:
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        finally:
            args.beta = gift_beta
        self.gift_beta = gift_beta
        use_gift_fast(self, backend=args.gift_backend)
        self._gift_rewards_per_func = None

    # -- rewards: TRL keeps only advantages; GIFT normalises the raw rewards itself -------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions,
                                                      completion_ids_list)
        self._gift_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        per_func = self._gift_rewards_per_func
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        # a completion no reward function scored gets its group's mean (no signal, no bias)
        unscorable = torch.isnan(per_func).all(dim=1)
        if unscorable.any():
            mode = "train" if self.model.training else "eval"
            g = self.num_generations if mode == "train" else self.num_generations_eval
            grouped = rewards.masked_fill(unscorable, float("nan")).view(-1, g)
            fill = torch.nan_to_num(torch.nanmean(grouped, dim=1, keepdim=True), nan=0.0)
            rewards = torch.where(torch.isnan(grouped), fill, grouped).view(-1)
        n = output["prompt_ids"].size(0)
        start = self.accelerator.process_index * n
        output["gift_rewards"] = rewards[start:start + n]
        return output

    # -- micro-batches of whole groups ----------------------------------------------------------
    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return self._generate_and_score_completions(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = split_pixel_values_by_grid(batch)
            batch = _shuffle_whole_groups(batch, self.num_generations)
            batches = split_tensor_dict(batch, self.args.steps_per_generation)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in batches]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    # -- the loss -------------------------------------------------------------------------------
    def _head_loss(self, anchor, rewards, group):
        """The ``head_loss`` of one micro-batch: ``(loss, metrics)`` of :func:`gift_loss`, run by
        the patched forward on the folded head. ``anchor`` None: the anchor is this forward's own
        log-probs without gradient (pi_old == pi_theta when each rollout is used once)."""
        args = self.args

        def head_loss(hidden, weight, targets, bias=None, softcap=None, temperature=1.0):
            anchor_logps = anchor
            if anchor_logps is None:
                with torch.no_grad():
                    anchor_logps = linear_logprobs(hidden, weight, targets, bias,
                                                   temperature=temperature, softcap=softcap,
                                                   backend=args.gift_backend)
            return gift_loss(hidden, weight, targets, anchor_logps, rewards, group_size=group,
                             bias=bias, beta=self.gift_beta, eps=args.epsilon, std=args.std,
                             detach_stats=args.detach_stats, length_norm=args.length_norm,
                             drop_uniform_groups=args.drop_uniform_groups,
                             temperature=temperature, softcap=softcap, backend=args.gift_backend)
        return head_loss

    def _compute_loss(self, model, inputs):
        args = self.args
        mode = "train" if self.model.training else "eval"
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        keep = completion_ids.size(1)
        labels = torch.cat([torch.full_like(prompt_ids, -100),
                            completion_ids.masked_fill(mask == 0, -100)], dim=1)
        anchor = inputs.get("ref_per_token_logps" if args.anchor == "ref"
                            else "old_per_token_logps")
        group = self.num_generations if mode == "train" else self.num_generations_eval
        head_loss = self._head_loss(anchor, inputs["gift_rewards"], group)
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        fused_lm_head=True, logits_to_keep=keep, head_loss=head_loss)
        loss, metrics = out.loss
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                self._metrics[mode][f"gift/{name}"].append(
                    self.accelerator.gather(value.detach().float().reshape(1)).nanmean().item())
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        return loss / normalizer


def _shuffle_whole_groups(batch: dict, group: int) -> dict:
    """TRL shuffles completions before splitting them into micro-batches; GIFT needs each group
    whole, so permute groups and keep each group's members together and in order."""
    size = len(next(v for v in batch.values() if v is not None))
    order = (torch.randperm(size // group)[:, None] * group + torch.arange(group)).reshape(-1)

    def permute(v):
        if v is None or (isinstance(v, torch.Tensor) and v.ndim == 0):
            return v
        if isinstance(v, torch.Tensor):
            return v[order]
        return [v[i] for i in order]
    return {k: permute(v) for k, v in batch.items()}


__all__ = ["GIFTConfig", "GIFTTrainer", "add_gift_fast_lm_head", "use_gift_fast", "patch_trl"]
