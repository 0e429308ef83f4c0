"""Run a .tflite file with the LiteRT interpreter (ai-edge-litert), float or full-integer.

For int8 files the normalised input is quantized with the scale and zero point read from
the file (rounding half away from zero, as TFLite's QUANTIZE op) and the int8 output is
dequantized the same way, so float and int8 files give comparable logits. The kernel set
is selectable because XNNPACK and the reference kernels may differ by one LSB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ghnq_deploy.errors import UserError
from ghnq_deploy.runtime import batches, prepare, quiet_native_output, top1

# name -> ai_edge_litert OpResolverType member: the default path (XNNPACK delegate), the
# optimised builtin kernels without delegates, and the reference kernels
RESOLVERS = {"xnnpack": "AUTO", "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "reference": "BUILTIN_REF"}


def make_interpreter(model_file: str | os.PathLike | bytes, resolver: str = "xnnpack", num_threads: int | None = None,
                     preserve_all_tensors: bool = False):
    """A LiteRT interpreter with tensors allocated; ``model_file`` may also be the flatbuffer bytes.

    ``preserve_all_tensors`` keeps every intermediate readable after ``invoke`` (layer-wise comparison)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if resolver not in RESOLVERS:
        raise UserError(f"unknown op resolver {resolver!r}; choose from {', '.join(RESOLVERS)}")
    source = {"model_content": model_file} if isinstance(model_file, bytes) else {"model_path": str(model_file)}
    name = "<tflite bytes>" if isinstance(model_file, bytes) else str(model_file)
    try:
        with quiet_native_output():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            interpreter = Interpreter(**source, num_threads=num_threads,
                                      experimental_op_resolver_type=getattr(OpResolverType, RESOLVERS[resolver]),
                                      experimental_preserve_all_tensors=preserve_all_tensors)
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"{name}: LiteRT cannot load it ({str(exc).strip().splitlines()[0][:200]})") from None
    return interpreter


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype=np.int8) -> np.ndarray:
    """real -> int with TFLite's QUANTIZE rounding (half away from zero), saturated."""
    info = np.iinfo(dtype)
    q = np.trunc(x / scale + np.copysign(0.5, x)) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((q.astype(np.int32) - zero_point) * np.float32(scale)).astype(np.float32)


@dataclass
class LiteRTOutput:
    logits: np.ndarray  # float32, dequantized for int8 files
    raw: np.ndarray  # the output tensor as the file produces it (int8 for full-integer files)
    output_scale: float | None
    output_zero_point: int | None


def run_detailed(model_file, x: np.ndarray, resolver: str = "xnnpack", batch_size: int = 256,
                 num_threads: int | None = None) -> LiteRTOutput:
    """Run normalised float NCHW ``x``; returns dequantized logits and the raw output tensor."""
    interpreter = make_interpreter(model_file, resolver, num_threads)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    in_dtype, out_dtype = np.dtype(inp["dtype"]), np.dtype(out["dtype"])
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    nhwc = np.ascontiguousarray(np.asarray(x, dtype=np.float32).transpose(0, 2, 3, 1))
    if tuple(nhwc.shape[1:]) != tuple(int(v) for v in inp["shape"][1:]):
        raise UserError(f"{model_file}: input shape {list(inp['shape'][1:])} (NHWC), got {list(nhwc.shape[1:])}")
    if in_dtype != np.float32:
        nhwc = quantize(nhwc, in_scale, in_zero, in_dtype)
    raws = []
    current = None
    for s in batches(len(nhwc), batch_size):
        chunk = nhwc[s]
        if current != len(chunk):
            interpreter.resize_tensor_input(inp["index"], [len(chunk), *nhwc.shape[1:]])
            interpreter.allocate_tensors()
            current = len(chunk)
        interpreter.set_tensor(inp["index"], chunk)
        interpreter.invoke()
        raws.append(interpreter.get_tensor(out["index"]).copy())
    raw = np.concatenate(raws)
    quantized = out_dtype != np.float32
    logits = dequantize(raw, out_scale, out_zero) if quantized else raw.astype(np.float32)
    return LiteRTOutput(logits, raw, float(out_scale) if quantized else None, int(out_zero) if quantized else None)


def run_normalized(model_file, x: np.ndarray, **kw) -> np.ndarray:
    return run_detailed(model_file, x, **kw).logits


def run(model_file, images: np.ndarray, **kw) -> np.ndarray:
    """Logits for raw uint8 NHWC images."""
    return run_normalized(model_file, prepare(images), **kw)


def accuracy(model_file, images: np.ndarray, labels: np.ndarray, **kw) -> float:
    return top1(run(model_file, images, **kw), labels)


def describe(resolver: str = "xnnpack") -> str:
    from importlib.metadata import version

    return f"ai-edge-litert {version('ai-edge-litert')} Interpreter ({resolver} kernels)"
