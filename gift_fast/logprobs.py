"""``linear_logprobs``: per-token log-probs of ``hidden @ weight.T`` without materialising logits.

This is the building block of every loss in the library: any loss written in torch on top of it
keeps memory flat in N and V.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backends import resolve_backend
from .backends.protocol import get_backend, local_targets, single_device
from .backends.reference import reference_linear_logprobs
from .validation import check_linear_inputs, check_target_range


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                    softcap: Optional[float] = None, ignore_index: int = -100,
                    return_entropy: bool = False, return_argmax: bool = False,
                    backend: str = "auto", reference_dtype: torch.dtype = torch.float32,
                    vocab_parallel_group=None, vocab_start_index: Optional[int] = None):
    """Log-probability of each target token under ``softmax(softcap(hidden @ weight.T + bias) / T)``.

    Args:
        hidden: ``[..., H]`` last hidden states, float32 / float16 / bfloat16.
        weight: ``[V, H]`` lm_head weight, same dtype as ``hidden``.
        targets: ``[...]`` integer token ids, already aligned (``hidden[t]`` predicts
            ``targets[t]``); rows equal to ``ignore_index`` give 0 and no gradient.
        bias: optional ``[V]`` lm_head bias.
        temperature: divides the (soft-capped) logits; must be > 0.
        softcap: optional ``c`` for ``z -> c * tanh(z / c)`` (Gemma-2 style), applied before T.
        return_entropy: also return the entropy of each row's distribution (differentiable).
        return_argmax: also return the greedy prediction of each row (int64, no gradient),
            computed in the same pass (used by IFT).
        backend: ``"auto"`` (triton on CUDA, torch otherwise), ``"triton"``, ``"torch"``
            (chunked), or ``"reference"`` (materialised logits; ``reference_dtype`` sets its
            precision, e.g. ``torch.float64`` for tests).
        vocab_parallel_group: a ``torch.distributed`` process group over which the lm_head is
            sharded along the vocabulary: ``weight`` (and ``bias``) are then this rank's contiguous
            rows ``[start, start + weight.shape[0])``, shards in rank order unless
            ``vocab_start_index`` gives this rank's ``start``; ``hidden`` and ``targets`` (global
            ids) are the same on every rank. Results equal the single-device op on the full
            weight; the weight gradient is the shard's own, the hidden gradient is all-reduced.
            Every rank of the group must call the op (it runs collectives). ``torch`` and
            ``triton`` backends only. See docs/distributed.md.

    Returns:
        ``logp`` ``[...]`` float32, or a tuple ``(logp, [entropy], [argmax])`` with the extra
        outputs that were asked for, in that order.

    Gradients flow to ``hidden``, ``weight`` and ``bias`` in their own dtypes. Under
    ``torch.no_grad()`` nothing is saved for backward.
    """
    which = resolve_backend(backend, getattr(hidden, "device", torch.device("cpu")))
    if vocab_parallel_group is not None:
        from .distributed.vocab_parallel import vocab_shard
        h2, t1, lead = check_linear_inputs(hidden, weight, targets, bias, temperature, softcap,
                                           ignore_index, check_targets=False)
        if which == "reference":    # raised on every rank before any collective
            raise ValueError("backend: vocab_parallel_group works with 'torch' or 'triton' (or "
                             "'auto'), got 'reference'; for an oracle, gather the full weight and "
                             "call linear_logprobs without the group")
        shard = vocab_shard(vocab_parallel_group, weight.shape[0], h2.shape[0], h2.device,
                            vocab_start_index, targets=t1)
        check_target_range(t1, shard.vocab_size, ignore_index)
        active = t1 != ignore_index
        y = local_targets(t1, active, shard.start, shard.size)
        combiner = (vocab_parallel_group.group_name, shard.start, shard.vocab_size)
    else:
        if vocab_start_index is not None:
            raise ValueError("vocab_start_index: only meaningful with vocab_parallel_group")
        h2, t1, lead = check_linear_inputs(hidden, weight, targets, bias, temperature, softcap,
                                           ignore_index)
        if which == "reference":
            logp, entropy, argmax = reference_linear_logprobs(
                h2, weight, t1, bias, temperature, softcap, ignore_index, reference_dtype)
            return _outputs(lead, logp, entropy, argmax, return_entropy, return_argmax)
        active = t1 != ignore_index
        y = local_targets(t1, active)
        combiner = (None, 0, weight.shape[0])
    args = (h2, weight, bias, y, active, which, float(temperature), softcap, return_entropy,
            return_argmax, *combiner)
    if grad_wanted(hidden, weight, bias):
        logp, entropy, argmax = LinearLogprobs.apply(*args)
    else:   # inference: nothing is saved for backward
        logp, entropy, argmax, _ = _forward(*args)
    return _outputs(lead, logp, entropy, argmax, return_entropy, return_argmax)


def grad_wanted(*tensors) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _forward(hidden, weight, bias, local_targets, active, backend, temperature, softcap,
             want_entropy, want_argmax, group_name, vocab_start, vocab_size):
    """Per-row (logp, entropy or None, argmax or None, lse): the backend's statistics of this
    weight, combined over the vocabulary shards when ``group_name`` names a group."""
    st = get_backend(backend).stats(hidden, weight, bias, local_targets, temperature, softcap,
                                    want_entropy, want_argmax)
    if group_name is None:
        return single_device(st, active)
    from .distributed.vocab_parallel import combine
    return combine(st, active, group_name, vocab_start, vocab_size)


class LinearLogprobs(torch.autograd.Function):
    """``linear_logprobs`` on flattened inputs, for one backend ("torch" or "triton") and one
    combiner: identity (``group_name`` None) or the all-reduce over a vocabulary-parallel group.

    Saves the inputs and the (global) per-row lse and entropy; backward recomputes the logits of
    this weight, and under vocabulary parallelism gives this shard's dW / db and the summed dX.
    Every argument is a tensor or a plain scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, local_targets, active, backend, temperature, softcap,
                want_entropy, want_argmax, group_name, vocab_start, vocab_size):
        logp, entropy, argmax, lse = _forward(hidden, weight, bias, local_targets, active,
                                              backend, temperature, softcap, want_entropy,
                                              want_argmax, group_name, vocab_start, vocab_size)
        ctx.save_for_backward(hidden, weight, bias, local_targets, active, lse, entropy)
        ctx.cfg = (backend, temperature, softcap, group_name)
        if argmax is None:
            argmax = torch.zeros_like(local_targets, dtype=torch.int64)
        ctx.mark_non_differentiable(argmax)
        return logp, entropy if entropy is not None else torch.zeros_like(logp), argmax

    @staticmethod
    def backward(ctx, d_logp, d_entropy, _d_argmax):
        hidden, weight, bias, local_targets, active, lse, entropy = ctx.saved_tensors
        backend, temperature, softcap, group_name = ctx.cfg
        acc = lse.dtype
        g = (torch.where(active, d_logp.to(acc), 0.0) if d_logp is not None
             else torch.zeros_like(lse))
        e = None
        if entropy is not None and d_entropy is not None:
            e = torch.where(active, d_entropy.to(acc), 0.0)
        need_dx = ctx.needs_input_grad[0]
        d_hidden, d_weight, d_bias = get_backend(backend).grad(
            hidden, weight, bias, local_targets, lse, entropy, g, e, temperature, softcap,
            need_dx, ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if need_dx and group_name is not None:
            from .distributed.vocab_parallel import sum_over_group
            d_hidden = sum_over_group(d_hidden, group_name)
        return (d_hidden, d_weight, d_bias) + (None,) * 10


def _outputs(lead, logp, entropy, argmax, return_entropy: bool, return_argmax: bool):
    outputs = [logp.reshape(lead)]
    if return_entropy:
        outputs.append(entropy.reshape(lead))
    if return_argmax:
        outputs.append(argmax.reshape(lead))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
