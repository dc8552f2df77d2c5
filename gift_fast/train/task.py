"""The verifiable task: 2-digit addition, answer written least-significant digit first, then EOS.

Prompts are ``<bos>AB+CD=`` with zero-padded operands, so every prompt has the same length
(``PROMPT_LEN`` tokens): no left padding is needed anywhere.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from .tokenizer import CharTokenizer

PROMPT_LEN = 7          # <bos> + "AB+CD="
MAX_ANSWER_DIGITS = 3   # 99 + 99 = 198


def prompt_text(a: int, b: int) -> str:
    return f"{a:02d}+{b:02d}="


def answer_text(a: int, b: int) -> str:
    return str(a + b)[::-1]


def reward(response: str, a: int, b: int, ended: bool) -> float:
    """Format-gated reward: exact answer 1; well-formed but wrong 0.1 + 0.9 x fraction of the
    digits right (position by position over the longer of the two); anything else 0.

    ``response`` is the text before EOS; ``ended`` says whether EOS was produced at all.
    """
    if not ended or not response.isdigit() or not 1 <= len(response) <= MAX_ANSWER_DIGITS:
        return 0.0
    target = answer_text(a, b)
    if response == target:
        return 1.0
    right = sum(p == t for p, t in zip(response, target))
    return 0.1 + 0.9 * right / max(len(response), len(target))


@dataclass
class AdditionTask:
    """All 10,000 problems, split once (by ``seed``) into a held-out set and a training pool."""

    tokenizer: CharTokenizer
    seed: int = 0
    n_heldout: int = 256

    def __post_init__(self):
        pairs = [(a, b) for a in range(100) for b in range(100)]
        random.Random(self.seed).shuffle(pairs)
        self.heldout: List[Tuple[int, int]] = pairs[:self.n_heldout]
        self.train_pool: List[Tuple[int, int]] = pairs[self.n_heldout:]

    def sample(self, rng: random.Random, n: int) -> List[Tuple[int, int]]:
        return [self.train_pool[rng.randrange(len(self.train_pool))] for _ in range(n)]

    def prompt_ids(self, problems: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """``[n, PROMPT_LEN]`` token ids."""
        tok = self.tokenizer
        rows = [[tok.bos_id] + tok.encode(prompt_text(a, b)) for a, b in problems]
        return torch.tensor(rows, dtype=torch.long)

    def gold_sequences(self, problems: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """Prompt + gold answer + EOS, right-padded with PAD to a common length."""
        tok = self.tokenizer
        rows = [[tok.bos_id] + tok.encode(prompt_text(a, b) + answer_text(a, b)) + [tok.eos_id]
                for a, b in problems]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows], dtype=torch.long)

    def score(self, problems: Sequence[Tuple[int, int]], responses: torch.Tensor):
        """Rewards and exact-match flags of ``responses`` (``[n, L]`` ids after the prompt)."""
        tok = self.tokenizer
        rewards, exact = [], []
        for (a, b), ids in zip(problems, responses.tolist()):
            ended = tok.eos_id in ids
            text = tok.decode(ids)
            r = reward(text, a, b, ended)
            rewards.append(r)
            exact.append(r == 1.0)
        return (torch.tensor(rewards, dtype=torch.float32),
                torch.tensor(exact, dtype=torch.float32))
