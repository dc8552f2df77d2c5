"""Chunked PyTorch backend: the same math as the Triton kernels, one block of rows at a time.

Peak extra memory is a few [chunk, V] float32 buffers, never [N, V]. The forward keeps only
per-row statistics (lse, entropy); the backward recomputes each chunk's logits and skips rows
whose upstream gradient is zero (prompt tokens, padding, dropped groups).
"""
from __future__ import annotations

from typing import Optional

import torch

from .logit_math import grad_raw_from_grad_z, grad_z, transform_logits

# Elements of one [chunk, V] float32 buffer (64 MiB): bounds peak memory whatever N is.
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(vocab: int, n_rows: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, min(n_rows, chunk_elements // vocab))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every training dtype; float64 inputs stay float64 (gradcheck, audits)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  softcap: Optional[float], temperature: float) -> torch.Tensor:
    acc = accumulation_dtype(x.dtype)
    raw = (x @ weight.T).to(acc)
    if bias is not None:
        raw += bias.to(acc)
    return transform_logits(raw, softcap, temperature)


def chunked_forward(hidden, weight, bias, targets, temperature, softcap, ignore_index,
                    want_entropy: bool, chunk_elements: int = CHUNK_ELEMENTS,
                    with_shard_stats: bool = False):
    """Returns (logp, lse, entropy or None, argmax) for flattened inputs, in the accumulation dtype.

    A target outside [0, V) that is not ``ignore_index`` is an active row whose target is not in
    this weight (a vocabulary shard): it is never gathered, its target logit is 0, its entropy
    and statistics are computed as usual. ``with_shard_stats=True`` appends the raw target logit
    and the row's max logit (what ``gift_fast.distributed.vocab_parallel`` combines across shards):
    (logp, lse, entropy, argmax, target_logit, row_max).
    """
    n = hidden.shape[0]
    V = weight.shape[0]
    dev = hidden.device
    acc = accumulation_dtype(hidden.dtype)
    logp = torch.zeros(n, dtype=acc, device=dev)
    lse = torch.zeros(n, dtype=acc, device=dev)
    entropy = torch.zeros(n, dtype=acc, device=dev) if want_entropy else None
    argmax = torch.zeros(n, dtype=torch.int64, device=dev)
    target_logit = torch.zeros(n, dtype=acc, device=dev) if with_shard_stats else None
    row_max = torch.zeros(n, dtype=acc, device=dev) if with_shard_stats else None
    active = targets != ignore_index
    in_weight = active & (targets >= 0) & (targets < V)
    step = chunk_rows(V, n, chunk_elements)
    for start in range(0, n, step):
        sl = slice(start, start + step)
        z = _chunk_logits(hidden[sl], weight, bias, softcap, temperature)
        lse_c = torch.logsumexp(z, dim=-1)
        act = active[sl]
        hit = in_weight[sl]
        tgt = torch.where(hit, targets[sl], torch.zeros_like(targets[sl])).long()
        z_y = torch.where(hit, z.gather(1, tgt[:, None]).squeeze(1), 0.0)
        logp[sl] = torch.where(act, z_y - lse_c, 0.0)
        lse[sl] = lse_c
        if with_shard_stats:
            target_logit[sl] = z_y
            row_max[sl], argmax[sl] = z.max(-1)      # first maximum on ties, as argmax
        else:
            argmax[sl] = z.argmax(-1)
        if want_entropy:
            z.sub_(lse_c[:, None])                       # z is now log p
            ent = -(z.exp() * z).sum(-1)
            entropy[sl] = torch.where(act, ent, 0.0)
        del z
    if with_shard_stats:
        return logp, lse, entropy, argmax, target_logit, row_max
    return logp, lse, entropy, argmax


def chunked_backward(hidden, weight, bias, targets, lse, entropy, g, e, temperature, softcap,
                     need_dx: bool, need_dw: bool, need_db: bool,
                     chunk_elements: int = CHUNK_ELEMENTS):
    """Gradients of ``sum_n g_n logp_n + e_n H_n`` w.r.t. hidden, weight, bias (None where not needed).

    ``lse`` / ``entropy`` are the per-row statistics the probabilities are taken from; they may
    come from outside this weight (global statistics over vocabulary shards), in which case
    ``p = exp(z - lse)`` are the global probabilities of this shard's columns. ``g`` / ``e`` are
    per-row upstream gradients in the accumulation dtype, already 0 at ignored rows (``e`` may be
    None). A target outside [0, V) on a live row means "target not in this weight": its ``-p``
    terms apply, there is no one-hot term and it is never gathered. Rows with g = e = 0 are
    skipped (one host sync).
    """
    acc = lse.dtype
    nonzero = g != 0 if e is None else (g != 0) | (e != 0)
    rows = torch.nonzero(nonzero).squeeze(1)  # the only host sync: skips dead rows

    d_hidden = torch.zeros_like(hidden) if need_dx else None
    d_weight32 = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
    d_bias32 = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_db else None
    step = chunk_rows(weight.shape[0], max(1, rows.numel()), chunk_elements)
    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        x = hidden[idx]
        z = _chunk_logits(x, weight, bias, softcap, temperature)
        dz = grad_z(z, lse[idx], targets[idx].long(), g[idx],
                    e[idx] if e is not None else None,
                    entropy[idx] if e is not None else None)
        d_raw = grad_raw_from_grad_z(dz, z, softcap, temperature)
        del z
        if d_hidden is not None:
            d_hidden[idx] = (d_raw.to(weight.dtype) @ weight).to(hidden.dtype)
        if d_weight32 is not None:
            d_weight32.addmm_(d_raw.T, x.to(acc))
        if d_bias32 is not None:
            d_bias32 += d_raw.sum(0)
    d_weight = d_weight32.to(weight.dtype) if d_weight32 is not None else None
    d_bias = d_bias32.to(bias.dtype) if d_bias32 is not None else None
    return d_hidden, d_weight, d_bias


class ChunkedLinearLogprobs(torch.autograd.Function):
    """Autograd wrapper: saves inputs and per-row statistics, recomputes logits in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, ignore_index,
                want_entropy, chunk_elements):
        logp, lse, entropy, argmax = chunked_forward(hidden, weight, bias, targets, temperature,
                                                     softcap, ignore_index, want_entropy,
                                                     chunk_elements)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.cfg = (temperature, softcap, ignore_index, chunk_elements)
        ctx.mark_non_differentiable(argmax)
        if entropy is None:
            entropy = torch.zeros_like(logp)
        return logp, entropy, argmax

    @staticmethod
    def backward(ctx, d_logp, d_entropy, _d_argmax):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, softcap, ignore_index, chunk_elements = ctx.cfg
        want_entropy = entropy is not None
        acc = lse.dtype
        active = targets != ignore_index
        g = torch.where(active, d_logp.to(acc), 0.0) if d_logp is not None else torch.zeros_like(lse)
        e = torch.where(active, d_entropy.to(acc), 0.0) \
            if (want_entropy and d_entropy is not None) else None
        d_hidden, d_weight, d_bias = chunked_backward(
            hidden, weight, bias, targets, lse, entropy, g, e, temperature, softcap,
            need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1],
            need_db=bias is not None and ctx.needs_input_grad[2], chunk_elements=chunk_elements)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None
