"""gift_fast: fused kernels for LLM post-training losses that never materialise the logits.

The building block is :func:`linear_logprobs`; the losses (GIFT, GRPO, DPO, ...) are built on it.
"""
from .logprobs import linear_logprobs

__version__ = "0.1.0"
__all__ = ["linear_logprobs", "__version__"]
