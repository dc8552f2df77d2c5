"""The memory-budget planner: which plan a fused op runs, and with which chunk or block width.

Pure arithmetic on the sizes (no tensors), so ``bench/model.py`` can call it with the arguments
the backends use. ``memory_budget`` is the peak scratch, in bytes, an op may allocate besides
its inputs and the gradients it returns. Plans, fastest first (GEMM-eq: one [N, V, H] GEMM):

- ``"stream"`` (token-local losses only; 3 GEMM-eq): chunks of ``step`` rows; the forward writes
  the chunk's logits, they become the loss gradient in place once the chunk's log-sum-exp is
  known, and dX[chunk] = D @ W, dW += D.T @ X run in cuBLAS (``dw_sum``: how dW is summed
  across chunks, see :func:`plan_token_local`).
- ``"keep"`` (two-phase; 3 GEMM-eq): the logits of all rows are kept from the forward to the
  backward, which forms D from them (``gift_fast/backends/keep.py``: bare ``linear_logprobs``
  without entropy or argmax, eager mode).
- ``"recompute"`` (two-phase, and token-local when no stream fits; 4 GEMM-eq): the backward
  recomputes the logits block by block, in the loop ``order`` that needs less memory
  (``"vocab"``: blocks of ``step`` vocabulary columns; ``"rows"``: chunks of ``step`` rows), the
  widest blocks the budget allows.

How a backend stores logits is a :class:`LogitStore`: float32 (the torch backend, and triton's
float32 inputs), or 2 bytes per logit plus a float32 shift per row and tile of columns
(triton's 16-bit inputs: float16 z - max over the tile, D written over them in the input
dtype). The log-probs never come from the store (the forward's online log-sum-exp), and the
store's absolute rounding |z - max| * 2^-11 only moves D where p <= exp(-|z - max|): see
docs/plans.md, "Precision of the stored logits".

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
    dw_sum: str = ""    # stream / keep: "once", "float32" or "gemm" (:func:`plan_token_local`)


@dataclass(frozen=True)
class LogitStore:
    """How a backend stores a chunk's logits: ``value_bytes`` per logit, and when ``shift_cols``
    is not 0 a float32 shift per row and ``shift_cols`` columns; the values and the shifts each
    padded to a multiple of ``pad_cols`` elements of ``value_bytes``. D is formed in place when
    it has the size of a stored logit (the GEMM operands' element size), else in its own
    buffer."""
    value_bytes: int = 4
    shift_cols: int = 0
    pad_cols: int = 1

    def row_bytes(self, vocab: int, element_size: int) -> int:
        """Bytes of one row's stored logits, shifts and (when not in place) D."""
        unit = self.pad_cols * self.value_bytes
        total = -(-vocab * self.value_bytes // unit) * unit
        total += -(-(-(-vocab // self.shift_cols) * 4) // unit) * unit if self.shift_cols else 0
        return total + (vocab * element_size if element_size != self.value_bytes else 0)


FLOAT32_LOGITS = LogitStore(4, 0)
# Past one stream chunk of 16-bit rows dW is summed across chunks. A separate float32 [V, H] sum
# (no rounding but the final cast) is taken when it fits with at most this many chunks: every
# chunk past the first reads and rewrites its 4 V H bytes (twice the 16-bit sum's traffic), the
# cost that made 5 such chunks model at 1.35x the bare GEMM (docs/plans.md).
FLOAT32_SUM_MAX_CHUNKS = 2
# Else dW is summed in the weight dtype (cuBLAS addmm, beta = 1: one more 16-bit rounding of the
# partial dW per chunk past the first) with at most this many chunks: 3 extra roundings of 2^-8
# (bf16) of the partial sums at most, the order of the 16-bit rounding D already carries
# (tests/helpers.py, ``dw_roundings``); beyond that the recompute plan (4 GEMM-eq, dW summed in
# float32 inside one GEMM) is preferred for its precision.
GEMM_DTYPE_SUM_MAX_CHUNKS = 4


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
                        need_dw: bool = True, need_db: bool = False, n_rows: int = 0,
                        store: LogitStore = FLOAT32_LOGITS, dw_sum: str = "") -> int:
    """Peak scratch of the stored-logits plans: the stored logits of ``rows`` rows and their
    gradient D (:class:`LogitStore`), the rows of X with dead rows zeroed (for dW), a float32
    db sum past one chunk, and a float32 [V, H] dW sum when ``dw_sum`` is "float32" (default:
    when there is more than one chunk of 16-bit rows)."""
    e = element_size
    total = n_rows * PER_ROW_BYTES + rows * store.row_bytes(vocab, e)
    total += rows * hidden * e if need_dw else 0
    if not dw_sum:
        dw_sum = "float32" if chunks > 1 and e != 4 else "gemm"
    total += vocab * hidden * 4 if (need_dw and dw_sum == "float32") else 0
    total += vocab * 4 if (need_db and chunks > 1) else 0
    return total


def _rows_within(cost, n: int, max_chunks: int, budget: int) -> int:
    """The widest chunk below n rows with cost(rows) <= budget and at most ``max_chunks`` chunks
    (0: any number); 0 when none."""
    rows = _widest(cost, n - 1, budget) if n > 1 else 0
    if rows and max_chunks and -(-n // rows) > max_chunks:
        least = -(-n // max_chunks)             # the alignment may cost a chunk: unaligned
        rows = least if cost(least) <= budget else 0
    return rows


def plan_token_local(n_rows: int, vocab: int, hidden: int, element_size: int,
                     need_dx: bool = True, need_dw: bool = True, need_db: bool = False,
                     budget: int = CPU_BUDGET, fixed_bytes: int = 0,
                     recompute_minimum: Optional[int] = None,
                     store: LogitStore = FLOAT32_LOGITS) -> Plan:
    """Stream chunks of rows (3 GEMM-eq), the widest the budget allows; else the recompute plan
    of every row (4 GEMM-eq). Raises BudgetTooSmall naming the least budget of either.
    ``fixed_bytes``: a backend's own scratch of the stream besides these buffers (the torch
    backend's float32 copies of a 16-bit weight and its tile buffer). ``recompute_minimum``:
    a backend that sizes its recompute tiles itself (torch) gives its least budget; the plan's
    ``step`` is then 0 (the backend's choice). ``store``: the backend's :class:`LogitStore`;
    None when the backend cannot store these inputs' logits (the recompute plan).

    ``dw_sum``, how dW is summed across chunks: "once" (one chunk, dW written once); with
    float32 GEMM operands (``element_size`` 4) "gemm" (summed in the float32 gradient), any
    number of chunks; with 16-bit operands "float32" (a float32 [V, H] sum, at most
    ``FLOAT32_SUM_MAX_CHUNKS`` chunks), else "gemm" (summed in the weight dtype, at most
    ``GEMM_DTYPE_SUM_MAX_CHUNKS`` chunks), else the recompute plan."""
    n = max(1, n_rows)

    def cost(rows, dw_sum):
        return fixed_bytes + stored_logits_bytes(rows, vocab, hidden, element_size,
                                                 -(-n // rows), need_dw, need_db, n, store,
                                                 dw_sum)
    once = cost(n, "once") if store is not None else None
    if once is not None and once <= budget:
        return Plan("stream", "rows", n, once, 3, "once")
    modes = ((("gemm", 0),) if element_size == 4 or not need_dw else
             (("float32", FLOAT32_SUM_MAX_CHUNKS), ("gemm", GEMM_DTYPE_SUM_MAX_CHUNKS)))
    least = once if once is not None else float("inf")
    for mode, max_chunks in (modes if store is not None else ()):
        rows = _rows_within(lambda r, m=mode: cost(r, m), n, max_chunks, budget)
        if rows:
            return Plan("stream", "rows", rows, cost(rows, mode), 3, mode)
        if n > 1:
            least = min(least, cost(-(-n // max_chunks) if max_chunks else 1, mode))
    what = f"a token-local loss of {n_rows} rows, V={vocab}, H={hidden}"
    if recompute_minimum is not None:
        if recompute_minimum <= budget:
            return Plan("recompute", "rows", 0, recompute_minimum, 4)
        raise BudgetTooSmall(budget, min(recompute_minimum, least), what)
    try:
        return plan_recompute(n_rows, n_rows, vocab, hidden, element_size, need_dx, need_dw,
                              need_db, budget)
    except BudgetTooSmall as err:
        raise BudgetTooSmall(budget, min(err.minimum, least), what) from None


def keep_bytes(n_rows: int, vocab: int, hidden: int, element_size: int, need_dw: bool = True,
               need_db: bool = False, fixed_bytes: int = 0,
               store: LogitStore = FLOAT32_LOGITS) -> int:
    """Peak scratch of the keep plan: the stored logits of all rows as one chunk, plus a
    backend's own scratch ``fixed_bytes`` (as in :func:`plan_token_local`)."""
    return fixed_bytes + stored_logits_bytes(n_rows, vocab, hidden, element_size, 1, need_dw,
                                             need_db, n_rows, store, "once")


def plan_two_phase(n_rows: int, n_live: int, vocab: int, hidden: int, element_size: int,
                   need_dx: bool = True, need_dw: bool = True, need_db: bool = False,
                   budget: int = CPU_BUDGET, order: str = "auto", can_keep: bool = False,
                   fixed_bytes: int = 0, store: LogitStore = FLOAT32_LOGITS) -> Plan:
    """Keep the logits of all rows when the budget holds them and the backend can (3 GEMM-eq),
    else recompute block by block (4 GEMM-eq)."""
    if can_keep:
        kept = keep_bytes(n_rows, vocab, hidden, element_size, need_dw, need_db, fixed_bytes,
                          store)
        if kept <= budget:
            return Plan("keep", "rows", max(1, n_rows), kept, 3, "once")
    return plan_recompute(n_rows, n_live, vocab, hidden, element_size, need_dx, need_dw,
                          need_db, budget, order)
