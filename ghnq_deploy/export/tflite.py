"""TFLite export: float32 and full-integer int8, through a Keras 3 functional model.

Route (measured, see docs/export.md): the arch spec is rebuilt as a Keras functional model
in NHWC with the folded torch weights copied in, then converted by
``tf.lite.TFLiteConverter.from_keras_model``. onnx2tf pins older TF/numpy/onnx and wants
to download a sample file; litert-torch downgrades pydantic and adds ~1 GB; wrapping the
Keras model in ``tf.function`` silently gives NaN outputs (docs/platform-notes.md).

Exactness rules of the translation:
- torch padding -> explicit ``ZeroPadding2D`` + 'valid' (TF 'same' pads asymmetrically);
- dilated convs use tf.raw_ops with a ``dilations`` attribute (see DilatedConv2D), so they
  become TFLite's native dilated kernels, strided or not;
- padded max-pool: torch pads with -inf; we pad by symmetric mirroring (exact, since each
  mirrored pixel lies in the same window), or with zeros when the input is known to be
  non-negative (after ReLU), which XNNPACK can run;
- a linear layer on a (C, H, W) map: torch flattens C-major, Keras H-major, so the dense
  weight rows are permuted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ghnq_deploy.arch.builder import ArchNet
from ghnq_deploy.errors import UserError
from ghnq_deploy.runtime import quiet_native_output

FLOAT_FILE = "model.float32.tflite"
INT8_FILE = "model.full-int8.tflite"


def triton_first() -> None:
    """Import triton (when installed) before TensorFlow ever is.

    torch 2.14's CUDA build imports triton lazily (torch.optim -> dynamo), and triton imported
    after TensorFlow segfaults the process (docs/platform-notes: "Segfault"); the other order is
    harmless and costs ~0.15 s once.
    """
    if "tensorflow" in sys.modules:
        return
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken triton: nothing to protect
        pass


class TFLiteExportError(UserError):
    """A net the TFLite route cannot express, or a failed conversion; one line."""


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the converter logs pages of INFO lines
    triton_first()
    with quiet_native_output():  # CUDA-stub and CPU-feature lines on first import
        import tensorflow as tf

    return tf


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy().astype(np.float32)


def _pad_pair(padding) -> tuple[int, int]:
    if isinstance(padding, str):
        raise TFLiteExportError(f"string padding {padding!r} is not supported")
    return (padding, padding) if isinstance(padding, int) else (int(padding[0]), int(padding[1]))


_DILATED_CONV = None


def _dilated_conv_class(keras, tf):
    """A Keras layer over tf.raw_ops Conv2D / DepthwiseConv2dNative with a ``dilations`` attribute.

    Keras' own layers lower dilation through SpaceToBatchND / BatchToSpaceND with the bias
    as a separate (int8-quantized) ADD; the raw ops convert to TFLite's native dilated
    CONV_2D / DEPTHWISE_CONV_2D with an int32 bias, as a device runs them. (TF's CPU
    kernels cannot execute dilated depthwise eagerly; the converter only traces it.)
    """
    global _DILATED_CONV
    if _DILATED_CONV is None:

        class DilatedConv2D(keras.layers.Layer):
            def __init__(self, kernel_shape, depthwise, strides, dilations, use_bias, **kw):
                super().__init__(**kw)
                self.kernel_shape, self.depthwise = tuple(kernel_shape), depthwise
                self.strides, self.dilations, self.use_bias = tuple(strides), tuple(dilations), use_bias

            def _channels(self) -> int:
                kh, kw, a, b = self.kernel_shape
                return a * b if self.depthwise else b

            def build(self, input_shape):
                self.kernel = self.add_weight(shape=self.kernel_shape, initializer="zeros", name="kernel")
                self.bias = (self.add_weight(shape=(self._channels(),), initializer="zeros", name="bias")
                             if self.use_bias else None)

            def call(self, x):
                strides = [1, *self.strides, 1]
                dilations = [1, *self.dilations, 1]
                op = tf.raw_ops.DepthwiseConv2dNative if self.depthwise else tf.raw_ops.Conv2D
                y = op(input=x, filter=self.kernel, strides=strides, padding="VALID", dilations=dilations)
                return y if self.bias is None else tf.nn.bias_add(y, self.bias)

            def compute_output_shape(self, input_shape):
                n, h, w, _ = input_shape
                kh, kw = self.kernel_shape[:2]
                (sh, sw), (dh, dw) = self.strides, self.dilations
                out = lambda size, k, s, d: None if size is None else (size - d * (k - 1) - 1) // s + 1  # noqa: E731
                return (n, out(h, kh, sh, dh), out(w, kw, sw, dw), self._channels())

        _DILATED_CONV = DilatedConv2D
    return _DILATED_CONV


def _conv_layers(keras, node_id: str, conv: nn.Conv2d, x):
    """Keras layers computing exactly torch's Conv2d on NHWC ``x``."""
    (ph, pw), (sh, sw), (dh, dw) = _pad_pair(conv.padding), conv.stride, conv.dilation
    weight, bias = _np(conv.weight), _np(conv.bias)
    if ph or pw:
        x = keras.layers.ZeroPadding2D(((ph, ph), (pw, pw)), name=f"{node_id}_pad")(x)
    kernel = tuple(conv.kernel_size)
    c_in, c_out, groups = conv.in_channels, conv.out_channels, conv.groups
    depthwise = groups > 1 and groups == c_in
    if depthwise:
        multiplier = c_out // c_in
        # (in*mult, 1, kh, kw) -> (kh, kw, in*mult, 1) -> (kh, kw, in, mult): output o = i*mult + m
        kernel_value = weight.transpose(2, 3, 0, 1).reshape(kernel[0], kernel[1], c_in, multiplier)
    else:
        kernel_value = weight.transpose(2, 3, 1, 0)  # (out, in/groups, kh, kw) -> (kh, kw, in/groups, out)
    if dh > 1 or dw > 1:
        if groups > 1 and not depthwise:
            raise TFLiteExportError(f"node '{node_id}': dilated grouped convolution has no TFLite kernel")
        import tensorflow as tf

        layer = _dilated_conv_class(keras, tf)(kernel_value.shape, depthwise, (sh, sw), (dh, dw), bias is not None,
                                               name=node_id)
    elif depthwise:
        layer = keras.layers.DepthwiseConv2D(kernel, strides=(sh, sw), padding="valid", depth_multiplier=multiplier,
                                             use_bias=bias is not None, name=node_id)
    else:
        layer = keras.layers.Conv2D(c_out, kernel, strides=(sh, sw), padding="valid", groups=groups,
                                    use_bias=bias is not None, name=node_id)
    y = layer(x)
    layer.set_weights([kernel_value] if bias is None else [kernel_value, bias])
    return y


def build_keras_model(model: ArchNet):
    """The Keras 3 functional model (NHWC input, logits output) equal to ``model`` (BN folded or kept)."""
    with quiet_native_output():  # the first layer call sets TF's devices up, which logs (absl, cuInit)
        return _build_keras_model(model)


def _build_keras_model(model: ArchNet):
    tf = _tf()
    keras = tf.keras
    spec, info = model.spec, model.info
    c, h, w = spec.input_shape
    tensors = {"input": keras.Input(shape=(h, w, c), name="input")}
    nonneg = {"input": False}
    shapes = {"input": spec.input_shape, **{k: v.shape for k, v in info.nodes.items()}}
    for node_id, inputs in model._plan:
        node, module = spec.node(node_id), model.layers[node_id]
        xs = [tensors[i] for i in inputs]
        x = xs[0]
        op = node.op
        positive = False
        if op == "conv":
            y = _conv_layers(keras, node_id, module, x)
        elif op == "bn":
            if isinstance(module, nn.Identity):  # folded into its conv
                y, positive = x, nonneg[inputs[0]]
            else:
                layer = keras.layers.BatchNormalization(axis=-1, epsilon=module.eps, name=node_id)
                y = layer(x)
                layer.set_weights([_np(module.weight), _np(module.bias), _np(module.running_mean),
                                   _np(module.running_var)])
        elif op == "relu":
            y, positive = keras.layers.ReLU(name=node_id)(x), True
        elif op == "relu6":
            y, positive = keras.layers.ReLU(max_value=6.0, name=node_id)(x), True
        elif op in _KERAS_ACTIVATIONS:
            y, positive = keras.layers.Activation(_KERAS_ACTIVATIONS[op], name=node_id)(x), op in _POSITIVE_ACTS
        elif op in ("identity", "output"):
            y, positive = x, nonneg[inputs[0]]
        elif op == "mul":
            y = xs[0]
            for other in xs[1:]:
                y = keras.ops.multiply(y, other)  # a (N,1,1,C) gate broadcasts: one MUL
            positive = all(nonneg[i] for i in inputs)
        elif op == "channel_shuffle":
            ch, hh, ww = shapes[inputs[0]]
            g = module.groups
            y = keras.ops.reshape(x, (-1, hh, ww, g, ch // g))
            y = keras.ops.reshape(keras.ops.transpose(y, (0, 1, 2, 4, 3)), (-1, hh, ww, ch))
            positive = nonneg[inputs[0]]
        elif op == "channel_slice":
            y, positive = x[:, :, :, module.start:module.stop], nonneg[inputs[0]]
        elif op == "adaptive_avgpool":
            y, positive = _adaptive_pool(keras, node_id, x, shapes[inputs[0]][1:], module.output_size), nonneg[inputs[0]]
        elif op in ("maxpool", "avgpool"):
            k = _pad_pair(module.kernel_size)
            s = _pad_pair(module.stride)
            p = _pad_pair(module.padding)
            positive = nonneg[inputs[0]]
            extra = (0, 0)
            if op == "maxpool" and module.ceil_mode:  # torch's last partial window: pad bottom / right
                size = shapes[inputs[0]][1:]
                out = shapes[node_id][1:]
                extra = tuple(max(0, (o - 1) * st + kk - (n + 2 * pp)) for o, st, kk, n, pp in zip(out, s, k, size, p))
            if any(extra):
                if positive:
                    x = keras.layers.ZeroPadding2D(((p[0], p[0] + extra[0]), (p[1], p[1] + extra[1])),
                                                   name=f"{node_id}_pad")(x)
                elif all(pp + e <= kk // 2 for pp, e, kk in zip(p, extra, k)):
                    x = keras.ops.pad(x, [[0, 0], [p[0], p[0] + extra[0]], [p[1], p[1] + extra[1]], [0, 0]],
                                      mode="symmetric")  # mirrored pixels stay in their window (see below)
                else:
                    raise TFLiteExportError(f"node '{node_id}': ceil-mode max-pool over signed values with this "
                                            "kernel has no exact TFLite padding")
            elif any(p):
                if op == "maxpool" and not positive:
                    # torch pads with -inf. Symmetric mirror padding is exact too: every mirrored
                    # value is a copy of a pixel inside the same window (padding <= kernel/2),
                    # and unlike a -FLT_MAX constant it quantizes with the input's own scale
                    x = keras.ops.pad(x, [[0, 0], [p[0], p[0]], [p[1], p[1]], [0, 0]], mode="symmetric")
                else:  # avg-pool counts the zero padding (torch's count_include_pad=True)
                    x = keras.layers.ZeroPadding2D(((p[0], p[0]), (p[1], p[1])), name=f"{node_id}_pad")(x)
            cls = keras.layers.MaxPooling2D if op == "maxpool" else keras.layers.AveragePooling2D
            y = cls(k, strides=s, padding="valid", name=node_id)(x)
        elif op == "global_avgpool":
            y, positive = keras.layers.GlobalAveragePooling2D(name=node_id)(x), nonneg[inputs[0]]
        elif op == "linear":
            weight, bias = _np(module.weight), _np(module.bias)
            in_shape = shapes[inputs[0]]
            if len(in_shape) == 3:
                ch, hh, ww = in_shape
                x = keras.layers.Flatten(name=f"{node_id}_flatten")(x)  # NHWC order: (h, w, c)
                weight = weight.reshape(-1, ch, hh, ww).transpose(0, 2, 3, 1).reshape(weight.shape[0], -1)
            layer = keras.layers.Dense(module.out_features, use_bias=bias is not None, name=node_id)
            y = layer(x)
            layer.set_weights([weight.T.copy()] if bias is None else [weight.T.copy(), bias])
        elif op == "add":
            y, positive = keras.layers.Add(name=node_id)(xs), all(nonneg[i] for i in inputs)
        elif op == "concat":
            y, positive = keras.layers.Concatenate(axis=-1, name=node_id)(xs), all(nonneg[i] for i in inputs)
        else:  # pragma: no cover - the spec parser knows no other op
            raise TFLiteExportError(f"node '{node_id}': op '{op}' has no TFLite translation")
        tensors[node_id], nonneg[node_id] = y, positive
    return keras.Model(tensors["input"], tensors[model.output_id], name=spec.name)


_KERAS_ACTIVATIONS = {"hardswish": "hard_swish", "hardsigmoid": "hard_sigmoid", "silu": "silu",
                      "sigmoid": "sigmoid"}
_POSITIVE_ACTS = ("hardsigmoid", "sigmoid")


def _adaptive_pool(keras, node_id: str, x, size_in: tuple[int, int], output_size):
    """torch's AdaptiveAvgPool2d in NHWC: AVERAGE_POOL_2D, nearest upsampling, or slice means + concat."""
    from ghnq_deploy.arch.builder import adaptive_windows

    out = output_size if isinstance(output_size, int) else output_size[0]
    h, w = size_in
    if h == w and h % out == 0:
        return keras.layers.AveragePooling2D(h // out, padding="valid", name=node_id)(x)
    if h == w and out % h == 0:
        # every output pixel copies one input pixel; UpSampling2D would become TILE, which LiteRT lacks in int8
        return keras.layers.Resizing(out, out, interpolation="nearest", name=node_id)(x)
    for axis, n in ((1, h), (2, w)):
        parts = []
        for a, b in adaptive_windows(n, out):
            piece = x[:, a:b] if axis == 1 else x[:, :, a:b]
            parts.append(keras.ops.mean(piece, axis=axis, keepdims=True))
        x = keras.ops.concatenate(parts, axis=axis)
    return x


def _converter(keras_model):
    tf = _tf()
    return tf.lite.TFLiteConverter.from_keras_model(keras_model)


def convert_float(keras_model) -> bytes:
    """A float32 .tflite flatbuffer."""
    try:
        with quiet_native_output():
            return _converter(keras_model).convert()
    except Exception as exc:  # noqa: BLE001 - converter errors are long multi-line dumps
        raise TFLiteExportError(f"TFLite float conversion failed: {_first_line(exc)}") from None


def nhwc_batches(images_nchw: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    """The converter's representative dataset: one normalised NHWC image per step."""
    data = np.ascontiguousarray(np.asarray(images_nchw, dtype=np.float32).transpose(0, 2, 3, 1))

    def gen() -> Iterator[list[np.ndarray]]:
        for i in range(len(data)):
            yield [data[i:i + 1]]

    return gen


def convert_full_int8(keras_model, calibration_nchw: np.ndarray) -> bytes:
    """Full-integer int8: int8 input and output, TFLITE_BUILTINS_INT8 only, and no float op left.

    ``calibration_nchw`` are normalised calibration images; they set every activation range.
    The result is checked with :func:`float_ops`: a leftover float op is an error, not a
    silently mixed file.
    """
    tf = _tf()
    converter = _converter(keras_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = nhwc_batches(calibration_nchw)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    try:
        with quiet_native_output():
            content = converter.convert()
    except Exception as exc:  # noqa: BLE001
        raise TFLiteExportError(f"TFLite full-integer conversion failed: {_first_line(exc)}") from None
    leftover = float_ops(content)
    if leftover:
        compute = [op for op in leftover if op not in ("QUANTIZE", "DEQUANTIZE")] or leftover
        raise TFLiteExportError(f"full-integer conversion left float ops ({', '.join(compute)}); this net uses an "
                                f"op without an int8 kernel, so no full-integer file was written")
    return content


def float_ops(model: bytes | str | os.PathLike) -> list[str]:
    """Ops of a .tflite model that read or write float tensors (none in a full-integer file).

    TFLITE_BUILTINS_INT8 alone does not guarantee that: measured with TF 2.21, an op with no
    int8 kernel (e.g. SIN) is converted as DEQUANTIZE -> float op -> QUANTIZE without any
    error, so every full-integer conversion is checked here.
    """
    from ghnq_deploy.runtime.litert_runner import make_interpreter

    interpreter = make_interpreter(model, resolver="reference")
    found = []
    for op in interpreter._get_ops_details():
        tensors = [int(i) for i in (*op["inputs"], *op["outputs"]) if int(i) >= 0]
        if any(np.dtype(interpreter._get_tensor_details(i, 0)["dtype"]).kind == "f" for i in tensors):
            found.append(op["op_name"])
    return sorted(set(found))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()[:300]
    return (text.splitlines()[0][:300] if text else type(exc).__name__)


@dataclass
class TensorQuant:
    """One I/O tensor of a .tflite file, as the interpreter reports it."""

    name: str
    dtype: str
    shape: list[int]  # -1 marks a dynamic dimension (the batch)
    scale: float | None
    zero_point: int | None

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape,
                "scale": self.scale, "zero_point": self.zero_point}


def io_quantization(model_file: str | os.PathLike) -> tuple[TensorQuant, TensorQuant]:
    """(input, output) dtype, shape, scale and zero point read back from the file."""
    from ghnq_deploy.runtime.litert_runner import make_interpreter

    interpreter = make_interpreter(model_file)

    def describe(detail: dict) -> TensorQuant:
        scale, zero = detail["quantization"]
        quantized = np.dtype(detail["dtype"]) != np.float32 and scale != 0
        shape = detail.get("shape_signature", detail["shape"])
        return TensorQuant(detail["name"], np.dtype(detail["dtype"]).name, [int(v) for v in shape],
                           float(scale) if quantized else None, int(zero) if quantized else None)

    return describe(interpreter.get_input_details()[0]), describe(interpreter.get_output_details()[0])


WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _tensor_quant(interpreter, index: int) -> dict:
    detail = interpreter._get_tensor_details(index, 0)  # private but stable since TF 2.x; no public per-index call
    params = detail["quantization_parameters"]
    row = {"name": detail["name"], "dtype": np.dtype(detail["dtype"]).name, "shape": [int(v) for v in detail["shape"]],
           "scales": params["scales"].tolist(), "zero_points": params["zero_points"].tolist(),
           "axis": int(params["quantized_dimension"])}
    try:
        value = interpreter.get_tensor(index)
        row["min"], row["max"] = (value.min().item(), value.max().item()) if value.size else (None, None)
    except ValueError:
        pass
    return row


def weighted_ops(model_file: str | os.PathLike) -> list[dict]:
    """Every conv / depthwise conv / fully-connected op with its input, weight and bias tensors.

    Read back from the file through the interpreter (weights and biases are constants, so
    their values are available after allocate_tensors): what tests and manifests check.
    """
    from ghnq_deploy.runtime.litert_runner import make_interpreter

    interpreter = make_interpreter(model_file, resolver="reference")
    rows = []
    for op in interpreter._get_ops_details():
        if op["op_name"] not in WEIGHTED_OPS:
            continue
        inputs = [int(i) for i in op["inputs"]]
        rows.append({
            "op": op["op_name"],
            "input": _tensor_quant(interpreter, inputs[0]),
            "weight": _tensor_quant(interpreter, inputs[1]),
            "bias": _tensor_quant(interpreter, inputs[2]) if len(inputs) > 2 and inputs[2] >= 0 else None,
            "output": _tensor_quant(interpreter, int(op["outputs"][0])),
        })
    return rows


def op_names(model_file: str | os.PathLike) -> list[str]:
    """The TFLite builtin op of every node, in execution order (delegates not applied)."""
    from ghnq_deploy.runtime.litert_runner import make_interpreter

    return [op["op_name"] for op in make_interpreter(model_file, resolver="reference")._get_ops_details()]
