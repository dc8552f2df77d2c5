"""The memory-budget planner: which plan a fused op runs, and with which chunk or block width.

Pure arithmetic on the sizes (no tensors), so ``bench/model.py`` can call it with the arguments
the backends use. ``memory_budget`` is the peak scratch, in bytes, an op may allocate besides
its inputs and the gradients it returns. Plans, fastest first (GEMM-eq: one [N, V, H] GEMM):

- ``"stream"`` (token-local losses only; 3 GEMM-eq): chunks of ``step`` rows; the forward writes
  the chunk's float32 logits, they become the loss gradient in place once the chunk's
  log-sum-exp is known, and dX[chunk] = D @ W, dW += D.T @ X run in cuBLAS.
- ``"keep"`` (two-phase; 3 GEMM-eq): the float32 logits of all rows are kept from the forward
  to the backward, which forms D from them (``gift_fast/backends/keep.py``: bare
  ``linear_logprobs`` without entropy or argmax, eager mode).
- ``"recompute"`` (two-phase, and token-local when no stream fits; 4 GEMM-eq): the backward
  recomputes the logits block by block, in the loop ``order`` that needs less memory
  (``"vocab"``: blocks of ``step`` vocabulary columns; ``"rows"``: chunks of ``step`` rows), the
  widest blocks the budget allows.

Logits are stored in float32 whatever the input dtype: the loss gradient is then formed from
the same float32 logit the recompute would produce, so log-probs and gradients keep today's
precision (a 16-bit logit, even shifted by the row max, adds a rounding of |z - max| * 2^-11 or
more to every exponent: larger than the 16-bit rounding of D itself for every token further
than 4 nats below the max).

The process default budget (:func:`memory_budget`): ``set_memory_budget(bytes)``, else the
environment variable ``GIFT_FAST_MEMORY_BUDGET`` (bytes), else on CUDA ``DEVICE_FRACTION`` of
the device's free memory at the first call on that device, capped at ``DEVICE_CAP``; on CPU
``CPU_BUDGET``. ``use_memory_budget``
sets it for the calls inside a ``with`` block (this thread only).
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

DEVICE_FRACTION = 0.25          # of the free device memory when the op is called
DEVICE_CAP = 4 << 30            # at most 4 GiB, whatever is free
CPU_BUDGET = 1 << 30            # CPU: no free-memory query worth trusting; 1 GiB
ALIGN = 128                     # multiples of 128 rows / columns keep the GEMM tiles full
PER_ROW_BYTES = 32              # row ids, targets, g, lse, ... of the rows in flight

_process_budget: Optional[int] = None
_device_budgets: dict = {}
_scoped = threading.local()


class BudgetTooSmall(ValueError):
    """The memory budget cannot hold any plan; ``minimum`` is the least budget that can."""

    def __init__(self, budget: int, minimum: int, what: str):
        self.budget, self.minimum = budget, minimum
        super().__init__(f"memory_budget: {budget} bytes cannot hold any plan for {what}; "
                         f"the minimum is {minimum} bytes")


def _check_budget(nbytes) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"memory_budget: expected a positive number of bytes, got {nbytes!r}")
    return nbytes


def set_memory_budget(nbytes: Optional[int]) -> None:
    """Process default budget in bytes (None: back to the device default)."""
    global _process_budget
    _process_budget = None if nbytes is None else _check_budget(nbytes)


@contextlib.contextmanager
def use_memory_budget(nbytes: int) -> Iterator[None]:
    """The budget of every op called inside the block (this thread)."""
    previous = getattr(_scoped, "budget", None)
    _scoped.budget = _check_budget(nbytes)
    try:
        yield
    finally:
        _scoped.budget = previous


def memory_budget(device=None, budget: Optional[int] = None) -> int:
    """The budget of one call: ``budget`` if given, else the scoped, process or device default."""
    for value in (budget, getattr(_scoped, "budget", None), _process_budget):
        if value is not None:
            return _check_budget(value)
    env = os.environ.get("GIFT_FAST_MEMORY_BUDGET")
    if env:
        return _check_budget(int(env))
    if device is not None and getattr(device, "type", device) == "cuda":
        # Read once per device and process: no driver query on every call (nor inside a
        # CUDA graph capture after the first eager call).
        import torch
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        if index not in _device_budgets:
            free, _total = torch.cuda.mem_get_info(index)
            _device_budgets[index] = max(1, min(DEVICE_CAP, int(free * DEVICE_FRACTION)))
        return _device_budgets[index]
    return CPU_BUDGET


@dataclass(frozen=True)
class Plan:
    kind: str           # "stream", "keep" or "recompute"
    order: str          # "rows" or "vocab" (stream and keep: "rows")
    step: int           # rows per chunk ("rows") or vocabulary columns per block ("vocab")
    extra_bytes: int    # peak scratch beyond inputs and gradients (model of the backends' code)
    gemm_eq: int        # GEMMs of N x V x H each, forward and backward


def _aligned(step: int, limit: int) -> int:
    step = step // ALIGN * ALIGN if step >= ALIGN else step
    return max(0, min(step, limit))


def _widest(cost, limit: int, budget: int) -> int:
    """The largest step <= limit (a multiple of ALIGN when >= ALIGN) with cost(step) <= budget,
    0 when not even step 1 fits; cost is non-decreasing in step."""
    if cost(1) > budget:
        return 0
    lo, hi = 1, limit
    while lo < hi:                          # largest step that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid - 1)
    return max(1, _aligned(lo, limit))


# -- recompute (two-phase backward) -----------------------------------------------------------

def recompute_extra_bytes(order: str, step: int, n_rows: int, n_live: int, vocab: int,
                          hidden: int, element_size: int, need_dx: bool = True,
                          need_dw: bool = True, need_db: bool = False) -> int:
    """Peak bytes ``triton_op.grad`` allocates besides dX, dW, db, for this order and step."""
    e = element_size
    per_row = n_live * PER_ROW_BYTES
    partial = n_live < n_rows
    if order == "rows":
        loop = step * vocab * e + (step * hidden * e if partial else 0)      # D, gathered x
        loop += step * hidden * e if (need_dx and partial) else 0           # dX of the chunk
        loop += vocab * hidden * 4 if (need_dw and e != 4) else 0          # float32 dW sum
        loop += vocab * 4 if need_db else 0                                  # float32 db
        return per_row + loop
    if order != "vocab":
        raise ValueError(f"order: expected 'rows' or 'vocab', got {order!r}")
    gathered = n_live * hidden * e if partial else 0
    acc = n_live * hidden * 4 if need_dx and (partial or e != 4) else 0     # float32 dX sum
    loop = n_live * step * e + gathered + acc
    finish = acc + (n_live * hidden * e if need_dx and partial and e != 4 else 0)
    return per_row + max(loop, finish)


RECOMPUTE_ORDERS = ("auto", "rows", "vocab")


def plan_recompute(n_rows: int, n_live: int, vocab: int, hidden: int, element_size: int,
                   need_dx: bool = True, need_dw: bool = True, need_db: bool = False,
                   budget: int = CPU_BUDGET, order: str = "auto") -> Plan:
    """The recompute backward with the widest blocks ``budget`` allows; of the two orders the
    one with fewer GEMM launches (then less memory). Raises BudgetTooSmall."""
    if order not in RECOMPUTE_ORDERS:
        raise ValueError(f"order: expected one of {list(RECOMPUTE_ORDERS)}, got {order!r}")
    live = max(1, n_live)
    plans, minimum = [], None
    for o in (("vocab", "rows") if order == "auto" else (order,)):
        limit = vocab if o == "vocab" else live

        def cost(step, o=o):
            return recompute_extra_bytes(o, step, n_rows, n_live, vocab, hidden, element_size,
                                         need_dx, need_dw, need_db)
        least = cost(1)
        minimum = least if minimum is None else min(minimum, least)
        step = _widest(cost, limit, budget)
        if step:
            plans.append(Plan("recompute", o, step, cost(step), 4))
    if not plans:
        raise BudgetTooSmall(budget, minimum, f"the recompute backward of {n_live} rows, "
                             f"V={vocab}, H={hidden}")
    # Fewer, wider launches first; ties: less memory, then the vocab order (listed first).
    return min(plans, key=lambda p: (-(-(vocab if p.order == "vocab" else live) // p.step),
                                     p.extra_bytes))


# -- stream (token-local) and keep (two-phase) ------------------------------------------------

def stored_logits_bytes(rows: int, vocab: int, hidden: int, element_size: int, chunks: int,
                        need_dw: bool = True, need_db: bool = False, n_rows: int = 0) -> int:
    """Peak scratch of the stored-logits plans: float32 logits of ``rows`` rows, their gradient
    D in the input dtype (float32 inputs: in place), the rows of X with dead rows zeroed (for
    dW), float32 dW / db sums when there is more than one chunk of 16-bit rows (one chunk
    writes dW = D.T @ X once)."""
    e = element_size
    total = n_rows * PER_ROW_BYTES + rows * vocab * 4 + (rows * vocab * e if e != 4 else 0)
    total += rows * hidden * e if need_dw else 0
    if chunks > 1:
        total += vocab * hidden * 4 if (need_dw and e != 4) else 0
        total += vocab * 4 if need_db else 0
    return total


def plan_token_local(n_rows: int, vocab: int, hidden: int, element_size: int,
                     need_dx: bool = True, need_dw: bool = True, need_db: bool = False,
                     budget: int = CPU_BUDGET, fixed_bytes: int = 0,
                     recompute_minimum: Optional[int] = None) -> Plan:
    """Stream chunks of rows (3 GEMM-eq), the widest the budget allows; else the recompute plan
    of every row (4 GEMM-eq). Raises BudgetTooSmall naming the least budget of either.
    ``fixed_bytes``: a backend's own scratch of the stream besides these buffers (the torch
    backend's float32 copies of a 16-bit weight and its tile buffer). ``recompute_minimum``:
    a backend that sizes its recompute tiles itself (torch) gives its least budget; the plan's
    ``step`` is then 0 (the backend's choice)."""
    n = max(1, n_rows)

    def cost(rows):
        return fixed_bytes + stored_logits_bytes(rows, vocab, hidden, element_size,
                                                 -(-n // rows), need_dw, need_db, n)
    if cost(n) <= budget:
        return Plan("stream", "rows", n, cost(n), 3)
    # Past one chunk the float32 dW sum joins (16-bit), so the cost jumps at rows < n.
    rows = _widest(cost, n - 1, budget) if n > 1 else 0
    if rows:
        return Plan("stream", "rows", rows, cost(rows), 3)
    what = f"a token-local loss of {n_rows} rows, V={vocab}, H={hidden}"
    if recompute_minimum is not None:
        if recompute_minimum <= budget:
            return Plan("recompute", "rows", 0, recompute_minimum, 4)
        raise BudgetTooSmall(budget, min(recompute_minimum, cost(1), cost(n)), what)
    try:
        return plan_recompute(n_rows, n_rows, vocab, hidden, element_size, need_dx, need_dw,
                              need_db, budget)
    except BudgetTooSmall as err:
        least = min(err.minimum, cost(1), cost(n))
        raise BudgetTooSmall(budget, least, what) from None


def keep_bytes(n_rows: int, vocab: int, hidden: int, element_size: int, need_dw: bool = True,
               need_db: bool = False, fixed_bytes: int = 0) -> int:
    """Peak scratch of the keep plan: the stored logits of all rows as one chunk, plus a
    backend's own scratch ``fixed_bytes`` (as in :func:`plan_token_local`)."""
    return fixed_bytes + stored_logits_bytes(n_rows, vocab, hidden, element_size, 1, need_dw,
                                             need_db, n_rows)


def plan_two_phase(n_rows: int, n_live: int, vocab: int, hidden: int, element_size: int,
                   need_dx: bool = True, need_dw: bool = True, need_db: bool = False,
                   budget: int = CPU_BUDGET, order: str = "auto", can_keep: bool = False,
                   fixed_bytes: int = 0) -> Plan:
    """Keep the logits of all rows when the budget holds them and the backend can (3 GEMM-eq),
    else recompute block by block (4 GEMM-eq)."""
    if can_keep:
        kept = keep_bytes(n_rows, vocab, hidden, element_size, need_dw, need_db, fixed_bytes)
        if kept <= budget:
            return Plan("keep", "rows", max(1, n_rows), kept, 3)
    return plan_recompute(n_rows, n_live, vocab, hidden, element_size, need_dx, need_dw,
                          need_db, budget, order)
