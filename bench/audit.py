"""Accuracy audit: relative error of loss, dX and dW against a float64 reference.

For each method the reference is the same objective computed in float64 from materialised logits
(``hidden`` and ``weight`` upcast, log_softmax in float64, the epilogue of bench.methods in
float64). Errors are ``||out - ref|| / ||ref||``. Run on a small shape, where float64 is cheap.
"""
from __future__ import annotations

from typing import Dict

import torch

from .inputs import Inputs
from .methods import EPILOGUES, Context, Method, make_runner, naive_logps, epilogue_dpo
from .status import classify_exception


def reference_fwd_bwd(method: Method, inp: Inputs):
    """(loss, dX, dW) of ``method.objective`` in float64 on the same inputs."""
    h64 = inp.hidden.detach().double().requires_grad_(True)
    w64 = inp.weight.detach().double().requires_grad_(True)
    lp = naive_logps(h64.view(-1, inp.shape.h), w64, inp.targets1d)
    lp = lp.view(inp.layout.n_seq, inp.layout.seq_len)
    lp = torch.where(inp.mask, lp, torch.zeros_like(lp))
    if method.objective == "dpo" and method.audit_ref_zero:
        loss = epilogue_dpo(lp, inp, ref=torch.zeros_like(inp.ref_logps))
    else:
        loss = EPILOGUES[method.objective](lp, inp)
    dx, dw = torch.autograd.grad(loss, [h64, w64])
    return loss.detach(), dx, dw


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double().reshape(ref.shape)
    num = torch.linalg.vector_norm(out - ref)
    den = torch.linalg.vector_norm(ref)
    if not torch.isfinite(num):
        return float("nan")
    return float(num / den) if den > 0 else float(num)


def audit_method(method: Method, inp: Inputs, ctx: Context) -> Dict:
    row = {"method": method.name, "objective": method.objective, "inputs": inp.kind,
           "layout": inp.layout.name}
    try:
        run = make_runner(method, inp, "fwd+bwd", ctx)
        loss, dx, dw = run()
        ref_loss, ref_dx, ref_dw = reference_fwd_bwd(method, inp)
        row.update(status="ok", rel_err_loss=rel_err(loss, ref_loss),
                   rel_err_dx=rel_err(dx, ref_dx), rel_err_dw=rel_err(dw, ref_dw))
    except Exception as e:  # noqa: BLE001 - every failure is reported, never dropped
        row.update(status=classify_exception(e, ctx.device), rel_err_loss=None,
                   rel_err_dx=None, rel_err_dw=None)
    return row
