"""linear_logprobs on every backend against a float64 oracle, plus invariance, memory and errors.

The oracle is ``backend="reference"`` with ``reference_dtype=float64`` applied to the same
(already rounded) inputs: materialised logits, torch.log_softmax, autograd for the gradients.
On CPU the triton backend runs through TRITON_INTERPRET=1 (set in conftest), so shapes stay small;
bfloat16 runs on both (the interpreter's bf16 tl.dot is fixed in tests/conftest.py)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gift_fast import linear_logprobs
from helpers import LargestAllocation, assert_within, backend_rounding_bounds

HAS_CUDA = torch.cuda.is_available()

# (N, H, V, bias, temperature, softcap, ignored fraction). Interpreter tiles are 16 x 32 x 16
# and vocabulary slices 64 wide, so these cover partial tiles, several slices, V < one tile.
CASES = {
    "odd": (37, 40, 100, False, 1.0, None, 0.2),
    "bias_temp_softcap": (29, 24, 75, True, 0.7, 3.0, 0.3),
    "n1": (1, 19, 53, True, 1.0, None, 0.0),
    "v_below_tile": (6, 17, 7, False, 1.3, None, 0.0),
    "all_ignored": (5, 16, 33, True, 1.0, None, 1.0),
}
# Results are checked elementwise against rounding bounds derived from the magnitudes of the
# inputs (tests/helpers.py: backend_rounding_bounds), not against a per-dtype tolerance.


def make_inputs(N, H, V, dtype, bias, ignored, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.25).to(device, dtype)
    b = torch.randn(V, generator=g).to(device, dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignored] = -100
    return hidden, weight, b, targets.to(device)


def run_with_grads(hidden, weight, bias, targets, upstream, backend, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    h, w = leaves[:2]
    b = leaves[2] if bias is not None else None
    logp, ent, argmax = linear_logprobs(h, w, targets, b, return_entropy=True, return_argmax=True,
                                        backend=backend, reference_dtype=torch.float64, **kw)
    g_logp, g_ent = (u.to(logp.dtype) for u in upstream)
    grads = torch.autograd.grad((logp * g_logp).sum() + (ent * g_ent).sum(), leaves,
                                allow_unused=True)
    return logp, ent, argmax, grads, leaves


def assert_close(name, actual, expected, tol):
    expected = expected.double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol:.1g} x {scale:.3g}"


def check_against_reference(backend, dtype, case, seed=0, device="cpu"):
    N, H, V, bias, temperature, softcap, ignored = CASES[case]
    hidden, weight, b, targets = make_inputs(N, H, V, dtype, bias, ignored, seed, device)
    upstream = (torch.randn(N, device=device), torch.randn(N, device=device))
    kw = dict(temperature=temperature, softcap=softcap)
    ref = run_with_grads(hidden, weight, b, targets, upstream, "reference", **kw)
    out = run_with_grads(hidden, weight, b, targets, upstream, backend, **kw)
    bound = backend_rounding_bounds(backend, dtype, hidden, weight, b, targets, *upstream, **kw)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert_within("logp", out[0], ref[0], bound.logp)
    assert_within("entropy", out[1], ref[1], bound.entropy)
    active = targets != -100
    assert torch.all(out[0][~active] == 0) and torch.all(out[1][~active] == 0)
    if dtype == torch.float32 or backend == "triton":
        # rows whose top two logits are further apart than twice the rounding bound have the
        # same argmax on any CPU (the others may legitimately differ); the kernels form 16-bit
        # logits from exact products in float32 like float32 ones (the torch backend's 16-bit
        # logits are rounded to 16 bits, hence not checked here)
        z = hidden.cpu().double() @ weight.cpu().double().T
        z = z + (b.cpu().double() if b is not None else 0.0)
        z = (softcap * torch.tanh(z / softcap) if softcap else z) / temperature
        top2 = z.topk(2, -1).values
        clear = top2[:, 0] - top2[:, 1] > 2 * bound.max_logit
        assert torch.equal(out[2].cpu()[clear], ref[2].cpu()[clear]), \
            "argmax differs from the float64 reference"
    for name, g_out, g_ref, leaf in zip(("d_hidden", "d_weight", "d_bias"), out[3], ref[3], out[4]):
        assert g_out.dtype == leaf.dtype, f"{name} came back in {g_out.dtype}, not {leaf.dtype}"
        assert_within(name, g_out, g_ref, getattr(bound, name))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_float64_reference(backend, dtype, case):
    check_against_reference(backend, dtype, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["odd", "bias_temp_softcap", "v_below_tile"])
def test_triton_row_stats_match_float64(case, dtype):
    """The triton backend's protocol ``stats`` (forward kernel + combine): lse, target logit, max
    logit, entropy and argmax of every row against float64 on the same rounded inputs, within
    the bounds of backend_rounding_bounds (exact products, float32 accumulation)."""
    from gift_fast.backends import triton_op
    from gift_fast.backends.protocol import local_targets
    N, H, V, bias, temperature, softcap, ignored = CASES[case]
    hidden, weight, b, targets = make_inputs(N, H, V, dtype, bias, ignored, seed=5)
    active = targets != -100
    st = triton_op.stats(hidden, weight, b, local_targets(targets, active), temperature, softcap,
                         want_entropy=True, want_argmax=True)
    z = hidden.double() @ weight.double().T + (b.double() if b is not None else 0.0)
    z = (softcap * torch.tanh(z / softcap) if softcap else z) / temperature
    lse = torch.logsumexp(z, 1)
    p = torch.softmax(z, 1)
    # every row's statistics are computed (ignored rows only lose their target logit)
    bound = backend_rounding_bounds("triton", dtype, hidden, weight, b, targets.clamp_min(0),
                                    temperature=temperature, softcap=softcap)
    assert_within("lse", st.lse, lse, bound.lse)
    assert_within("max_logit", st.max_logit, z.max(1).values, bound.max_logit)
    assert_within("entropy", st.entropy, lse - (p * z).sum(1), bound.entropy)
    z_t = z.gather(1, targets.clamp_min(0)[:, None])[:, 0]
    assert_within("target_logit", st.target_logit[active], z_t[active], bound.target_logit[active])
    assert torch.all(st.target_logit[~active] == 0)
    top2 = z.topk(min(2, V), -1).values
    clear = top2[:, 0] - top2[:, -1] > 2 * bound.max_logit if V > 1 else torch.ones(N, dtype=bool)
    assert torch.equal(st.argmax[clear], z.argmax(1)[clear])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logprobs_are_normalised(backend):
    """Summing exp(logp) over every possible target of one row gives 1."""
    H, V = 16, 45
    hidden, weight, _, _ = make_inputs(1, H, V, torch.float32, False, 0.0, seed=3)
    logp = linear_logprobs(hidden.expand(V, H), weight, torch.arange(V), backend=backend)
    # sum_v e^(logp_v + d_v) - 1 = sum_v p_v (e^d_v - 1), |d_v| <= the log-prob's rounding bound
    bound = backend_rounding_bounds(backend, torch.float32, hidden.expand(V, H), weight, None,
                                    torch.arange(V)).logp
    p = torch.softmax(hidden.double() @ weight.double().T, -1)[0]
    assert abs(logp.double().exp().sum().item() - 1.0) <= (p * torch.expm1(bound)).sum().item()
    assert torch.all(logp <= 0)


def test_torch_backend_gradcheck_float64():
    hidden, weight, b, targets = make_inputs(6, 5, 11, torch.float64, True, 0.2, seed=1)
    hidden.requires_grad_(); weight.requires_grad_(); b.requires_grad_()

    def f(h, w, bb):
        return linear_logprobs(h, w, targets, bb, temperature=0.8, softcap=2.5,
                               return_entropy=True, backend="torch")

    assert torch.autograd.gradcheck(f, (hidden, weight, b))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_leading_shape_and_noncontiguous_inputs(backend):
    B, T, H, V = 3, 5, 24, 70
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(T, B, H, generator=g).transpose(0, 1)          # [B, T, H], non-contiguous
    weight = torch.randn(H, V, generator=g).T                            # [V, H], non-contiguous
    targets = torch.randint(0, V, (T, B), generator=g).T
    out = linear_logprobs(hidden, weight, targets, backend=backend)
    ref = linear_logprobs(hidden.contiguous(), weight.contiguous(), targets.contiguous(),
                          backend="reference", reference_dtype=torch.float64)
    assert out.shape == (B, T)
    bound = backend_rounding_bounds(backend, torch.float32, hidden, weight, None, targets)
    assert_within("logp", out.reshape(-1), ref.reshape(-1), bound.logp)


def test_triton_batch_invariance_bitwise():
    """A row's log-prob and entropy do not depend on the batch size or on the other rows.

    The interpreter's numpy dot may round a row differently at another position inside a tile,
    so here rows keep their position modulo the 16-row tile; the GPU test uses any offset.
    """
    H, V = 24, 150
    hidden, weight, _, targets = make_inputs(64, H, V, torch.float32, False, 0.1, seed=7)
    full = linear_logprobs(hidden, weight, targets, return_entropy=True, return_argmax=True,
                           backend="triton")
    g = torch.Generator().manual_seed(8)
    for start, n in [(16, 1), (16, 9), (32, 17), (0, 64)]:
        other = torch.randn(64, H, generator=g)
        other[start:start + n] = hidden[start:start + n]
        stop = min(64, start + n + 5)
        sub = linear_logprobs(other[:stop], weight, targets[:stop], return_entropy=True,
                              return_argmax=True, backend="triton")
        for a, b in zip(sub, full):
            assert torch.equal(a[start:start + n], b[start:start + n])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_anchor_and_policy_passes_bitwise_equal(backend):
    """GIFT's first step after a rollout: the no-grad anchor pass and the grad pass over the same
    batch must give the same bits (then s_i is exactly 0). The torch backend promises only this;
    across batch compositions CPU BLAS picks kernels by shape, so cross-batch bitwise invariance
    is a triton-backend property (tested above and on the GPU)."""
    hidden, weight, _, targets = make_inputs(40, 24, 150, torch.float32, False, 0.1, seed=9)
    with torch.no_grad():
        anchor = linear_logprobs(hidden, weight, targets, backend=backend)
    policy = linear_logprobs(hidden.requires_grad_(), weight, targets, backend=backend)
    assert torch.equal((policy - anchor).detach(), torch.zeros_like(anchor))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_grad_saves_nothing_and_matches(backend):
    hidden, weight, _, targets = make_inputs(9, 16, 40, torch.float32, False, 0.2, seed=2)
    hidden.requires_grad_()
    with torch.no_grad():
        out = linear_logprobs(hidden, weight, targets, backend=backend)
    assert out.grad_fn is None and not out.requires_grad
    assert torch.equal(out, linear_logprobs(hidden, weight, targets, backend=backend).detach())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_upstream_rows_get_zero_gradient(backend):
    hidden, weight, _, targets = make_inputs(20, 16, 40, torch.float32, False, 0.0, seed=4)
    hidden.requires_grad_()
    upstream = torch.zeros(20)
    upstream[3] = 1.0
    (linear_logprobs(hidden, weight, targets, backend=backend) * upstream).sum().backward()
    rows = hidden.grad.abs().sum(1) != 0
    assert rows.tolist() == [i == 3 for i in range(20)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_n_by_v_tensor_is_allocated(backend, monkeypatch):
    """With chunk budgets below N x V, no tensor of N x V elements appears, forward or backward."""
    import gift_fast.backends.torch_chunked as tc
    from gift_fast.backends import plan
    N, H, V = 48, 16, 96
    monkeypatch.setattr(tc, "CHUNK_ELEMENTS", 16 * V)
    # A budget of one 16 x V float32 buffer (+ the per-row vectors): every row live, float32,
    # the backward's dX / dW sums are the gradients themselves; the torch backend also counts
    # its float32 copies of a block of X and of its dX (torch_chunked.budget_chunk_elements).
    monkeypatch.setattr(plan, "_process_budget", 16 * V * 4 + N * plan.PER_ROW_BYTES
                        + (2 * N * H * 4 if backend == "torch" else 0))
    hidden, weight, _, targets = make_inputs(N, H, V, torch.float32, False, 0.0, seed=6)
    hidden.requires_grad_(); weight.requires_grad_()
    with LargestAllocation() as spy:
        logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
        (logp.sum() + ent.sum()).backward()
    assert spy.largest <= 16 * V + V * H, f"largest tensor had {spy.largest} elements (N*V={N * V})"


def test_torch_backend_peak_memory_at_8192_x_131072():
    """Peak RSS of forward+backward stays far below the 4 GiB a materialised N x V would take."""
    script = textwrap.dedent("""
        import resource, torch
        from gift_fast import linear_logprobs
        torch.manual_seed(0)
        N, H, V = 8192, 32, 131072
        hidden = torch.randn(N, H, requires_grad=True)
        weight = (torch.randn(V, H) * 0.1).requires_grad_()
        targets = torch.randint(0, V, (N,))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        logp = linear_logprobs(hidden, weight, targets, backend="torch")
        logp.sum().backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) * 1024)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.strip().splitlines()[-1])
    materialised = 8192 * 131072 * 4
    assert extra < materialised / 8, f"extra peak {extra / 2**20:.0f} MiB"


def _far_rows(n_rows, width, dtype, seed):
    """A [n_rows, width] view whose last rows sit past element 2**31 of a lazily-allocated buffer
    (untouched pages cost no RAM): int32 offset arithmetic in a kernel would wrap around."""
    stride = (1 << 31) // (n_rows - 1) + 1
    storage = torch.empty(stride * (n_rows - 1) + width, dtype=dtype)
    view = storage.as_strided((n_rows, width), (stride, 1))
    view.copy_(torch.randn(n_rows, width, generator=torch.Generator().manual_seed(seed)) / 4)
    return view


def test_triton_offsets_past_2_pow_31():
    H = 16
    hidden = _far_rows(3, H, torch.float16, seed=1)
    weight = _far_rows(40, H, torch.float16, seed=2)
    targets = torch.tensor([0, 21, 39])
    hidden.requires_grad_()
    weight_leaf = weight.detach().clone()
    logp = linear_logprobs(hidden, weight, targets, backend="triton")
    ref = linear_logprobs(hidden.detach().contiguous(), weight_leaf, targets, backend="reference",
                          reference_dtype=torch.float64)
    bound = backend_rounding_bounds("triton", torch.float16, hidden.detach(), weight_leaf, None,
                                    targets, torch.ones(3))
    assert_within("logp", logp, ref, bound.logp)
    logp.sum().backward()
    h_ref = hidden.detach().contiguous().requires_grad_()
    linear_logprobs(h_ref, weight_leaf, targets, backend="reference",
                    reference_dtype=torch.float64).sum().backward()
    assert_within("d_hidden", hidden.grad, h_ref.grad, bound.d_hidden)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error that names the argument.

def _ok():
    return make_inputs(4, 8, 10, torch.float32, True, 0.0, seed=0)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda h, w, b, t: (h[:, :7], w, b, t), ValueError, "weight"),
    (lambda h, w, b, t: (h, w, b[:9], t), ValueError, "bias"),
    (lambda h, w, b, t: (h, w.half(), b, t), TypeError, "weight"),
    (lambda h, w, b, t: (h.long(), w, b, t), TypeError, "hidden"),
    (lambda h, w, b, t: (h, w, b, t.float()), TypeError, "targets"),
    (lambda h, w, b, t: (h, w[None], b, t), ValueError, "weight"),
    (lambda h, w, b, t: (h, w, b, t[:3]), ValueError, "targets"),
    (lambda h, w, b, t: (h, w, b, torch.tensor([0, 1, 10, -100])), ValueError, r"targets.*\[0, 10\)"),
    (lambda h, w, b, t: (h, w, b, torch.tensor([0, 1, -1, 2])), ValueError, "targets"),
    (lambda h, w, b, t: (h, w.to("meta"), b, t), ValueError, "device"),
])
def test_bad_input_names_the_argument(mutate, exc, match):
    h, w, b, t = mutate(*_ok())
    with pytest.raises(exc, match=match):
        linear_logprobs(h, w, t, b, backend="torch")


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(softcap=0.0), "softcap"), (dict(backend="cuda"), "backend"),
])
def test_bad_options(kw, match):
    h, w, b, t = _ok()
    with pytest.raises(ValueError, match=match):
        linear_logprobs(h, w, t, b, **kw)


def test_triton_rejects_float64():
    h, w, b, t = make_inputs(4, 8, 10, torch.float64, False, 0.0, seed=0)
    with pytest.raises(TypeError, match="float64"):
        linear_logprobs(h, w, t, backend="triton")


# ---------------------------------------------------------------------------------------------
# GPU: the triton backend for real, bfloat16 and large shapes.

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_triton_matches_reference(dtype, case):
    check_against_reference("triton", dtype, case, device="cuda")


@pytest.mark.gpu
def test_gpu_triton_large_vocab_vs_torch_backend():
    N, H, V = 1000, 1024, 151936
    hidden, weight, _, targets = make_inputs(N, H, V, torch.bfloat16, False, 0.3, seed=11,
                                             device="cuda")
    upstream = (torch.randn(N, device="cuda"), torch.randn(N, device="cuda"))
    ref = run_with_grads(hidden, weight, None, targets, upstream, "reference")
    out = run_with_grads(hidden, weight, None, targets, upstream, "triton")
    assert_close("logp", out[0], ref[0], 1e-4)
    assert_close("entropy", out[1], ref[1], 1e-4)
    assert_close("d_hidden", out[3][0], ref[3][0], 2e-2)
    assert_close("d_weight", out[3][1], ref[3][1], 2e-2)


@pytest.mark.gpu
def test_gpu_triton_batch_invariance_any_offset():
    H, V = 512, 50000
    hidden, weight, _, targets = make_inputs(300, H, V, torch.bfloat16, False, 0.1, seed=12,
                                             device="cuda")
    full = linear_logprobs(hidden, weight, targets, return_entropy=True, backend="triton")
    for start, n in [(0, 1), (7, 1), (13, 77), (101, 199)]:
        sub = linear_logprobs(hidden[start:start + n].clone(), weight, targets[start:start + n],
                              return_entropy=True, backend="triton")
        for a, b in zip(sub, full):
            assert torch.equal(a, b[start:start + n])


@pytest.mark.gpu
def test_gpu_offsets_past_2_pow_31():
    """V x H = 256000 x 8448 > 2**31 elements."""
    N, H, V = 64, 8448, 256000
    hidden, weight, _, targets = make_inputs(N, H, V, torch.bfloat16, False, 0.0, seed=13,
                                             device="cuda")
    targets[-1] = V - 1
    ref = linear_logprobs(hidden, weight, targets, backend="torch")
    out = linear_logprobs(hidden, weight, targets, backend="triton")
    assert_close("logp", out, ref, 5e-2)
