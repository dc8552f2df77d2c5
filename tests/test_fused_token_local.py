"""One-pass token-local losses on the triton backend (gradients computed in the forward) against
the composed path on the torch backend: same loss, metrics and gradients; backward scales by
grad_output; under no_grad the composed path runs. Interpreter shapes; float32; tolerance 2e-5
of the largest entry."""
import pytest
import torch

from gift_fast import dft_loss, fdiv_sft_loss, grpo_loss


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
        h, w, t, old, adv, ref_logps=ref, beta=0.04, bias=b, backend=be),
    "grpo_grpo": lambda h, w, b, t, old, ref, adv, be: grpo_loss(
        h, w, t, old, adv, loss_type="grpo", bias=b, temperature=0.8, backend=be),
    "fdiv_js": lambda h, w, b, t, old, ref, adv, be: fdiv_sft_loss(
        h, w, t, ref, divergence="js", bias=b, backend=be),
    "fdiv_tv": lambda h, w, b, t, old, ref, adv, be: fdiv_sft_loss(h, w, t, bias=b, backend=be),
    "dft": lambda h, w, b, t, old, ref, adv, be: dft_loss(h, w, t, bias=b, backend=be),
}


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
    assert abs(loss1 - loss2) <= 2e-5 * max(1.0, abs(loss2.item()))
    for a, b in zip(grads1, grads2):
        assert (a - b).abs().max() <= 2e-5 * max(1.0, b.abs().max().item())
    assert set(m1) == set(m2)
    for k in m2:
        assert abs(float(m1[k]) - float(m2[k])) <= 2e-5, k


def test_one_pass_under_no_grad_matches():
    h, w, b, t, old, ref, adv = _inputs(seed=3)
    with torch.no_grad():
        a, _ = grpo_loss(h, w, t, old, adv, bias=b, backend="triton")
    c, _ = grpo_loss(h, w, t, old, adv, bias=b, backend="torch")
    assert abs(a - c) <= 2e-5 * max(1.0, abs(c.item()))


def test_one_pass_prompt_rows_get_no_gradient():
    h, w, b, t, old, ref, adv = _inputs(seed=4)
    _, (dh, _, _), _ = _run("grpo_dapo_kl", "triton", (h, w, b, t, old, ref, adv))
    assert torch.all(dh[:, :3] == 0) and torch.all(dh[:, 3:].abs().sum(-1) > 0)
