"""Integrations with the trainers people already run.

Each submodule is optional and imports its framework lazily:

- :mod:`gift_fast.integrations.hf` — Hugging Face causal LMs (extra ``hf``): per-token log-probs
  through the model's own head without logits, and a patched forward for FSDP.
- :mod:`gift_fast.integrations.trl` — TRL (extra ``trl``): ``GIFTTrainer`` / ``GIFTConfig`` and a
  switch that makes TRL's GRPO and DPO trainers use gift_fast's fused log-probs.
"""
