"""Quantization schemes and the tensor-level quantizers they use.

A :class:`QuantScheme` says *how* a network is quantized (bit-widths, symmetric or
asymmetric, per-tensor or per-channel weights, where ranges come from, how ties round,
whether concat outputs and int32 biases are quantized); the simulator in
:mod:`ghnq_deploy.quant.simulate` says *where*. Two base presets exist:

* ``paper`` - the GHN-Q paper's simulation: tensorwise asymmetric weights and
  activations, ranges from the absolute min/max of each tensor in each batch, torch's
  round-half-to-even, float bias, float input image, no quantizer after concat.
* ``tflite-int8`` - what a TFLite int8 model runs: per-channel symmetric narrow-range
  weights ([-127, 127], zero point 0), per-tensor asymmetric activations with ranges fixed
  at calibration, int32 bias at ``s_in * s_w``, quantized input, concat and pooling
  outputs on a shared grid, round half away from zero.

Training cannot use calibrated ranges (no calibration pass, and ranges fixed at the start
would go stale as the weights move), so QAT trains with :func:`qat_scheme` of the deployment
scheme: the same grid with each activation's range taken from the current batch. It is
registered as a third preset:

* ``tflite-int8-qat`` - ``tflite-int8`` with ``range_source="absolute"`` (per-batch
  absolute min / max); weights, bias, rounding and quantizer placement are tflite-int8's.

and one ablation: ``paper-per-channel`` (``paper`` with a weight grid per output channel).

All are combined with a bit-width shorthand (``fp32``, ``w8a8``, ``w4a8``, ``w4a4``,
``w2a2`` or any ``wNaM`` with N, M in 2..8; 32 means float): ``get_scheme("paper", "w4a8")``.

The integer functions (:func:`quantize`, :func:`quantize_tensor`) return exact integers
with their scale and zero point, for tests and exporters; the fake-quant functions return
``(q - zero_point) * scale`` as float with straight-through gradients for training.
Scales and zero points are computed as tensors (no host sync) and detached: ranges are
treated as constants by the gradient, as in Jacob et al. (2018).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch

from ghnq_deploy.errors import UserError

Rounding = Literal["half_even", "half_away"]
RangeSource = Literal["absolute", "calibrated"]
Granularity = Literal["per_tensor", "per_channel"]
BiasMode = Literal["float", "int32"]

MIN_BITS, MAX_BITS = 2, 8
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_MIN_SCALE = 1e-12  # a constant (all-zero) tensor still gets a usable, positive scale
_BITS_RE = re.compile(r"^w(\d+)a(\d+)$")


class QuantSchemeError(UserError):
    """An unknown preset, a malformed bit-width or an inconsistent scheme; one line."""


@dataclass(frozen=True)
class QuantScheme:
    """Everything that decides the numbers a quantized network computes.

    ``weight_bits`` / ``act_bits``: 2..8, or None for float (no quantizer).
    """

    name: str = "paper"
    weight_bits: int | None = 8
    act_bits: int | None = 8
    weight_symmetric: bool = False
    act_symmetric: bool = False
    weight_granularity: Granularity = "per_tensor"
    weight_narrow_range: bool = False  # [-(2^(b-1)-1), 2^(b-1)-1]: TFLite int8 weights
    act_narrow_range: bool = False
    range_source: RangeSource = "absolute"  # activation ranges: per-batch min/max or calibrated
    rounding: Rounding = "half_even"
    quantize_input: bool = False  # quantize the input image (TFLite does; the paper does not)
    quantize_after_concat: bool = False  # paper footnote 3: no Quantize() after concatenation
    pool_shares_input_qparams: bool = False  # TFLite: pools keep the input's scale / zero point
    fuse_activations: bool = True  # conv(+BN)+ReLU is one op with one output quantizer
    bias: BiasMode = "float"  # "int32": bias rounded to the grid s_in * s_w (zero point 0)

    def __post_init__(self) -> None:
        for label, b in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)):
            if b is not None and not (isinstance(b, int) and MIN_BITS <= b <= MAX_BITS):
                raise QuantSchemeError(f"{label} must be an integer in {MIN_BITS}..{MAX_BITS} or None (float), got {b!r}")
        choices = {"weight_granularity": ("per_tensor", "per_channel"), "range_source": ("absolute", "calibrated"),
                   "rounding": ("half_even", "half_away"), "bias": ("float", "int32")}
        for label, allowed in choices.items():
            if getattr(self, label) not in allowed:
                raise QuantSchemeError(f"{label} must be one of {', '.join(allowed)}, got {getattr(self, label)!r}")

    @property
    def bits(self) -> str:
        """The shorthand for this scheme's bit-widths ("fp32", "w4a8", "w8a32"...)."""
        if self.weight_bits is None and self.act_bits is None:
            return "fp32"
        return f"w{self.weight_bits or 32}a{self.act_bits or 32}"

    @property
    def is_float(self) -> bool:
        return self.weight_bits is None and self.act_bits is None

    def with_bits(self, bits: str) -> QuantScheme:
        w, a = parse_bits(bits)
        return replace(self, weight_bits=w, act_bits=a)

    def weight_qrange(self) -> tuple[int, int]:
        assert self.weight_bits is not None
        return qrange(self.weight_bits, self.weight_narrow_range)

    def act_qrange(self) -> tuple[int, int]:
        assert self.act_bits is not None
        return qrange(self.act_bits, self.act_narrow_range)

    def to_dict(self) -> dict:
        return asdict(self) | {"bits": self.bits}


PRESETS: dict[str, QuantScheme] = {
    "paper": QuantScheme(name="paper"),
    "tflite-int8": QuantScheme(
        name="tflite-int8", weight_symmetric=True, act_symmetric=False, weight_granularity="per_channel",
        weight_narrow_range=True, range_source="calibrated", rounding="half_away", quantize_input=True,
        quantize_after_concat=True, pool_shares_input_qparams=True, bias="int32",
    ),
}
QAT_SUFFIX = "-qat"


def qat_scheme(preset: str | QuantScheme = "paper", bits: str | None = None) -> QuantScheme:
    """The scheme QAT trains with when the net will be deployed with ``preset`` (and ``bits``).

    A scheme whose activation ranges are calibrated gets them from the current batch instead
    (``range_source="absolute"``: the absolute min / max of each activation in each batch),
    and ``-qat`` appended to its name; nothing else changes, so ``tflite-int8`` trains on its
    own per-channel symmetric narrow-range weights, asymmetric activations, int32 bias at
    ``s_in * s_w``, half-away rounding and quantizer placement. A scheme that already uses
    batch ranges (``paper``, any ``*-qat``) is returned unchanged. Bit-width shorthands
    combine as with :func:`get_scheme`: ``qat_scheme("tflite-int8", "w4a8")``.
    """
    scheme = get_scheme(preset, bits)
    if scheme.range_source == "absolute":
        return scheme
    name = scheme.name if scheme.name.endswith(QAT_SUFFIX) else scheme.name + QAT_SUFFIX
    return replace(scheme, name=name, range_source="absolute")


def parse_bits(bits: str) -> tuple[int | None, int | None]:
    """"fp32" -> (None, None); "w4a8" -> (4, 8); a width of 32 means float."""
    text = str(bits).strip().lower()
    if text == "fp32":
        return None, None
    m = _BITS_RE.match(text)
    if not m:
        raise QuantSchemeError(f"bit-width {bits!r} is not 'fp32' or 'wNaM' (e.g. w8a8, w4a8, w4a4, w2a2)")
    out: list[int | None] = []
    for value in (int(m.group(1)), int(m.group(2))):
        if value == 32:
            out.append(None)
        elif MIN_BITS <= value <= MAX_BITS:
            out.append(value)
        else:
            raise QuantSchemeError(f"bit-width {bits!r}: widths must be {MIN_BITS}..{MAX_BITS} (or 32 for float)")
    return out[0], out[1]


def get_scheme(preset: str | QuantScheme = "paper", bits: str | None = None) -> QuantScheme:
    """A preset (by name) or scheme, with its bit-widths replaced by ``bits`` when given."""
    if isinstance(preset, QuantScheme):
        scheme = preset
    else:
        if preset not in PRESETS:
            raise QuantSchemeError(f"unknown quantization scheme {preset!r}; presets: {', '.join(PRESETS)}")
        scheme = PRESETS[preset]
    return scheme.with_bits(bits) if bits is not None else scheme


PRESETS["tflite-int8-qat"] = qat_scheme("tflite-int8")
# the paper's scheme with one grid per output channel instead of per tensor: the ablation
# that shows where 4-bit accuracy goes (docs/quantization.md, "Why 4 bits lose")
PRESETS["paper-per-channel"] = replace(PRESETS["paper"], name="paper-per-channel", weight_granularity="per_channel")


# ----------------------------------------------------------------------------- integer grid


def qrange(bits: int, narrow_range: bool = False) -> tuple[int, int]:
    """Signed integer range of a ``bits``-bit code; narrow range drops the most negative code."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return (lo + 1 if narrow_range else lo), hi


def compute_qparams(mn: torch.Tensor, mx: torch.Tensor, qmin: int, qmax: int,
                    symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) mapping [mn, mx] onto [qmin, qmax], zero exact.

    Asymmetric: the range is widened to contain 0, ``scale = (max - min) / (qmax - qmin)``,
    ``zp = clamp(round(qmin - min / scale))``. Symmetric: ``scale = max|x| / qmax`` and
    ``zp = 0`` (so int8 uses [-127, 127] whether or not -128 is allowed, as TFLite).
    Works elementwise, so per-channel ranges give per-channel parameters.
    """
    mn = torch.clamp(mn.detach().float(), max=0.0)
    mx = torch.clamp(mx.detach().float(), min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-mn, mx) / qmax, min=_MIN_SCALE)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((mx - mn) / (qmax - qmin), min=_MIN_SCALE)
    zp = torch.clamp(torch.round(qmin - mn / scale), qmin, qmax).to(torch.int32)
    return scale, zp


def flat_view(x: torch.Tensor) -> torch.Tensor:
    """All elements as 1-D in memory order, without a copy for NCHW- or channels_last-contiguous
    tensors (oneDNN convs keep channels_last inputs channels_last; a plain ``reshape`` of those
    would copy the whole activation just to take its min / max)."""
    if x.is_contiguous():
        return x.view(-1)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)
    return x.reshape(-1)


def tensor_range(x: torch.Tensor, axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of the whole tensor, or of each slice along ``axis`` (per channel)."""
    x = x.detach()
    if axis is None:
        return torch.aminmax(flat_view(x))
    flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return torch.aminmax(flat, dim=1)


def _round(v: torch.Tensor, rounding: str) -> torch.Tensor:
    if rounding == "half_even":
        return torch.round(v)
    return torch.sign(v) * torch.floor(torch.abs(v) + 0.5)


def _bshape(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape per-channel parameters to broadcast against ``x`` along ``axis``."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
             rounding: str = "half_even", axis: int | None = None) -> torch.Tensor:
    """Integer codes ``clamp(round(x * (1/scale)) + zp, qmin, qmax)`` as int64.

    Multiplies by the reciprocal scale, exactly as torch's fake-quant kernels, so
    ``dequantize(quantize(x))`` equals :func:`fake_quant` bit for bit.
    """
    inv = _bshape(1.0 / scale.float(), x, axis)
    zp = _bshape(zero_point, x, axis).to(torch.int64)
    q = _round(x.detach().float() * inv, rounding).to(torch.int64) + zp
    return torch.clamp(q, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    return (q - _bshape(zero_point, q, axis).to(q.dtype)).float() * _bshape(scale.float(), q, axis)


@dataclass
class QuantizedTensor:
    """Integer codes with the parameters that give them meaning: real = (q - zp) * scale."""

    q: torch.Tensor  # int64 codes
    scale: torch.Tensor  # float32, scalar or per channel
    zero_point: torch.Tensor  # int32, like scale
    axis: int | None
    qmin: int
    qmax: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero_point, self.axis)


def quantize_tensor(x: torch.Tensor, bits: int, symmetric: bool = False, narrow_range: bool = False,
                    axis: int | None = None, rounding: str = "half_even") -> QuantizedTensor:
    """Quantize with the tensor's own absolute range (per tensor, or per slice along ``axis``)."""
    qmin, qmax = qrange(bits, narrow_range)
    mn, mx = tensor_range(x, axis)
    scale, zp = compute_qparams(mn, mx, qmin, qmax, symmetric)
    return QuantizedTensor(quantize(x, scale, zp, qmin, qmax, rounding, axis), scale, zp, axis, qmin, qmax)


# ----------------------------------------------------------------------------- fake quant (differentiable)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               rounding: str = "half_even", axis: int | None = None, inplace: bool = False) -> torch.Tensor:
    """Quantize-dequantize, ``(clamp(round(x * (1/scale)) + zp, qmin, qmax) - zp) * scale``.

    With gradients, half-to-even uses torch's fused fake-quant ops (straight-through,
    zero where the code clamps); half-away-from-zero (TFLite's QUANTIZE) has no torch op
    and gets the same STE written out. Without gradients the same arithmetic runs as four
    elementwise ops, bit-identical to torch's op and several times faster on CPU; with
    ``inplace=True`` they overwrite ``x`` (callers pass tensors they own), which avoids
    allocating a new activation, and on CPU per-tensor bounds are plain numbers (a clamp
    with tensor bounds is ~6x slower there).
    """
    needs_grad = x.requires_grad and torch.is_grad_enabled()
    if needs_grad and rounding == "half_even":
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()), qmin, qmax)
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)
    inv = 1.0 / scale.float()
    lo, hi = qmin - zero_point.float(), qmax - zero_point.float()
    scale_b: torch.Tensor | float
    if axis is None and x.device.type == "cpu":
        inv_b, lo_b, hi_b, scale_b = float(inv), float(lo), float(hi), float(scale)
    else:
        inv_b, lo_b, hi_b, scale_b = (_bshape(t, x, axis) for t in (inv, lo, hi, scale.float()))
    if inplace and not needs_grad:
        v = x.mul_(inv_b)
    else:
        v = x.detach() * inv_b
    if rounding == "half_even":
        v.round_()
    else:
        sign = torch.sign(v)
        v.abs_().add_(0.5).floor_().mul_(sign)
    inside = (v >= lo_b) & (v <= hi_b) if needs_grad else None
    out = torch.clamp_(v, lo_b, hi_b).mul_(scale_b)
    if not needs_grad:
        return out
    masked = x * inside
    return masked + (out - masked).detach()


def fake_quant_range(x: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, bits: int, symmetric: bool,
                     narrow_range: bool, rounding: str, axis: int | None = None, inplace: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake-quantize ``x`` onto the grid for range [mn, mx]; returns (out, scale, zero_point)."""
    qmin, qmax = qrange(bits, narrow_range)
    scale, zp = compute_qparams(mn, mx, qmin, qmax, symmetric)
    return fake_quant(x, scale, zp, qmin, qmax, rounding, axis, inplace), scale, zp


def fake_quant_weight(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight on the scheme's grid (its own absolute range), and its scale(s)."""
    if scheme.weight_bits is None:
        return w, torch.ones((), dtype=w.dtype, device=w.device)
    axis = 0 if scheme.weight_granularity == "per_channel" else None
    mn, mx = tensor_range(w, axis)
    out, scale, _ = fake_quant_range(w, mn, mx, scheme.weight_bits, scheme.weight_symmetric,
                                     scheme.weight_narrow_range, scheme.rounding, axis)
    return out, scale


def fake_quant_bias(b: torch.Tensor, scale: torch.Tensor, rounding: str) -> torch.Tensor:
    """An int32 bias at ``scale`` (= s_in * s_w, scalar or per channel), zero point 0."""
    scale = scale.detach().float().expand_as(b) if scale.dim() == 0 else scale.detach().float()
    zp = torch.zeros_like(scale, dtype=torch.int32)
    return fake_quant(b, torch.clamp(scale, min=_MIN_SCALE), zp, INT32_MIN, INT32_MAX, rounding, axis=0)
