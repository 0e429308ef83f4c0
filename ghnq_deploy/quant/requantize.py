"""TFLite's fixed-point requantization primitives, vectorised over int64 torch tensors.

Written from the semantics of TFLite's ``QuantizeMultiplier`` (quantization_util.cc) and
``MultiplyByQuantizedMultiplier`` (kernels/internal/common.h): the default build rounds
twice (a saturating rounding doubling high-mul, then a rounding divide by a power of two,
both half away from zero); builds with ``TFLITE_SINGLE_ROUNDING`` (TFLite Micro, CMSIS-NN)
round once, half up. Values are int64 tensors holding int32 quantities, so no product
overflows; int32 wrap-around is mimicked where the C++ code shifts left in 32 bits.
"""

from __future__ import annotations

import numpy as np
import torch

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
ROUNDINGS = ("double", "single", "xnnpack")


def round_half_away(x: np.ndarray | float) -> np.ndarray:
    """std::round: ties away from zero (TfLiteRound)."""
    x = np.asarray(x, dtype=np.float64)
    return np.trunc(x + np.copysign(0.5, x))


def quantize_multiplier(real, single: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Real multiplier(s) -> (Q31 multiplier, shift) as TFLite's QuantizeMultiplier does.

    ``single`` adds the single-rounding build's clamp (shift <= 30).
    """
    real = np.atleast_1d(np.asarray(real, dtype=np.float64))
    mantissa, shift = np.frexp(real)
    q = round_half_away(mantissa * float(1 << 31)).astype(np.int64)
    carry = q == (1 << 31)
    q = np.where(carry, q // 2, q)
    shift = np.where(carry, shift + 1, shift).astype(np.int64)
    tiny = shift < -31
    q, shift = np.where(tiny, 0, q), np.where(tiny, 0, shift)
    if single:
        big = shift > 30
        q, shift = np.where(big, INT32_MAX, q), np.where(big, 30, shift)
    zero = real == 0
    return np.where(zero, 0, q).astype(np.int64), np.where(zero, 0, shift).astype(np.int64)


def _wrap32(x: torch.Tensor) -> torch.Tensor:
    return ((x - INT32_MIN) & 0xFFFFFFFF) + INT32_MIN


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a * b * 2 + 2^31) >> 32 with rounding half away from zero; the one overflow saturates."""
    a, b = torch.broadcast_tensors(torch.as_tensor(a, dtype=torch.int64), torch.as_tensor(b, dtype=torch.int64))
    ab = a * b
    nudge = torch.where(ab >= 0, torch.tensor(1 << 30), torch.tensor(1 - (1 << 30)))
    high = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    overflow = (a == b) & (a == INT32_MIN)
    return torch.where(overflow, torch.tensor(INT32_MAX), high)


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """x / 2^exponent rounded half away from zero (gemmlowp's RoundingDivideByPOT)."""
    x = torch.as_tensor(x, dtype=torch.int64)
    exponent = torch.as_tensor(exponent, dtype=torch.int64)
    mask = (torch.ones_like(exponent) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> exponent) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(x: torch.Tensor, multiplier, shift, rounding: str = "double") -> torch.Tensor:
    """TFLite's MultiplyByQuantizedMultiplier for int32 ``x`` (held in int64), broadcasting the last axis."""
    x = torch.as_tensor(x, dtype=torch.int64)
    m = torch.as_tensor(np.asarray(multiplier), dtype=torch.int64)
    s = torch.as_tensor(np.asarray(shift), dtype=torch.int64)
    if rounding == "single":
        total = 31 - s
        return (x * m + (torch.ones_like(total) << (total - 1))) >> total
    if rounding != "double":
        raise ValueError(f"fixed-point rounding is 'double' or 'single', not {rounding!r}")
    left = s.clamp(min=0)
    right = (-s).clamp(min=0)
    if bool((left > 0).any()):
        x = _wrap32(x << left)  # int32 multiply by 1 << left_shift in C++
    if bool((m < 0).any()):  # never from QuantizeMultiplier; keep the general (slower) path exact
        return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, m), right)
    return _double_round_fast(x, m, right)


def _double_round_fast(x: torch.Tensor, m: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """SaturatingRoundingDoublingHighMul then RoundingDivideByPOT for multipliers >= 0, in fewer
    int64 passes: no saturation case exists (it needs both operands equal to INT32_MIN), and the
    truncating division by 2^31 is a shift plus a correction for negative products."""
    v = x * m
    neg = v < 0
    v += 1 << 30
    v -= neg.to(torch.int64) * ((1 << 31) - 1)  # nudge 1 - 2^30 for negative products
    high = v >> 31
    high += neg & ((v & ((1 << 31) - 1)) != 0)  # floor -> trunc toward zero
    if not bool(right.any()):
        return high
    mask = (torch.ones_like(right) << right) - 1
    threshold = (mask >> 1) + (high < 0)
    return (high >> right) + ((high & mask) > threshold)


def round_half_even_f32(x: torch.Tensor) -> torch.Tensor:
    """lrintf in the default mode: fp32 ties to even (XNNPACK's requantization rounding)."""
    return torch.round(x.to(torch.float32))


def _float_exact(acc: torch.Tensor, m: np.ndarray, s: np.ndarray, bound: float | None) -> bool:
    """Whether the float64 requantization is exact: no positive shift, and every |acc * m| < 2^52
    (checked on the static ``bound`` first, on the measured peak only when the bound is too loose)."""
    if (s > 0).any() or (m < 0).any():
        return False
    top = float(m.max(initial=0))
    if bound is not None and bound * top < 2.0 ** 52:
        return True
    peak = float(acc.abs().max()) if acc.numel() else 0.0
    return peak * top < 2.0 ** 52


def requantize_float_exact(acc: torch.Tensor, multiplier: np.ndarray, shift: np.ndarray,
                           rounding: str = "double", bound: float | None = None) -> torch.Tensor | None:
    """The same result as :func:`multiply_by_quantized_multiplier` computed in float64 passes.

    Exact when every |acc * multiplier| < 2^52 and no shift is positive: then acc * m / 2^31
    and each rounding step are exact in float64 (SRDHM rounds half up, RoundingDivideByPOT
    half away from zero). Returns None when the bound does not hold (callers use the int path).
    ``bound`` is a static bound on |acc| (from the weights), which saves measuring the peak;
    ``acc`` (float64) is overwritten.
    """
    m = np.asarray(multiplier, dtype=np.int64)
    s = np.asarray(shift, dtype=np.int64)
    if not _float_exact(acc, m, s, bound):
        return None
    acc = acc.to(torch.float64)
    if rounding == "single":
        v = acc.mul_(torch.from_numpy(m.astype(np.float64) * np.exp2(-(31.0 - s))))
        return torch.floor_(v.add_(0.5))
    v = acc.mul_(torch.from_numpy(m.astype(np.float64) * 2.0 ** -31))
    high = torch.floor_(v.add_(0.5))
    if not s.any():
        return high
    high.mul_(torch.from_numpy(np.exp2(s.astype(np.float64))))
    return torch.trunc_(high.add_(torch.copysign(torch.tensor(0.5, dtype=torch.float64), high)))


def requantize_clamped(acc: torch.Tensor, multiplier: np.ndarray, shift: np.ndarray, rounding: str, bound: float | None,
                       zero: int, lo: int, hi: int, out_dtype: torch.dtype = torch.int32,
                       work: torch.Tensor | None = None, work2: torch.Tensor | None = None) -> torch.Tensor | None:
    """``clamp(MultiplyByQuantizedMultiplier(acc) + zero, lo, hi)`` in in-place float64 passes.

    Same exactness conditions as :func:`requantize_float_exact` (else None). ``acc`` holds exact
    integers (float32 or float64) and is not modified. ``work`` / ``work2`` are optional float64
    buffers of ``acc``'s shape, reused across calls: fresh large tensors cost more in page faults
    than the arithmetic itself. Each rounding is a floor of an exactly representable value; the
    zero point (an integer) moves inside the last floor; with a clamp whose lower end is at or
    above the zero point (fused ReLU / ReLU6) every negative value clamps to it, so the second
    rounding's half-away rule may be computed as half up there.
    """
    m = np.asarray(multiplier, dtype=np.int64)
    s = np.asarray(shift, dtype=np.int64)
    if not _float_exact(acc, m, s, bound):
        return None
    v = work if work is not None else torch.empty(acc.shape, dtype=torch.float64)
    v.copy_(acc)
    if rounding == "single":
        v.mul_(torch.from_numpy(m.astype(np.float64) * np.exp2(-(31.0 - s)))).add_(0.5 + zero).floor_()
        return v.clamp_(lo, hi).to(out_dtype)
    v.mul_(torch.from_numpy(m.astype(np.float64) * 2.0 ** -31))
    if not s.any():
        return v.add_(0.5 + zero).floor_().clamp_(lo, hi).to(out_dtype)
    v.add_(0.5).floor_()  # SaturatingRoundingDoublingHighMul: half up
    pot = torch.from_numpy(np.exp2(s.astype(np.float64)))
    if lo >= zero:  # negatives clamp to lo: half up == half away from zero
        return v.mul_(pot).add_(0.5 + zero).floor_().clamp_(lo, hi).to(out_dtype)
    sign = torch.sign(v, out=work2) if work2 is not None else torch.sign(v)
    # RoundingDivideByPOT: trunc(h / 2^e + sign(h) / 2), exact for integer h (also for shift 0)
    return v.mul_(pot).add_(sign, alpha=0.5).trunc_().add_(zero).clamp_(lo, hi).to(out_dtype)
