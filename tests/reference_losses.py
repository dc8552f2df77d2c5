"""Float64 reference implementations written straight from the math in docs/losses.md.

Deliberately independent of gift_fast.functional / gift_fast.sequences: plain Python loops over
sequences and groups, textbook formulas, autograd for gradients. Inputs are per-sequence lists
so the layout code of the library is not reused either.

Conventions: ``seqs`` is a list of 1-D float64 tensors of the ACTIVE tokens' log-probs of each
sequence (ignored tokens already removed), ``anchors`` the matching anchor log-probs.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def logprobs64(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100):
    """Per-token log-probs in float64 from materialised logits (0 at ignored rows)."""
    z = hidden.to(F64) @ weight.to(F64).T
    if bias is not None:
        z = z + bias.to(F64)
    z = z / temperature
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    active = targets != ignore_index
    safe = torch.where(active, targets, torch.zeros_like(targets))
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(active, out, torch.zeros((), dtype=F64))


def split_padded(values, mask):
    """[B, T] values + mask -> list of 1-D tensors of the active entries (keeps autograd)."""
    return [values[i][mask[i]] for i in range(values.shape[0])]


def split_packed(values, mask, cu):
    out = []
    for i in range(len(cu) - 1):
        v = values[cu[i]:cu[i + 1]]
        m = mask[cu[i]:cu[i + 1]]
        out.append(v[m])
    return out


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs, unbiased=True):
    m = _mean(xs)
    ss = sum((x - m) ** 2 for x in xs)
    d = len(xs) - 1 if unbiased else len(xs)
    v = ss / d
    # subgradient 0 at v == 0, like an absolute value
    return torch.sqrt(v) if float(v.detach()) > 0 else v * 0


def groups_of(n, group_size=None, group_ids=None):
    if group_ids is not None:
        labels = [int(g) for g in group_ids]
        order = []
        for lab in sorted(set(labels)):
            order.append([i for i in range(n) if labels[i] == lab])
        return order
    return [list(range(k, k + group_size)) for k in range(0, n, group_size)]


def seq_logratio(lp, an, p=0.0):
    n = lp.numel()
    s = (lp - an).sum() if n else torch.zeros((), dtype=F64)
    if p:
        s = s / max(n, 1) ** p
    return s


# ------------------------------------------------------------ GIFT (docs/losses.md, "GIFT")

def gift(seqs, anchors, rewards, groups, beta=1.0, eps=1e-6, unbiased=True, detach_stats=True,
         p=0.0, drop_uniform=False, reduction="mean"):
    s = [seq_logratio(lp, an, p) for lp, an in zip(seqs, anchors)]
    total = torch.zeros((), dtype=F64)
    n_terms = 0
    for g in groups:
        R = [float(rewards[i]) for i in g]
        if drop_uniform and max(R) == min(R):
            continue
        if len(g) == 1:
            # a group of one (docs/losses.md, authors' code): rewards mean 0 / std 1, implicit
            # mean stopgrad(s) / std 1
            x = s[g[0]]
            A = [R[0] / (1 + eps)]
            z = [(x - x.detach()) / (1 + eps)]
        else:
            mR, sR = _mean(R), float(_std([torch.tensor(x, dtype=F64) for x in R], unbiased))
            A = [(x - mR) / (sR + eps) for x in R]
            sg = [s[i] for i in g]
            stat = [x.detach() for x in sg] if detach_stats else sg
            ms, ss = _mean(stat), _std(stat, unbiased)
            z = [(x - ms) / (ss + eps) for x in sg]
        for a, zz in zip(A, z):
            total = total + (a - beta * zz) ** 2
            n_terms += 1
    if reduction == "sum":
        return total
    return total / max(n_terms, 1)


# ---------------------------------------------- GRPO (docs/losses.md, "GRPO family")

def grpo(seqs, olds, advs, refs=None, beta=0.0, el=0.2, eh=0.2, loss_type="dapo",
         max_len=None, num_items=None):
    per_seq = []
    for i, lp in enumerate(seqs):
        toks = []
        for n in range(lp.numel()):
            rho = torch.exp(lp[n] - olds[i][n])
            a = float(advs[i])
            l1 = rho * a
            l2 = torch.clamp(rho, 1 - el, 1 + eh) * a
            t = -torch.minimum(l1, l2)
            if beta:
                d = refs[i][n] - lp[n]
                t = t + beta * (torch.exp(d) - d - 1)
            toks.append(t)
        per_seq.append(toks)
    B = len(seqs)
    n_act = sum(len(t) for t in per_seq)
    tot = sum((sum(t) for t in per_seq if t), torch.zeros((), dtype=F64))
    if loss_type == "grpo":
        return sum(((sum(t) / len(t)) if t else torch.zeros((), dtype=F64)) for t in per_seq) / B
    if loss_type == "bnpo":
        return tot / max(n_act, 1)
    if loss_type == "dr_grpo":
        return tot / (B * max_len)
    return tot / max(num_items if num_items is not None else n_act, 1)


def group_adv(rewards, G, scale="group", eps=1e-4):
    r = [float(x) for x in rewards]
    out = []
    all_std = float(torch.tensor(r, dtype=F64).std()) if len(r) > 1 else 0.0
    for k in range(0, len(r), G):
        g = r[k:k + G]
        m = _mean(g)
        sd = float(torch.tensor(g, dtype=F64).std()) if len(g) > 1 else 0.0
        for x in g:
            if scale == "group":
                out.append((x - m) / (sd + eps))
            elif scale == "batch":
                out.append((x - m) / (all_std + eps))
            else:
                out.append(x - m)
    return torch.tensor(out, dtype=F64)


# ------------------------------------ pairwise (docs/losses.md, DPO / IPO / SimPO / RPO)

def _logsig(x):
    return -torch.log1p(torch.exp(-x)) if float(x.detach()) > 0 else x - torch.log1p(torch.exp(x))


def _pairs(vals):
    P = len(vals) // 2
    return [(vals[k], vals[k + P]) for k in range(P)]


def dpo(seqs, refs, beta=0.1, ls=0.0):
    d = [seq_logratio(lp, rf) for lp, rf in zip(seqs, refs)]
    terms = [-(1 - ls) * _logsig(beta * (w - l)) - ls * _logsig(-beta * (w - l)) for w, l in _pairs(d)]
    return sum(terms) / len(terms)


def ipo(seqs, refs, beta=0.1, length_normalized=True):
    d = [seq_logratio(lp, rf, 1.0 if length_normalized else 0.0) for lp, rf in zip(seqs, refs)]
    terms = [(w - l - 1 / (2 * beta)) ** 2 for w, l in _pairs(d)]
    return sum(terms) / len(terms)


def simpo(seqs, beta=2.0, gamma=1.0, sft_weight=0.0):
    avg = [lp.sum() / max(lp.numel(), 1) for lp in seqs]
    terms = [-_logsig(beta * (w - l) - gamma) for w, l in _pairs(avg)]
    loss = sum(terms) / len(terms)
    if sft_weight:
        P = len(seqs) // 2
        nll = -sum(lp.sum() for lp in seqs[:P]) / max(sum(lp.numel() for lp in seqs[:P]), 1)
        loss = loss + sft_weight * nll
    return loss


def _sig(x):
    return 1 / (1 + torch.exp(-x))


def _bkl(p, q):
    return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))


def rpo_pairwise(seqs, refs, rewards, kind="sq", beta=0.2, eta=1.0):
    d = [seq_logratio(lp, rf) for lp, rf in zip(seqs, refs)]
    R = [torch.tensor(float(x), dtype=F64) for x in rewards]
    terms = []
    for (w, l), (rw, rl) in zip(_pairs(d), _pairs(R)):
        x, g = beta * (w - l), eta * (rw - rl)
        if kind == "sq":
            terms.append((x - g) ** 2)
        elif kind == "bwd_kl":
            terms.append(_bkl(_sig(g), _sig(x)))
        else:
            terms.append(_bkl(_sig(x), _sig(g)))
    return sum(terms) / len(terms)


def rpo_multi(seqs, refs, rewards, groups, kind="sq", beta=0.2, eta=1.0):
    d = [seq_logratio(lp, rf) for lp, rf in zip(seqs, refs)]
    terms = []
    for g in groups:
        D = [d[i] for i in g]
        R = [float(rewards[i]) for i in g]
        K = len(g)
        if kind == "sq":
            mD, mR = _mean(D), _mean(R)
            terms.append(sum((beta * (D[j] - mD) - eta * (R[j] - mR)) ** 2 for j in range(K)) / K)
        else:
            pm = torch.softmax(torch.stack([beta * x for x in D]), 0)
            pt = torch.softmax(torch.tensor([eta * x for x in R], dtype=F64), 0)
            if kind == "bwd_kl":
                terms.append((pt * torch.log(pt / pm)).sum())
            else:
                terms.append((pm * torch.log(pm / pt)).sum())
    return sum(terms) / len(terms)


# -------------------------------------------------------------- UNA (docs/losses.md, "UNA")

def una(seqs, anchors, kind="pairwise", labels=None, scores=None, beta=None):
    if beta is None:
        beta = 0.01 if kind.startswith("binary") else 0.03
    r = [beta * seq_logratio(lp, an) for lp, an in zip(seqs, anchors)]
    if kind == "pairwise":
        terms = [-_logsig(w - l) for w, l in _pairs(r)]
        return sum(terms) / len(terms)
    B = len(r)
    if kind == "score_mse":
        t = [float(x) for x in scores]
    else:
        t = [float(x) for x in labels] if labels is not None else [1.0] * (B // 2) + [0.0] * (B // 2)
    terms = []
    for ri, ti in zip(r, t):
        q = _sig(ri)
        if kind == "binary_bce":
            terms.append(-(ti * torch.log(q) + (1 - ti) * torch.log(1 - q)))
        else:
            terms.append((q - ti) ** 2)
    return sum(terms) / B


# ------------------------------------------------------------------ f-div SFT, DFT (section 5)

def _phi(div, u):
    if div == "tv":
        return u
    if div == "pearson":
        return u - u ** 2 / 4
    if div == "kl":
        return 1 - torch.exp(-u)
    edge = -1.0 if div == "hellinger" else -math.log(2)
    u0 = edge + 0.05

    def f(x):
        return x / (1 + x) if div == "hellinger" else torch.log(2 - torch.exp(-x))

    if float(u.detach()) >= u0:
        return f(u)
    x0 = torch.tensor(u0, dtype=F64, requires_grad=True)
    y0 = f(x0)
    (d0,) = torch.autograd.grad(y0, x0)
    return y0.detach() + d0 * (u - u0)


def fdiv(seqs, refs, div="tv", beta=0.1):
    lps = torch.cat(seqs)
    if div == "tv":
        return -lps.sum() / lps.numel()
    rfs = torch.cat(refs)
    vals = [_phi(div, beta * (lps[n] - rfs[n])) for n in range(lps.numel())]
    return -sum(vals) / (beta * lps.numel())


def dft(seqs):
    lps = torch.cat(seqs)
    return -(torch.exp(lps).detach() * lps).sum() / lps.numel()


# ------------------------------------------------------------------ IFT (section 6)

def ift(logps, mask, gamma=0.95):
    """logps, mask: [B, T] (padded, positions matter for the discount)."""
    B, T = logps.shape
    out = []
    for b in range(B):
        act = [bool(m) for m in mask[b]]
        n = max(sum(act), 1)
        if gamma == 0:
            w = [1.0 if act[t] else 0.0 for t in range(T)]
        else:
            c = [(-logps[b, t] / n) if act[t] else torch.zeros((), dtype=F64) for t in range(T)]
            w = []
            for t in range(T):
                if not act[t]:
                    w.append(torch.zeros((), dtype=F64))
                    continue
                w.append(sum(gamma ** (j - t) * c[j] for j in range(t, T)))
            tot = sum(w)
            w = [x * n / tot for x in w]
        out.append(sum(-logps[b, t] * w[t] for t in range(T) if act[t]) / n)
    return sum(out) / B
