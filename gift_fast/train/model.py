"""Model presets: small causal LMs built from a config with random weights (no download).

- ``tiny``: a 2-layer Llama for the CPU default (minutes on 2 cores).
- ``qwen2``: a Qwen2-style body for the large-vocabulary mode (``--vocab 151936``).
- ``gpu``: a larger Llama, bfloat16 compute, SDPA attention or FlashAttention-2 when installed.

The training path only uses ``body(model)`` (the base model, returning hidden states) and
``lm_head_weight(model)``; the model's own logits are never computed there.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

PRESETS = ("tiny", "qwen2", "gpu")


@dataclass(frozen=True)
class Preset:
    arch: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    compute_dtype: torch.dtype = torch.float32


_PRESETS = {
    "tiny": Preset("llama", hidden=96, intermediate=256, layers=2, heads=4, kv_heads=4),
    "qwen2": Preset("qwen2", hidden=128, intermediate=352, layers=2, heads=4, kv_heads=2),
    "gpu": Preset("llama", hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=8,
                  compute_dtype=torch.bfloat16),
}


def attention_implementation(device: torch.device) -> str:
    """FlashAttention-2 on CUDA when the package imports, SDPA otherwise."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_model(preset: str, vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
                device: torch.device, max_positions: int = 32):
    """Returns ``(model, compute_dtype)``; parameters stay float32 (master weights), forward passes
    run in ``compute_dtype`` under autocast on CUDA."""
    if preset not in _PRESETS:
        raise ValueError(f"preset: expected one of {list(PRESETS)}, got {preset!r}")
    p = _PRESETS[preset]
    common = dict(vocab_size=vocab_size, hidden_size=p.hidden, intermediate_size=p.intermediate,
                  num_hidden_layers=p.layers, num_attention_heads=p.heads,
                  num_key_value_heads=p.kv_heads, max_position_embeddings=max_positions,
                  pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
                  tie_word_embeddings=False)
    if p.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    config._attn_implementation = attention_implementation(device)
    model = cls(config).to(device)
    compute_dtype = p.compute_dtype if device.type == "cuda" else torch.float32
    return model, compute_dtype


def body(model):
    """The base model (embeddings + decoder stack + final norm), without the lm_head."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def lm_head_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight
