"""nn.Module wrappers: same values and gradients as the fused front-ends (bit for bit on the same
backend), weight given as a tensor or an nn.Linear, unknown options rejected."""
import pytest
import torch

import gift_fast as gf

V, H, B, T = 23, 8, 6, 5


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(H, V, bias=True)
    h = torch.randn(B, T, H, generator=g)
    t = torch.randint(0, V, (B, T), generator=g)
    t[:, :2] = -100
    with torch.no_grad():
        an = gf.linear_logprobs(h, lin.weight * 0.9, t, backend="torch")
    r = torch.randn(B, generator=g)
    return lin, h, t, an, r


CASES = [
    (gf.GIFTLoss, dict(group_size=3), gf.gift_loss, ("an", "r")),
    (gf.GRPOLoss, dict(beta=0.04, loss_type="bnpo"), gf.grpo_loss, ("an", "r")),
    (gf.DPOLoss, dict(beta=0.2), gf.dpo_loss, ("an",)),
    (gf.IPOLoss, dict(), gf.ipo_loss, ("an",)),
    (gf.SimPOLoss, dict(sft_weight=0.1), gf.simpo_loss, ()),
    (gf.RPOLoss, dict(kind="fwd_kl"), gf.rpo_loss, ("an", "r")),
    (gf.UNALoss, dict(kind="binary_mse"), gf.una_loss, ("an",)),
    (gf.FDivSFTLoss, dict(divergence="hellinger"), gf.fdiv_sft_loss, ("an",)),
    (gf.DFTLoss, dict(), gf.dft_loss, ()),
    (gf.IFTLoss, dict(gamma=0.9), gf.ift_loss, ()),
]


@pytest.mark.parametrize("cls,opts,fn,data", CASES, ids=[c[0].__name__ for c in CASES])
def test_module_equals_front_end(batch, cls, opts, fn, data):
    lin, h, t, an, r = batch
    vals = {"an": an, "r": r}
    args = [vals[k] for k in data]
    extra = {"kl_ref_logps": an} if cls is gf.GRPOLoss else {}
    mod = cls(backend="torch", **opts)
    h1 = h.clone().requires_grad_(True)
    loss_m, met_m = mod(h1, lin, t, *args, **extra)
    loss_m.backward()
    gw_m, gb_m = lin.weight.grad.clone(), lin.bias.grad.clone()
    lin.zero_grad()
    h2 = h.clone().requires_grad_(True)
    loss_f, met_f = fn(h2, lin.weight, t, *args, bias=lin.bias, backend="torch", **opts, **extra)
    loss_f.backward()
    assert torch.equal(loss_m, loss_f)
    assert torch.equal(h1.grad, h2.grad)
    assert torch.equal(gw_m, lin.weight.grad) and torch.equal(gb_m, lin.bias.grad)
    assert met_m.keys() == met_f.keys()
    # weight as a plain tensor (no bias)
    loss_w, _ = mod(h, lin.weight.detach(), t, *args, **extra)
    loss_w2, _ = fn(h, lin.weight.detach(), t, *args, backend="torch", **opts, **extra)
    assert torch.equal(loss_w, loss_w2)


def test_module_rejects_unknown_options():
    with pytest.raises(TypeError, match="unknown option"):
        gf.GIFTLoss(group_sise=4)
    with pytest.raises(TypeError, match="lm_head"):
        gf.DFTLoss(backend="torch")(torch.zeros(1, 2, H), "weight", torch.zeros(1, 2, dtype=torch.long))
    assert "group_size=4" in repr(gf.GIFTLoss(group_size=4))
