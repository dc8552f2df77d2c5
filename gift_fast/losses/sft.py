"""Supervised fine-tuning variants on the log-probs of the gold tokens: f-divergence SFT (ours),
DFT (dynamic fine-tuning) and IFT (intuitive fine-tuning, with its two input-side helpers).

f-divergence SFT and DFT are token-local (the one-pass op applies on the triton backend); IFT's
weights couple the tokens of a sequence, so it is composed. f-divergence SFT's ``anchor_logps``
is the reference the per-token ratio is taken against (None: the current policy, i.e. u = 0 and
the SFT gradient); its ``beta`` scales that log-ratio (> 0).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..logprobs import linear_logprobs
from ..sequences import Layout, nonfinite_rows
from ..validation import check_choice
from .common import (REDUCTIONS, AnchoredLossModule, Head, LossResult, LossSpec,
                     TokensLossModule, check_number, composed, masked, per_token, prepare, reduce,
                     renamed, token_local)

__all__ = ["fdiv_sft_loss", "dft_loss", "ift_loss", "fdiv_sft_loss_from_logps",
           "dft_loss_from_logps", "ift_loss_from_logps", "FDivSFTLoss", "DFTLoss", "IFTLoss",
           "ift_greedy_predictions", "ift_mixed_embeddings", "phi_f", "discounted_suffix_sum",
           "DIVERGENCES"]

DIVERGENCES = ("tv", "pearson", "hellinger", "kl", "js")


def _token_reduce(per: torch.Tensor, active: torch.Tensor, layout: Layout, reduction: str,
                  n_active: torch.Tensor) -> torch.Tensor:
    """A token-local loss's reduction: the token mean over active tokens, the sum, or the
    per-token terms in the caller's layout (0 at ignored tokens)."""
    per = masked(active, per)
    if reduction == "none":
        return per_token(layout, per)
    return reduce(per, reduction, n_active)


# --------------------------------------------------------------------------------------------
# f-divergence SFT
# --------------------------------------------------------------------------------------------

_EDGES = {"hellinger": -1.0, "js": -math.log(2.0)}


def _phi(div: str, u: torch.Tensor) -> torch.Tensor:
    if div == "pearson":
        return u - u * u / 4
    if div == "kl":
        return 1 - torch.exp(-u)
    if div == "hellinger":
        return u / (1 + u)
    if div == "js":
        return torch.log(2 - torch.exp(-u))
    return u


def _dphi(div: str, u):
    if div == "pearson":
        return 1 - u / 2
    if div == "kl":
        return math.exp(-u)
    if div == "hellinger":
        return 1 / (1 + u) ** 2
    if div == "js":
        return math.exp(-u) / (2 - math.exp(-u))
    return 1.0


def phi_f(div: str, u: torch.Tensor) -> torch.Tensor:
    """The rescaled ``phi_f`` with its C1 linear extension below ``edge + 0.05``."""
    if div not in _EDGES:
        return _phi(div, u)
    u0 = _EDGES[div] + 0.05
    inside = u >= u0
    val = _phi(div, torch.where(inside, u, torch.full_like(u, u0)))
    lin = float(_phi(div, torch.tensor(u0, dtype=torch.float64))) + _dphi(div, u0) * (u - u0)
    return torch.where(inside, val, lin)


@renamed(ref_logps="anchor_logps")
def fdiv_sft_loss_from_logps(logps: torch.Tensor, anchor_logps: Optional[torch.Tensor] = None, *,
                             mask: Optional[torch.Tensor] = None,
                             cu_seqlens: Optional[torch.Tensor] = None, divergence: str = "tv",
                             beta: float = 0.1, reduction: str = "mean") -> LossResult:
    """f-divergence SFT (ours): ``L = -(1/beta) mean_n phi_f(beta (logp_n - anchor_n))``.

    ``tv`` reports plain NLL ``mean(-logp)`` (same gradient). ``anchor_logps=None`` anchors at
    the current policy (``anchor = logp.detach()``, i.e. u = 0 and the gradient of SFT).
    Token mean over active tokens. Metrics: ``nll``, ``implicit_reward_mean`` (mean u).
    """
    check_choice("divergence", divergence, DIVERGENCES)
    check_number("beta", beta, 0.0, lo_open=True)
    check_choice("reduction", reduction, REDUCTIONS)
    layout, active, acc, lp, fl = prepare(logps, mask, cu_seqlens, anchor_logps=anchor_logps)
    n_active = active.to(acc).sum().clamp_min(1)
    nll = -masked(active, lp).sum() / n_active
    ref = fl["anchor_logps"].detach() if fl["anchor_logps"] is not None else lp.detach()
    u = masked(active, beta * (lp - ref))
    if divergence == "tv":
        loss = nll if reduction == "mean" else _token_reduce(-lp, active, layout, reduction,
                                                             n_active)
    elif reduction == "mean":
        loss = -masked(active, phi_f(divergence, u)).sum() / (beta * n_active)
    else:
        loss = _token_reduce(-phi_f(divergence, u) / beta, active, layout, reduction, n_active)
    with torch.no_grad():
        metrics = {"nll": nll.detach().float(),
                   "implicit_reward_mean": (u.sum() / n_active).float(),
                   "nonfinite_rows": nonfinite_rows(active, lp, fl["anchor_logps"])}
    return loss, metrics


@renamed(ref_logps="anchor_logps")
def fdiv_sft_loss(hidden, weight, targets, anchor_logps=None, *, divergence="tv", beta=0.1,
                  cu_seqlens=None, bias=None, temperature=1.0, softcap=None, ignore_index=-100,
                  reduction="mean", backend="auto", vocab_parallel_group=None) -> LossResult:
    """f-divergence SFT on hidden states (ours; ``divergence`` in tv, pearson, hellinger, kl,
    js)."""
    check_choice("divergence", divergence, DIVERGENCES)
    head = Head(weight, bias, temperature, softcap, ignore_index, backend, vocab_parallel_group)
    return token_local(
        hidden, targets, cu_seqlens, head,
        lambda logps, mask: fdiv_sft_loss_from_logps(
            logps, anchor_logps, mask=mask, cu_seqlens=cu_seqlens, divergence=divergence,
            beta=beta, reduction=reduction),
        scalar=reduction != "none")


class FDivSFTLoss(AnchoredLossModule):
    """f-divergence SFT as a module; options as :func:`fdiv_sft_loss`."""

    loss_fn = staticmethod(fdiv_sft_loss)


# --------------------------------------------------------------------------------------------
# DFT
# --------------------------------------------------------------------------------------------

def dft_loss_from_logps(logps: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
                        cu_seqlens: Optional[torch.Tensor] = None,
                        reduction: str = "mean") -> LossResult:
    """Dynamic fine-tuning: ``L = -mean_n sg(exp logp_n) logp_n`` over active tokens."""
    check_choice("reduction", reduction, REDUCTIONS)
    layout, active, acc, lp, fl = prepare(logps, mask, cu_seqlens)
    n_active = active.to(acc).sum().clamp_min(1)
    lpm = masked(active, lp)
    loss = _token_reduce(-(torch.exp(lpm).detach() * lpm), active, layout, reduction, n_active)
    with torch.no_grad():
        metrics = {"nll": (-lpm.sum() / n_active).float(),
                   "prob_mean": (masked(active, torch.exp(lpm)).sum() / n_active).float(),
                   "nonfinite_rows": nonfinite_rows(active, lp)}
    return loss, metrics


def dft_loss(hidden, weight, targets, *, cu_seqlens=None, bias=None, temperature=1.0,
             softcap=None, ignore_index=-100, reduction="mean", backend="auto",
             vocab_parallel_group=None) -> LossResult:
    """Dynamic fine-tuning on hidden states: ``-mean sg(p) log p`` over active tokens."""
    head = Head(weight, bias, temperature, softcap, ignore_index, backend, vocab_parallel_group)
    return token_local(
        hidden, targets, cu_seqlens, head,
        lambda logps, mask: dft_loss_from_logps(logps, mask=mask, cu_seqlens=cu_seqlens,
                                                reduction=reduction),
        scalar=reduction != "none")


class DFTLoss(TokensLossModule):
    """DFT as a module; options as :func:`dft_loss`."""

    loss_fn = staticmethod(dft_loss)


# --------------------------------------------------------------------------------------------
# IFT
# --------------------------------------------------------------------------------------------

_SCAN_BLOCK = 128


def discounted_suffix_sum(c: torch.Tensor, gamma: float) -> torch.Tensor:
    """``w_t = sum_{j >= t} gamma^(j - t) c_j`` along the last dim of ``c [B, T]``.

    Blocked: an in-block ``[K, K]`` discount matrix plus a ``[nb, nb]`` matrix across blocks; only
    non-negative powers of gamma appear, so nothing overflows for long T.
    """
    b, t = c.shape
    k = min(_SCAN_BLOCK, max(t, 1))
    nb = -(-t // k)
    pad = nb * k - t
    x = F.pad(c, (0, pad)).view(b, nb, k)
    ar = torch.arange(k, device=c.device, dtype=c.dtype)
    e = ar[None, :] - ar[:, None]                             # e[t, j] = j - t
    dmat = torch.where(e >= 0, torch.pow(torch.tensor(gamma, dtype=c.dtype, device=c.device),
                                         e.clamp_min(0)), torch.zeros_like(e))
    inner = x @ dmat.T                                         # [b, nb, k]: in-block suffix sums
    starts = inner[:, :, 0]                                    # block sums discounted to block start
    ab = torch.arange(nb, device=c.device, dtype=c.dtype)
    eb = ab[None, :] - ab[:, None]                             # later block index - block index
    gk = torch.tensor(gamma, dtype=c.dtype, device=c.device) ** k
    bmat = torch.where(eb >= 1, torch.pow(gk, (eb - 1).clamp_min(0)), torch.zeros_like(eb))
    carry = starts @ bmat.T                                    # value at the start of block b+1
    tail = torch.pow(torch.tensor(gamma, dtype=c.dtype, device=c.device), k - ar)  # gamma^(k - t)
    out = inner + carry[:, :, None] * tail[None, None, :]
    return out.reshape(b, nb * k)[:, :t]


def _sequence_suffix_sums(layout: Layout, c: torch.Tensor, gamma: float,
                          cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`discounted_suffix_sum` within each sequence of flat ``c [N]``. Packed rows are
    scattered into a ``[B, T_max]`` block and back; T_max is read once on the host."""
    if layout.padded:
        return discounted_suffix_sum(c.view(layout.shape), gamma).reshape(-1)
    starts = cu_seqlens.long()
    t_max = int((starts[1:] - starts[:-1]).max()) if layout.n_seq else 0
    pos = torch.arange(c.numel(), device=c.device) - starts.index_select(0, layout.seq_index)
    block = c.new_zeros(layout.n_seq, max(t_max, 1)).index_put((layout.seq_index, pos), c)
    return discounted_suffix_sum(block, gamma)[layout.seq_index, pos]


def ift_loss_from_logps(logps: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
                        cu_seqlens: Optional[torch.Tensor] = None, gamma: float = 0.95,
                        reduction: str = "mean") -> LossResult:
    """Intuitive fine-tuning loss on the log-probs of the ground truth under mixed inputs.

    ``c_t = -logp_t / |y|`` on active tokens, ``w_t = sum_{j >= t} gamma^(j - t) c_j`` rescaled so
    that ``sum_t w_t = |y|`` (not detached), ``L = mean_b sum_t (-logp_t w_t) / |y_b|``.
    ``gamma = 0`` uses ``w = 1`` (plain SFT), as the authors' code does. ``reduction="none"``:
    the per-sequence terms ``[B]``.
    """
    check_number("gamma", gamma, 0.0, 1.0)
    check_choice("reduction", reduction, REDUCTIONS)
    layout, active, acc, lp, fl = prepare(logps, mask, cu_seqlens)
    act_f = active.to(acc)
    lpm = masked(active, lp)
    lengths = layout.seq_sum(act_f).clamp_min(1)
    if gamma == 0:
        w = act_f
    else:
        c = -lpm / layout.expand(lengths)
        w = masked(active, _sequence_suffix_sums(layout, c, gamma, cu_seqlens))
        tot = layout.seq_sum(w)
        w = w * layout.expand(lengths / torch.where(tot == 0, torch.ones_like(tot), tot))
    per = layout.seq_sum(-lpm * w) / lengths
    b = layout.n_seq
    loss = per.mean() if reduction == "mean" and b else reduce(per, reduction)
    with torch.no_grad():
        metrics = {"nll": ((layout.seq_sum(-lpm) / lengths).sum() / max(b, 1)).float(),  # b = 0: 0
                   "weight_max": w.detach().max().float() if w.numel()
                   else torch.zeros((), device=lp.device),
                   "nonfinite_rows": nonfinite_rows(active, lp)}
    return loss, metrics


def ift_loss(hidden, weight, targets, *, gamma=0.95, cu_seqlens=None, bias=None, temperature=1.0,
             softcap=None, ignore_index=-100, reduction="mean", backend="auto",
             vocab_parallel_group=None) -> LossResult:
    """IFT loss on hidden states; ``hidden`` must come from the forward on the mixed input
    embeddings (:func:`ift_mixed_embeddings`)."""
    head = Head(weight, bias, temperature, softcap, ignore_index, backend, vocab_parallel_group)
    return composed(hidden, targets, cu_seqlens, head, lambda logps, mask: ift_loss_from_logps(
        logps, mask=mask, cu_seqlens=cu_seqlens, gamma=gamma, reduction=reduction))


class IFTLoss(TokensLossModule):
    """IFT as a module; options as :func:`ift_loss`; ``hidden`` from the mixed inputs."""

    loss_fn = staticmethod(ift_loss)


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
    Returns ``[B, T, H]`` input embeddings (pack them as the rest of the batch for packed IFT).
    """
    check_number("lam", lam, 0.0, 1.0)
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


_FDIV_SPEC = LossSpec("fdiv_sft", fdiv_sft_loss_from_logps, fdiv_sft_loss, FDivSFTLoss,
                     token_local=True, mean_over="tokens")
_DFT_SPEC = LossSpec("dft", dft_loss_from_logps, dft_loss, DFTLoss, token_local=True,
                    mean_over="tokens")
_IFT_SPEC = LossSpec("ift", ift_loss_from_logps, ift_loss, IFTLoss, token_local=False,
                    mean_over="sequences")
SPECS = (_FDIV_SPEC, _DFT_SPEC, _IFT_SPEC)
# Exported by gift_fast next to the front-ends (IFT's two input-side steps).
HELPERS = (ift_greedy_predictions, ift_mixed_embeddings)
