"""gift_fast: fused kernels for LLM post-training losses that never materialise the logits.

The building block is :func:`linear_logprobs`; the losses (GIFT, GRPO, DPO, ...) are built on it,
one module per family in :mod:`gift_fast.losses`. Their fused front-ends (hidden states + lm_head
weight) and nn.Modules are exported here, the epilogues on precomputed per-token log-probs by
:mod:`gift_fast.functional`.
"""
from .logprobs import linear_logprobs
from . import functional
from . import losses
from .losses import SPECS as _SPECS, HELPERS as _HELPERS

__version__ = "0.1.0"
__all__ = ["linear_logprobs", "functional", "losses", "__version__"]

for _obj in [s.fused for s in _SPECS] + list(_HELPERS) + [s.module for s in _SPECS]:
    globals()[_obj.__name__] = _obj
    __all__.append(_obj.__name__)
del _obj
