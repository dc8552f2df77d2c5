"""Triton kernels of gift_fast (installed as ``gift_fast.kernels``): @triton.jit code and thin
launch helpers only; the autograd wiring lives in ``gift_fast.backends.triton_op``."""
from .logprob_backward import dlogits, dlogits_from_logits
from .logprob_forward import dot_precision, logprob_forward_stats
from .gift_epilogue import gift_epilogue

__all__ = ["logprob_forward_stats", "dlogits", "dlogits_from_logits", "dot_precision", "gift_epilogue"]
