"""Benchmark inputs: shapes, token layouts and the tensors every method shares.

Every method of one case gets the very same tensors, so ratios between methods are fair.

Layouts
- ``dense``: every token is a target (SFT-style, the roofline case for ``linear_logprobs``).
- ``rl-gG``: RL rollouts, G responses per prompt. Sequences of length T; the first T/2 positions
  are prompt tokens (``targets == ignore_index``), then a response of random length between T/4
  and T/2, then padding (also ignored). About half the tokens are prompt tokens.

Input kinds
- ``random``: hidden ~ N(0, 1), weight ~ N(0, 1/H): near-uniform softmax rows (high entropy).
- ``peaked``: each hidden state points at one vocabulary row (the target 70% of the time) with a
  per-row sharpness, giving low-entropy rows as trained models do. Filtering peers (CCE) are only
  fast on such rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

IGNORE_INDEX = -100
SEQ_LEN_TARGET = 1024   # RL sequences are 1024 tokens unless N is too small for the group


@dataclass(frozen=True)
class Shape:
    n: int   # tokens
    h: int   # hidden size
    v: int   # vocabulary size

    @property
    def label(self) -> str:
        return f"N={self.n} H={self.h} V={self.v}"

    @staticmethod
    def parse(text: str) -> "Shape":
        """``"8192x4096x151936"`` -> Shape(8192, 4096, 151936)."""
        n, h, v = (int(x) for x in text.lower().split("x"))
        return Shape(n, h, v)

    def gemm_flops(self) -> float:
        """One GEMM-equivalent: 2 N H V."""
        return 2.0 * self.n * self.h * self.v


@dataclass(frozen=True)
class Layout:
    name: str            # "dense" or "rl-g8", "rl-g16", ...
    group_size: int      # G (1 for dense)
    n_seq: int           # B sequences
    seq_len: int         # T tokens per sequence (B * T == N)

    def to_json(self) -> dict:
        return {"name": self.name, "group_size": self.group_size, "n_seq": self.n_seq,
                "seq_len": self.seq_len}


def make_layout(name: str, n: int) -> Layout:
    if name == "dense":
        # Sequences only matter to the losses; dense DPO pairs need an even count.
        seq_len = min(n // 2, SEQ_LEN_TARGET) if n >= 2 else 1
        return Layout("dense", 1, n // seq_len, seq_len)
    if name.startswith("rl-g"):
        g = int(name[4:])
        prompts = max(1, n // (g * SEQ_LEN_TARGET))
        seq_len = n // (g * prompts)
        if seq_len < 4 or seq_len * g * prompts != n:
            raise ValueError(f"layout {name}: N={n} does not split into {g} x {prompts} prompts "
                             f"of >= 4 tokens")
        return Layout(name, g, g * prompts, seq_len)
    raise ValueError(f"unknown layout {name!r}; expected 'dense' or 'rl-g<G>'")


@dataclass
class Inputs:
    """The tensors of one case. ``hidden`` and ``weight`` are the leaves gradients are taken of."""
    shape: Shape
    layout: Layout
    kind: str                    # "random" or "peaked"
    hidden: torch.Tensor         # [B, T, H] leaf, requires grad
    weight: torch.Tensor         # [V, H] leaf, requires grad
    targets: torch.Tensor        # [B, T] int64, IGNORE_INDEX on prompt and padding
    mask: torch.Tensor           # [B, T] bool, targets != IGNORE_INDEX
    grad_tok: torch.Tensor       # [B, T] float32 upstream gradient of per-token log-probs (0 on masked)
    anchor_logps: torch.Tensor   # [B, T] float32: old-policy log-probs (current + small noise), 0 on masked
    ref_logps: torch.Tensor      # [B, T] float32: reference log-probs (current + larger noise)
    rewards: torch.Tensor        # [B] float32, 0/1 per response
    advantages: torch.Tensor     # [B] float32, group-normalised rewards (GRPO helper convention)
    mean_entropy: Optional[float] = None   # nats, measured on a row sample

    @property
    def hidden2d(self) -> torch.Tensor:
        return self.hidden.view(-1, self.shape.h)

    @property
    def targets1d(self) -> torch.Tensor:
        return self.targets.view(-1)

    def input_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.hidden, self.weight, self.targets, self.grad_tok, self.anchor_logps,
                    self.ref_logps))


def _make_mask(layout: Layout, gen: torch.Generator) -> torch.Tensor:
    b, t = layout.n_seq, layout.seq_len
    if layout.name == "dense":
        return torch.ones(b, t, dtype=torch.bool)
    prompt = t // 2
    lo, hi = max(1, t // 4), t - prompt
    lengths = torch.randint(lo, hi + 1, (b,), generator=gen)
    pos = torch.arange(t)[None, :]
    return (pos >= prompt) & (pos < prompt + lengths[:, None])


def make_inputs(shape: Shape, layout: Layout, kind: str, *, dtype=torch.bfloat16,
                device="cpu", seed: int = 0, entropy_rows: int = 256,
                anchor_noise: float = 0.02) -> Inputs:
    """Builds one case's tensors on ``device`` (generated on CPU for reproducibility per seed,
    except the two large tensors, which are generated on the device to keep set-up fast)."""
    if kind not in ("random", "peaked"):
        raise ValueError(f"inputs: expected 'random' or 'peaked', got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    dgen = torch.Generator(device=device).manual_seed(seed)
    n, h, v = shape.n, shape.h, shape.v
    b, t = layout.n_seq, layout.seq_len

    mask = _make_mask(layout, gen)
    targets = torch.randint(0, v, (b, t), generator=gen)
    targets = torch.where(mask, targets, torch.full_like(targets, IGNORE_INDEX))

    weight = torch.randn(v, h, generator=dgen, device=device, dtype=torch.float32)
    weight.mul_(1.0 / math.sqrt(h))
    hidden = torch.randn(n, h, generator=dgen, device=device, dtype=torch.float32)
    if kind == "peaked":
        # Row n points at token p_n (its target 70% of the time) with sharpness c_n in [8, 22]:
        # logit of p_n ~ c_n, others ~ N(0, c_n^2 / H + 0.25): mostly low-entropy rows.
        tgt = targets.view(-1).clamp_min(0).to(device)
        other = torch.randint(0, v, (n,), generator=dgen, device=device)
        use_tgt = torch.rand(n, generator=dgen, device=device) < 0.7
        pick = torch.where(use_tgt, tgt, other)
        sharp = 8.0 + 14.0 * torch.rand(n, 1, generator=dgen, device=device)
        direction = weight[pick]
        direction = direction / direction.norm(dim=1, keepdim=True)
        hidden = sharp * direction + 0.5 * hidden
    hidden = hidden.to(dtype).view(b, t, h).requires_grad_(True)
    weight = weight.to(dtype).requires_grad_(True)

    targets = targets.to(device)
    mask = mask.to(device)
    grad_tok = torch.randn(b, t, generator=gen).to(device) * mask

    # Anchor / reference log-probs near the current policy's (as right after a rollout).
    current = _current_logps(hidden, weight, targets)
    anchor = (current + anchor_noise * torch.randn(b, t, generator=gen).to(device)) * mask
    ref = (current + max(0.2, anchor_noise) * torch.randn(b, t, generator=gen).to(device)) * mask

    g = layout.group_size
    rewards = (torch.rand(b, generator=gen) < 0.5).float().to(device)
    grouped = rewards.view(-1, g)
    if g > 1:
        adv = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    else:
        adv = grouped.clone()
    inputs = Inputs(shape, layout, kind, hidden, weight, targets, mask, grad_tok, anchor, ref,
                    rewards, adv.view(-1))
    inputs.mean_entropy = _mean_entropy(hidden, weight, targets, entropy_rows, gen)
    return inputs


@torch.no_grad()
def _current_logps(hidden, weight, targets) -> torch.Tensor:
    from gift_fast import linear_logprobs
    return linear_logprobs(hidden.detach(), weight.detach(), targets, backend="torch")


@torch.no_grad()
def _mean_entropy(hidden, weight, targets, rows: int, gen) -> float:
    from gift_fast import linear_logprobs
    h2 = hidden.detach().view(-1, hidden.shape[-1])
    idx = torch.randperm(h2.shape[0], generator=gen)[:rows].to(h2.device)
    tgt = targets.view(-1)[idx].clamp_min(0)
    _, ent = linear_logprobs(h2[idx], weight.detach(), tgt, backend="torch", return_entropy=True)
    return float(ent.float().mean())
