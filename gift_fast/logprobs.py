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
from .validation import check_linear_inputs


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                    softcap: Optional[float] = None, ignore_index: int = -100,
                    return_entropy: bool = False, return_argmax: bool = False,
                    backend: str = "auto", reference_dtype: torch.dtype = torch.float32):
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

    Returns:
        ``logp`` ``[...]`` float32, or a tuple ``(logp, [entropy], [argmax])`` with the extra
        outputs that were asked for, in that order.

    Gradients flow to ``hidden``, ``weight`` and ``bias`` in their own dtypes. Under
    ``torch.no_grad()`` nothing is saved for backward.
    """
    h2, t1, lead = check_linear_inputs(hidden, weight, targets, bias, temperature, softcap,
                                       ignore_index)
    which = resolve_backend(backend, hidden.device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if which == "reference":
        logp, entropy, argmax = reference_linear_logprobs(h2, weight, t1, bias, temperature,
                                                          softcap, ignore_index, reference_dtype)
    elif which == "torch" and not needs_grad:   # inference: nothing is saved for backward
        logp, _, entropy, argmax, _, _ = chunked_forward(h2, weight, bias, t1, temperature,
                                                         softcap, ignore_index, return_entropy,
                                                         return_argmax)
    elif which == "torch":
        logp, entropy, argmax = ChunkedLinearLogprobs.apply(
            h2, weight, bias, t1, float(temperature), softcap, ignore_index, return_entropy,
            CHUNK_ELEMENTS, return_argmax)
    else:
        from .backends.triton_op import TritonLinearLogprobs, triton_forward
        if needs_grad:
            logp, entropy, argmax = TritonLinearLogprobs.apply(
                h2, weight, bias, t1, float(temperature), softcap, ignore_index, return_entropy)
        else:
            logp, entropy, argmax, _, _ = triton_forward(h2, weight, bias, t1, float(temperature),
                                                         softcap, ignore_index, return_entropy)
    outputs = [logp.reshape(lead)]
    if return_entropy:
        outputs.append(entropy.reshape(lead))
    if return_argmax:
        outputs.append(argmax.reshape(lead))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
