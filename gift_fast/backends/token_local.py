"""One-pass token-local losses (SFT variants, DFT, GRPO family) on the torch or triton backend.

For these losses dL/dlogp_n depends only on row n (per-row terms, weights from masks and layout),
so it is known as soon as that row's log-prob is. The op computes dX, dW (and db) inside its
forward, and its backward only scales them by grad_output: nothing but the gradients is kept
alive between the two, and hidden/weight are not saved.

The plan comes from :func:`plan.plan_token_local` within the memory budget:

- ``"stream"`` (3 GEMM-eq): chunks of rows. The backend's forward writes the chunk's logits
  (the backend's ``stream_buffer``: float32, or 16-bit shifted by tile maxima on triton) and its
  statistics; the epilogue's derivative for those rows turns the logits into D in place;
  dX[chunk] = D @ W and dW (+)= D.T @ X go to cuBLAS (:mod:`.blas`), dW summed across chunks as
  the plan's ``dw_sum`` says.
- ``"recompute"`` (4 GEMM-eq): statistics of all rows, then the backend's recompute backward.

The epilogue is any callable ``logp [N] -> (loss, metrics)`` written in torch (the functional
losses); its per-row derivative comes from autograd on that [N] vector, so the math lives in one
place and the fused op cannot drift from it. While streaming, rows not reached yet hold logp 0:
a token-local epilogue's derivative at the chunk's rows does not depend on them, and the loss
and metrics are those of the last call, which sees every row.
"""
from __future__ import annotations

import torch

from . import plan as planner
from .blas import mm_into
from .protocol import get_backend, local_targets, single_device


def _row_grad(epilogue, logp):
    """(loss, metrics, dloss/dlogp in logp's dtype, zeros where unused) of ``epilogue``."""
    with torch.enable_grad():
        leaf = logp.detach().requires_grad_()
        loss, metrics = epilogue(leaf)
        (g,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    g = torch.zeros_like(logp) if g is None else g.to(logp.dtype)
    return loss, metrics, g


def stores_logits(backend, hidden, weight, bias, softcap) -> bool:
    """Whether the backend may run a stored-logits plan on these inputs (default: yes)."""
    check = getattr(backend, "stores_logits", None)
    return True if check is None else check(hidden, weight, bias, softcap)


def logit_store(backend, vocab, hidden, dtype, device) -> planner.LogitStore:
    """The backend's stored-logits layout for the planner (default: float32 logits)."""
    store = getattr(backend, "stream_store", None)
    return planner.FLOAT32_LOGITS if store is None else store(vocab, hidden, dtype, device)


def logits_buffer(backend, rows, vocab, dtype, device) -> torch.Tensor:
    """A [rows, V] buffer for the backend's ``stream_logits`` (default: its sums' dtype)."""
    make = getattr(backend, "stream_buffer", None)
    if make is not None:
        return make(rows, vocab, dtype, device)
    return torch.empty((rows, vocab), dtype=backend.stream_dtypes(dtype)[0], device=device)


def gradient_buffers(backend, hidden, weight, rows, dw_sum, need):
    """(W in the GEMM dtype, d_hidden, dx_tmp, dw_sum, db32) for :func:`grads_from_logits` over
    chunks of at most ``rows`` rows, dW summed as the plan's ``dw_sum`` says; None where not
    needed.

    Sums in float32 (float64 inputs on torch: float64); the GEMMs' operands in the input dtype
    on triton (cuBLAS sums in float32), in the sums' dtype on the torch backend."""
    need_dx, need_dw, need_db = need
    dev = hidden.device
    z_dtype, mm_dtype = backend.stream_dtypes(hidden.dtype)
    w_mm = weight if weight.dtype == mm_dtype else weight.to(mm_dtype)
    d_hidden = torch.empty_like(hidden) if need_dx else None
    # dX[chunk] is written once per row: straight into d_hidden unless the GEMM's dtype differs.
    dx_tmp = (torch.empty((rows, hidden.shape[1]), dtype=mm_dtype, device=dev)
              if need_dx and mm_dtype != hidden.dtype else None)
    # "float32": a float32 sum cast at the end; "once" / "gemm": dW in the GEMM's dtype (the
    # weight's own on triton; the torch backend's float32 copy of a 16-bit weight's gradient).
    dw_buf = None
    if need_dw:
        dw_dtype = torch.float32 if dw_sum == "float32" else mm_dtype
        dw_buf = torch.empty(weight.shape, dtype=dw_dtype, device=dev)
    db32 = torch.zeros(weight.shape[0], dtype=z_dtype, device=dev) if need_db else None
    return w_mm, d_hidden, dx_tmp, dw_buf, db32


def finish_sums(dw_sum, db32, weight, bias):
    """(d_weight, d_bias) in the parameters' dtypes from the sums (None where not needed)."""
    return (None if dw_sum is None else dw_sum.to(weight.dtype),
            None if db32 is None else db32.to(bias.dtype))


def grads_from_logits(backend, z, d, x, y, g, lse, temperature, softcap, w_mm, d_hidden,
                      dx_tmp, dw_sum, db32, accumulate):
    """The gradients of rows whose stored logits are ``z`` and upstream gradient ``g``: D into
    ``d`` (``z`` itself when the GEMMs take the logits' dtype; rows with g = 0 get D = 0), then
    ``d_hidden`` = D @ W (through ``dx_tmp`` when the GEMM dtype is not the gradient's),
    ``dw_sum`` (+)= D.T @ X, ``db32`` += column sums of D; None where not wanted.

    A backend's ``stream_dlogits`` may return a per-row factor r with D = r[:, None] * d (None:
    D = d): r then scales dX's rows and X's rows, [rows, H] each, not the [rows, V] d."""
    r = backend.stream_dlogits(z, y, g, lse, temperature, softcap, d)
    if d_hidden is not None:
        dx = mm_into(d_hidden if dx_tmp is None else dx_tmp, d, w_mm)
        if r is not None:
            dx.mul_(r[:, None])
        if dx_tmp is not None:
            d_hidden.copy_(dx)
    if dw_sum is not None:
        # A dead row's D is 0, but 0 * a non-finite hidden state is not: zero those rows.
        xm = torch.where((g != 0)[:, None], x, 0.0).to(d.dtype)
        if r is not None:
            xm.mul_(r[:, None])
        mm_into(dw_sum, d.T, xm, accumulate=accumulate)
    if db32 is not None:
        db32 += (d.sum(0, dtype=db32.dtype) if r is None else (d.T @ r).to(db32.dtype))


def _stream(backend, hidden, weight, bias, y, active, epilogue, temperature, softcap, need,
            plan):
    """The stream plan: (loss, metrics, (d_hidden, d_weight, d_bias))."""
    need_dx, need_dw, _ = need
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    z_dtype, mm_dtype = backend.stream_dtypes(hidden.dtype)
    step = plan.step
    rows = min(step, N)
    z = logits_buffer(backend, rows, V, hidden.dtype, dev)
    d = z if mm_dtype == z.dtype else torch.empty((rows, V), dtype=mm_dtype, device=dev)
    w_mm, d_hidden, dx_tmp, dw_sum, db32 = gradient_buffers(backend, hidden, weight, rows,
                                                            plan.dw_sum, need)
    logp = torch.zeros(N, dtype=z_dtype, device=dev)
    if N == 0:                    # no rows: the loss of nothing, zero gradients
        loss, metrics, _ = _row_grad(epilogue, logp)
        if need_dw:
            dw_sum.zero_()
    for start in range(0, N, step):
        stop = min(N, start + step)
        zc, dc = z[:stop - start], d[:stop - start]
        x = hidden[start:stop]
        lse, target_logit = backend.stream_logits(x, weight, bias, y[start:stop], temperature,
                                                  softcap, zc)
        logp[start:stop] = torch.where(active[start:stop], target_logit - lse, 0.0)
        loss, metrics, g = _row_grad(epilogue, logp)
        g = torch.where(active[start:stop], g[start:stop], 0.0)
        grads_from_logits(backend, zc, dc, x, y[start:stop], g, lse, temperature, softcap, w_mm,
                          d_hidden[start:stop] if need_dx else None,
                          None if dx_tmp is None else dx_tmp[:stop - start], dw_sum, db32,
                          accumulate=start > 0)
    return loss, metrics, (d_hidden, *finish_sums(dw_sum, db32, weight, bias))


def _two_phase(name, hidden, weight, bias, y, active, epilogue, temperature, softcap, need,
               budget):
    """The recompute plan: statistics of all rows, the epilogue, the backend's backward."""
    backend = get_backend(name)
    kw = dict(budget=budget) if name == "torch" else {}
    logp, _, _, lse = single_device(backend.stats(
        hidden, weight, bias, y, temperature, softcap, want_entropy=False, want_argmax=False,
        **kw), active)
    loss, metrics, g = _row_grad(epilogue, logp)
    if not any(need):
        return loss, metrics, (None, None, None)
    g = torch.where(active, g, 0.0)
    grads = backend.grad(hidden, weight, bias, y, lse, None, g, None, temperature, softcap,
                         need_dx=need[0], need_dw=need[1], need_db=need[2], budget=budget)
    return loss, metrics, tuple(grads)


class OnePassTokenLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, ignore_index, epilogue,
                box, backend, budget):
        active = targets != ignore_index
        y = local_targets(targets, active)
        need = ctx.needs_input_grad
        need = (need[0], need[1], bias is not None and need[2])
        module = get_backend(backend)
        N, H = hidden.shape
        V = weight.shape[0]
        budget = planner.memory_budget(hidden.device, budget)
        fixed = module.stream_fixed_bytes(N, V, H, hidden.dtype, need[1])
        elt = torch.empty((), dtype=module.stream_dtypes(hidden.dtype)[1]).element_size()
        plan = planner.plan_token_local(
            N, V, H, elt, *need, budget=budget, fixed_bytes=fixed,
            recompute_minimum=module.recompute_minimum(N, V, H, hidden.dtype, need[1], softcap),
            store=(logit_store(module, V, H, hidden.dtype, hidden.device)
                   if stores_logits(module, hidden, weight, bias, softcap) else None))
        box["plan"] = plan
        if plan.kind == "stream":
            loss, metrics, grads = _stream(module, hidden, weight, bias, y, active, epilogue,
                                           temperature, softcap, need, plan)
        else:
            loss, metrics, grads = _two_phase(backend, hidden, weight, bias, y, active, epilogue,
                                              temperature, softcap, need, budget)
        box["metrics"] = metrics
        ctx.grads = grads
        return loss.detach()

    @staticmethod
    def backward(ctx, d_loss):
        # In place: the gradients are ours alone, and a second dX/dW copy would double memory.
        # grad_output 1 (loss.backward()) skips that pass over dW; read where it is free (CPU).
        unit = (d_loss.device.type == "cpu" and not torch.compiler.is_compiling()
                and bool(d_loss == 1))
        grads = tuple(t if t is None or unit else t.mul_(d_loss.to(t.dtype)) for t in ctx.grads)
        ctx.grads = None
        return (*grads, None, None, None, None, None, None, None, None)


def one_pass(h2, weight, bias, t1, epilogue, *, backend, temperature, softcap, ignore_index,
             memory_budget=None):
    """Loss and metrics of ``epilogue(logp)`` with gradients computed in the forward pass, on
    ``backend`` ("torch" or "triton"); ``memory_budget`` in bytes (default: the process's)."""
    box = {}
    loss = OnePassTokenLocal.apply(h2, weight, bias, t1, float(temperature), softcap, ignore_index,
                                   epilogue, box, backend, memory_budget)
    return loss, box["metrics"]
