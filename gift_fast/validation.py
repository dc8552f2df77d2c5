"""Input checks shared by every public entry point.

Every check raises a ``ValueError``/``TypeError`` that names the offending argument and what was
expected, so a user sees "targets: expected shape (4, 7) ..." instead of a CUDA assert.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: torch/reference only
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_float(name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {desc}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if _shape(t) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected shape {tuple(expected)}{extra}, got {_shape(t)}")


def check_positive(name: str, value: float) -> None:
    # A comparison, not math.isfinite, which dynamo cannot trace (False for NaN as well).
    if not (isinstance(value, (int, float)) and 0 < value < math.inf):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")


def check_finite(name: str, t: torch.Tensor) -> None:
    if torch.compiler.is_compiling():
        _assert_in_graph(torch.isfinite(t).all(),
                         f"{name}: expected finite values, found NaN or inf")
    elif not _capturing(t) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")


def check_unit_interval(name: str, t: torch.Tensor) -> None:
    """Values in [0, 1] (labels, target scores); in a compiled graph a device-side assert."""
    ok = ((t >= 0) & (t <= 1)).all()        # NaN fails both comparisons
    if torch.compiler.is_compiling():
        _assert_in_graph(ok, f"{name}: expected values in [0, 1]")
    elif not _capturing(t) and not bool(ok):
        raise ValueError(f"{name}: expected values in [0, 1]")


def _assert_in_graph(ok: torch.Tensor, message: str) -> None:
    """The compiled form of a value check: a bool() would break the graph (and sync), so the
    check becomes ``torch._assert_async``, an op in the graph. It raises RuntimeError (not the
    eager ValueError) with ``message``: on CPU when it runs, on CUDA as a device-side assert
    (asynchronous, and fatal to the CUDA context)."""
    torch._assert_async(ok, message)


LOGPROB_DTYPES = (torch.float32, torch.float64)


def check_logprob_input(name: str, t: Optional[torch.Tensor]) -> None:
    """Per-token log-probs given as data (anchor / reference / old policy): float32 or float64.

    16-bit log-probs are refused rather than cast: bfloat16 keeps 8 significant bits, so a
    log-prob near -10 is off by up to 0.03, a 3 % error in every ``exp(logp - anchor)`` ratio
    (float16: 0.004, 0.4 %).
    ``None`` (an optional anchor left out) passes.
    """
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in LOGPROB_DTYPES:
        raise TypeError(
            f"{name}: expected float32 (or float64) log-probs, got "
            f"{str(t.dtype).replace('torch.', '')}; near -10 a bfloat16 log-prob is off by up to "
            f"0.03 (float16: 0.004), which shifts every exp(logp - anchor) ratio: compute them in "
            f"float32 (linear_logprobs returns float32), or call .float() if that rounding is "
            f"acceptable")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def _capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured: value checks would need a host sync then."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _is_dtensor(t) -> bool:
    """isinstance(t, DTensor), importing torch.distributed.tensor only for tensor subclasses."""
    if type(t) in _PLAIN_TENSOR_TYPES or not isinstance(t, torch.Tensor):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:      # torch built without distributed support
        return False
    return isinstance(t, DTensor)


def check_not_dtensor(name: str, t, context: str = "") -> None:
    """A sharded DTensor (FSDP2 / tensor parallel) must not reach the fused op.

    Outside the forward that FSDP2 runs for it, an FSDP2 parameter is a DTensor shard; reading it
    there (or its ``full_tensor()``) bypasses FSDP2's gradient reduce-scatter and gives wrong
    gradients. ``context`` (e.g. the caller) prefixes the message.
    """
    if t is not None and _is_dtensor(t):
        raise TypeError(
            f"{context}{name}: got a DTensor (placements {tuple(t.placements)}), expected a plain "
            "tensor. Under FSDP2 (fully_shard) call the fused loss inside the forward of the root "
            "FSDP module: wrap the model in gift_fast.integrations.fsdp.FusedLossModel, or call "
            "gift_fast.integrations.hf.patch_model(model) before fully_shard and then "
            "model(input_ids, token_logprobs=True, ...) (TRL: use_gift_fast / patch_trl); "
            "lm_head may be in the root's unit or its own fully_shard unit. Never pass "
            "lm_head.weight, its full_tensor() or an unshard()-ed copy from outside that forward "
            "(FSDP2 would not reduce its gradient). See docs/distributed.md")


def check_target_range(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Every target is ``ignore_index`` or in [0, vocab_size) (one host sync, skipped in capture;
    a graph-side assert under torch.compile)."""
    compiling = torch.compiler.is_compiling()
    if not compiling and (not targets.numel() or _capturing(targets)):
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if compiling:
        # The size is not formatted into the message: that would specialize a symbolic V.
        _assert_in_graph(~bad.any(), f"targets: expected values in [0, V) (the vocabulary) or "
                                     f"ignore_index={ignore_index}")
    elif bool(bad.any()):
        first = int(targets[bad][0])
        raise ValueError(f"targets: expected values in [0, {vocab_size}) or "
                         f"ignore_index={ignore_index}, found {first}")


def check_linear_inputs(hidden, weight, targets, bias, temperature, softcap, ignore_index,
                        check_targets: bool = True):
    """Validates the inputs of the fused linear log-prob op and flattens them.

    ``check_targets=False`` leaves the target range to the caller (a vocabulary shard's caller
    checks against the global vocabulary with :func:`check_target_range`).

    Returns ``(hidden_2d [N, H], targets_1d [N], leading_shape)``. The flattening is a view when the
    input allows it; non-contiguous inputs are accepted (the backends copy only what they must).
    """
    check_not_dtensor("hidden", hidden)
    check_not_dtensor("weight", weight)
    check_not_dtensor("bias", bias)
    check_float("hidden", hidden)
    check_float("weight", weight)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets: expected a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in INT_DTYPES:
        raise TypeError(f"targets: expected an integer dtype, got {str(targets.dtype).replace('torch.', '')}")
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape [..., H] with at least one dimension, got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape [V, H] (2 dims), got {_shape(weight)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected the same dtype as hidden ({hidden.dtype}), got {weight.dtype}")
    H = hidden.shape[-1]
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight: expected shape [V, H] with H = hidden.shape[-1] = {H}, got {_shape(weight)}")
    if V == 0 or H == 0:
        raise ValueError(f"weight: expected V > 0 and H > 0, got shape {_shape(weight)}")
    lead = _shape(hidden)[:-1]
    if _shape(targets) != lead:
        raise ValueError(f"targets: expected shape {lead} (hidden.shape[:-1]), got {_shape(targets)}")
    if bias is not None:
        check_float("bias", bias)
        check_shape("bias", bias, (V,), "one value per vocabulary entry")
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    check_positive("temperature", temperature)
    if softcap is not None:
        check_positive("softcap", softcap)
    h2 = hidden.reshape(-1, H)
    t1 = targets.reshape(-1)
    if check_targets:
        check_target_range(t1, V, ignore_index)
    return h2, t1, lead
