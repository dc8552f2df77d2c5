"""The nn.Module of every loss (form (c)), each defined in its family module of
:mod:`gift_fast.losses`; kept as an import path."""
from __future__ import annotations

from .losses import SPECS

__all__ = []
for _spec in SPECS:
    globals()[_spec.module.__name__] = _spec.module
    __all__.append(_spec.module.__name__)
del _spec
