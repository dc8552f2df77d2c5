"""One argument vocabulary across the losses (gift_fast/losses/common.py): the names, the
reductions against each loss's declared mean (its LossSpec, which data-parallel training reads),
packed input everywhere, and the deprecated names of the previous release."""
import inspect
import warnings

import pytest
import torch

import gift_fast as gf
import gift_fast.functional as Fn
from gift_fast.losses import BY_NAME, SPECS
from helpers import assert_within

F64 = torch.float64
U64 = 2.0 ** -53
B, T = 6, 5
DATA_NAMES = {"logps", "anchor_logps", "kl_ref_logps", "rewards", "advantages", "hidden",
              "weight", "targets"}


def _batch(seed=0, responses=False):
    """``responses``: each row's active tokens are a prefix (a response then padding), as
    packing assumes: IFT's discount counts positions, so a hole in a padded row is a distance."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.25
    if responses:
        mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B, 1), generator=g)
    mask[:, 0] = True                                     # no empty sequence: packed == padded
    lp = torch.where(mask, -torch.rand(B, T, generator=g, dtype=F64) * 3, 0.0)
    an = torch.where(mask, lp + 0.3 * torch.randn(B, T, generator=g, dtype=F64), 0.0)
    r = torch.rand(B, generator=g, dtype=F64)
    return lp.requires_grad_(True), an, r, mask


# Each loss's data on a [6, 5] batch (groups of 3 where a loss groups), options that make every
# term non-trivial.
CALLS = {
    "gift": lambda lp, an, r, **k: Fn.gift_loss(lp, an, r, group_size=3, **k),
    "grpo": lambda lp, an, r, **k: Fn.grpo_loss(lp, an, r - 0.5, kl_ref_logps=an * 1.1, beta=0.1,
                                                **k),
    "kl": lambda lp, an, r, **k: Fn.kl_loss(lp, an, **k),
    "dpo": lambda lp, an, r, **k: Fn.dpo_loss(lp, an, length_norm=0.5, **k),
    "ipo": lambda lp, an, r, **k: Fn.ipo_loss(lp, an, **k),
    "simpo": lambda lp, an, r, **k: Fn.simpo_loss(lp, **k),
    "rpo": lambda lp, an, r, **k: Fn.rpo_loss(lp, an, r, group_size=3, **k),
    "una": lambda lp, an, r, **k: Fn.una_loss(lp, an, kind="score_mse", scores=r, **k),
    "fdiv_sft": lambda lp, an, r, **k: Fn.fdiv_sft_loss(lp, an, divergence="js", **k),
    "dft": lambda lp, an, r, **k: Fn.dft_loss(lp, **k),
    "ift": lambda lp, an, r, **k: Fn.ift_loss(lp, **k),
}
OPTIONS = {"una": {"kind": "score_mse"}}


def test_every_loss_is_covered_here():
    assert set(CALLS) == set(BY_NAME)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_names_are_the_vocabulary(spec):
    for fn in (spec.from_logps, spec.fused):
        params = inspect.signature(fn).parameters
        assert "reduction" in params and params["reduction"].default == "mean"
        assert not {"ref_logps", "old_logps", "length_normalized"} & set(params)
        if "length_norm" in params:
            assert isinstance(params["length_norm"].default, float)
        if spec.fused is fn:
            assert "cu_seqlens" in params and params["cu_seqlens"].kind == params["cu_seqlens"].KEYWORD_ONLY
        positional = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
        assert set(positional) <= DATA_NAMES, positional
    forward = inspect.signature(spec.module.forward).parameters
    assert list(forward)[:4] == ["self", "hidden", "lm_head", "targets"]


@pytest.mark.parametrize("name", list(CALLS))
def test_reductions_agree_with_the_declared_mean(name):
    lp, an, r, mask = _batch()
    mean, _ = CALLS[name](lp, an, r, mask=mask)
    total, _ = CALLS[name](lp, an, r, mask=mask, reduction="sum")
    each, _ = CALLS[name](lp, an, r, mask=mask, reduction="none")
    count = BY_NAME[name].count(mask.reshape(-1), B, group_size=3, **OPTIONS.get(name, {}))
    # Float64 sums of at most B * T terms in different orders: gamma_(B*T) of the absolute sum.
    bound = 2 * B * T * U64 * each.abs().sum().detach()
    if name != "grpo":           # GRPO's "none" is per token, its dapo mean a token mean too
        assert_within("sum of none", each.sum().detach(), total.detach(), bound)
    assert_within("mean * count", (mean * count).detach(), total.detach(), bound * count)


def test_grpo_sum_is_the_numerator_of_every_loss_type():
    lp, an, r, mask = _batch(1)
    for loss_type, denom in (("grpo", B), ("bnpo", int(mask.sum())), ("dapo", int(mask.sum())),
                             ("dr_grpo", B * T)):
        mean, _ = Fn.grpo_loss(lp, an, r - 0.5, mask=mask, loss_type=loss_type)
        total, _ = Fn.grpo_loss(lp, an, r - 0.5, mask=mask, loss_type=loss_type, reduction="sum")
        assert_within(loss_type, (mean * denom).detach(), total.detach(),
                      4 * B * T * U64 * total.abs().detach())


@pytest.mark.parametrize("name", list(CALLS))
def test_packed_input_equals_padded(name):
    lp, an, r, mask = _batch(2, responses=True)
    padded, _ = CALLS[name](lp, an, r, mask=mask)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])
    if name == "grpo":      # dr_grpo aside, no loss type reads the padded length
        packed, _ = Fn.grpo_loss(lp[mask], an[mask], r - 0.5, cu_seqlens=cu,
                                 kl_ref_logps=an[mask] * 1.1, beta=0.1)
    else:
        packed, _ = CALLS[name](lp[mask], an[mask], r, cu_seqlens=cu)
    # Same terms, summed per sequence in a different layout: gamma_(B*T) of the absolute value.
    assert_within("packed", packed.detach(), padded.detach(),
                  4 * B * T * U64 * padded.abs().detach() + 1e-300)


def test_ift_front_end_takes_packed_input():
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(2, 4, 8, generator=g), torch.randn(11, 8, generator=g)
    targets = torch.randint(0, 11, (2, 4), generator=g)
    targets[1, 3] = -100
    keep = targets != -100
    cu = torch.tensor([0, 4, 7])
    padded, _ = gf.ift_loss(hidden, weight, targets, backend="reference")
    packed, _ = gf.ift_loss(hidden[keep], weight, targets[keep], cu_seqlens=cu, backend="reference")
    # Each row's log-prob is computed alike in both layouts; the float32 sums over a sequence
    # (<= 4 terms) and over sequences (2) differ in order: well inside gamma_8 twice, relative.
    torch.testing.assert_close(packed, padded, rtol=2 * 8 * 2.0 ** -24, atol=0)


OLD_NAMES = [  # (call with the old name, call with the new one)
    (lambda lp, an, r: Fn.dpo_loss(lp, ref_logps=an), lambda lp, an, r: Fn.dpo_loss(lp, anchor_logps=an)),
    (lambda lp, an, r: Fn.ipo_loss(lp, ref_logps=an, length_normalized=False),
     lambda lp, an, r: Fn.ipo_loss(lp, anchor_logps=an, length_norm=0.0)),
    (lambda lp, an, r: Fn.rpo_loss(lp, ref_logps=an, rewards=r),
     lambda lp, an, r: Fn.rpo_loss(lp, anchor_logps=an, rewards=r)),
    (lambda lp, an, r: Fn.una_loss(lp, ref_logps=an), lambda lp, an, r: Fn.una_loss(lp, an)),
    (lambda lp, an, r: Fn.fdiv_sft_loss(lp, ref_logps=an, divergence="kl"),
     lambda lp, an, r: Fn.fdiv_sft_loss(lp, an, divergence="kl")),
    (lambda lp, an, r: Fn.grpo_loss(lp, old_logps=an, advantages=r, ref_logps=an, beta=0.1),
     lambda lp, an, r: Fn.grpo_loss(lp, an, r, kl_ref_logps=an, beta=0.1)),
]


@pytest.mark.parametrize("old,new", OLD_NAMES, ids=range(len(OLD_NAMES)))
def test_old_names_warn_and_mean_the_same(old, new):
    lp, an, r, mask = _batch(3)
    with pytest.warns(DeprecationWarning, match="is deprecated, use"):
        a, _ = old(lp, an, r)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        b, _ = new(lp, an, r)
    assert torch.equal(a, b)


def test_old_names_on_front_ends_and_modules():
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(4, 3, 8, generator=g), torch.randn(11, 8, generator=g)
    targets = torch.randint(0, 11, (4, 3), generator=g)
    with torch.no_grad():
        an = gf.linear_logprobs(hidden, weight * 0.9, targets, backend="torch")
    with pytest.warns(DeprecationWarning, match="'ref_logps' is deprecated, use 'anchor_logps'"):
        a, _ = gf.dpo_loss(hidden, weight, targets, ref_logps=an, backend="torch")
    assert torch.equal(a, gf.dpo_loss(hidden, weight, targets, an, backend="torch")[0])
    with pytest.warns(DeprecationWarning, match="'length_normalized' is deprecated"):
        b, _ = gf.IPOLoss(length_normalized=False, backend="torch")(hidden, weight, targets, an)
    assert torch.equal(b, gf.ipo_loss(hidden, weight, targets, an, length_norm=0.0,
                                      backend="torch")[0])
    with pytest.raises(TypeError, match="got both 'ref_logps' \\(deprecated\\) and 'anchor_logps'"):
        gf.dpo_loss(hidden, weight, targets, anchor_logps=an, ref_logps=an)
