"""An independent transcription of the GIFT authors' algorithm, for conformance tests.

Written for this project from the semantics of the authors' verl code (fork
ZhichaoWang970201/verl, verl/trainer/ppo/core_algos.py: compute_gift_outcome_advantage,
normalize_gift_kl, compute_policy_loss_gift; verl PR #4933), not copied from it. It keeps their
structure on purpose — Python dicts keyed by uid, one response at a time, torch.mean / torch.std
on stacked per-group values — so that it shares no code and no vectorisation with gift_fast:

1. advantage: reward R_i = sum of the response's token-level rewards; per uid group, a group of
   one uses mean 0 and std 1, larger groups mean and unbiased std; A_i = (R_i - mean)/(std + eps),
   broadcast over the response times the response mask.
2. loss: s_i = sum_t mask (log_prob - old_log_prob); per uid group, a group of one uses the
   detached s_i as its mean and std 1, larger groups the detached mean and unbiased std;
   z_i = (s_i - mean)/(std + eps); A_i = advantages[i, 0]; loss = mean_i (A_i - beta z_i)^2.
"""
from __future__ import annotations

from collections import defaultdict

import torch


def authors_advantage(token_level_rewards, response_mask, index, epsilon=1e-6):
    scores = token_level_rewards.sum(dim=-1)
    by_uid = defaultdict(list)
    for i in range(scores.shape[0]):
        by_uid[index[i]].append(scores[i])
    centre, scale = {}, {}
    for uid, vals in by_uid.items():
        if len(vals) == 1:
            centre[uid] = torch.tensor(0.0, dtype=scores.dtype)
            scale[uid] = torch.tensor(1.0, dtype=scores.dtype)
        else:
            stacked = torch.stack(vals)
            centre[uid] = torch.mean(stacked)
            scale[uid] = torch.std(stacked)
    out = torch.stack([(scores[i] - centre[index[i]]) / (scale[index[i]] + epsilon)
                       for i in range(scores.shape[0])])
    return out.unsqueeze(-1) * response_mask


def authors_policy_loss(old_log_prob, log_prob, advantages, response_mask, index, beta=1.0,
                        epsilon=1e-6):
    s = ((log_prob - old_log_prob) * response_mask).sum(dim=-1)
    by_uid = defaultdict(list)
    for i in range(s.shape[0]):
        by_uid[index[i]].append(s[i])
    centre, scale = {}, {}
    for uid, vals in by_uid.items():
        if len(vals) == 1:
            centre[uid] = vals[0].detach()
            scale[uid] = torch.tensor(1.0, dtype=s.dtype)
        else:
            stacked = torch.stack(vals)
            centre[uid] = stacked.mean().detach()
            scale[uid] = stacked.std().detach()
    z = torch.stack([(s[i] - centre[index[i]]) / (scale[index[i]] + epsilon)
                     for i in range(s.shape[0])])
    a = advantages[:, 0]
    return ((a - beta * z) ** 2).mean()


def authors_gift(log_prob, old_log_prob, rewards, response_mask, index, beta=1.0, epsilon=1e-6):
    """The whole pipeline: rewards [B] (put on the last response token) -> advantage -> loss."""
    token_rewards = torch.zeros_like(old_log_prob)
    token_rewards[:, -1] = rewards
    adv = authors_advantage(token_rewards, response_mask, index, epsilon)
    return authors_policy_loss(old_log_prob, log_prob, adv, response_mask, index, beta, epsilon)
