"""The minimal training loop: GIFT (and baselines) end to end on 2-digit addition.

``train(TrainConfig(...))`` runs one training run, ``compare(cfg, ["gift", "grpo"], seeds=[0, 1, 2])``
every loss from one shared warm start per seed, with a table and a mean/min-max plot; the
``gift-fast train`` console script wraps both (see docs/training.md).
Importing this package pulls in transformers; ``import gift_fast`` alone does not.
"""
from .config import TrainConfig
from .study import compare
from .trainer import NonFiniteError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "NonFiniteError", "train", "compare"]
