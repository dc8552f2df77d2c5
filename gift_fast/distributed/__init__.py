"""Running the fused ops under ``torch.distributed``.

- :mod:`.vocab_parallel`: the lm_head sharded along the vocabulary over a process group
  (``vocab_parallel_group=`` of :func:`gift_fast.linear_logprobs` and every loss front-end).
"""
