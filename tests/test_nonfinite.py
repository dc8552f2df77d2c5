"""Non-finite inputs, empty batches and the dtype of log-prob data, for every loss and backend.

- NaN / inf are not checked on the hot path: they propagate, and every ``(loss, metrics)`` counts
  the active rows they reach in ``metrics["nonfinite_rows"]`` (exact counts, no tolerance).
- An empty batch (zero sequences, or every row ignored) gives finite metrics, a finite loss
  and zero gradients.
- anchor / reference / old log-probs must be float32 or float64 (16-bit: TypeError naming the
  argument); rewards and advantages of any float dtype are cast.

Small shapes: the Triton kernels run through the interpreter on CPU.
"""
import math

import pytest
import torch

import gift_fast as gf
import gift_fast.functional as Fn

V, H, G = 11, 8, 2
NAN, INF = float("nan"), float("inf")


def _triton_available() -> bool:
    try:
        import gift_fast.backends.triton_op  # noqa: F401
    except Exception:
        return False
    return True


BACKENDS = ["reference", "torch",
            pytest.param("triton", marks=pytest.mark.skipif(
                not _triton_available(), reason="gift_fast.backends.triton_op does not import"))]

# name -> (front-end call, takes a per-token anchor, the loss is 0 when no token is active)
LOSSES = {
    "gift": (lambda h, w, t, an, r, be: gf.gift_loss(h, w, t, an, r, group_size=G, backend=be),
             True, False),
    "gift_drop": (lambda h, w, t, an, r, be: gf.gift_loss(h, w, t, an, r, group_size=G, backend=be,
                                                          drop_uniform_groups=True), True, False),
    "grpo": (lambda h, w, t, an, r, be: gf.grpo_loss(h, w, t, an, gf.group_advantages(r, G),
                                                     kl_ref_logps=an, beta=0.04, backend=be),
             True, True),
    "grpo_seqmean": (lambda h, w, t, an, r, be: gf.grpo_loss(h, w, t, an, gf.group_advantages(r, G),
                                                             loss_type="grpo", backend=be),
                     True, True),
    "dpo": (lambda h, w, t, an, r, be: gf.dpo_loss(h, w, t, an, backend=be), True, False),
    "ipo": (lambda h, w, t, an, r, be: gf.ipo_loss(h, w, t, an, backend=be), True, False),
    "simpo": (lambda h, w, t, an, r, be: gf.simpo_loss(h, w, t, sft_weight=0.2, backend=be),
              False, False),
    "rpo": (lambda h, w, t, an, r, be: gf.rpo_loss(h, w, t, an, r, backend=be), True, False),
    "rpo_multi": (lambda h, w, t, an, r, be: gf.rpo_loss(h, w, t, an, r, group_size=4, backend=be),
                  True, False),
    "una": (lambda h, w, t, an, r, be: gf.una_loss(h, w, t, an, backend=be), True, False),
    "una_bce": (lambda h, w, t, an, r, be: gf.una_loss(h, w, t, an, kind="binary_bce", backend=be),
                True, False),
    "fdiv_js": (lambda h, w, t, an, r, be: gf.fdiv_sft_loss(h, w, t, an, divergence="js",
                                                            backend=be), True, True),
    "dft": (lambda h, w, t, an, r, be: gf.dft_loss(h, w, t, backend=be), False, True),
    "ift": (lambda h, w, t, an, r, be: gf.ift_loss(h, w, t, backend=be), False, True),
}

# dL/dlogp of a row depends on that row only
TOKEN_LOCAL = {"grpo", "grpo_seqmean", "fdiv_js", "dft"}


def _data(B=4, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 0] = targets[3, 2] = -100                   # a prompt token, a padding token
    with torch.no_grad():
        anchor = gf.linear_logprobs(hidden, weight + 0.1, targets, backend="reference")
    rewards = torch.randn(B, generator=g)
    return hidden, weight, targets, anchor, rewards


def _run(name, hidden, weight, targets, anchor, rewards, backend):
    front = LOSSES[name][0]
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, metrics = front(h, w, targets, anchor, rewards, backend)
    loss.backward()
    return loss.detach(), metrics, h.grad, w.grad


def _check_metric_tensors(metrics, device):
    for k, v in metrics.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, k
        assert v.dtype == torch.float32 and v.device == torch.device(device), k


# ------------------------------------------------------------------------- non-finite inputs

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_nan_in_hidden_is_counted_and_propagates(name, backend):
    hidden, weight, targets, anchor, rewards = _data()
    hidden[1, 1, 0] = NAN           # live rows: poisoned
    hidden[2, 0, 3] = NAN
    hidden[0, 0, 5] = NAN           # an ignored (prompt) row: no log-prob, not counted
    loss, m, gh, gw = _run(name, hidden, weight, targets, anchor, rewards, backend)
    _check_metric_tensors(m, "cpu")
    assert m["nonfinite_rows"].item() == 2
    assert math.isnan(loss.item())
    # a NaN row's dlogits reach every entry of dW (each row of dW sums over all live rows)
    assert torch.isnan(gw).all()
    # dX: the poisoned rows, and for a token-local loss only they (else their sequence, pair or
    # group too)
    bad = ~torch.isfinite(gh).all(-1)
    assert bad[1, 1] and bad[2, 0]
    if backend != "reference":      # it differentiates the ignored row's logits too
        assert not bad[0, 0]
        if name in TOKEN_LOCAL:
            assert int(bad.sum()) == 2


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("name", ["gift", "grpo", "dpo", "dft"])
def test_nan_in_an_ignored_row_reaches_nothing(name, backend):
    """Prompt / padding rows are skipped by the torch and triton backends (the reference backend,
    which differentiates materialised logits, lets such a NaN into dW: see docs/losses.md)."""
    hidden, weight, targets, anchor, rewards = _data()
    hidden[0, 0, 5] = NAN                                   # targets[0, 0] is ignored
    loss, m, gh, gw = _run(name, hidden, weight, targets, anchor, rewards, backend)
    assert m["nonfinite_rows"].item() == 0 and math.isfinite(loss.item())
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_inf_in_weight_is_counted(name, backend):
    hidden, weight, targets, anchor, rewards = _data()
    weight[4, 2] = INF
    # logit 4 of row n is +inf when hidden[n, 2] > 0 (then lse = +inf and the log-prob is -inf or
    # NaN) and -inf otherwise (exp gives 0: the row stays finite)
    want = int(((hidden[..., 2] > 0) & (targets != -100)).sum())
    assert 0 < want < int((targets != -100).sum())        # both cases occur in this batch
    _, m, _, _ = _run(name, hidden, weight, targets, anchor, rewards, backend)
    assert m["nonfinite_rows"].item() == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [n for n, spec in LOSSES.items() if spec[1]])
def test_nonfinite_anchor_is_counted(name, backend):
    hidden, weight, targets, anchor, rewards = _data()
    anchor = anchor.clone()
    anchor[1, 2] = NAN
    anchor[2, 1] = -INF             # e.g. a sampler's masked token
    anchor[3, 2] = NAN              # padding: ignored, not counted
    loss, m, _, _ = _run(name, hidden, weight, targets, anchor, rewards, backend)
    assert m["nonfinite_rows"].item() == 2
    assert not math.isfinite(loss.item())


@pytest.mark.parametrize("name", list(LOSSES))
def test_finite_batch_counts_zero_and_metric_names_agree_across_backends(name):
    data = _data(seed=3)
    names = None
    for backend in ["reference", "torch"] + (["triton"] if _triton_available() else []):
        loss, m, _, _ = _run(name, *data, backend)
        assert m["nonfinite_rows"].item() == 0
        assert math.isfinite(loss.item())
        names = names or set(m)
        assert set(m) == names, backend


def test_functional_counts_masked_rows_out():
    """Form (a): only active tokens count; per-token advantages are counted too."""
    B, T = 4, 3
    logps = -torch.rand(B, T) * 3
    old = logps.detach() - 0.1
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2] = False
    logps[0, 2] = NAN                                       # masked: not counted
    old[1, 0] = INF                                         # counted
    adv = torch.randn(B, T)
    adv[2, 1] = NAN                                         # per-token advantage: counted
    adv[0, 2] = NAN                                         # masked: not counted
    _, m = Fn.grpo_loss(logps.requires_grad_(), old, adv, mask=mask)
    assert m["nonfinite_rows"].item() == 2
    _, m = Fn.dft_loss(logps, mask=mask)
    assert m["nonfinite_rows"].item() == 0


# ------------------------------------------------------------------------------ empty batches

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_zero_sequences(name, backend):
    hidden, weight, targets, anchor, rewards = _data()
    loss, m, gh, gw = _run(name, hidden[:0], weight, targets[:0], anchor[:0], rewards[:0], backend)
    _check_metric_tensors(m, "cpu")
    assert loss.item() == 0
    for k, v in m.items():
        assert v.item() == 0, k
    assert gh.shape == (0, 3, H) and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_every_row_ignored(name, backend):
    """Sequences without a token: token-level losses are 0; sequence-level ones take their value
    at s = 0 (e.g. DPO's log 2), finite; no gradient reaches hidden or weight."""
    hidden, weight, targets, anchor, rewards = _data()
    targets = torch.full_like(targets, -100)
    anchor = torch.zeros_like(anchor)
    loss, m, gh, gw = _run(name, hidden, weight, targets, anchor, rewards, backend)
    _check_metric_tensors(m, "cpu")
    assert math.isfinite(loss.item())
    if LOSSES[name][2]:
        assert loss.item() == 0
    assert all(math.isfinite(v.item()) for v in m.values()), m
    assert m["nonfinite_rows"].item() == 0
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_rows", [0, 5])
def test_packed_sequences_without_tokens(backend, n_rows):
    """Packed layout, three sequences with no active token (one of length 0; no row at all when
    n_rows = 0): the fused GIFT and one-pass paths on triton, the composed ones elsewhere."""
    cu = torch.tensor([0, 0, 0, 0] if n_rows == 0 else [0, 2, 2, 5])
    targets = torch.full((n_rows,), -100)
    anchor, rewards = torch.zeros(n_rows), torch.tensor([0.3, -1.2, 0.5])
    calls = {
        "gift": lambda h, w: gf.gift_loss(h, w, targets, anchor, rewards, group_size=3,
                                          cu_seqlens=cu, backend=backend),
        "grpo": lambda h, w: gf.grpo_loss(h, w, targets, anchor, gf.group_advantages(rewards, 3),
                                          cu_seqlens=cu, backend=backend),
        "dft": lambda h, w: gf.dft_loss(h, w, targets, cu_seqlens=cu, backend=backend),
    }
    for name, call in calls.items():
        h = torch.randn(n_rows, H, requires_grad=True)
        w = torch.randn(V, H, requires_grad=True)
        loss, m = call(h, w)
        loss.backward()
        assert math.isfinite(loss.item()), name
        if name != "gift":
            assert loss.item() == 0, name
        assert all(math.isfinite(v.item()) for v in m.values()), (name, m)
        assert m["nonfinite_rows"].item() == 0
        assert torch.equal(w.grad, torch.zeros_like(w)), name


def test_functional_gift_and_ift_on_zero_sequences():
    """The epilogues themselves (form (a)): the means that used to divide by zero."""
    _, m = Fn.gift_loss(torch.zeros(0, 5, requires_grad=True), torch.zeros(0, 5), torch.zeros(0),
                        group_size=4)
    assert {k: v.item() for k, v in m.items() if k != "loss_groups"} == dict.fromkeys(
        ["adv_mean", "z_mean", "z_abs_mean", "implicit_std", "correlation", "uniform_reward_frac",
         "nonfinite_rows"], 0.0)
    loss, m = Fn.ift_loss(torch.zeros(0, 5, requires_grad=True))
    assert loss.item() == 0 and m["nll"].item() == 0 and m["weight_max"].item() == 0


# ---------------------------------------------------------------------------- dtype of the data

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [n for n, spec in LOSSES.items() if spec[1]])
def test_16bit_anchor_is_refused(name, backend, dtype):
    hidden, weight, targets, anchor, rewards = _data()
    arg = "anchor_logps"      # one name for the log-probs a ratio is taken against
    got = str(dtype).replace("torch.", "")
    with pytest.raises(TypeError, match=rf"^{arg}: expected float32 \(or float64\) log-probs, "
                                        rf"got {got};"):
        _run(name, hidden, weight, targets, anchor.to(dtype), rewards, backend)


def test_16bit_reference_of_grpo_is_refused():
    hidden, weight, targets, anchor, rewards = _data()
    with pytest.raises(TypeError, match="^kl_ref_logps: expected float32"):
        gf.grpo_loss(hidden, weight, targets, anchor, gf.group_advantages(rewards, G),
                     kl_ref_logps=anchor.bfloat16(), beta=0.04)
    with pytest.raises(TypeError, match="^anchor_logps: expected float32"):
        Fn.gift_loss(anchor.clone(), anchor.half(), rewards, group_size=G)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_anchor_and_16bit_rewards_are_accepted(backend):
    hidden, weight, targets, anchor, rewards = _data(seed=5)
    base, _, _, _ = _run("gift", hidden, weight, targets, anchor, rewards.bfloat16().float(),
                         backend)
    got, _, _, _ = _run("gift", hidden, weight, targets, anchor.double(), rewards.bfloat16(),
                        backend)
    # Same values; only the accumulation precision of s may differ (float64 with a float64 anchor
    # on the composed path): s sums <= 3 tokens of |logp - anchor| < 10, float32 rounding
    # 3 * 10 * 6e-8 ~ 2e-6 on s, / (std of s, > 0.05 here) -> 4e-5 on z, times |A - z| < 4 on
    # the squared error: < 3e-4 on the loss.
    torch.testing.assert_close(got.float(), base, rtol=0, atol=3e-4)
    adv = gf.group_advantages(rewards.half(), G)           # cast: same as the float32 path
    torch.testing.assert_close(adv, gf.group_advantages(rewards.half().float(), G))
