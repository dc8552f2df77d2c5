"""Integrations with the trainers people already run (each an optional extra in setup.py).

Each submodule imports its framework lazily; ``import gift_fast`` never imports a trainer:

- :mod:`gift_fast.integrations.hf` — Hugging Face causal LMs (extra ``hf``): per-token log-probs
  through the model's own head without logits, and a patched forward for FSDP.
- :mod:`gift_fast.integrations.trl` — TRL (extra ``trl``): ``GIFTTrainer`` / ``GIFTConfig`` and a
  switch that makes TRL's GRPO and DPO trainers use gift_fast's fused log-probs.
- :mod:`gift_fast.integrations.verl` — verl (extra ``verl``): the GIFT authors' advantage
  estimator and policy loss, registered with verl's registries, and a fused actor forward.
"""
