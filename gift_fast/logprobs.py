"""``linear_logprobs``: per-token log-probs of ``hidden @ weight.T`` without materialising logits.

This is the building block of every loss in the library: any loss written in torch on top of it
keeps memory flat in N and V.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .backends import resolve_backend
from .backends.keep import ENABLED as KEEP_ENABLED
from .backends.keep import KeepLogprobs, keep_fits
from .backends.protocol import get_backend, local_targets, single_device
from .backends.reference import reference_linear_logprobs
from .backends.torch_chunked import accumulation_dtype
from .validation import _capturing, check_linear_inputs, check_target_range

# Backends whose stored-logits forward runs the statistics' tiles (log-probs with the same bits).
KEEP_BACKENDS = ("triton",)


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
    which = resolve_backend(backend, getattr(hidden, "device", torch.device("cpu")),
                            getattr(hidden, "dtype", None))
    if vocab_parallel_group is not None:
        from .distributed.vocab_parallel import vocab_shard
        h2, t1, lead = check_linear_inputs(hidden, weight, targets, bias, temperature, softcap,
                                           ignore_index, check_targets=False)
        if which == "reference":    # raised on every rank before any collective
            raise ValueError("backend: vocab_parallel_group works with 'torch' or 'triton' (or "
                             "'auto'), got 'reference'; for an oracle, gather the full weight and "
                             "call linear_logprobs without the group")
        shard = vocab_shard(vocab_parallel_group, weight.shape[0], h2.shape[0], h2.device,
                            vocab_start_index, targets=t1, weight=weight)
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
        if keeps_logits(which, h2, weight, bias, return_entropy or return_argmax, softcap):
            logp = KeepLogprobs.apply(h2, weight, bias, y, active, which, float(temperature),
                                      None if softcap is None else float(softcap))
            return _outputs(lead, logp, None, None, False, False)
        combiner = (None, 0, weight.shape[0])
    logp, entropy, argmax, _ = linear_logprobs_fwd(
        h2, weight, bias, y, active, which, float(temperature),
        None if softcap is None else float(softcap), return_entropy, return_argmax, *combiner)
    return _outputs(lead, logp, entropy, argmax, return_entropy, return_argmax)


def keeps_logits(backend: str, hidden, weight, bias, extra_outputs: bool, softcap=None) -> bool:
    """The keep plan (:mod:`.backends.keep`): gradients wanted, no entropy or argmax, a backend
    whose stored-logits forward has the statistics' bits (triton), eager mode (the custom ops'
    fake implementations have no stored logits), and the budget holds the logits."""
    # must_not_sync first: under compile nothing below is traced (no guard on the shapes).
    if (must_not_sync(hidden) or not KEEP_ENABLED or extra_outputs
            or backend not in KEEP_BACKENDS or hidden.shape[0] == 0
            or not grad_wanted(hidden, weight, bias)):
        return False
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    return keep_fits(backend, hidden, weight, need, bias=bias, softcap=softcap)


def grad_wanted(*tensors) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# The op as two torch.library custom ops (forward and backward) tied by register_autograd: one
# definition for eager mode, torch.compile (dynamo sees one opaque node, its fake implementation
# gives the output shapes) and vocabulary parallelism (the process group travels by name).
# Custom ops cannot return None: outputs that were not asked for are empty tensors.

@torch.library.custom_op("gift_fast::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        local_targets: torch.Tensor, active: torch.Tensor, backend: str,
                        temperature: float, softcap: Optional[float], want_entropy: bool,
                        want_argmax: bool, group_name: Optional[str], vocab_start: int,
                        vocab_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    """Per-row (logp, entropy, argmax, lse) of flattened inputs: the backend's statistics of this
    weight (``backend`` "torch" or "triton"), combined over the vocabulary shards when
    ``group_name`` names a process group. ``entropy`` / ``argmax`` are empty unless asked for;
    ``lse`` is the (global) log-sum-exp the backward needs."""
    st = get_backend(backend).stats(hidden, weight, bias, local_targets, temperature, softcap,
                                    want_entropy, want_argmax)
    if group_name is None:
        logp, entropy, argmax, lse = single_device(st, active)
    else:
        from .distributed.vocab_parallel import combine
        logp, entropy, argmax, lse = combine(st, active, group_name, vocab_start, vocab_size)
    if entropy is None:
        entropy = logp.new_empty(0)
    if argmax is None:
        argmax = local_targets.new_empty(0, dtype=torch.int64)
    return logp, entropy, argmax, lse


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, local_targets, active, backend, temperature, softcap, want_entropy,
      want_argmax, group_name, vocab_start, vocab_size):
    n, acc = hidden.shape[0], accumulation_dtype(hidden.dtype)
    return (hidden.new_empty(n, dtype=acc), hidden.new_empty(n if want_entropy else 0, dtype=acc),
            hidden.new_empty(n if want_argmax else 0, dtype=torch.int64),
            hidden.new_empty(n, dtype=acc))


@torch.library.custom_op("gift_fast::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        local_targets: torch.Tensor, active: torch.Tensor, lse: torch.Tensor,
                        entropy: Optional[torch.Tensor], d_logp: Optional[torch.Tensor],
                        d_entropy: Optional[torch.Tensor], backend: str, temperature: float,
                        softcap: Optional[float], need_dx: bool, need_dw: bool, need_db: bool,
                        group_name: Optional[str], compact: bool) -> Tuple[torch.Tensor,
                                                                           torch.Tensor,
                                                                           torch.Tensor]:
    """(d_hidden, d_weight, d_bias) of ``linear_logprobs_fwd`` for upstream ``d_logp`` /
    ``d_entropy`` (None: zero), empty where not needed. Under vocabulary parallelism d_weight /
    d_bias are this shard's and d_hidden is summed over the group.

    ``compact``: drop the rows with zero upstream gradient before any GEMM (one host sync to
    count them); False runs every row through the backward, each dead row masked to an exact
    zero contribution, with no host read (compiled graphs, CUDA graph capture)."""
    acc = lse.dtype
    g = (torch.where(active, d_logp.to(acc), 0.0) if d_logp is not None
         else torch.zeros_like(lse))
    e = None
    if entropy is not None and d_entropy is not None:
        e = torch.where(active, d_entropy.to(acc), 0.0)
    d_hidden, d_weight, d_bias = get_backend(backend).grad(
        hidden, weight, bias, local_targets, lse, entropy, g, e, temperature, softcap,
        need_dx, need_dw, need_db, compact=compact)
    if need_dx and group_name is not None:
        from .distributed.vocab_parallel import sum_over_group
        d_hidden = sum_over_group(d_hidden, group_name)
    return (d_hidden.contiguous() if need_dx else hidden.new_empty(0),
            d_weight.contiguous() if need_dw else weight.new_empty(0),
            d_bias.contiguous() if need_db else weight.new_empty(0))


@linear_logprobs_bwd.register_fake
def _(hidden, weight, bias, local_targets, active, lse, entropy, d_logp, d_entropy, backend,
      temperature, softcap, need_dx, need_dw, need_db, group_name, compact):
    return (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_dx
            else hidden.new_empty(0),
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_dw
            else weight.new_empty(0),
            torch.empty(bias.shape, dtype=bias.dtype, device=bias.device) if need_db
            else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, local_targets, active, backend, temperature, softcap, want_entropy,
     _want_argmax, group_name, _vocab_start, _vocab_size) = inputs
    _logp, entropy, _argmax, lse = output
    ctx.save_for_backward(hidden, weight, bias, local_targets, active, lse,
                          entropy if want_entropy else None)
    ctx.cfg = (backend, temperature, softcap, group_name)


def must_not_sync(hidden: torch.Tensor) -> bool:
    """Inside torch.compile or a CUDA graph capture a host read would break the graph (or fail
    the capture): the backward then skips the row compaction."""
    return torch.compiler.is_compiling() or _capturing(hidden)


def _backward(ctx, d_logp, d_entropy, _d_argmax, _d_lse):
    hidden, weight, bias, local_targets, active, lse, entropy = ctx.saved_tensors
    backend, temperature, softcap, group_name = ctx.cfg
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[2]
    d_hidden, d_weight, d_bias = linear_logprobs_bwd(
        hidden, weight, bias, local_targets, active, lse, entropy, d_logp,
        d_entropy if entropy is not None else None, backend, temperature, softcap, need_dx,
        need_dw, need_db, group_name, not must_not_sync(hidden))
    return ((d_hidden if need_dx else None, d_weight if need_dw else None,
             d_bias if need_db else None) + (None,) * 10)


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def _outputs(lead, logp, entropy, argmax, return_entropy: bool, return_argmax: bool):
    outputs = [logp.reshape(lead)]
    if return_entropy:
        outputs.append(entropy.reshape(lead))
    if return_argmax:
        outputs.append(argmax.reshape(lead))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
