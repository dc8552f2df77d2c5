"""Which code-generation target a launch is for, so launchers pick tile configs per target family.

``launch_target(t)`` is the :class:`Target` of ``t``'s device (vendor, architecture, warp size,
family), or ``INTERPRETER`` for CPU tensors (``TRITON_INTERPRET=1``). ``override_target(arch)``
makes every launch inside it choose the configs of ``arch`` (``80``, ``"sm_120"``,
``"gfx942"``, or a Target) whatever the device: the compile-for-target check
(``gift_fast.compile_targets``) and the native build drive the real launchers on small CPU
tensors this way and record the launches instead of relying on hand-copied configs.

Launchers branch on ``target.family``, never on a number: torch on ROCm reports MI300 (gfx942)
as capability (9, 4) and RDNA3 (gfx1100) as (11, 0), so a ``capability >= 90`` test would hand
AMD GPUs the Hopper or Blackwell configs. A Target does not compare with ints for that reason.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
from typing import Iterator, Optional, Union

INTERPRETER = "interpreter"

# Families: the unit launch configurations are chosen per (gift_fast.kernels.configs).
TURING = "turing"                        # sm_75 (T4): no bf16 tensor cores
AMPERE = "ampere"                        # sm_80/86/87/89 (A100, A10, RTX 30xx, L4, L40S, RTX 40xx)
HOPPER = "hopper"                        # sm_90 (H100, H200): wgmma, TMA
BLACKWELL = "blackwell"                  # sm_100/103 (B200, GB200, B300): tcgen05
BLACKWELL_CONSUMER = "blackwell_consumer"  # sm_120/121 (RTX 50xx, RTX PRO 6000, DGX Spark)
CDNA2 = "cdna2"                          # gfx90a (MI210, MI250)
CDNA3 = "cdna3"                          # gfx942 (MI300X, MI300A, MI325X)
CDNA4 = "cdna4"                          # gfx950 (MI350X, MI355X)
RDNA3 = "rdna3"                          # gfx1100/1101/1102 (RX 7900, Radeon PRO W7900)
FAMILIES = (TURING, AMPERE, HOPPER, BLACKWELL, BLACKWELL_CONSUMER, CDNA2, CDNA3, CDNA4, RDNA3)

_AMD_FAMILIES = {"gfx90a": CDNA2, "gfx940": CDNA3, "gfx941": CDNA3, "gfx942": CDNA3,
                 "gfx950": CDNA4, "gfx1100": RDNA3, "gfx1101": RDNA3, "gfx1102": RDNA3}


def _nvidia_family(capability: int) -> Optional[str]:
    if capability == 75:
        return TURING
    if 80 <= capability < 90:
        return AMPERE
    if capability == 90:
        return HOPPER
    if 100 <= capability < 120:
        return BLACKWELL
    if 120 <= capability < 130:
        return BLACKWELL_CONSUMER
    return None


@dataclasses.dataclass(frozen=True)
class Target:
    """One code-generation target: ``vendor`` "cuda" (``arch`` an int capability such as 90) or
    "hip" (``arch`` a gfx name such as "gfx942"), its warp (wavefront) size and family."""
    vendor: str
    arch: Union[int, str]
    warp_size: int
    family: str

    @property
    def name(self) -> str:
        return f"sm_{self.arch}" if self.vendor == "cuda" else str(self.arch)

    @property
    def is_amd(self) -> bool:
        return self.vendor == "hip"

    def gpu_target(self):
        """Triton's GPUTarget for this target (compiling needs no GPU)."""
        from triton.backends.compiler import GPUTarget
        return GPUTarget(self.vendor, self.arch, self.warp_size)

    def __str__(self) -> str:
        return self.name


def target_of(arch: Union[int, str, Target]) -> Target:
    """The Target named by ``arch``: an int CUDA capability (80), "sm_80", "80", a gfx name
    ("gfx942", also with ROCm's feature suffix "gfx942:sramecc+:xnack-"), or a Target."""
    if isinstance(arch, Target):
        return arch
    if isinstance(arch, str):
        text = arch.strip().lower()
        if text.startswith("gfx"):
            gfx = text.split(":")[0]
            if gfx not in _AMD_FAMILIES:
                raise ValueError(f"arch: AMD target {gfx!r} is not one of {sorted(_AMD_FAMILIES)}")
            family = _AMD_FAMILIES[gfx]
            return Target("hip", gfx, 32 if family == RDNA3 else 64, family)
        m = re.fullmatch(r"(?:sm_?)?(\d+)", text)
        if m is None:
            raise ValueError(f"arch: expected a CUDA capability such as 90 or 'sm_90', or a gfx "
                             f"name such as 'gfx942', got {arch!r}")
        arch = int(m.group(1))
    if isinstance(arch, bool) or not isinstance(arch, int):
        raise TypeError(f"arch: expected an int CUDA capability, a gfx name or a Target, "
                        f"got {arch!r}")
    family = _nvidia_family(arch)
    if family is None:
        raise ValueError(f"arch: CUDA capability {arch} has no launch configurations "
                         f"(supported: sm_75, sm_80-89, sm_90, sm_100-110, sm_120-121)")
    return Target("cuda", arch, 32, family)


def device_target(device) -> Optional[Target]:
    """The Target of a CUDA or ROCm device, or None for a GPU without launch configurations
    (e.g. Volta, RDNA2). On ROCm torch reports the gfx name in ``gcnArchName``; its
    ``get_device_capability`` (gfx942 -> (9, 4)) says nothing about the architecture family."""
    import torch
    try:
        if torch.version.hip is not None:
            return target_of(torch.cuda.get_device_properties(device).gcnArchName)
        major, minor = torch.cuda.get_device_capability(device)
        return target_of(10 * major + minor)
    except ValueError:
        return None


_state = threading.local()


def launch_target(tensor) -> Union[Target, str]:
    arch = getattr(_state, "arch", None)
    if arch is not None:
        return arch
    if not tensor.is_cuda:
        return INTERPRETER
    target = device_target(tensor.device)
    if target is None:
        raise RuntimeError(f"the triton backend has no launch configurations for {tensor.device} "
                           "(see docs/hardware.md); use backend='torch' or backend='auto'")
    return target


@contextlib.contextmanager
def override_target(arch: Union[int, str, Target]) -> Iterator[None]:
    target = INTERPRETER if arch == INTERPRETER else target_of(arch)
    previous = getattr(_state, "arch", None)
    _state.arch = target
    try:
        yield
    finally:
        _state.arch = previous


def aligned16(*values) -> bool:
    """True when Triton will specialise every value as divisible by 16 (ints: multiple of 16
    or 1; tensors: 16-byte-aligned data pointer). Unaligned operands cannot be loaded in
    vectors, so their address registers limit the tile size a kernel can afford."""
    for v in values:
        if hasattr(v, "data_ptr"):
            if v.data_ptr() % 16:
                return False
        elif v != 1 and v % 16:
            return False
    return True
