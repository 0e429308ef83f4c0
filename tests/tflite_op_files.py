"""Single-op full-integer .tflite files with chosen scales and zero points, for per-op kernel tests.

The converter picks scales from data, so extreme encodings (scales from 1e-6 to 1e2, zero
points at -128 / 127) never come out of an export; these files are written directly through
LiteRT's schema object API, so the reference kernels and the simulator run the same op.
"""

from __future__ import annotations

from dataclasses import dataclass

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

_TYPES = {np.dtype(np.int8): schema.TensorType.INT8, np.dtype(np.int32): schema.TensorType.INT32,
          np.dtype(np.float32): schema.TensorType.FLOAT32}
# op versions as the converter writes them for int8 (read from exported files)
_VERSIONS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "ADD": 2, "MUL": 2, "LOGISTIC": 2, "HARD_SWISH": 1,
             "AVERAGE_POOL_2D": 2, "CONCATENATION": 2, "QUANTIZE": 2, "FULLY_CONNECTED": 4}


@dataclass
class T:
    """A tensor of the file: shape, dtype, per-tensor or per-channel encoding, constant data."""

    shape: tuple
    scale: tuple | float | None = None
    zero_point: tuple | int = 0
    dtype: type = np.int8
    data: np.ndarray | None = None
    axis: int = 0


def single_op_file(op: str, inputs: list[T], output: T, options=None) -> bytes:
    """A one-op model: the non-constant inputs are the graph's inputs, in order."""
    model = schema.ModelT()
    model.version = 3
    code = schema.OperatorCodeT()
    code.builtinCode = getattr(schema.BuiltinOperator, op)
    code.deprecatedBuiltinCode = min(code.builtinCode, 127)
    code.version = _VERSIONS.get(op, 1)
    model.operatorCodes = [code]
    empty = schema.BufferT()
    model.buffers = [empty]
    sub = schema.SubGraphT()
    sub.tensors, sub.inputs = [], []
    for k, t in enumerate([*inputs, output]):
        tensor = schema.TensorT()
        tensor.shape = np.asarray(t.shape, np.int32)
        tensor.type = _TYPES[np.dtype(t.dtype)]
        tensor.name = f"t{k}"
        if t.scale is not None:
            q = schema.QuantizationParametersT()
            q.scale = np.atleast_1d(np.asarray(t.scale, np.float32))
            q.zeroPoint = np.broadcast_to(np.asarray(t.zero_point, np.int64), q.scale.shape).copy()
            q.quantizedDimension = t.axis
            tensor.quantization = q
        if t.data is not None:
            buf = schema.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(t.data, dtype=t.dtype).tobytes(), np.uint8)
            model.buffers.append(buf)
            tensor.buffer = len(model.buffers) - 1
        else:
            tensor.buffer = 0
            if k < len(inputs):
                sub.inputs.append(k)
        sub.tensors.append(tensor)
    operator = schema.OperatorT()
    operator.opcodeIndex = 0
    operator.inputs = list(range(len(inputs)))
    operator.outputs = [len(inputs)]
    if options is not None:
        operator.builtinOptionsType = getattr(schema.BuiltinOptions, type(options).__name__[:-1])
        operator.builtinOptions = options
    sub.operators = [operator]
    sub.outputs = [len(inputs)]
    model.subgraphs = [sub]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def run_reference(model: bytes, *inputs: np.ndarray) -> np.ndarray:
    """The file on LiteRT's reference kernels (BUILTIN_REF)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_content=model, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    for detail, x in zip(it.get_input_details(), inputs):
        it.resize_tensor_input(detail["index"], list(x.shape))
    it.allocate_tensors()
    for detail, x in zip(it.get_input_details(), inputs):
        it.set_tensor(detail["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]).copy()


def run_tflm(model: bytes, x: np.ndarray) -> np.ndarray:
    """The file on TensorFlow Lite Micro's interpreter (tflite-micro wheel), one batch entry per invoke
    when the file's batch is 1 (TFLM cannot resize inputs)."""
    from tflite_micro.python.tflite_micro import runtime

    it = runtime.Interpreter.from_bytes(model)
    batch = int(it.get_input_details(0)["shape"][0])
    outs = []
    for i in range(0, len(x), batch):
        it.set_input(np.ascontiguousarray(x[i:i + batch]), 0)
        it.invoke()
        outs.append(np.array(it.get_output(0), copy=True))
    return np.concatenate(outs)
