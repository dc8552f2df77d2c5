"""GIFT epilogue kernel: per-token log-probs -> loss terms and per-token gradient, one group per
program.

For group g (sequences i in [group_ptr[g], group_ptr[g+1]), rows of i in [cu[i], cu[i+1])):

    s_i = sum_n m_n (logp_n - anchor_n) / max(|y_i|, 1)^p        (implicit reward)
    A_i = (R_i - mean R) / (std R + eps)                           (explicit, 0 if R uniform)
    z_i = (s_i - mean s) / (std s + eps)                           (statistics detached)
    err_g = sum_i (A_i - beta z_i)^2
    dL/ds_i = -2 beta (A_i - beta z_i) / (std s + eps)             (before the 1/N_seq of "mean")
    dL/dlogp_n = m_n dL/ds_i / max(|y_i|, 1)^p

A group of one follows the authors' code: reward mean 0 and std 1, implicit mean the detached s
and std 1, so A = R / (1 + eps), z = 0 and dL/ds = -2 beta A / (1 + eps). A group whose rewards
are all equal (and has more than one sequence) has A = 0 exactly. With DROP_UNIFORM, groups whose
rewards are all equal (groups of one included) add nothing. Everything is summed in a fixed order,
so the result is deterministic.
"""
import torch
import triton
import triton.language as tl

from .configs import epilogue_config
from .target import launch_target


@triton.jit
def _sequence_logratio(LOGP, ANCHOR, Y, row_start, row_end, BLOCK_T: tl.constexpr):
    """(sum over active rows of logp - anchor, number of active rows) for one sequence."""
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    count = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        active = (rows < row_end) & (tl.load(Y + rows, mask=rows < row_end, other=-1) >= 0)
        lp = tl.load(LOGP + rows, mask=active, other=0.0)
        an = tl.load(ANCHOR + rows, mask=active, other=0.0).to(tl.float32)
        total += tl.where(active, lp - an, 0.0)
        count += active.to(tl.float32)
    return tl.sum(total, axis=0), tl.sum(count, axis=0)


@triton.jit
def _group_mean_std(x, mask, n, UNBIASED: tl.constexpr):
    mean = tl.sum(tl.where(mask, x, 0.0), axis=0) / n
    d = tl.where(mask, x - mean, 0.0)
    denom = tl.maximum(n - 1.0, 1.0) if UNBIASED else n
    return mean, tl.sqrt(tl.sum(d * d, axis=0) / denom), d


@triton.jit
def _gift_epilogue_kernel(
    LOGP, ANCHOR, Y, CU, GROUP_PTR, R,
    S_OUT, A_OUT, Z_OUT, G_ROW, ERR, STATS,
    beta, eps, length_norm,
    UNBIASED: tl.constexpr, DROP_UNIFORM: tl.constexpr, MAX_G: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    g = tl.program_id(0)
    first = tl.load(GROUP_PTR + g)
    last = tl.load(GROUP_PTR + g + 1)
    n_seq = last - first
    k = tl.arange(0, MAX_G)
    in_group = k < n_seq
    seq = first + k

    # Pass 1: the implicit reward s_i of every sequence in the group.
    s = tl.zeros((MAX_G,), dtype=tl.float32)
    length = tl.zeros((MAX_G,), dtype=tl.float32)
    for j in range(0, n_seq):
        start = tl.load(CU + first + j)
        end = tl.load(CU + first + j + 1)
        total, count = _sequence_logratio(LOGP, ANCHOR, Y, start, end, BLOCK_T)
        s = tl.where(k == j, total, s)
        length = tl.where(k == j, count, length)
    norm = tl.exp(length_norm * tl.log(tl.maximum(length, 1.0)))     # max(|y|, 1)^p
    s = s / norm

    # Group statistics of rewards and implicit rewards.
    n = n_seq.to(tl.float32)
    r = tl.load(R + seq, mask=in_group, other=0.0).to(tl.float32)
    r_max = tl.max(tl.where(in_group, r, -float("inf")), axis=0)
    r_min = tl.min(tl.where(in_group, r, float("inf")), axis=0)
    uniform = r_max == r_min
    single = n_seq == 1
    r_mean, r_std, dr = _group_mean_std(r, in_group, n, UNBIASED)
    s_mean, s_std, ds = _group_mean_std(s, in_group, n, UNBIASED)
    # A group of one: the authors' constants (mean 0 / detached s, std 1) replace the statistics.
    r_scale = tl.where(single, 1.0, r_std) + eps
    s_scale = tl.where(single, 1.0, s_std) + eps
    a = tl.where(uniform, 0.0, dr / r_scale)
    a = tl.where(single, r / r_scale, a)
    z = tl.where(single, 0.0, ds / s_scale)
    resid = tl.where(in_group, a - beta * z, 0.0)
    keep = 1.0
    if DROP_UNIFORM:
        keep = 1.0 - uniform.to(tl.float32)
    err = tl.sum(resid * resid, axis=0) * keep
    coef = -2.0 * beta * resid / s_scale * keep / norm

    tl.store(S_OUT + seq, s, mask=in_group)
    tl.store(A_OUT + seq, a, mask=in_group)
    tl.store(Z_OUT + seq, z, mask=in_group)
    tl.store(ERR + g, err)
    # Per-group metrics: std of s, correlation of (s, R), whether it is defined, uniform flag.
    cov = tl.sum(dr * ds, axis=0)
    var = tl.sum(dr * dr, axis=0) * tl.sum(ds * ds, axis=0)
    defined = (n_seq > 1) & (var > 0)
    rho = tl.where(defined, cov / tl.sqrt(tl.where(defined, var, 1.0)), 0.0)
    tl.store(STATS + 4 * g + 0, tl.where(single, 0.0, s_std))
    tl.store(STATS + 4 * g + 1, rho)
    tl.store(STATS + 4 * g + 2, defined.to(tl.float32))
    tl.store(STATS + 4 * g + 3, uniform.to(tl.float32))

    # Pass 2: broadcast each sequence's coefficient to its active rows.
    for j in range(0, n_seq):
        start = tl.load(CU + first + j)
        end = tl.load(CU + first + j + 1)
        c = tl.sum(tl.where(k == j, coef, 0.0), axis=0)
        for r0 in range(start, end, BLOCK_T):
            rows = r0 + tl.arange(0, BLOCK_T)
            inside = rows < end
            active = tl.load(Y + rows, mask=inside, other=-1) >= 0
            tl.store(G_ROW + rows, tl.where(active, c, 0.0), mask=inside)


def gift_epilogue(logp, anchor, y, cu_seqlens, group_ptr, rewards, *, beta, eps, length_norm,
                  unbiased, drop_uniform, max_group):
    """Launches one program per group. ``y`` < 0 marks ignored rows. Returns a dict of float32
    tensors: s, adv, z [B]; grad_rows [N] (dL/dlogp before 1/N_seq); err [groups]; stats
    [groups, 4] (std of s, correlation, correlation defined, uniform rewards)."""
    n_groups = group_ptr.numel() - 1
    B = cu_seqlens.numel() - 1
    dev = logp.device
    out = dict(s=torch.empty(B, dtype=torch.float32, device=dev),
               adv=torch.empty(B, dtype=torch.float32, device=dev),
               z=torch.empty(B, dtype=torch.float32, device=dev),
               grad_rows=torch.zeros(logp.numel(), dtype=torch.float32, device=dev),
               err=torch.empty(n_groups, dtype=torch.float32, device=dev),
               stats=torch.empty((n_groups, 4), dtype=torch.float32, device=dev))
    if n_groups == 0:
        return out
    _gift_epilogue_kernel[(n_groups,)](
        logp, anchor, y, cu_seqlens, group_ptr, rewards,
        out["s"], out["adv"], out["z"], out["grad_rows"], out["err"], out["stats"],
        float(beta), float(eps), float(length_norm),
        UNBIASED=unbiased, DROP_UNIFORM=drop_uniform,
        MAX_G=max(2, triton.next_power_of_2(max_group)),
        **epilogue_config(launch_target(logp)))
    return out
