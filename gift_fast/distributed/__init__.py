"""Distributed primitives under the fused ops (see docs/distributed.md).

- :mod:`.vocab_parallel`: the lm_head sharded along the vocabulary over a process group
  (``vocab_parallel_group=`` of :func:`gift_fast.linear_logprobs` and every loss front-end).
- :mod:`.data_parallel`: gathers the few per-sequence numbers GIFT's group statistics need when a
  group's responses are split across data-parallel ranks (``gift_loss(..., data_parallel_group=)``).
- :mod:`.fused_forward`: :func:`run_in_fsdp_unit`, runs a function of a module's parameters as a
  forward of that module's FSDP2 unit.

This package sits below the losses (which import it) and imports none of them: the adapters that
run a loss, such as :class:`gift_fast.integrations.fsdp.FusedLossModel`, sit above the losses, and
the end-to-end torchrun check is examples/data_parallel_gift.py.
"""
from .data_parallel import all_gather_uneven, data_parallel_world
from .fused_forward import run_in_fsdp_unit

__all__ = ["all_gather_uneven", "data_parallel_world", "run_in_fsdp_unit"]


def __getattr__(name):
    if name == "FusedLossModel":   # moved up a layer, above the losses it runs
        raise AttributeError("gift_fast.distributed.FusedLossModel moved to "
                             "gift_fast.integrations.fsdp.FusedLossModel")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
