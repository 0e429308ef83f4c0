"""Execute an exported QDQ ONNX file in torch, as fake-quant float, with the file's own encodings.

The ``onnx-int8`` export is a QDQ graph: float ops wrapped in QuantizeLinear / DequantizeLinear
pairs whose scales and zero points were calibrated at export. Interpreting that graph directly
(float32 math on dequantized values, every QuantizeLinear rounding half to even and saturating as
the ONNX spec says) is the target-scheme simulation of what ONNX Runtime's integer kernels
compute, and it shares every encoding with the artifact, as ``tflite_sim`` does for TFLite files.

It executes the graph as written, so it does not depend on how ONNX Runtime fuses the pairs into
QLinearConv / QLinearAdd; that is the runtime's part of the gap. Ops are a registry (ONNX op type
-> kernel); an op outside it raises one :class:`OnnxSimError` naming it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ghnq_deploy.errors import UserError

KERNELS: dict[str, Callable[["_Node", list], list]] = {}
_QRANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255), np.dtype(np.int16): (-32768, 32767),
           np.dtype(np.uint16): (0, 65535)}


class OnnxSimError(UserError):
    """The file cannot be simulated: not ONNX, or an op outside the simulator's registry."""


def register(*op_types: str):
    def deco(fn):
        for name in op_types:
            KERNELS[name] = fn
        return fn

    return deco


class _Node:
    """One graph node with its attributes decoded to Python values."""

    def __init__(self, proto) -> None:
        from onnx import helper

        self.op_type = proto.op_type
        self.name = proto.name or proto.op_type
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.attrs = {a.name: helper.get_attribute_value(a) for a in proto.attribute}

    def attr(self, name: str, default=None):
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value


class QDQGraph:
    """A parsed QDQ ONNX model: constants as tensors, nodes in topological (file) order."""

    def __init__(self, model_file: str | os.PathLike | bytes) -> None:
        import onnx
        from onnx import numpy_helper

        try:
            model = onnx.load_model_from_string(model_file) if isinstance(model_file, bytes) else onnx.load(
                str(model_file))
        except Exception as exc:  # DecodeError, OSError: the file is not an ONNX model
            raise OnnxSimError(f"{model_file if not isinstance(model_file, bytes) else 'model'}: not a readable "
                               f"ONNX model ({type(exc).__name__})") from None
        g = model.graph
        self.constants: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.nodes = [_Node(n) for n in g.node]
        self.input_names = [i.name for i in g.input if i.name not in self.constants]
        self.output_names = [o.name for o in g.output]
        missing = sorted({n.op_type for n in self.nodes} - set(KERNELS))
        if missing:
            raise OnnxSimError(f"the ONNX simulator has no kernel for {', '.join(missing)}")
        self._fold_constants()

    def _fold_constants(self) -> None:
        """Run once what depends only on initializers (weight / bias dequantization), not per batch."""
        known: dict[str, object] = dict(self.constants)
        known[""] = None
        rest = []
        with torch.no_grad():
            for node in self.nodes:
                if all(name in known for name in node.inputs):
                    for name, value in zip(node.outputs, KERNELS[node.op_type](node, [known[n] for n in node.inputs])):
                        known[name] = value
                else:
                    rest.append(node)
        known.pop("")
        self.values, self.nodes = known, rest


def _tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    arr = np.asarray(value)
    if arr.dtype.kind in "iu" and arr.dtype.itemsize >= 4:
        return torch.from_numpy(arr.astype(np.int64))
    if arr.dtype.kind in "iu" or arr.dtype == np.bool_:
        return torch.from_numpy(arr.astype(np.int32 if arr.dtype.kind in "iu" else np.bool_))
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


class _Quantized:
    """The output of a QuantizeLinear: integer codes (as float32) and their storage type."""

    def __init__(self, codes: torch.Tensor, dtype: np.dtype) -> None:
        self.codes, self.dtype = codes, dtype


def run(graph: QDQGraph, x: np.ndarray) -> list[np.ndarray]:
    """All graph outputs for one input batch (float32 NCHW, as the exported file takes it)."""
    env: dict[str, object] = dict(graph.values)
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    # channels_last: oneDNN's depthwise and grouped convs are several times faster in it (same values)
    env[graph.input_names[0]] = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    env[""] = None  # an omitted optional input
    for node in graph.nodes:
        outs = KERNELS[node.op_type](node, [env.get(name) for name in node.inputs])
        for name, value in zip(node.outputs, outs):
            env[name] = value
    result = []
    for name in graph.output_names:
        value = env[name]
        value = value.codes if isinstance(value, _Quantized) else _tensor(value)
        result.append(value.numpy().astype(np.float32))
    return result


def simulate(model_file: str | os.PathLike | bytes, inputs: np.ndarray, batch: int = 250) -> np.ndarray:
    """The first output of the file for ``inputs`` (float32 NCHW), in batches."""
    graph = QDQGraph(model_file)
    if len(graph.input_names) != 1:
        raise OnnxSimError(f"the ONNX simulator expects one input, the file has {len(graph.input_names)}")
    outs = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            outs.append(run(graph, inputs[i:i + batch])[0])
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


# ----------------------------------------------------------------------------- quantization


def _per_axis(param: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    if param.dim() == 0 or param.numel() == 1:
        return param.reshape(())
    shape = [1] * rank
    shape[axis % rank] = -1
    return param.reshape(shape)


def _param(value, dtype, axis: int, rank: int):
    """A scale or zero point: a Python float when per-tensor (cheaper in elementwise ops), else a tensor."""
    arr = np.array(value, dtype)  # a writable copy: torch refuses read-only numpy buffers
    if arr.size == 1:
        return float(arr.reshape(()))
    return _per_axis(torch.from_numpy(arr), axis, rank)


@register("QuantizeLinear")
def _quantize(node: _Node, ins: list) -> list:
    x = _tensor(ins[0]).float()
    zp_arr = np.asarray(ins[2]) if len(ins) > 2 and ins[2] is not None else np.zeros((), np.uint8)
    axis = node.attr("axis", 1)
    lo, hi = _QRANGE[zp_arr.dtype]
    codes = torch.div(x, _param(ins[1], np.float32, axis, x.dim()))
    codes.round_().add_(_param(zp_arr, np.float32, axis, x.dim())).clamp_(lo, hi)  # round_: half to even
    return [_Quantized(codes, zp_arr.dtype)]


@register("DequantizeLinear")
def _dequantize(node: _Node, ins: list) -> list:
    src = ins[0]
    # float32 as the runtime dequantizes; int32 constants (biases) in float64, exact beyond 2^24
    wide = not isinstance(src, _Quantized) and np.asarray(src).dtype.itemsize >= 4
    dtype = np.float64 if wide else np.float32
    codes = src.codes if isinstance(src, _Quantized) else torch.from_numpy(np.asarray(src, dtype))
    axis = node.attr("axis", 1)
    rank = codes.dim()
    zp = _param(ins[2], dtype, axis, rank) if len(ins) > 2 and ins[2] is not None else 0.0
    out = torch.sub(codes, zp) if not isinstance(zp, float) or zp != 0.0 else codes.clone()
    return [out.mul_(_param(ins[1], dtype, axis, rank)).float()]


# ----------------------------------------------------------------------------- float ops


def _pads2d(node: _Node, rank: int) -> tuple[int, int, int, int]:
    if node.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise OnnxSimError(f"{node.name}: auto_pad {node.attr('auto_pad')} is not supported by the ONNX simulator")
    pads = list(node.attr("pads", [0] * (2 * (rank - 2))))
    return pads[0], pads[1], pads[2], pads[3]  # top, left, bottom, right


@register("Conv")
def _conv(node: _Node, ins: list) -> list:
    x, w = _tensor(ins[0]), _tensor(ins[1])
    b = _tensor(ins[2]) if len(ins) > 2 and ins[2] is not None else None
    t, l, bo, r = _pads2d(node, x.dim())
    if (t, l) != (bo, r):
        x, pad = F.pad(x, (l, r, t, bo)), 0
    else:
        pad = (t, l)
    return [F.conv2d(x, w, b, stride=tuple(node.attr("strides", [1, 1])), padding=pad,
                     dilation=tuple(node.attr("dilations", [1, 1])), groups=node.attr("group", 1))]


@register("Gemm")
def _gemm(node: _Node, ins: list) -> list:
    a, b = _tensor(ins[0]), _tensor(ins[1])
    if node.attr("transA", 0):
        a = a.t()
    if node.attr("transB", 0):
        b = b.t()
    y = node.attr("alpha", 1.0) * (a @ b)
    if len(ins) > 2 and ins[2] is not None:
        y = y + node.attr("beta", 1.0) * _tensor(ins[2])
    return [y]


@register("MatMul")
def _matmul(node: _Node, ins: list) -> list:
    return [_tensor(ins[0]) @ _tensor(ins[1])]


_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}


@register(*_BINARY)
def _binary(node: _Node, ins: list) -> list:
    return [_BINARY[node.op_type](_tensor(ins[0]).float(), _tensor(ins[1]).float())]


@register("Relu")
def _relu(node: _Node, ins: list) -> list:
    return [torch.relu(_tensor(ins[0]))]


@register("Clip")
def _clip(node: _Node, ins: list) -> list:
    lo = float(_tensor(ins[1])) if len(ins) > 1 and ins[1] is not None else None
    hi = float(_tensor(ins[2])) if len(ins) > 2 and ins[2] is not None else None
    return [torch.clamp(_tensor(ins[0]), lo, hi)]


@register("Sigmoid")
def _sigmoid(node: _Node, ins: list) -> list:
    return [torch.sigmoid(_tensor(ins[0]))]


@register("HardSigmoid")
def _hard_sigmoid(node: _Node, ins: list) -> list:
    alpha, beta = node.attr("alpha", 0.2), node.attr("beta", 0.5)
    return [torch.clamp(alpha * _tensor(ins[0]) + beta, 0.0, 1.0)]


@register("HardSwish")
def _hard_swish(node: _Node, ins: list) -> list:
    return [F.hardswish(_tensor(ins[0]))]


@register("Identity", "Dropout")
def _identity(node: _Node, ins: list) -> list:
    return [ins[0]]


@register("Constant")
def _constant(node: _Node, ins: list) -> list:
    from onnx import numpy_helper

    return [numpy_helper.to_array(node.attrs["value"])]


def _pool_input(node: _Node, x: torch.Tensor, fill: float) -> tuple[torch.Tensor, tuple[int, int]]:
    t, l, b, r = _pads2d(node, x.dim())
    if (t, l) == (b, r) and fill != float("-inf"):
        return x, (t, l)
    return (F.pad(x, (l, r, t, b), value=fill) if (t, l, b, r) != (0, 0, 0, 0) else x), (0, 0)


@register("MaxPool")
def _max_pool(node: _Node, ins: list) -> list:
    x = _tensor(ins[0])
    x, pad = _pool_input(node, x, float("-inf"))
    return [F.max_pool2d(x, tuple(node.attr("kernel_shape")), tuple(node.attr("strides", [1, 1])), pad,
                         dilation=tuple(node.attr("dilations", [1, 1])), ceil_mode=bool(node.attr("ceil_mode", 0)))]


@register("AveragePool")
def _avg_pool(node: _Node, ins: list) -> list:
    x = _tensor(ins[0])
    k, s = tuple(node.attr("kernel_shape")), tuple(node.attr("strides", [1, 1]))
    ceil, include = bool(node.attr("ceil_mode", 0)), bool(node.attr("count_include_pad", 0))
    t, l, b, r = _pads2d(node, x.dim())
    if (t, l) == (b, r):
        return [F.avg_pool2d(x, k, s, (t, l), ceil_mode=ceil, count_include_pad=include)]
    xp = F.pad(x, (l, r, t, b))  # asymmetric: sum over the window / count of real (or all) cells
    total = F.avg_pool2d(xp, k, s, ceil_mode=ceil, count_include_pad=True) * (k[0] * k[1])
    ones = F.pad(torch.ones_like(x[:1, :1]), (l, r, t, b), value=1.0 if include else 0.0)
    count = F.avg_pool2d(ones, k, s, ceil_mode=ceil, count_include_pad=True) * (k[0] * k[1])
    return [total / count]


@register("GlobalAveragePool")
def _global_avg(node: _Node, ins: list) -> list:
    return [_tensor(ins[0]).mean(dim=(2, 3), keepdim=True)]


@register("ReduceMean")
def _reduce_mean(node: _Node, ins: list) -> list:
    x = _tensor(ins[0])
    axes = node.attr("axes")
    if axes is None and len(ins) > 1 and ins[1] is not None:
        axes = [int(a) for a in np.asarray(ins[1]).reshape(-1)]
    axes = list(range(x.dim())) if axes is None else [a % x.dim() for a in axes]
    return [x.mean(dim=axes, keepdim=bool(node.attr("keepdims", 1)))]


@register("Flatten")
def _flatten(node: _Node, ins: list) -> list:
    x = _tensor(ins[0])
    axis = node.attr("axis", 1) % max(x.dim(), 1)
    return [x.reshape(int(np.prod(x.shape[:axis])), -1)]


@register("Reshape")
def _reshape(node: _Node, ins: list) -> list:
    x = _tensor(ins[0])
    shape = [int(v) for v in np.asarray(ins[1]).reshape(-1)]
    shape = [x.shape[i] if v == 0 and not node.attr("allowzero", 0) else v for i, v in enumerate(shape)]
    return [x.reshape(shape)]


@register("Transpose")
def _transpose(node: _Node, ins: list) -> list:
    x = _tensor(ins[0])
    perm = node.attr("perm") or list(reversed(range(x.dim())))
    return [x.permute(*perm).contiguous()]


@register("Concat")
def _concat(node: _Node, ins: list) -> list:
    return [torch.cat([_tensor(v) for v in ins], dim=node.attr("axis"))]


@register("Slice")
def _slice(node: _Node, ins: list) -> list:
    x = _tensor(ins[0])
    starts = np.asarray(ins[1]).reshape(-1)
    ends = np.asarray(ins[2]).reshape(-1)
    axes = np.asarray(ins[3]).reshape(-1) if len(ins) > 3 and ins[3] is not None else np.arange(len(starts))
    steps = np.asarray(ins[4]).reshape(-1) if len(ins) > 4 and ins[4] is not None else np.ones(len(starts), int)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st <= 0:
            raise OnnxSimError(f"{node.name}: Slice with step {st} is not supported by the ONNX simulator")
        n = x.shape[int(a)]
        index[int(a) % x.dim()] = slice(int(max(min(s, n), -n)), int(max(min(e, n), -n - 1)), int(st))
    return [x[tuple(index)]]


@register("Pad")
def _pad(node: _Node, ins: list) -> list:
    x = _tensor(ins[0])
    pads = [int(v) for v in np.asarray(ins[1]).reshape(-1)]
    value = float(_tensor(ins[2])) if len(ins) > 2 and ins[2] is not None else 0.0
    rank = x.dim()
    torch_pads: list[int] = []
    for axis in reversed(range(rank)):
        torch_pads += [pads[axis], pads[axis + rank]]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(node.attr("mode", "constant"))
    if mode is None:
        raise OnnxSimError(f"{node.name}: Pad mode {node.attr('mode')} is not supported by the ONNX simulator")
    while len(torch_pads) > 4 and torch_pads[-2:] == [0, 0]:  # torch pads only the trailing dims
        torch_pads = torch_pads[:-2]
    return [F.pad(x, torch_pads, mode=mode, value=value) if mode == "constant" else F.pad(x, torch_pads, mode=mode)]


@register("Resize")
def _resize(node: _Node, ins: list) -> list:
    x = _tensor(ins[0])
    if node.attr("mode", "nearest") != "nearest":
        raise OnnxSimError(f"{node.name}: Resize mode {node.attr('mode')} is not supported by the ONNX simulator")
    sizes = ins[3] if len(ins) > 3 and ins[3] is not None and np.asarray(ins[3]).size else None
    if sizes is not None:
        out = [int(v) for v in np.asarray(sizes).reshape(-1)][2:]
    else:
        scales = np.asarray(ins[2]).reshape(-1)
        out = [int(np.floor(x.shape[i + 2] * scales[i + 2])) for i in range(x.dim() - 2)]
    return [F.interpolate(x, size=out, mode="nearest")]


@register("BatchNormalization")
def _batch_norm(node: _Node, ins: list) -> list:
    x, gamma, beta, mean, var = (_tensor(v) for v in ins[:5])
    return [F.batch_norm(x, mean, var, gamma, beta, training=False, eps=node.attr("epsilon", 1e-5))]


@register("Shape")
def _shape(node: _Node, ins: list) -> list:
    return [np.asarray(_tensor(ins[0]).shape, np.int64)]


@register("Gather")
def _gather(node: _Node, ins: list) -> list:
    data, idx = ins[0], np.asarray(ins[1])
    if isinstance(data, np.ndarray) and data.dtype.kind in "iu":
        return [np.take(data, idx, axis=node.attr("axis", 0))]
    t = _tensor(data)
    return [torch.index_select(t, node.attr("axis", 0) % t.dim(), torch.from_numpy(idx.reshape(-1).astype(np.int64)))
            .reshape(*t.shape[:node.attr("axis", 0) % t.dim()], *idx.shape,
                     *t.shape[node.attr("axis", 0) % t.dim() + 1:])]


@register("Unsqueeze", "Squeeze")
def _squeeze(node: _Node, ins: list) -> list:
    x = _tensor(ins[0])
    axes = node.attr("axes")
    if axes is None and len(ins) > 1 and ins[1] is not None:
        axes = [int(a) for a in np.asarray(ins[1]).reshape(-1)]
    if node.op_type == "Squeeze":
        dims = [a % x.dim() for a in axes] if axes else [i for i, n in enumerate(x.shape) if n == 1]
        for d in sorted(dims, reverse=True):
            x = x.squeeze(d)
        return [x]
    for a in sorted(a % (x.dim() + len(axes)) for a in axes):
        x = x.unsqueeze(a)
    return [x]


def supported_ops() -> list[str]:
    return sorted(KERNELS)


def describe(path: str | os.PathLike) -> str:
    """One line for reports: where the encodings came from."""
    return f"read from the exported file ({Path(path).name}: fake-quant execution of its QDQ graph)"
