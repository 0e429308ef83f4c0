"""TFLite's int8 elementwise activations (HARD_SWISH, LOGISTIC) as 256-entry tables.

An int8 unary op's output depends only on the input code, so each kernel is written once,
exactly as the reference kernel computes it, over the 256 codes -128..127; the simulator
then gathers. Written from the semantics of TFLite's ``HardSwishPrepare`` /
``reference_ops::HardSwish`` (16-bit fixed point, gemmlowp rounding) and the int8
``LOGISTIC`` lookup table of the reference / generic kernels (float32 sigmoid, ``std::round``).
The ``xnnpack`` LOGISTIC variant follows XNNPACK's qs8 sigmoid table (sign-split float math,
ties to even). Measured on single-op files: LiteRT's default path gives HARD_SWISH outputs
identical to the reference kernel's, and LOGISTIC outputs equal to both tables. TensorFlow
Lite Micro computes LOGISTIC in gemmlowp fixed point instead (``logistic_table_tflm``): it
parts from the float table where the input scale is large (codes past its radius saturate).
"""

from __future__ import annotations

import numpy as np
import torch

from ghnq_deploy.quant import requantize as rq

CODES = np.arange(-128, 128, dtype=np.int64)
_I16_MIN, _I16_MAX = -(1 << 15), (1 << 15) - 1


def _srdhm16(a: np.ndarray, b) -> np.ndarray:
    """gemmlowp::SaturatingRoundingDoublingHighMul for int16: (2ab + 2^15) >> 16, nudged half away."""
    a = np.asarray(a, np.int64)
    b = np.broadcast_to(np.asarray(b, np.int64), a.shape)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 14, 1 - (1 << 14))
    high = np.trunc((ab + nudge) / float(1 << 15)).astype(np.int64)  # exact: |ab| < 2^31
    return np.where((a == b) & (a == _I16_MIN), _I16_MAX, high)


def _sdhm16(a: np.ndarray, b) -> np.ndarray:
    """SaturatingDoublingHighMul (hard_swish.h): like the rounding one, but truncating toward zero."""
    a = np.asarray(a, np.int64)
    b = np.broadcast_to(np.asarray(b, np.int64), a.shape)
    high = np.trunc((a * b) / float(1 << 15)).astype(np.int64)
    return np.where((a == b) & (a == _I16_MIN), _I16_MAX, high)


def _rdbpot(x: np.ndarray, exponent: int) -> np.ndarray:
    """gemmlowp::RoundingDivideByPOT: x / 2^exponent, ties away from zero."""
    x = np.asarray(x, np.int64)
    mask = (1 << exponent) - 1
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + ((x & mask) > threshold)


def _sat_left_shift16(x: np.ndarray, amount: int) -> np.ndarray:
    return np.clip(np.asarray(x, np.int64) * (1 << amount), _I16_MIN, _I16_MAX)


def _multiplier16(real: np.float32) -> tuple[int, int]:
    """QuantizeMultiplier then DownScaleInt32ToInt16Multiplier: a Q15 multiplier and its exponent."""
    m, s = rq.quantize_multiplier(np.float64(real))
    m32, shift = int(m[0]), int(s[0])
    if m32 >= rq.INT32_MAX - (1 << 15):
        return _I16_MAX, shift
    return (m32 + (1 << 15)) >> 16, shift


def hard_swish_params(in_scale: float, out_scale: float) -> dict:
    """HardSwishPrepare: the two Q15 multipliers, computed from float32 scales as the kernel does."""
    hires = np.float32(1.0 / 128.0) * np.float32(in_scale)
    out_m, out_e = _multiplier16(np.float32(hires / np.float32(out_scale)))
    relu_m, relu_e = _multiplier16(np.float32(hires / np.float32(3.0 / 32768.0)))
    return {"output_multiplier": out_m, "output_exponent": out_e, "reluish_multiplier": relu_m,
            "reluish_exponent": relu_e}


def hard_swish_table(in_scale: float, in_zero: int, out_scale: float, out_zero: int) -> np.ndarray:
    """int8 HARD_SWISH of every input code, as reference_ops::HardSwish computes it (int64 array)."""
    p = hard_swish_params(in_scale, out_scale)
    if p["output_exponent"] > 0:
        raise ValueError("HARD_SWISH output multiplier above 1 (TFLite's Prepare refuses such a file)")
    hires = (CODES - in_zero) * (1 << 7)  # |x - zp| <= 255: fits int16 after the shift
    preshift_out = _srdhm16(hires, p["output_multiplier"])
    reluish = hires
    e = p["reluish_exponent"]
    if e > 0:
        reluish = _sat_left_shift16(reluish, e - 1)
    reluish = _srdhm16(reluish, p["reluish_multiplier"])
    if e > 0:
        reluish = _sat_left_shift16(reluish, 1)
    elif e < 0:
        reluish = _rdbpot(reluish, -e)
    reluish = (reluish + (1 << 15)) >> 1  # [-1, 1] -> [0, 1] in Q15
    out = _rdbpot(_sdhm16(reluish, preshift_out), -p["output_exponent"]) + out_zero
    return np.clip(out, -128, 127)


def _expf(x: np.ndarray) -> np.ndarray:
    """float32 exp correctly rounded (exp in float64, one rounding to float32), as glibc's expf."""
    with np.errstate(over="ignore"):  # overflow to inf, as expf does
        return np.exp(x.astype(np.float64)).astype(np.float32)


def logistic_table(in_scale: float, in_zero: int, out_scale: float, out_zero: int) -> np.ndarray:
    """int8 LOGISTIC of every input code: the reference kernels' float32 lookup table.

    dequantize in float32, 1 / (1 + exp(-x)) in float32, times 1 / out_scale, std::round
    (ties away from zero), + zero point, clamp to int8.
    """
    x = np.float32(in_scale) * (CODES - in_zero).astype(np.float32)
    y = np.float32(1.0) / (np.float32(1.0) + _expf(-x))
    inverse = np.float32(1.0) / np.float32(out_scale)
    q = rq.round_half_away(y * inverse).astype(np.int64) + out_zero
    return np.clip(q, -128, 127)


def logistic_table_xnnpack(in_scale: float, in_zero: int, out_scale: float, out_zero: int) -> np.ndarray:
    """XNNPACK's qs8 sigmoid table: the sign-split float32 sigmoid, scaled, rounded to nearest even."""
    x = np.float32(in_scale) * (CODES - in_zero).astype(np.float32)
    pos = np.float32(1.0) - np.float32(1.0) / (np.float32(1.0) + _expf(x))
    neg = np.float32(1.0) / (np.float32(1.0) + _expf(-x))
    y = np.where(np.signbit(x), neg, pos).astype(np.float32)
    q = np.rint(y / np.float32(out_scale)).astype(np.int64) + out_zero
    return np.clip(q, -128, 127)


# ---- TensorFlow Lite Micro's int8 LOGISTIC: gemmlowp fixed point, no table in the kernel ----
# Written from the semantics of TFLM's CalculateArithmeticOpDataLogistic and
# reference_integer_ops::Logistic: the input is rescaled to Q4.27 by a multiplier from frexp,
# codes beyond a radius saturate, the rest go through gemmlowp::logistic on int32 raw values.
# All values are int64 arrays holding int32 quantities.

_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1


def _srdhm32(a, b) -> np.ndarray:
    """gemmlowp::SaturatingRoundingDoublingHighMul for int32."""
    return rq.saturating_rounding_doubling_high_mul(torch.as_tensor(np.asarray(a, np.int64)),
                                                    torch.as_tensor(np.asarray(b, np.int64))).numpy()


def _sat_mul_pot(x: np.ndarray, exponent: int) -> np.ndarray:
    """gemmlowp::SaturatingRoundingMultiplyByPOT: a saturating left shift, or a rounding right shift."""
    if exponent < 0:
        return _rdbpot(x, -exponent)
    threshold = (1 << (31 - exponent)) - 1
    return np.where(x > threshold, _I32_MAX, np.where(x < -threshold, _I32_MIN, x << exponent))


def _exp_on_interval(a: np.ndarray) -> np.ndarray:
    """exp on [-1/4, 0) in Q0.31: Taylor expansion around -1/8."""
    constant_term, one_third = 1895147668, 715827883
    x = a + (1 << 28)
    x2 = _srdhm32(x, x)
    x3 = _srdhm32(x2, x)
    x4 = _srdhm32(x2, x2)
    x4_over_4 = _sat_mul_pot(x4, -2)
    poly = _sat_mul_pot(_srdhm32(x4_over_4 + x3, one_third) + x2, -1)
    return constant_term + _srdhm32(constant_term, x + poly)


def _exp_on_negative_q4(a: np.ndarray) -> np.ndarray:
    """gemmlowp::exp_on_negative_values for Q4.27 input (a <= 0), Q0.31 result."""
    fractional = 27
    quarter = 1 << (fractional - 2)
    a_mod = (a & (quarter - 1)) - quarter
    result = _exp_on_interval(_sat_mul_pot(a_mod, 4))
    remainder = a_mod - a
    barrel = {-2: 1672461947, -1: 1302514674, 0: 790015084, 1: 290630308, 2: 39332535, 3: 720401}
    for exponent, multiplier in barrel.items():  # exponents below the 4 integer bits
        bit = (remainder & (1 << (fractional + exponent))) != 0
        result = np.where(bit, _srdhm32(result, multiplier), result)
    return np.where(a == 0, _I32_MAX, result)


def _one_over_one_plus_x(a: np.ndarray) -> np.ndarray:
    """1 / (1 + a) for a in [0, 1] (Q0.31 in and out): Newton-Raphson in Q2.29."""
    half_denominator = (a + _I32_MAX + 1) >> 1  # RoundingHalfSum(a, One()); the sum is never negative here
    x = 1515870810 + _srdhm32(half_denominator, -1010580540)
    one_q2 = 1 << 29
    for _ in range(3):
        hd_x = _srdhm32(half_denominator, x)
        x = x + _sat_mul_pot(_srdhm32(x, one_q2 - hd_x), 2)
    return _sat_mul_pot(x, 1)


def logistic_table_tflm(in_scale: float, in_zero: int, out_scale: float, out_zero: int,
                        rounding: str = "double") -> np.ndarray:
    """int8 LOGISTIC of every input code as TensorFlow Lite Micro computes it (fixed point).

    The output encoding is TFLite's fixed 1/256, -128 for int8 LOGISTIC (``out_scale`` and
    ``out_zero`` are checked by the caller's file, not used); ``rounding`` is the build's
    MultiplyByQuantizedMultiplier (``"double"``, or ``"single"`` for TFLITE_SINGLE_ROUNDING).
    """
    mantissa, left_shift = np.frexp(np.float64(in_scale) * float(1 << 27))
    multiplier = int(rq.round_half_away(mantissa * float(1 << 31)))
    left_shift = int(left_shift)
    radius = int(np.floor(15.0 * float(1 << 27) / float(2.0 ** left_shift)))
    x = CODES - in_zero
    inside = (x > -radius) & (x < radius)
    q4 = rq.multiply_by_quantized_multiplier(torch.as_tensor(np.where(inside, x, 0)), multiplier, left_shift,
                                             rounding).numpy()
    positive = q4 > 0
    magnitude = np.where(positive, q4, -q4)
    on_positive = _one_over_one_plus_x(_exp_on_negative_q4(-magnitude))
    value = np.where(q4 == 0, 1 << 30, np.where(positive, on_positive, _I32_MAX - on_positive))
    out = np.clip(_rdbpot(value, 23) - 128, -128, 127)
    return np.where(x <= -radius, -128, np.where(x >= radius, 127, out)).astype(np.int64)
