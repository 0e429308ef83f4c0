"""The floating-point precision the sampled nets of a training step run in.

``bf16`` runs the nets' forward (and so their backward) under bf16 autocast; the GHN itself,
its parameters, gradients and the optimizer stay float32. ``auto`` picks bf16 only where the
hardware computes it natively (CPU: AVX512-BF16 or AMX; CUDA: a bf16-capable GPU), because
emulated bf16 is slower than float32.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ghnq_deploy.errors import UserError

PRECISIONS = ("auto", "bf16", "fp32")
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class PrecisionError(UserError):
    """An unknown precision name."""


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` computes bf16 natively (checked at run time, on this machine)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    query = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(q is not None for q in query):  # torch's own capability query
        native = any(q() for q in query)
    else:
        native = bool(_cpu_flags() & set(_NATIVE_BF16_FLAGS))
    return native and torch.backends.mkldnn.is_available()


def resolve_precision(requested: str, device: str = "cpu") -> str:
    """The precision that runs: ``auto`` becomes bf16 where native, else fp32."""
    if requested not in PRECISIONS:
        raise PrecisionError(f"unknown precision {requested!r}; choose from {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return requested


def net_autocast(precision: str, device: str = "cpu") -> contextlib.AbstractContextManager:
    """The context the sampled nets run in for a resolved ``precision`` (bf16 or fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise PrecisionError(f"precision {precision!r} is not resolved (bf16 or fp32)")
