"""A character-level tokenizer built locally with the ``tokenizers`` library (no download).

The real alphabet is tiny (digits, '+', '='); the vocabulary is padded with unused tokens up to a
configurable size so that the lm_head is as wide as a real LLM's and the large-vocab path of the
fused op is what training exercises.
"""
from __future__ import annotations

from typing import List, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ALPHABET = list("0123456789+=")
MIN_VOCAB = len(SPECIALS) + len(ALPHABET)


class CharTokenizer:
    """Thin wrapper exposing ids of the special tokens and list-based encode/decode."""

    def __init__(self, vocab_size: int):
        if vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size: expected >= {MIN_VOCAB}, got {vocab_size}")
        tokens = SPECIALS + ALPHABET + [f"<extra_{i}>" for i in range(vocab_size - MIN_VOCAB)]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        # Every character is its own pre-token, so WordLevel acts as a character vocabulary.
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens(SPECIALS)
        self.tokenizer = tok
        self.vocab_size = vocab_size
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (vocab[t] for t in SPECIALS)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes up to (not including) the first end-of-sequence; other specials stay visible."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, path: str) -> None:
        self.tokenizer.save(path)
