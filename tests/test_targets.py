"""Code-generation targets (gift_fast.kernels.target), the per-family launch configurations and
the auto backend's choice per GPU and dtype, on CPU by faking the device's target."""
import logging
import types

import pytest
import torch

from gift_fast import backends
from gift_fast.kernels import configs, target as tg


@pytest.mark.parametrize("arch, vendor, family, warp", [
    (75, "cuda", tg.TURING, 32), ("sm_80", "cuda", tg.AMPERE, 32), ("86", "cuda", tg.AMPERE, 32),
    (89, "cuda", tg.AMPERE, 32), (90, "cuda", tg.HOPPER, 32), (100, "cuda", tg.BLACKWELL, 32),
    (120, "cuda", tg.BLACKWELL_CONSUMER, 32), ("gfx90a", "hip", tg.CDNA2, 64),
    ("gfx942", "hip", tg.CDNA3, 64), ("gfx950", "hip", tg.CDNA4, 64),
    ("gfx1100", "hip", tg.RDNA3, 32), ("gfx942:sramecc+:xnack-", "hip", tg.CDNA3, 64)])
def test_target_knows_vendor_family_and_warp_size(arch, vendor, family, warp):
    t = tg.target_of(arch)
    assert (t.vendor, t.family, t.warp_size) == (vendor, family, warp)
    assert t.gpu_target().warp_size == warp and t.gpu_target().backend == vendor
    assert tg.target_of(t.name.replace("sm_", "")) == t


def test_target_is_not_an_int_and_unknown_targets_are_named():
    with pytest.raises(TypeError):
        tg.target_of(90) >= 90          # noqa: B015 - a `>= 90` branch must fail loudly
    for bad in (70, "gfx1030", "hopper"):
        with pytest.raises(ValueError, match="arch"):
            tg.target_of(bad)


def test_rocm_device_is_mapped_by_its_gfx_name_not_its_capability(monkeypatch):
    # torch on ROCm reports MI300X as capability (9, 4): by number it would be "Hopper".
    monkeypatch.setattr(torch.version, "hip", "6.4", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 4))
    props = types.SimpleNamespace(gcnArchName="gfx942:sramecc+:xnack-")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: props)
    t = tg.device_target(torch.device("cuda", 0))
    assert (t.vendor, t.arch, t.family, t.warp_size) == ("hip", "gfx942", tg.CDNA3, 64)
    props.gcnArchName = "gfx1100"
    assert tg.device_target(torch.device("cuda", 0)).family == tg.RDNA3
    props.gcnArchName = "gfx1030"       # RDNA2: no launch configurations
    assert tg.device_target(torch.device("cuda", 0)) is None


def test_every_family_has_a_config_for_every_case():
    for table in (configs.FORWARD, configs.DLOGITS):
        assert set(table) == set(tg.FAMILIES)
        for family in tg.FAMILIES:
            assert set(table[family]) == {"fp32", "unaligned", "16bit"}, family
    # Consumer Blackwell is its own family, not Hopper (a `>= 90` test made it one).
    assert tg.target_of(120).family == tg.BLACKWELL_CONSUMER != tg.target_of(90).family


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dot_precision_is_ieee_for_every_dtype(dtype):
    # The AMD backends reject "tf32" for 16-bit dots (gfx90a, gfx950, gfx1100).
    assert configs.dot_precision(dtype) == "ieee"


def _fake_gpu(monkeypatch, arch):
    monkeypatch.setattr(tg, "device_target", lambda device: tg.target_of(arch))
    monkeypatch.setattr(backends, "_told", set())


def test_auto_backend_sends_bf16_on_turing_to_torch_and_says_so_once(monkeypatch, caplog):
    _fake_gpu(monkeypatch, 75)
    cuda = torch.device("cuda", 0)
    with caplog.at_level(logging.WARNING, logger="gift_fast"):
        assert backends.resolve_backend("auto", cuda, torch.bfloat16) == "torch"
        assert backends.resolve_backend("auto", cuda, torch.bfloat16) == "torch"
        assert backends.resolve_backend("auto", cuda, torch.float32) == "triton"
    told = [r.getMessage() for r in caplog.records if r.name == "gift_fast"]
    assert len(told) == 1 and "sm_75" in told[0] and "bfloat16" in told[0], told
    # Asking for triton explicitly is the user's call: still triton.
    assert backends.resolve_backend("triton", cuda, torch.bfloat16) == "triton"


@pytest.mark.parametrize("arch", [80, 89, 90, 100, 120, "gfx90a", "gfx942", "gfx950", "gfx1100"])
def test_auto_backend_runs_triton_on_supported_gpus(monkeypatch, caplog, arch):
    _fake_gpu(monkeypatch, arch)
    with caplog.at_level(logging.WARNING, logger="gift_fast"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            assert backends.resolve_backend("auto", torch.device("cuda"), dtype) == "triton"
    assert not [r for r in caplog.records if r.name == "gift_fast"]


def test_auto_backend_on_a_gpu_without_configs_uses_torch(monkeypatch, caplog):
    monkeypatch.setattr(tg, "device_target", lambda device: None)
    monkeypatch.setattr(backends, "_told", set())
    with caplog.at_level(logging.WARNING, logger="gift_fast"):
        assert backends.resolve_backend("auto", torch.device("cuda"), torch.float32) == "torch"
    assert any("no launch configurations" in r.getMessage() for r in caplog.records)


def test_public_ops_hand_the_input_dtype_to_the_choice(monkeypatch):
    seen = []

    def spy(backend, device, dtype=None):
        seen.append(dtype)
        return backends.resolve_backend(backend, device, dtype)
    monkeypatch.setattr("gift_fast.logprobs.resolve_backend", spy)
    import gift_fast as gf
    gf.linear_logprobs(torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64),
                       torch.tensor([0, 1, 2]))
    assert seen == [torch.float64]
