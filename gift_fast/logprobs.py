"""``linear_logprobs``: per-token log-probs of ``hidden @ weight.T`` without materialising logits.

This is the building block of every loss in the library: any loss written in torch on top of it
keeps memory flat in N and V.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backends import resolve_backend
from .backends.reference import reference_linear_logprobs
from .backends.torch_chunked import CHUNK_ELEMENTS, ChunkedLinearLogprobs, chunked_forward
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
        from .distributed.vocab_parallel import shard_logprobs, vocab_shard
        h2, t1, lead = check_linear_inputs(hidden, weight, targets, bias, temperature, softcap,
                                           ignore_index, check_targets=False)
        shard = vocab_shard(vocab_parallel_group, weight.shape[0], h2.shape[0], h2.device,
                            vocab_start_index, targets=t1)
        check_target_range(t1, shard.vocab_size, ignore_index)
        logp, entropy, argmax = shard_logprobs(
            h2, weight, t1, bias, shard, group=vocab_parallel_group, backend=which,
            temperature=temperature, softcap=softcap, ignore_index=ignore_index,
            want_entropy=return_entropy)
        return _outputs(lead, logp, entropy, argmax, return_entropy, return_argmax)
    if vocab_start_index is not None:
        raise ValueError("vocab_start_index: only meaningful with vocab_parallel_group")
    h2, t1, lead = check_linear_inputs(hidden, weight, targets, bias, temperature, softcap,
                                       ignore_index)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if which == "reference":
        logp, entropy, argmax = reference_linear_logprobs(h2, weight, t1, bias, temperature,
                                                          softcap, ignore_index, reference_dtype)
    elif which == "torch" and not needs_grad:   # inference: nothing is saved for backward
        logp, _, entropy, argmax = chunked_forward(h2, weight, bias, t1, temperature, softcap,
                                                   ignore_index, return_entropy)
    elif which == "torch":
        logp, entropy, argmax = ChunkedLinearLogprobs.apply(
            h2, weight, bias, t1, float(temperature), softcap, ignore_index, return_entropy,
            CHUNK_ELEMENTS)
    else:
        from .backends.triton_op import TritonLinearLogprobs, triton_forward
        if needs_grad:
            logp, entropy, argmax = TritonLinearLogprobs.apply(
                h2, weight, bias, t1, float(temperature), softcap, ignore_index, return_entropy)
        else:
            logp, entropy, argmax, _, _ = triton_forward(h2, weight, bias, t1, float(temperature),
                                                         softcap, ignore_index, return_entropy)
    return _outputs(lead, logp, entropy, argmax, return_entropy, return_argmax)


def _outputs(lead, logp, entropy, argmax, return_entropy: bool, return_argmax: bool):
    outputs = [logp.reshape(lead)]
    if return_entropy:
        outputs.append(entropy.reshape(lead))
    if return_argmax:
        outputs.append(argmax.reshape(lead))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
