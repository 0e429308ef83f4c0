"""Execute an exported full-integer .tflite file in torch: fake-quant float or bit-exact integer.

Everything (graph, constants, scales, zero points, options) comes from the file through
:mod:`ghnq_deploy.quant.tflite_graph`, so a simulation and the artifact share their encodings.

Arithmetic modes:
- ``"fake-quant"``: float32 math on dequantized int8 weights / int32 biases, every op's output
  quantized to its tensor's scale and zero point (half away from zero, as TFLite's QUANTIZE)
  and clamped to the fused activation's range: the target scheme, without integer rounding.
- ``"integer"``: int32 accumulation plus bias, requantization through the Q31 multiplier and
  shift, and the reference kernels' integer rules per op (ADD's 20-bit left shift and input
  multipliers, AVERAGE_POOL's rounded division, MEAN's rescaled multiplier, ...). ``rounding``
  picks the requantization: ``"double"`` (TFLite default builds, BUILTIN_REF), ``"single"``
  (TFLITE_SINGLE_ROUNDING: TFLite Micro, CMSIS-NN) or ``"xnnpack"`` (fp32 scale, ties to even,
  as XNNPACK's int8 kernels requantize; an approximation whose distance we measure).
  ``kernels`` picks whose reference kernels the integer rules follow where they part:
  ``"litert-ref"`` (LiteRT's BUILTIN_REF) or ``"tflm"`` (TensorFlow Lite Micro's, as the
  tflite-micro wheel runs them). Measured difference: the per-channel int8 FULLY_CONNECTED,
  which BUILTIN_REF requantizes with single rounding and TFLite Micro with double.

Convolutions run as torch conv2d on exact integers in float32 when every partial sum is
provably below 2^24, else float64 (exact below 2^53), so integer results are bit-exact.
Ops are a registry (builtin name -> kernel); a new op is one registered function.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ghnq_deploy.errors import UserError
from ghnq_deploy.quant import requantize as rq
from ghnq_deploy.quant import unary_int8 as unary
from ghnq_deploy.quant.tflite_graph import Graph, Operator, read_tflite

ARITHMETICS = ("fake-quant", "integer")
KERNEL_SETS = ("litert-ref", "tflm")
KERNELS: dict[str, Callable[["Simulator", Operator], None]] = {}


def register(*names: str):
    """Register the kernel of one or more TFLite builtin ops."""

    def deco(fn):
        for name in names:
            KERNELS[name] = fn
        return fn

    return deco


_QRANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255), np.dtype(np.int16): (-32768, 32767),
           np.dtype(np.int32): (rq.INT32_MIN, rq.INT32_MAX)}


@dataclass
class _Conv:
    weight: torch.Tensor  # torch layout (O, I/groups, KH, KW): ints (integer) or dequantized floats
    bias: torch.Tensor | None  # int64 (integer) or float32 (fake-quant), per output channel
    multiplier: np.ndarray
    shift: np.ndarray
    scale_f32: torch.Tensor  # fp32 requantization scale (xnnpack rounding)
    dtype: torch.dtype  # conv arithmetic dtype: float32 when provably exact, else float64
    bound: float | None = None  # static bound on |accumulator + bias| (integer mode)

    @property
    def bias_arith(self) -> torch.Tensor | None:
        """The bias in the arithmetic dtype (integer mode: exact, every partial sum is below the bound)."""
        return None if self.bias is None else self.bias.to(self.dtype)


class Simulator:
    """One parsed model, run batch by batch; ``cache`` holds per-op prepared constants."""

    def __init__(self, graph: Graph, arithmetic: str = "fake-quant", rounding: str = "double",
                 kernels: str = "litert-ref"):
        if arithmetic not in ARITHMETICS:
            raise UserError(f"unknown arithmetic {arithmetic!r}; choose from {', '.join(ARITHMETICS)}")
        if rounding not in rq.ROUNDINGS:
            raise UserError(f"unknown rounding {rounding!r}; choose from {', '.join(rq.ROUNDINGS)}")
        if kernels not in KERNEL_SETS:
            raise UserError(f"unknown simulator kernel set {kernels!r}; choose from {', '.join(KERNEL_SETS)}")
        if arithmetic == "fake-quant" and rounding != "double":
            raise UserError("--rounding applies to integer arithmetic only (fake-quant has no fixed-point rounding)")
        for op in graph.operators:
            if op.op not in KERNELS:
                raise UserError(f"{graph.path}: op {op.op} (operator {op.index}) has no simulator kernel")
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise UserError(f"{graph.path}: the simulator runs single-input single-output models "
                            f"({len(graph.inputs)} inputs, {len(graph.outputs)} outputs)")
        self.graph, self.arithmetic, self.rounding, self.kernels = graph, arithmetic, rounding, kernels
        self.integer = arithmetic == "integer"
        self.cache: dict[int, object] = {}
        self.env: dict[int, torch.Tensor] = {}
        self._scratch: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    # -- tensor access -------------------------------------------------------------------------
    def meta(self, index: int):
        return self.graph.tensors[index]

    def value(self, index: int) -> torch.Tensor:
        if index in self.env:
            return self.env[index]
        t = self.meta(index)
        if t.data is None:
            raise UserError(f"{self.graph.path}: tensor {t.name!r} is read before any op writes it")
        v = torch.from_numpy(t.data.astype(np.int64) if t.data.dtype.kind in "iub" else t.data.astype(np.float32))
        self.env[index] = v
        return v

    def qparams(self, index: int) -> tuple[float, int]:
        t = self.meta(index)
        if t.quantization is None:
            raise UserError(f"{self.graph.path}: tensor {t.name!r} ({t.dtype}) has no quantization parameters")
        return t.scale, t.zero_point

    def set(self, index: int, value: torch.Tensor) -> None:
        self.env[index] = value

    def dequantized(self, index: int) -> torch.Tensor:
        """Real values of an int tensor (float32), as fake-quant reads them."""
        scale, zero = self.qparams(index)
        return (self.value(index).to(torch.float32) - zero) * np.float32(scale)

    def activation_range(self, out_index: int, activation: str | None) -> tuple[int, int]:
        """The integer clamp of a fused activation (CalculateActivationRangeQuantized)."""
        t = self.meta(out_index)
        lo, hi = _QRANGE[t.dtype]
        if activation in (None, "NONE") or t.quantization is None:
            return lo, hi
        scale, zero = t.scale, t.zero_point

        def q(f: float) -> int:
            return zero + int(rq.round_half_away(np.float32(f) / np.float32(scale)))

        if activation == "RELU":
            return max(lo, q(0.0)), hi
        if activation == "RELU6":
            return max(lo, q(0.0)), min(hi, q(6.0))
        if activation == "RELU_N1_TO_1":
            return max(lo, q(-1.0)), min(hi, q(1.0))
        raise UserError(f"{self.graph.path}: fused activation {activation} is not simulated")

    def quantize_output(self, out_index: int, real: torch.Tensor, activation: str | None = None) -> None:
        """fake-quant: real -> the output tensor's grid (half away from zero), clamped."""
        scale, zero = self.qparams(out_index)
        lo, hi = self.activation_range(out_index, activation)
        y = real.to(torch.float32) / np.float32(scale)
        q = torch.trunc(y + torch.copysign(torch.tensor(0.5, dtype=torch.float32), y)) + zero
        self.set(out_index, q.clamp(lo, hi).to(torch.int32))

    def scratch(self, slot: int, shape, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A work buffer of ``shape`` (one flat buffer per slot and dtype, grown as needed, reused by
        every op): fresh large tensors cost more in page faults than the passes over them."""
        numel = int(np.prod(shape))
        buf = self._scratch.get((slot, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            self._scratch[(slot, dtype)] = buf
        return buf[:numel].view(tuple(shape))

    def requantized(self, out_index: int, acc: torch.Tensor, multiplier, shift, scale_f32, activation,
                    rounding: str | None = None, bound: float | None = None) -> None:
        """integer: int32 accumulator (exact integers in any dtype) -> output via the multiplier
        (or fp32 scale), + zero point, clamp; int8 outputs are held as torch.int8."""
        _, zero = self.qparams(out_index)
        lo, hi = self.activation_range(out_index, activation)
        rounding = rounding or self.rounding
        out_dtype = torch.int8 if self.meta(out_index).dtype == np.int8 else torch.int32
        if rounding == "xnnpack":
            y = acc.to(torch.float32) * scale_f32
            y = y.clamp(float(lo - zero), float(hi - zero))
            out = rq.round_half_even_f32(y).to(torch.int64) + zero
        else:
            fast = rq.requantize_clamped(acc, multiplier, shift, rounding, bound, zero, lo, hi, out_dtype,
                                         self.scratch(0, acc.shape), self.scratch(1, acc.shape) if lo < zero else None)
            if fast is not None:
                self.set(out_index, fast)
                return
            out = rq.multiply_by_quantized_multiplier(acc.to(torch.int64), multiplier, shift, rounding) + zero
        self.set(out_index, out.clamp(lo, hi).to(out_dtype))

    def multiplier(self, real) -> tuple[np.ndarray, np.ndarray]:
        return rq.quantize_multiplier(real, single=self.rounding == "single")

    # -- running -------------------------------------------------------------------------------
    def run(self, x: np.ndarray, keep_all: bool = False) -> dict[int, np.ndarray] | np.ndarray:
        """Run one batch of the file's input tensor; the raw output (or every tensor with ``keep_all``)."""
        self.env = {}
        src = self.graph.inputs[0]
        self.set(src, torch.from_numpy(np.ascontiguousarray(x)).to(
            torch.float32 if self.meta(src).dtype.kind == "f" else torch.int32))
        with torch.no_grad():
            for op in self.graph.operators:
                KERNELS[op.op](self, op)
        dst = self.graph.outputs[0]
        if keep_all:
            return {i: self._as_file_dtype(i, v) for i, v in self.env.items() if self.meta(i).data is None}
        return self._as_file_dtype(dst, self.env[dst])

    def _as_file_dtype(self, index: int, v: torch.Tensor) -> np.ndarray:
        return v.numpy().astype(self.meta(index).dtype)


def _check_input(graph: Graph, inputs: np.ndarray) -> np.ndarray:
    t = graph.tensors[graph.inputs[0]]
    x = np.asarray(inputs)
    if x.dtype != t.dtype:
        raise UserError(f"{graph.path}: input must be {t.dtype} (the file's input tensor, already quantized), "
                        f"got {x.dtype}")
    if x.ndim != len(t.shape) or tuple(x.shape[1:]) != tuple(t.shape[1:]):
        raise UserError(f"{graph.path}: input shape {list(x.shape)}, the file expects [N, "
                        f"{', '.join(str(v) for v in t.shape[1:])}]")
    return x


def load(model_file: str | os.PathLike | bytes | Graph, arithmetic: str = "fake-quant",
         rounding: str = "double", kernels: str = "litert-ref") -> Simulator:
    graph = model_file if isinstance(model_file, Graph) else read_tflite(model_file, supported=frozenset(KERNELS))
    return Simulator(graph, arithmetic, rounding, kernels)


def simulate(model_file: str | os.PathLike | bytes | Graph, inputs: np.ndarray, arithmetic: str = "fake-quant",
             rounding: str = "double", batch_size: int = 256, kernels: str = "litert-ref") -> np.ndarray:
    """The file's raw output tensor (int8 for full-integer files) for its raw input tensor.

    ``inputs`` is what the interpreter's input takes: int8 NHWC, already quantized with the
    file's input scale and zero point.
    """
    sim = load(model_file, arithmetic, rounding, kernels)
    x = _check_input(sim.graph, inputs)
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    outs = [sim.run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    if not outs:
        raise UserError("no input images to simulate")
    return np.concatenate(outs)


def simulate_all(model_file, inputs: np.ndarray, arithmetic: str = "integer", rounding: str = "double",
                 kernels: str = "litert-ref") -> dict[str, np.ndarray]:
    """Every intermediate tensor by name (for layer-wise comparison); run on a few samples only."""
    sim = load(model_file, arithmetic, rounding, kernels)
    kept = sim.run(_check_input(sim.graph, inputs), keep_all=True)
    return {sim.meta(i).name: v for i, v in kept.items()}


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

def _same_padding(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _spatial_pads(padding: str, h: int, w: int, kh: int, kw: int, sh: int, sw: int, dh: int = 1, dw: int = 1):
    """(left, right, top, bottom) as F.pad takes them for NCHW."""
    if padding == "VALID":
        return 0, 0, 0, 0
    top, bottom = _same_padding(h, kh, sh, dh)
    left, right = _same_padding(w, kw, sw, dw)
    return left, right, top, bottom


def _prepare_conv(sim: Simulator, op: Operator, depthwise: bool) -> _Conv:
    cached = sim.cache.get(op.index)
    if cached is not None:
        return cached
    x_i, w_i = op.inputs[0], op.inputs[1]
    b_i = op.inputs[2] if len(op.inputs) > 2 else -1
    wt = sim.meta(w_i)
    w = wt.data.astype(np.int64)
    if depthwise:  # (1, KH, KW, C*M) -> (C*M, 1, KH, KW)
        w = w.reshape(w.shape[1], w.shape[2], w.shape[3]).transpose(2, 0, 1)[:, None]
    else:  # (O, KH, KW, I) -> (O, I, KH, KW)
        w = w.transpose(0, 3, 1, 2)
    channels = w.shape[0]
    w_scale = np.broadcast_to(wt.quantization.scale.astype(np.float64), (channels,))
    w_zero = np.broadcast_to(wt.quantization.zero_point, (channels,))
    if np.any(w_zero != 0):
        raise UserError(f"{sim.graph.path}: {op.op} weight {wt.name!r} has non-zero zero points "
                        f"(TFLite int8 weights are symmetric)")
    in_scale, _ = sim.qparams(x_i)
    out_scale, _ = sim.qparams(op.outputs[0])
    real = np.float64(in_scale) * w_scale / np.float64(out_scale)
    multiplier, shift = sim.multiplier(real)
    scale_f32 = torch.from_numpy((np.float32(in_scale) * w_scale.astype(np.float32) / np.float32(out_scale))
                                 .astype(np.float32))
    bias = None
    if b_i >= 0:
        bt = sim.meta(b_i)
        b = bt.data.astype(np.int64).reshape(-1)
        if sim.integer:
            bias = torch.from_numpy(b)
        else:
            b_scale = np.broadcast_to(bt.quantization.scale, b.shape).astype(np.float32)
            bias = torch.from_numpy((b.astype(np.float32) * b_scale).astype(np.float32))
    if sim.integer:
        # every partial sum (bias included) is bounded by |b| + sum|w| * max|x - zp| (<= 255 for int8)
        sums = np.abs(w).reshape(channels, -1).sum(axis=1) * 255.0
        bias_abs = np.abs(bias.numpy()) if bias is not None else 0.0
        bound = float((sums + bias_abs).max(initial=0))
        dtype = torch.float32 if bound < 2.0 ** 24 else torch.float64
        weight = torch.from_numpy(w.astype(np.float32 if dtype == torch.float32 else np.float64))
    else:
        dtype, bound = torch.float32, None
        weight = torch.from_numpy((w * w_scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32))
    prepared = _Conv(weight, bias, multiplier, shift, scale_f32, dtype, bound)
    sim.cache[op.index] = prepared
    return prepared


def _padded_input(sim: Simulator, x: torch.Tensor, zero: int, pads, dtype: torch.dtype) -> torch.Tensor:
    """NHWC ``x - zero`` in ``dtype`` with zero borders (the kernels skip out-of-image taps), built
    in a reused buffer: two fresh full-size tensors per conv cost more than the conv's own passes."""
    left, right, top, bottom = pads
    n, h, w, c = x.shape
    buf = sim.scratch(2, (n, h + top + bottom, w + left + right, c), dtype)
    for border in (buf[:, :top], buf[:, top + h:], buf[:, top:top + h, :left], buf[:, top:top + h, left + w:]):
        if border.numel():
            border.zero_()
    buf[:, top:top + h, left:left + w].copy_(x).sub_(zero)
    return buf


def _conv_common(sim: Simulator, op: Operator, depthwise: bool) -> None:
    o = op.options
    p = _prepare_conv(sim, op, depthwise)
    x_i, out_i = op.inputs[0], op.outputs[0]
    _, in_zero = sim.qparams(x_i)
    x = sim.value(x_i)
    kh, kw = p.weight.shape[2], p.weight.shape[3]
    sh, sw = o["stride_h"], o["stride_w"]
    dh, dw = o.get("dilation_h_factor", 1), o.get("dilation_w_factor", 1)
    pads = _spatial_pads(o["padding"], x.shape[1], x.shape[2], kh, kw, sh, sw, dh, dw)
    if sim.integer:  # x - zp (exact integers) written into a reused, zero-bordered buffer
        xc = _padded_input(sim, x, in_zero, pads, p.dtype).permute(0, 3, 1, 2)  # NHWC -> NCHW view
    else:
        xc = sim.dequantized(x_i).permute(0, 3, 1, 2)
        if any(pads):
            xc = F.pad(xc, pads)  # zeros of (x - zp): the kernels skip out-of-image taps
    groups = xc.shape[1] // p.weight.shape[1]
    act = o.get("fused_activation_function")
    if sim.integer:  # the bias inside the conv: every partial sum is an exact integer below the bound
        acc = F.conv2d(xc, p.weight, p.bias_arith, stride=(sh, sw), dilation=(dh, dw), groups=groups)
        sim.requantized(out_i, acc.permute(0, 2, 3, 1), p.multiplier, p.shift, p.scale_f32, act, bound=p.bound)
    else:
        y = F.conv2d(xc, p.weight, stride=(sh, sw), dilation=(dh, dw), groups=groups).permute(0, 2, 3, 1)
        if p.bias is not None:
            y = y + p.bias
        sim.quantize_output(out_i, y, act)


@register("CONV_2D")
def _conv2d(sim: Simulator, op: Operator) -> None:
    _conv_common(sim, op, depthwise=False)


@register("DEPTHWISE_CONV_2D")
def _depthwise(sim: Simulator, op: Operator) -> None:
    _conv_common(sim, op, depthwise=True)


@register("FULLY_CONNECTED")
def _fully_connected(sim: Simulator, op: Operator) -> None:
    o = op.options
    if o.get("keep_num_dims"):
        raise UserError(f"{sim.graph.path}: FULLY_CONNECTED with keep_num_dims is not simulated")
    p = sim.cache.get(op.index)
    if p is None:
        wt = sim.meta(op.inputs[1])
        w = wt.data.astype(np.int64)  # (O, K)
        channels = w.shape[0]
        w_scale = np.broadcast_to(wt.quantization.scale.astype(np.float64), (channels,))
        in_scale, _ = sim.qparams(op.inputs[0])
        out_scale, _ = sim.qparams(op.outputs[0])
        multiplier, shift = sim.multiplier(np.float64(in_scale) * w_scale / np.float64(out_scale))
        scale_f32 = torch.from_numpy((np.float32(in_scale) * w_scale.astype(np.float32) / np.float32(out_scale))
                                     .astype(np.float32))
        bias = None
        b_i = op.inputs[2] if len(op.inputs) > 2 else -1
        if b_i >= 0:
            bt = sim.meta(b_i)
            b = bt.data.astype(np.int64).reshape(-1)
            bias = torch.from_numpy(b) if sim.integer else torch.from_numpy(
                (b.astype(np.float32) * np.broadcast_to(bt.quantization.scale, b.shape)).astype(np.float32))
        if sim.integer:
            bound = float((np.abs(w).sum(axis=1) * 255.0 + (np.abs(bias.numpy()) if bias is not None else 0.0))
                          .max(initial=0))
            dtype = torch.float32 if bound < 2.0 ** 24 else torch.float64
            weight = torch.from_numpy(w.T.astype(np.float32 if dtype == torch.float32 else np.float64).copy())
        else:
            dtype = torch.float32
            weight = torch.from_numpy((w * w_scale[:, None]).T.astype(np.float32).copy())
        p = _Conv(weight, bias, multiplier, shift, scale_f32, dtype, bound if sim.integer else None)
        sim.cache[op.index] = p
    x_i, out_i = op.inputs[0], op.outputs[0]
    k = p.weight.shape[0]
    if sim.integer:
        _, in_zero = sim.qparams(x_i)
        x = sim.value(x_i).to(p.dtype).sub_(in_zero).reshape(-1, k)
        acc = torch.addmm(p.bias_arith, x, p.weight) if p.bias is not None else x @ p.weight
        # measured against BUILTIN_REF (ai-edge-litert 2.3): the per-channel int8 FULLY_CONNECTED
        # reference kernel requantizes with single rounding even in double-rounding builds;
        # TFLite Micro's (tflite-micro wheel) rounds it twice like every other op
        per_channel_single = sim.kernels == "litert-ref" and p.multiplier.size > 1
        rounding = "single" if sim.rounding == "double" and per_channel_single else None
        sim.requantized(out_i, acc, p.multiplier, p.shift, p.scale_f32, o.get("fused_activation_function"), rounding,
                        bound=p.bound)
    else:
        y = sim.dequantized(x_i).reshape(-1, k) @ p.weight
        if p.bias is not None:
            y = y + p.bias
        sim.quantize_output(out_i, y, o.get("fused_activation_function"))


def _gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a contiguous index; index_select measured ~7x faster than advanced indexing."""
    return torch.index_select(table, 0, index.view(-1)).view(index.shape)


def _binary_via_table(sim: Simulator, op: Operator, fn) -> None:
    """An elementwise op of two int8 tensors: its output is a function of the pair of input codes,
    so ``fn`` (the exact kernel on int64 tensors) runs once on all 65,536 pairs and the tensors
    are looked up: bit-identical to running ``fn`` on them, and one gather instead of ~30 passes."""
    a_i, b_i = op.inputs[:2]
    table = sim.cache.get(op.index)
    if table is None:
        codes = torch.arange(-128, 128, dtype=torch.int64)
        table = fn(codes[:, None].expand(256, 256), codes[None, :].expand(256, 256)).reshape(-1).to(torch.int8)
        sim.cache[op.index] = table
    a, b = sim.value(a_i), sim.value(b_i)
    # int32 indices (a third of int64's gather time) built in place in a reused buffer
    index = sim.scratch(0, torch.broadcast_shapes(a.shape, b.shape), torch.int32)
    index.copy_(a.expand(index.shape)).mul_(256).add_(b).add_(128 * 256 + 128)
    sim.set(op.outputs[0], _gather(table, index))


def _int8_pair(sim: Simulator, op: Operator) -> bool:
    return all(sim.meta(i).dtype == np.int8 for i in (*op.inputs[:2], op.outputs[0]))


@register("ADD")
def _add(sim: Simulator, op: Operator) -> None:
    a_i, b_i = op.inputs[:2]
    out_i = op.outputs[0]
    act = op.options.get("fused_activation_function")
    if not sim.integer:
        sim.quantize_output(out_i, sim.dequantized(a_i) + sim.dequantized(b_i), act)
        return
    (sa, za), (sb, zb), (so, zo) = sim.qparams(a_i), sim.qparams(b_i), sim.qparams(out_i)
    lo, hi = sim.activation_range(out_i, act)
    rounding = sim.rounding
    ra, rb = np.float32(np.float32(sa) / np.float32(so)), np.float32(np.float32(sb) / np.float32(so))
    if rounding == "xnnpack" and not all(2.0 ** -10 <= r < 2.0 ** 8 for r in (ra, rb)):
        # outside XNNPACK's supported scale ratios LiteRT runs its builtin kernel, which follows the
        # reference rule (except at extreme ratios, ~1e5, where it overflows int32: not modelled)
        rounding = "double"
    if rounding == "xnnpack":  # XNNPACK's qs8 add: 20-bit multipliers from fp32 scale ratios, one shift
        shift = 20 - (int(np.array(max(ra, rb), np.float32).view(np.uint32) >> 23) - 127)
        ma = int(np.rint(np.float32(ra * np.float32(2.0 ** shift))))
        mb = int(np.rint(np.float32(rb * np.float32(2.0 ** shift))))
    else:  # add.cc Prepare: both inputs to a common 2*max scale, 20 bits of headroom
        left_shift = 20
        twice_max = 2.0 * max(np.float64(sa), np.float64(sb))
        m1, s1 = sim.multiplier(np.float64(sa) / twice_max)
        m2, s2 = sim.multiplier(np.float64(sb) / twice_max)
        mo, so_ = sim.multiplier(twice_max / ((1 << left_shift) * np.float64(so)))

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.to(torch.int64) - za, b.to(torch.int64) - zb
        if rounding == "xnnpack":  # measured equal to the default kernels on every pair of codes
            out = ((a * ma + b * mb + (1 << (shift - 1))) >> shift) + zo
        else:
            a = rq.multiply_by_quantized_multiplier(a << left_shift, m1, s1, rounding)
            b = rq.multiply_by_quantized_multiplier(b << left_shift, m2, s2, rounding)
            out = rq.multiply_by_quantized_multiplier(a + b, mo, so_, rounding) + zo
        return out.clamp(lo, hi).to(torch.int32)

    if _int8_pair(sim, op):
        _binary_via_table(sim, op, kernel)
    else:
        sim.set(out_i, kernel(sim.value(a_i), sim.value(b_i)))


@register("MUL")
def _mul(sim: Simulator, op: Operator) -> None:
    a_i, b_i = op.inputs[:2]
    out_i = op.outputs[0]
    act = op.options.get("fused_activation_function")
    if not sim.integer:
        sim.quantize_output(out_i, sim.dequantized(a_i) * sim.dequantized(b_i), act)
        return
    (sa, za), (sb, zb), (so, zo) = sim.qparams(a_i), sim.qparams(b_i), sim.qparams(out_i)
    m, s = sim.multiplier(np.float64(sa) * np.float64(sb) / np.float64(so))
    scale_f32 = np.float32(np.float32(sa) * np.float32(sb) / np.float32(so))
    lo, hi = sim.activation_range(out_i, act)
    rounding = sim.rounding

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        prod = (a.to(torch.int64) - za) * (b.to(torch.int64) - zb)
        if rounding == "xnnpack":
            out = rq.round_half_even_f32(prod.to(torch.float32) * scale_f32).to(torch.int64) + zo
        else:
            out = rq.multiply_by_quantized_multiplier(prod, m, s, rounding) + zo
        return out.clamp(lo, hi).to(torch.int32)

    if _int8_pair(sim, op):
        _binary_via_table(sim, op, kernel)
    else:
        sim.set(out_i, kernel(sim.value(a_i), sim.value(b_i)))


def _pool_inputs(sim: Simulator, op: Operator):
    o = op.options
    x = sim.value(op.inputs[0]).permute(0, 3, 1, 2)
    kh, kw, sh, sw = o["filter_height"], o["filter_width"], o["stride_h"], o["stride_w"]
    pads = _spatial_pads(o["padding"], x.shape[2], x.shape[3], kh, kw, sh, sw)
    return x, (kh, kw), (sh, sw), pads


@register("MAX_POOL_2D")
def _max_pool(sim: Simulator, op: Operator) -> None:
    x, k, s, pads = _pool_inputs(sim, op)
    xf = x.to(torch.float32)  # exact for int8 values
    if any(pads):
        xf = F.pad(xf, pads, value=-float("inf"))
    y = F.max_pool2d(xf, k, s).permute(0, 2, 3, 1)
    lo, hi = sim.activation_range(op.outputs[0], op.options.get("fused_activation_function"))
    sim.set(op.outputs[0], y.clamp(lo, hi).to(torch.int32))


@register("AVERAGE_POOL_2D")
def _avg_pool(sim: Simulator, op: Operator) -> None:
    x, k, s, pads = _pool_inputs(sim, op)
    out_i = op.outputs[0]
    act = op.options.get("fused_activation_function")
    ones = torch.ones((1, 1, x.shape[2], x.shape[3]), dtype=torch.float64)
    if any(pads):
        ones = F.pad(ones, pads)
    count = F.avg_pool2d(ones, k, s, divisor_override=1).permute(0, 2, 3, 1).round().to(torch.int64)
    if not sim.integer:
        xr = sim.dequantized(op.inputs[0]).permute(0, 3, 1, 2).to(torch.float32)
        if any(pads):
            xr = F.pad(xr, pads)
        total = F.avg_pool2d(xr, k, s, divisor_override=1).permute(0, 2, 3, 1)
        sim.quantize_output(out_i, total / count.to(torch.float32), act)
        return
    xf = x.to(torch.float64)
    if any(pads):
        xf = F.pad(xf, pads)
    acc = F.avg_pool2d(xf, k, s, divisor_override=1).permute(0, 2, 3, 1).round().to(torch.int64)
    lo, hi = sim.activation_range(out_i, act)
    # the raw int8 sum divided by the tap count, rounded half away from zero; measured: the
    # default (XNNPACK) path computes int8 average pools the same way (rounding="xnnpack" too)
    half = count // 2
    out = torch.where(acc > 0, torch.div(acc + half, count, rounding_mode="trunc"),
                      torch.div(acc - half, count, rounding_mode="trunc"))
    sim.set(out_i, out.clamp(lo, hi).to(torch.int32))


def _axes(sim: Simulator, index: int, rank: int) -> list[int]:
    return sorted({int(a) % rank for a in sim.value(index).reshape(-1).tolist()})


@register("MEAN")
def _mean(sim: Simulator, op: Operator) -> None:
    x_i, out_i = op.inputs[0], op.outputs[0]
    x = sim.value(x_i)
    axes = _axes(sim, op.inputs[1], x.dim())
    keep = bool(op.options.get("keep_dims"))
    count = int(np.prod([x.shape[a] for a in axes]))
    if not sim.integer:
        sim.quantize_output(out_i, sim.dequantized(x_i).mean(dim=axes, keepdim=keep))
        return
    (si, zi), (so, zo) = sim.qparams(x_i), sim.qparams(out_i)
    total = x.to(torch.int64).sum(dim=axes, keepdim=keep)
    if keep and x.dim() == 4 and axes == [1, 2]:
        raise UserError(f"{sim.graph.path}: MEAN over H, W with keep_dims has no integer kernel in the simulator")
    if sim.rounding == "xnnpack":
        y = (total - zi * count).to(torch.float32) * np.float32(np.float32(si) / (np.float32(so) * count))
        out = rq.round_half_even_f32(y).to(torch.int64) + zo
    elif si == so and zi == zo:  # reference_ops::Mean: integer division of the raw sum
        out = torch.div(total, count, rounding_mode="trunc")
    else:  # QuantizedMeanOrSum: the 1/count factor folded into the multiplier
        mult, shift = sim.multiplier(np.float64(si) / np.float64(so))
        mult, shift = int(mult[0]), int(shift[0])
        n_shift = min(count.bit_length() - 1, 32, 31 + shift)
        mult = (mult << n_shift) // count
        out = rq.multiply_by_quantized_multiplier(total - zi * count, mult, shift - n_shift, sim.rounding) + zo
    sim.set(out_i, out.clamp(-128, 127).to(torch.int32))


@register("CONCATENATION")
def _concat(sim: Simulator, op: Operator) -> None:
    out_i = op.outputs[0]
    rank = sim.value(op.inputs[0]).dim()
    axis = op.options.get("axis", 0) % rank
    so, zo = sim.qparams(out_i)
    lo, hi = sim.activation_range(out_i, op.options.get("fused_activation_function"))
    parts = []
    for i in op.inputs:
        si, zi = sim.qparams(i)
        v = sim.value(i)
        if si == so and zi == zo:
            parts.append(v.to(torch.int64))
        elif sim.integer and sim.rounding != "xnnpack":  # ConcatenationWithScaling: float scale, std::round
            scale = np.float32(si) * (np.float32(1.0) / np.float32(so))
            bias = np.float32(-zi) * scale
            y = v.to(torch.float32) * scale + bias
            parts.append(torch.trunc(y + torch.copysign(torch.tensor(0.5), y)).to(torch.int64) + zo)
        elif sim.integer:
            y = (v.to(torch.float32) - zi) * np.float32(np.float32(si) / np.float32(so))
            parts.append(rq.round_half_even_f32(y).to(torch.int64) + zo)
        else:
            y = sim.dequantized(i) / np.float32(so)
            parts.append(torch.trunc(y + torch.copysign(torch.tensor(0.5), y)).to(torch.int64) + zo)
    sim.set(out_i, torch.cat(parts, dim=axis).clamp(lo, hi).to(torch.int32))


def _paddings(sim: Simulator, index: int) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in row) for row in sim.value(index).reshape(-1, 2).tolist()]


@register("PAD", "PADV2")
def _pad(sim: Simulator, op: Operator) -> None:
    x = sim.value(op.inputs[0])
    pads = _paddings(sim, op.inputs[1])
    out = sim.meta(op.outputs[0])
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        fill = int(sim.value(op.inputs[2]).reshape(-1)[0])
    else:
        fill = out.zero_point if out.quantization is not None else 0
    flat = [v for pair in reversed(pads) for v in pair]
    sim.set(op.outputs[0], F.pad(x, flat, value=fill))


@register("MIRROR_PAD")
def _mirror_pad(sim: Simulator, op: Operator) -> None:
    x = sim.value(op.inputs[0]).numpy()
    mode = {"REFLECT": "reflect", "SYMMETRIC": "symmetric"}[op.options["mode"]]
    sim.set(op.outputs[0], torch.from_numpy(np.pad(x, _paddings(sim, op.inputs[1]), mode=mode)))


@register("RESHAPE")
def _reshape(sim: Simulator, op: Operator) -> None:
    x = sim.value(op.inputs[0])
    if len(op.inputs) > 1 and op.inputs[1] >= 0:
        shape = [int(v) for v in sim.value(op.inputs[1]).reshape(-1).tolist()]
    else:
        shape = list(op.options.get("new_shape") or [])
    sim.set(op.outputs[0], x.reshape(shape))


@register("SHAPE")
def _shape(sim: Simulator, op: Operator) -> None:
    sim.set(op.outputs[0], torch.tensor(list(sim.value(op.inputs[0]).shape), dtype=torch.int64))


@register("STRIDED_SLICE")
def _strided_slice(sim: Simulator, op: Operator) -> None:
    o = op.options
    if o.get("ellipsis_mask") or o.get("new_axis_mask"):
        raise UserError(f"{sim.graph.path}: STRIDED_SLICE with ellipsis / new-axis masks is not simulated")
    x = sim.value(op.inputs[0])
    begin, end, strides = (sim.value(i).reshape(-1).tolist() for i in op.inputs[1:4])
    index = []
    for d, (b, e, s) in enumerate(zip(begin, end, strides)):
        if o.get("shrink_axis_mask", 0) >> d & 1:
            index.append(int(b))
            continue
        start = None if o.get("begin_mask", 0) >> d & 1 else int(b)
        stop = None if o.get("end_mask", 0) >> d & 1 else (int(b) + int(e) if o.get("offset") else int(e))
        index.append(slice(start, stop, int(s)))
    sim.set(op.outputs[0], torch.as_tensor(np.array(x.numpy()[tuple(index)])))


@register("PACK")
def _pack(sim: Simulator, op: Operator) -> None:
    values = [sim.value(i).to(torch.int64) if sim.value(i).dtype != torch.float32 else sim.value(i) for i in op.inputs]
    sim.set(op.outputs[0], torch.stack(values, dim=op.options.get("axis", 0)))


@register("QUANTIZE")
def _quantize(sim: Simulator, op: Operator) -> None:
    x_i, out_i = op.inputs[0], op.outputs[0]
    so, zo = sim.qparams(out_i)
    lo, hi = _QRANGE[sim.meta(out_i).dtype]
    if sim.meta(x_i).dtype.kind == "f":  # AffineQuantize: float division, std::round
        y = sim.value(x_i).to(torch.float32) / np.float32(so)
        q = torch.trunc(y + torch.copysign(torch.tensor(0.5), y)) + zo
        sim.set(out_i, q.clamp(lo, hi).to(torch.int32))
        return
    si, zi = sim.qparams(x_i)
    if not sim.integer:
        sim.quantize_output(out_i, sim.dequantized(x_i))
        return
    m, s = sim.multiplier(np.float64(si) / np.float64(so))
    scale_f32 = torch.tensor(np.float32(si) / np.float32(so))
    sim.requantized(out_i, sim.value(x_i).to(torch.int64) - zi, m, s, scale_f32, None)


@register("DEQUANTIZE")
def _dequantize(sim: Simulator, op: Operator) -> None:
    s, z = sim.qparams(op.inputs[0])
    v = (sim.value(op.inputs[0]).to(torch.float64) - z) * np.float64(s)
    sim.set(op.outputs[0], v.to(torch.float32))


def _unary_via_table(sim: Simulator, op: Operator, tables: dict, exact) -> None:
    """An int8 -> int8 activation: the kernel's table over the 256 input codes, then a gather;
    ``tables`` maps rounding mode -> table builder, ``exact`` is the float function (fake-quant)."""
    x_i, out_i = op.inputs[0], op.outputs[0]
    if not sim.integer:
        sim.quantize_output(out_i, exact(sim.dequantized(x_i)))
        return
    if sim.meta(x_i).dtype != np.int8 or sim.meta(out_i).dtype != np.int8:
        raise UserError(f"{sim.graph.path}: {op.op} (operator {op.index}) is simulated for int8 tensors only")
    table = sim.cache.get(op.index)
    if table is None:
        (si, zi), (so, zo) = sim.qparams(x_i), sim.qparams(out_i)
        build = tables.get(sim.rounding, tables["double"])
        table = torch.from_numpy(build(si, zi, so, zo).astype(np.int8))
        sim.cache[op.index] = table
    x = sim.value(x_i)
    index = sim.scratch(0, x.shape, torch.int32).copy_(x).add_(128)  # reused int32 buffer
    sim.set(out_i, _gather(table, index))


def _hard_swish_float(x: torch.Tensor) -> torch.Tensor:
    return x * (x + 3.0).clamp(0.0, 6.0) / 6.0


@register("LOGISTIC")
def _logistic(sim: Simulator, op: Operator) -> None:
    # LiteRT's reference and generic kernels share one float LUT (no fixed-point rounding to
    # choose); TFLite Micro's kernel is gemmlowp fixed point, whose input rescale follows the build
    if sim.kernels == "tflm":
        tables = {r: functools.partial(unary.logistic_table_tflm, rounding=r) for r in ("double", "single")}
        tables["xnnpack"] = unary.logistic_table_xnnpack
    else:
        tables = {"double": unary.logistic_table, "xnnpack": unary.logistic_table_xnnpack}
    _unary_via_table(sim, op, tables, torch.sigmoid)


@register("HARD_SWISH")
def _hard_swish(sim: Simulator, op: Operator) -> None:
    # reference_ops::HardSwish is 16-bit fixed point with no single-rounding variant in TFLite;
    # measured: LiteRT's default (XNNPACK) path gives the same int8 outputs, so every mode uses it
    _unary_via_table(sim, op, {"double": unary.hard_swish_table}, _hard_swish_float)


@register("TRANSPOSE")
def _transpose(sim: Simulator, op: Operator) -> None:
    perm = [int(v) for v in sim.value(op.inputs[1]).reshape(-1).tolist()]
    sim.set(op.outputs[0], sim.value(op.inputs[0]).permute(*perm).contiguous())


def _nearest_index(out_size: int, in_size: int, align_corners: bool, half_pixel: bool) -> torch.Tensor:
    """reference_ops::ResizeNearestNeighbor's source index per output index (float32 math)."""
    if align_corners and out_size > 1:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
    pos = (np.arange(out_size, dtype=np.float32) + np.float32(0.5 if half_pixel else 0.0)) * scale
    idx = rq.round_half_away(pos) if align_corners else np.floor(pos)
    idx = np.minimum(idx.astype(np.int64), in_size - 1)
    return torch.from_numpy(np.maximum(idx, 0) if half_pixel else idx)


@register("RESIZE_NEAREST_NEIGHBOR")
def _resize_nearest(sim: Simulator, op: Operator) -> None:
    x = sim.value(op.inputs[0])  # NHWC
    out_h, out_w = (int(v) for v in sim.value(op.inputs[1]).reshape(-1).tolist())
    align, half = bool(op.options.get("align_corners")), bool(op.options.get("half_pixel_centers"))
    rows = _nearest_index(out_h, x.shape[1], align, half)
    cols = _nearest_index(out_w, x.shape[2], align, half)
    sim.set(op.outputs[0], x.index_select(1, rows).index_select(2, cols))
