"""The losses, one module per family: each module holds everything about its losses.

For each loss: the epilogue on per-token log-probs (``<name>_loss_from_logps``, public as
``gift_fast.functional.<name>_loss``), the checks of its options (one function, used by the
composed and the fused path), the fused front-end on hidden states (``<name>_loss``, public as
``gift_fast.<name>_loss``), its ``nn.Module`` with an explicit ``forward``, and a
:class:`~gift_fast.losses.common.LossSpec` (token-local or not, what ``reduction="mean"``
divides by). Shared plumbing and the argument vocabulary: :mod:`gift_fast.losses.common`.

A module of this package that defines ``SPECS`` is a loss family: its specs are collected in
:data:`SPECS` (by name in :data:`BY_NAME`), its ``__all__`` is exported here, and its front-ends,
modules and ``HELPERS`` by :mod:`gift_fast`. Adding a loss is adding (or extending) one module.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, Tuple

from .common import REDUCTIONS, LossSpec, sequence_logratios

SPECS: Tuple[LossSpec, ...] = ()
HELPERS: tuple = ()
__all__ = ["SPECS", "BY_NAME", "LossSpec", "REDUCTIONS", "sequence_logratios"]

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name == "common":
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    if not hasattr(_module, "SPECS"):
        continue
    SPECS += tuple(_module.SPECS)
    HELPERS += tuple(getattr(_module, "HELPERS", ()))
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
    __all__ += list(_module.__all__)

BY_NAME: Dict[str, LossSpec] = {spec.name: spec for spec in SPECS}
del _info, _module, _name
