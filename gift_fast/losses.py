"""Fused loss front-ends (form (b)): hidden states + lm_head weight in, ``(loss, metrics)`` out.

Every front-end validates its inputs, gets the per-token log-probs of the targets from ONE
internal function, :func:`_policy_logps` (:func:`gift_fast.linear_logprobs`), then applies the
matching epilogue of :mod:`gift_fast.functional`. On the triton backend two fused paths replace
that composition: GIFT runs as one two-phase op (``backends.triton_gift``) and the token-local
losses (GRPO, f-divergence SFT, DFT) as one-pass ops that compute dX/dW inside the forward
(``backends.triton_token_local``); both are tested equal to the composed path. Under
vocabulary parallelism (``vocab_parallel_group=``, every front-end) the composed path is used. The [N, V] logits are never materialised on the triton and torch
backends.

Layouts: padded ``hidden [B, T, H]`` with ``targets [B, T]`` (rows equal to ``ignore_index`` are
prompt / padding), or, where a loss accepts ``cu_seqlens``, packed ``hidden [N, H]``,
``targets [N]`` and ``cu_seqlens [B + 1]``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import functional as Fn
from .backends import resolve_backend
from .logprobs import grad_wanted, linear_logprobs
from .sequences import check_like, group_index, make_layout
from .validation import check_linear_inputs, check_logprob_input

__all__ = [
    "gift_loss", "grpo_loss", "group_advantages", "dpo_loss", "ipo_loss", "simpo_loss",
    "rpo_loss", "una_loss", "fdiv_sft_loss", "dft_loss", "ift_loss",
    "ift_greedy_predictions", "ift_mixed_embeddings",
]

group_advantages = Fn.group_advantages


def _policy_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  bias: Optional[torch.Tensor], temperature: float, ignore_index: int,
                  backend: str, softcap: Optional[float] = None,
                  vocab_parallel_group=None) -> torch.Tensor:
    """Per-token log-probs of ``targets`` (float32, 0 at ignored rows, with gradient).

    The single entry point every front-end uses for the policy's log-probs.
    """
    return linear_logprobs(hidden, weight, targets, bias, temperature=temperature,
                           softcap=softcap, ignore_index=ignore_index, backend=backend,
                           vocab_parallel_group=vocab_parallel_group)


def _check_layout(hidden, targets, cu_seqlens, packed_ok: bool = True) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden: expected a torch.Tensor, got {type(hidden).__name__}")
    if cu_seqlens is None:
        if hidden.dim() != 3:
            hint = " (or [N, H] with cu_seqlens)" if packed_ok else ""
            raise ValueError(f"hidden: expected shape [B, T, H]{hint}, got {tuple(hidden.shape)}")
    else:
        if not packed_ok:
            raise ValueError("cu_seqlens: this loss supports only the padded [B, T, H] layout")
        if hidden.dim() != 2:
            raise ValueError(f"hidden: expected packed shape [N, H] when cu_seqlens is given, "
                             f"got {tuple(hidden.shape)}")
    if isinstance(targets, torch.Tensor) and tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets: expected shape {tuple(hidden.shape[:-1])} (hidden.shape[:-1]), "
                         f"got {tuple(targets.shape)}")


def _front(hidden, weight, targets, bias, temperature, ignore_index, backend, softcap,
           cu_seqlens=None, packed_ok=True, vocab_parallel_group=None):
    _check_layout(hidden, targets, cu_seqlens, packed_ok)
    logps = _policy_logps(hidden, weight, targets, bias, temperature, ignore_index, backend, softcap,
                          vocab_parallel_group)
    return logps, targets != ignore_index


def _token_local(hidden, weight, targets, bias, temperature, ignore_index, backend, softcap,
                 cu_seqlens, epilogue, vocab_parallel_group=None):
    """Token-local losses (dL/dlogp_n depends on row n only): ``epilogue(logps, mask)``.

    On the triton backend, with gradients wanted, the one-pass op computes dX/dW inside the
    forward (backward only scales them); elsewhere, and under vocabulary parallelism, log-probs
    and epilogue are composed.
    """
    _check_layout(hidden, targets, cu_seqlens)
    if (grad_wanted(hidden, weight, bias) and vocab_parallel_group is None
            and resolve_backend(backend, hidden.device, hidden.dtype) == "triton"):
        from .backends.triton_token_local import one_pass_token_local
        h2, t1, lead = check_linear_inputs(hidden, weight, targets, bias, temperature, softcap,
                                           ignore_index)
        mask = targets != ignore_index
        return one_pass_token_local(h2, weight, bias, t1,
                                    lambda lp: epilogue(lp.reshape(lead), mask),
                                    temperature=temperature, softcap=softcap,
                                    ignore_index=ignore_index)
    logps = _policy_logps(hidden, weight, targets, bias, temperature, ignore_index, backend, softcap,
                          vocab_parallel_group)
    return epilogue(logps, targets != ignore_index)


def _fused_gift(hidden, weight, targets, anchor_logps, rewards, group_size, cu_seqlens, bias,
                **kw):
    """GIFT through the triton two-phase op (forward kernel, epilogue kernel, one backward)."""
    from .backends.triton_gift import fused_gift_loss
    h2, t1, lead = check_linear_inputs(hidden, weight, targets, bias, kw["temperature"],
                                       kw["softcap"], kw["ignore_index"])
    Fn.check_choice("std", kw["std"], Fn.STD_CHOICES)
    Fn._check_number("beta", kw["beta"])
    Fn._check_number("eps", kw["eps"], 0.0)
    Fn._check_number("length_norm", kw["length_norm"], 0.0, 1.0)
    check_logprob_input("anchor_logps", anchor_logps)
    check_like("anchor_logps", anchor_logps, targets, "one value per token, like targets")
    layout = make_layout(anchor_logps, cu_seqlens, "anchor_logps")
    Fn._per_seq("rewards", rewards, layout, anchor_logps)
    group_index(layout.n_seq, group_size, None, hidden.device)
    if cu_seqlens is None:
        B, T = lead
        cu_seqlens = torch.arange(B + 1, device=hidden.device) * T
    return fused_gift_loss(h2, weight, bias, t1, anchor_logps, rewards, cu_seqlens, group_size,
                           **kw)


def gift_loss(hidden, weight, targets, anchor_logps, rewards, *, group_size=None, group_ids=None,
              cu_seqlens=None, bias=None, beta=1.0, eps=1e-6, std="unbiased", detach_stats=True,
              length_norm=0.0, drop_uniform_groups=False, temperature=1.0, softcap=None,
              ignore_index=-100, reduction="mean", backend="auto", data_parallel_group=None,
              vocab_parallel_group=None):
    """GIFT (Group-relative Implicit Fine Tuning): ``L = mean_i (A_i - beta z_i)^2``.

    Args:
        hidden: ``[B, T, H]`` (or packed ``[N, H]`` with ``cu_seqlens``).
        weight: ``[V, H]`` lm_head weight; ``bias`` optional ``[V]``.
        targets: ``[B, T]`` / ``[N]`` token ids, ``ignore_index`` on prompt and padding.
        anchor_logps: per-token log-probs of the anchor (pi_old by default, or pi_ref), like targets.
        rewards: ``[B]`` explicit rewards, finite.
        group_size / group_ids: consecutive groups of ``group_size`` sequences, or ``[B]`` labels.
        data_parallel_group: process group whose ranks each hold part of the batch: group
            statistics are exact over the whole batch (docs/distributed.md); then the log-probs
            and the epilogue are composed (on the triton backend too).
        vocab_parallel_group: the lm_head is sharded along the vocabulary over this process
            group (``weight``/``bias`` are this rank's shard); see :func:`gift_fast.linear_logprobs`
            and docs/distributed.md. Every front-end takes it.
        Other options: see :func:`gift_fast.functional.gift_loss` and docs/losses.md.

    Returns ``(loss, metrics)``.
    """
    Fn._check_number("beta", beta, 0.0, lo_open=True)  # checked here too: the fused path skips Fn
    if (resolve_backend(backend, getattr(hidden, "device", torch.device("cpu")),
                        getattr(hidden, "dtype", None)) == "triton"
            and detach_stats and group_ids is None and group_size is not None
            and data_parallel_group is None and vocab_parallel_group is None
            and reduction in ("mean", "sum") and isinstance(hidden, torch.Tensor)):
        _check_layout(hidden, targets, cu_seqlens)
        return _fused_gift(hidden, weight, targets, anchor_logps, rewards, group_size, cu_seqlens,
                           bias, beta=beta, eps=eps, std=std, length_norm=length_norm,
                           drop_uniform_groups=drop_uniform_groups, temperature=temperature,
                           softcap=softcap, ignore_index=ignore_index, reduction=reduction)
    logps, mask = _front(hidden, weight, targets, bias, temperature, ignore_index, backend, softcap,
                         cu_seqlens, vocab_parallel_group=vocab_parallel_group)
    return Fn.gift_loss(logps, anchor_logps, rewards, mask=mask, cu_seqlens=cu_seqlens,
                        group_size=group_size, group_ids=group_ids, beta=beta, eps=eps, std=std,
                        detach_stats=detach_stats, length_norm=length_norm,
                        drop_uniform_groups=drop_uniform_groups, reduction=reduction,
                        data_parallel_group=data_parallel_group)


def grpo_loss(hidden, weight, targets, old_logps, advantages, *, ref_logps=None, beta=0.0,
              epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo", max_completion_length=None,
              num_items_in_batch=None, cu_seqlens=None, bias=None, temperature=1.0, softcap=None,
              ignore_index=-100, backend="auto", vocab_parallel_group=None):
    """GRPO clipped surrogate (+ beta * k3 KL); ``advantages [B]`` e.g. from
    :func:`group_advantages`. See :func:`gift_fast.functional.grpo_loss`."""
    return _token_local(
        hidden, weight, targets, bias, temperature, ignore_index, backend, softcap, cu_seqlens,
        lambda logps, mask: Fn.grpo_loss(
            logps, old_logps, advantages, mask=mask, cu_seqlens=cu_seqlens, ref_logps=ref_logps,
            beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type,
            max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch),
        vocab_parallel_group)


def dpo_loss(hidden, weight, targets, ref_logps, *, beta=0.1, label_smoothing=0.0, length_norm=0.0,
             cu_seqlens=None, bias=None, temperature=1.0, softcap=None, ignore_index=-100,
             reduction="mean", backend="auto", vocab_parallel_group=None):
    """DPO; chosen = first half of the batch, rejected = second half. ``ref_logps`` per token
    (None: reference-free)."""
    logps, mask = _front(hidden, weight, targets, bias, temperature, ignore_index, backend, softcap,
                         cu_seqlens, vocab_parallel_group=vocab_parallel_group)
    return Fn.dpo_loss(logps, ref_logps, mask=mask, cu_seqlens=cu_seqlens, beta=beta,
                       label_smoothing=label_smoothing, length_norm=length_norm, reduction=reduction)


def ipo_loss(hidden, weight, targets, ref_logps, *, beta=0.1, length_normalized=True,
             cu_seqlens=None, bias=None, temperature=1.0, softcap=None, ignore_index=-100,
             reduction="mean", backend="auto", vocab_parallel_group=None):
    """IPO ``(h - 1/(2 beta))^2``, length-normalised log-ratios by default."""
    logps, mask = _front(hidden, weight, targets, bias, temperature, ignore_index, backend, softcap,
                         cu_seqlens, vocab_parallel_group=vocab_parallel_group)
    return Fn.ipo_loss(logps, ref_logps, mask=mask, cu_seqlens=cu_seqlens, beta=beta,
                       length_normalized=length_normalized, reduction=reduction)


def simpo_loss(hidden, weight, targets, *, beta=2.0, gamma=1.0, sft_weight=0.0, label_smoothing=0.0,
               cu_seqlens=None, bias=None, temperature=1.0, softcap=None, ignore_index=-100,
               reduction="mean", backend="auto", vocab_parallel_group=None):
    """SimPO (reference-free, mean log-probs, margin ``gamma``), optional NLL on chosen."""
    logps, mask = _front(hidden, weight, targets, bias, temperature, ignore_index, backend, softcap,
                         cu_seqlens, vocab_parallel_group=vocab_parallel_group)
    return Fn.simpo_loss(logps, mask=mask, cu_seqlens=cu_seqlens, beta=beta, gamma=gamma,
                         sft_weight=sft_weight, label_smoothing=label_smoothing, reduction=reduction)


def rpo_loss(hidden, weight, targets, ref_logps, rewards, *, kind="sq", beta=0.2, eta=1.0,
             group_size=2, group_ids=None, length_norm=0.0, cu_seqlens=None, bias=None,
             temperature=1.0, softcap=None, ignore_index=-100, reduction="mean", backend="auto",
             vocab_parallel_group=None):
    """RPO (``kind`` in sq, bwd_kl, fwd_kl); pairwise for ``group_size=2``, multi-response
    otherwise. See :func:`gift_fast.functional.rpo_loss`."""
    logps, mask = _front(hidden, weight, targets, bias, temperature, ignore_index, backend, softcap,
                         cu_seqlens, vocab_parallel_group=vocab_parallel_group)
    return Fn.rpo_loss(logps, ref_logps, rewards, mask=mask, cu_seqlens=cu_seqlens, kind=kind,
                       beta=beta, eta=eta, group_size=group_size, group_ids=group_ids,
                       length_norm=length_norm, reduction=reduction)


def una_loss(hidden, weight, targets, anchor_logps, *, kind="pairwise", labels=None, scores=None,
             beta=None, cu_seqlens=None, bias=None, temperature=1.0, softcap=None,
             ignore_index=-100, reduction="mean", backend="auto", vocab_parallel_group=None):
    """UNA (``kind`` in pairwise, binary_mse, binary_bce, score_mse)."""
    logps, mask = _front(hidden, weight, targets, bias, temperature, ignore_index, backend, softcap,
                         cu_seqlens, vocab_parallel_group=vocab_parallel_group)
    return Fn.una_loss(logps, anchor_logps, mask=mask, cu_seqlens=cu_seqlens, kind=kind,
                       labels=labels, scores=scores, beta=beta, reduction=reduction)


def fdiv_sft_loss(hidden, weight, targets, ref_logps=None, *, divergence="tv", beta=0.1,
                  cu_seqlens=None, bias=None, temperature=1.0, softcap=None, ignore_index=-100,
                  backend="auto", vocab_parallel_group=None):
    """f-divergence SFT (ours; ``divergence`` in tv, pearson, hellinger, kl, js)."""
    Fn.check_choice("divergence", divergence, Fn.DIVERGENCES)
    return _token_local(
        hidden, weight, targets, bias, temperature, ignore_index, backend, softcap, cu_seqlens,
        lambda logps, mask: Fn.fdiv_sft_loss(logps, ref_logps, mask=mask, cu_seqlens=cu_seqlens,
                                             divergence=divergence, beta=beta),
        vocab_parallel_group)


def dft_loss(hidden, weight, targets, *, cu_seqlens=None, bias=None, temperature=1.0, softcap=None,
             ignore_index=-100, backend="auto", vocab_parallel_group=None):
    """Dynamic fine-tuning ``-mean sg(p) log p`` over active tokens."""
    return _token_local(
        hidden, weight, targets, bias, temperature, ignore_index, backend, softcap, cu_seqlens,
        lambda logps, mask: Fn.dft_loss(logps, mask=mask, cu_seqlens=cu_seqlens),
        vocab_parallel_group)


def ift_loss(hidden, weight, targets, *, gamma=0.95, bias=None, temperature=1.0, softcap=None,
             ignore_index=-100, backend="auto", vocab_parallel_group=None):
    """IFT loss; ``hidden [B, T, H]`` must come from the forward on the mixed input embeddings
    (:func:`ift_mixed_embeddings`)."""
    logps, mask = _front(hidden, weight, targets, bias, temperature, ignore_index, backend, softcap,
                         None, packed_ok=False, vocab_parallel_group=vocab_parallel_group)
    return Fn.ift_loss(logps, mask=mask, gamma=gamma)


@torch.no_grad()
def ift_greedy_predictions(hidden, weight, bias=None, *, temperature=1.0, softcap=None,
                           backend="auto", vocab_parallel_group=None) -> torch.Tensor:
    """Greedy next-token prediction ``argmax z_t`` of every row of ``hidden [..., H]`` (int64),
    computed by the fused forward without materialising logits (IFT step 1)."""
    dummy = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
    _, argmax = linear_logprobs(hidden.detach(), weight.detach(), dummy,
                                None if bias is None else bias.detach(), temperature=temperature,
                                softcap=softcap, return_argmax=True, backend=backend,
                                vocab_parallel_group=vocab_parallel_group)
    return argmax


def ift_mixed_embeddings(input_ids: torch.Tensor, labels: torch.Tensor, greedy_next: torch.Tensor,
                         embedding, *, lam: float = 0.2, ignore_index: int = -100) -> torch.Tensor:
    """IFT step 2: ``(1 - lam) E[y*] + lam E[y_hat]`` at response positions, prompt untouched.

    Args:
        input_ids: ``[B, T]`` ground-truth input tokens.
        labels: ``[B, T]`` aligned with ``input_ids`` (unshifted); positions equal to
            ``ignore_index`` are prompt / padding and keep their embedding.
        greedy_next: ``[B, T]`` greedy prediction at each position (of the NEXT token), e.g. from
            :func:`ift_greedy_predictions`; the prediction for position t is ``greedy_next[t - 1]``.
        embedding: an ``nn.Embedding`` or an embedding matrix ``[V, H]`` (used without gradient
            to the looked-up table only through ``E[y*]``, as a plain lookup).
        lam: mixing weight lambda in [0, 1].
    Returns ``[B, T, H]`` input embeddings.
    """
    Fn._check_number("lam", lam, 0.0, 1.0)
    for name, t in (("input_ids", input_ids), ("labels", labels), ("greedy_next", greedy_next)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name}: expected a [B, T] tensor")
        if tuple(t.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name}: expected shape {tuple(input_ids.shape)}, got {tuple(t.shape)}")
    table = embedding.weight if isinstance(embedding, torch.nn.Embedding) else embedding
    shifted = torch.cat([input_ids[:, :1], greedy_next[:, :-1]], dim=1)
    further = torch.where(labels == ignore_index, input_ids, shifted)
    e_true = torch.nn.functional.embedding(input_ids, table)
    e_pred = torch.nn.functional.embedding(further, table)
    return (1 - lam) * e_true + lam * e_pred
