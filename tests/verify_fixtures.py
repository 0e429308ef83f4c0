"""Shared by the verify transport tests: the committed tiny models and inputs quantized as the host would.

The models come from tests/fixtures/verify/make_tiny_models.py (committed, so no test process
imports TensorFlow).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "verify"
TINY_INT8 = FIXTURES / "tiny_int8.tflite"
TINY_FLOAT = FIXTURES / "tiny_float.tflite"
TINY_ONNX = FIXTURES / "tiny_float.onnx"
TINY_ONNX_INT8 = FIXTURES / "tiny_int8.onnx"


@functools.cache
def normalized_images(count: int = 64) -> np.ndarray:
    """Normalised float32 NCHW real test images (the shipped JPEG evaluation copy)."""
    from ghnq_deploy.calibration import load_eval_set
    from ghnq_deploy.runtime import prepare

    return prepare(load_eval_set().images[:count])


def tflite_inputs(model: Path, count: int = 64) -> np.ndarray:
    """NHWC inputs as the host hands them over: int8 with the file's input encoding, or float32."""
    from ghnq_deploy.runtime.litert_runner import make_interpreter, quantize

    x = np.ascontiguousarray(normalized_images(count).transpose(0, 2, 3, 1))
    detail = make_interpreter(model).get_input_details()[0]
    if np.dtype(detail["dtype"]) == np.float32:
        return x
    scale, zero = detail["quantization"]
    return quantize(x, scale, zero, np.dtype(detail["dtype"]))


def litert_raw(model: Path, inputs: np.ndarray, kernels: str = "xnnpack") -> np.ndarray:
    """The raw output tensor of in-process LiteRT on this host: what the runner must reproduce."""
    from ghnq_deploy.runtime.litert_runner import make_interpreter

    interpreter = make_interpreter(model, kernels)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(inputs.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], inputs)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"]).copy()
