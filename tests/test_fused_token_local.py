"""One-pass token-local losses on the triton backend (gradients computed in the forward) against
the composed path on the torch backend: same loss, metrics and gradients; backward scales by
grad_output; under no_grad the composed path runs. Interpreter shapes; float32. The two paths
may differ by the sum of their rounding bounds (tests/helpers.py: loss_rounding_bounds, derived
from the magnitudes of the inputs through the loss), elementwise for the gradients."""
import pytest
import torch

import gift_fast.functional as Fn
from gift_fast import dft_loss, fdiv_sft_loss, grpo_loss
from helpers import assert_within, loss_rounding_bounds


def _inputs(seed, B=4, T=9, H=24, V=70):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    bias = torch.randn(V, generator=g) * 0.1
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, :3] = -100
    old = torch.randn(B, T, generator=g) * 0.2 - 4.0
    ref = torch.randn(B, T, generator=g) * 0.2 - 4.0
    adv = torch.randn(B, generator=g)
    return hidden, weight, bias, targets, old, ref, adv


LOSSES = {
    "grpo_dapo_kl": lambda h, w, b, t, old, ref, adv, be: grpo_loss(
        h, w, t, old, adv, kl_ref_logps=ref, beta=0.04, bias=b, backend=be),
    "grpo_grpo": lambda h, w, b, t, old, ref, adv, be: grpo_loss(
        h, w, t, old, adv, loss_type="grpo", bias=b, temperature=0.8, backend=be),
    "fdiv_js": lambda h, w, b, t, old, ref, adv, be: fdiv_sft_loss(
        h, w, t, ref, divergence="js", bias=b, backend=be),
    "fdiv_tv": lambda h, w, b, t, old, ref, adv, be: fdiv_sft_loss(h, w, t, bias=b, backend=be),
    "dft": lambda h, w, b, t, old, ref, adv, be: dft_loss(h, w, t, bias=b, backend=be),
}
# The same losses on given log-probs (float64 for the bounds): (temperature, loss of logp).
ON_LOGPS = {
    "grpo_dapo_kl": (1.0, lambda lp, m, old, ref, adv: Fn.grpo_loss(lp, old, adv, mask=m,
                                                                    kl_ref_logps=ref, beta=0.04)),
    "grpo_grpo": (0.8, lambda lp, m, old, ref, adv: Fn.grpo_loss(lp, old, adv, mask=m,
                                                                 loss_type="grpo")),
    "fdiv_js": (1.0, lambda lp, m, old, ref, adv: Fn.fdiv_sft_loss(lp, ref, mask=m,
                                                                   divergence="js")),
    "fdiv_tv": (1.0, lambda lp, m, old, ref, adv: Fn.fdiv_sft_loss(lp, None, mask=m)),
    "dft": (1.0, lambda lp, m, old, ref, adv: Fn.dft_loss(lp, mask=m)),
}


def _bounds(name, inputs):
    """Sum of the two paths' rounding bounds (triton one-pass, torch composed)."""
    h, w, b, t, old, ref, adv = inputs
    temperature, on_logps = ON_LOGPS[name]
    fn = lambda lp: on_logps(lp, t != -100, old.double(), ref.double(), adv.double())  # noqa: E731
    one, two = (loss_rounding_bounds(fn, be, torch.float32, h, w, b, t, temperature=temperature)
                for be in ("triton", "torch"))
    return one.loss + two.loss, {k: one.metrics[k] + two.metrics[k] for k in one.metrics}, [
        getattr(one.grads, n) + getattr(two.grads, n) for n in ("d_hidden", "d_weight", "d_bias")]


def _run(name, backend, inputs, scale=1.0):
    h, w, b, t, old, ref, adv = inputs
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    loss, metrics = LOSSES[name](*leaves, t, old, ref, adv, backend)
    (loss * scale).backward()
    return loss.detach(), [x.grad for x in leaves], metrics


@pytest.mark.parametrize("name", list(LOSSES))
def test_one_pass_equals_composed(name):
    inputs = _inputs(seed=len(name))
    loss1, grads1, m1 = _run(name, "triton", inputs, scale=2.5)
    loss2, grads2, m2 = _run(name, "torch", inputs, scale=2.5)
    d_loss, d_metrics, d_grads = _bounds(name, inputs)
    assert_within("loss", loss1, loss2, d_loss)
    for gname, a, b, limit in zip(("d_hidden", "d_weight", "d_bias"), grads1, grads2, d_grads):
        assert_within(gname, a, b, 2.5 * limit)      # the backward of loss * 2.5
    assert set(m1) == set(m2)
    for k in m2:
        assert_within(k, torch.as_tensor(float(m1[k])), torch.as_tensor(float(m2[k])),
                      d_metrics.get(k, 0.0))


def test_one_pass_under_no_grad_matches():
    h, w, b, t, old, ref, adv = _inputs(seed=3)
    with torch.no_grad():
        a, _ = grpo_loss(h, w, t, old, adv, bias=b, backend="triton")
    c, _ = grpo_loss(h, w, t, old, adv, bias=b, backend="torch")
    fn = lambda lp: Fn.grpo_loss(lp, old.double(), adv.double(), mask=t != -100)  # noqa: E731
    limit = sum(loss_rounding_bounds(fn, be, torch.float32, h, w, b, t).loss
                for be in ("triton", "torch"))
    assert_within("loss", a, c, limit)


def test_one_pass_prompt_rows_get_no_gradient():
    h, w, b, t, old, ref, adv = _inputs(seed=4)
    _, (dh, _, _), _ = _run("grpo_dapo_kl", "triton", (h, w, b, t, old, ref, adv))
    assert torch.all(dh[:, :3] == 0) and torch.all(dh[:, 3:].abs().sum(-1) > 0)
