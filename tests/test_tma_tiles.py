"""The sm_90 / sm_100 16-bit path of the forward and dlogits kernels (TMA descriptors, 128-row tiles
with K step 64, grouped tile order on a 1-D grid), run through TRITON_INTERPRET=1 on CPU
tensors with the Hopper / Blackwell configs forced by ``override_target``, checked against the
float64 oracle (test_linear_logprobs.check_against_reference: elementwise bounds derived from the
inputs' magnitudes, tests/helpers.py). The interpreter runs the descriptors (zero-filled out of
bounds like the hardware's TMA); whether the GPU code uses them is the compile check's evidence
(tests/test_compile_targets.py). Shapes: H and V multiples of 16 (the aligned case that takes
TMA; V % 16 != 0 keeps the previous tiles, tested below), N, V and H not multiples of the tiles."""
import pytest
import torch

import test_linear_logprobs as ll
from gift_fast import compile_targets as ct
from gift_fast.kernels import configs
from gift_fast.kernels.logprob_forward import logprob_forward_stats
from gift_fast.kernels.target import BLACKWELL, HOPPER, override_target

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="forces GPU configs onto CPU tensors (interpreter)")

# (N, H, V, bias, temperature, softcap, ignored fraction)
CASES = {
    "tma_ragged": (37, 80, 304, False, 1.0, None, 0.2),           # K step 64 + 16
    "tma_bias_temp_softcap": (29, 48, 80, True, 0.7, 3.0, 0.3),   # H below one K step
    "tma_n1": (1, 16, 48, True, 1.0, None, 0.0),
    "tma_v_below_tile": (6, 32, 16, False, 1.3, None, 0.0),
    "tma_all_ignored": (5, 16, 32, True, 1.0, None, 1.0),
    # 3 row blocks x 3 vocabulary slices (with the narrow slices below), a ragged last slice,
    # 3 x 6 dlogits tiles in groups of 2 row blocks.
    "tma_slices": (300, 80, 688, True, 0.9, 5.0, 0.1),
}
ARCHS = (90, 100)


@pytest.fixture
def narrow_slices(monkeypatch):
    """Vocabulary slices of 2 tiles and groups of 2 row blocks, so that small shapes have several
    slices, an incomplete last group and a ragged last slice (same tiles, same code path)."""
    for family in (HOPPER, BLACKWELL):
        fwd = dict(configs.FORWARD[family]["16bit"], v_per_split=256, GROUP_N=2)
        dl = dict(configs.DLOGITS[family]["16bit"], GROUP_N=2)
        monkeypatch.setitem(configs.FORWARD[family], "16bit", fwd)
        monkeypatch.setitem(configs.DLOGITS[family], "16bit", dl)
    for name, case in CASES.items():
        monkeypatch.setitem(ll.CASES, name, case)


def _launches(arch, fn):
    sink = []
    with ct.recording(arch, sink):
        fn()
    return sink


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ARCHS)
def test_tma_path_matches_float64(arch, dtype, case, narrow_slices):
    """Log-probs, entropy, argmax and every gradient, forward and dlogits on the TMA path."""
    sink = _launches(arch, lambda: ll.check_against_reference("triton", dtype, case))
    kernels = {s.name: s for s in sink}
    # Every row ignored: no row has a gradient, so no dlogits launch.
    names = ["_logprob_forward_kernel"] + (["_dlogits_kernel"] if CASES[case][6] < 1 else [])
    for name in names:
        spec = kernels[name]
        sig = dict(spec.signature)
        assert sig["X"].startswith("tensordesc") and sig["W"].startswith("tensordesc"), sig
        cfg = (configs.FORWARD if name == "_logprob_forward_kernel" else configs.DLOGITS)[
            HOPPER if arch == 90 else BLACKWELL]["16bit"]
        assert spec.tiles() == f"{cfg['BLOCK_N']}x{cfg['BLOCK_V']}x{cfg['BLOCK_H']}"
        assert cfg["BLOCK_N"] == 128 and cfg["BLOCK_H"] == 64
        assert _constexprs(spec)["USE_TMA"] is True and _constexprs(spec)["GROUP_N"] == 2


def _constexprs(spec):
    names = [n for n, _ in spec.signature]
    return {names[p[0]]: v for p, v in spec.constexprs}


@pytest.mark.parametrize("arch", ARCHS)
def test_tma_only_for_aligned_16_bit(arch):
    """fp32 and unaligned 16-bit operands keep the pointer loads and the 2-D grid (today's code
    path); so do other families with aligned 16-bit operands."""
    def run(dtype, h, target=arch):
        x = torch.randn(5, h).to(dtype)
        w = torch.randn(48, h).to(dtype)
        sink = _launches(target, lambda: logprob_forward_stats(
            x, w, None, torch.zeros(5, dtype=torch.long), 1.0, None, False))
        return next(s for s in sink if s.name == "_logprob_forward_kernel")
    tma = _constexprs(run(torch.bfloat16, 64))
    assert tma["USE_TMA"] is True and tma["GROUP_N"] == 8
    for spec in (run(torch.float32, 64), run(torch.bfloat16, 40), run(torch.bfloat16, 64, 80)):
        cx = _constexprs(spec)
        assert cx["USE_TMA"] is False and cx["GROUP_N"] == 0
        assert dict(spec.signature)["X"].startswith("*")


@pytest.mark.parametrize("arch", ARCHS)
def test_vocabulary_not_a_multiple_of_16_keeps_the_previous_forward_tiles(arch):
    """V % 16 != 0: the logits store's float32 rows are not 16-byte aligned, and the forward keeps
    the previous 16-bit tiles (pointer loads, 2-D grid), the statistics-only variant too: the two
    still give the same statistics bits, and the log-probs match float64."""
    N, H, V = 37, 80, 301
    x, w, b, y = ll.make_inputs(N, H, V, torch.bfloat16, True, 0.0, seed=6)
    z = torch.empty(N, V)
    sink = _launches(arch, lambda: (
        logprob_forward_stats(x, w, b, y, 1.0, None, True),
        logprob_forward_stats(x, w, b, y, 1.0, None, True, logits_out=z)))
    fwd = [s for s in sink if s.name == "_logprob_forward_kernel"]
    assert len(fwd) == 2 and len({(s.tiles(), s.num_warps) for s in fwd}) == 1
    for spec in fwd:
        assert _constexprs(spec)["USE_TMA"] is False and dict(spec.signature)["X"] == "*bf16"
        assert spec.tiles() == "x".join(str(configs._FWD_16[k])
                                        for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H"))
    with override_target(arch):
        plain = logprob_forward_stats(x, w, b, y, 1.0, None, True)
        stored = logprob_forward_stats(x, w, b, y, 1.0, None, True, logits_out=z)
    for a, c in zip(plain, stored):
        assert torch.equal(a, c)
    raw = x.double() @ w.double().T + b.double()
    bound = ll.backend_rounding_bounds("triton", torch.bfloat16, x, w, b, y)
    ll.assert_within("lse", plain[0], torch.logsumexp(raw, 1), bound.lse)


@pytest.mark.parametrize("arch", ARCHS)
def test_stored_logits_forward_has_the_same_statistics_bits(arch, narrow_slices):
    """The keep/stream plans' forward (STORE_LOGITS) and the statistics-only forward use the same
    tiles, so their statistics are bit-identical; the stored logits are the tiles' z."""
    N, H, V, *_ = CASES["tma_slices"]
    x, w, b, y = ll.make_inputs(N, H, V, torch.bfloat16, True, 0.1, seed=3)
    z = torch.empty(N, V)
    with override_target(arch):
        plain = logprob_forward_stats(x, w, b, y.clamp_min(0), 0.9, 5.0, True)
        stored = logprob_forward_stats(x, w, b, y.clamp_min(0), 0.9, 5.0, True, logits_out=z)
    for a, c in zip(plain, stored):
        assert torch.equal(a, c)
    # z against float64: every logit of a row within that row's max_logit bound (the largest of
    # the per-logit bounds of a float32 dot of exact products plus the transform, helpers.py).
    raw = x.double() @ w.double().T + b.double()
    want = 5.0 * torch.tanh(raw / 5.0) / 0.9
    bound = ll.backend_rounding_bounds("triton", torch.bfloat16, x, w, b, y.clamp_min(0),
                                       temperature=0.9, softcap=5.0).max_logit
    ll.assert_within("stored logits", z.double(), want, bound[:, None].expand(N, V))


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_do_not_depend_on_the_batch(arch):
    """A row's statistics do not depend on N or on the grouped program order (rows keep their
    position inside the 128-row tile: the interpreter's numpy dot may round by position)."""
    H, V = 48, 300
    x, w, _, y = ll.make_inputs(300, H, V, torch.bfloat16, False, 0.0, seed=4)
    with override_target(arch):
        full = logprob_forward_stats(x, w, None, y, 1.0, None, True)
        part = logprob_forward_stats(x[:130], w, None, y[:130], 1.0, None, True)
    for a, c in zip(full, part):
        assert torch.equal(a[:130], c)

