"""Running the fused ops under ``torch.distributed`` (see docs/distributed.md).

- :mod:`.vocab_parallel`: the lm_head sharded along the vocabulary over a process group
  (``vocab_parallel_group=`` of :func:`gift_fast.linear_logprobs` and every loss front-end).
- :mod:`.data_parallel`: gathers the few per-sequence numbers GIFT's group statistics need when a
  group's responses are split across data-parallel ranks (``gift_loss(..., data_parallel_group=)``).
- :mod:`.fused_forward`: :class:`FusedLossModel`, runs a fused loss inside the root module's
  forward, where FSDP2 has unsharded the lm_head weight; :func:`run_in_fsdp_unit` runs it inside
  the lm_head's own FSDP2 unit when it has one.
"""
from .data_parallel import all_gather_uneven, data_parallel_world
from .fused_forward import FusedLossModel, run_in_fsdp_unit

__all__ = ["all_gather_uneven", "data_parallel_world", "FusedLossModel", "run_in_fsdp_unit"]
