"""gift_fast: fused kernels for LLM post-training losses that never materialise the logits.

The building block is :func:`linear_logprobs`; the losses (GIFT, GRPO, DPO, ...) are built on it.
Fused front-ends (hidden states + lm_head weight) live at the top level, the epilogues on
precomputed per-token log-probs in :mod:`gift_fast.functional`, the nn.Module wrappers in
:mod:`gift_fast.modules`.
"""
from .logprobs import linear_logprobs
from . import functional
from .losses import (dft_loss, dpo_loss, fdiv_sft_loss, gift_loss, group_advantages, grpo_loss,
                     ift_greedy_predictions, ift_loss, ift_mixed_embeddings, ipo_loss, rpo_loss,
                     simpo_loss, una_loss)
from .modules import (DFTLoss, DPOLoss, FDivSFTLoss, GIFTLoss, GRPOLoss, IFTLoss, IPOLoss, RPOLoss,
                      SimPOLoss, UNALoss)

__version__ = "0.1.0"
__all__ = [
    "linear_logprobs", "functional", "__version__",
    "gift_loss", "grpo_loss", "group_advantages", "dpo_loss", "ipo_loss", "simpo_loss", "rpo_loss",
    "una_loss", "fdiv_sft_loss", "dft_loss", "ift_loss", "ift_greedy_predictions",
    "ift_mixed_embeddings",
    "GIFTLoss", "GRPOLoss", "DPOLoss", "IPOLoss", "SimPOLoss", "RPOLoss", "UNALoss", "FDivSFTLoss",
    "DFTLoss", "IFTLoss",
]
