"""Read an exported .tflite flatbuffer into plain dataclasses (tensors, operators, I/O).

The simulators execute exactly what the file holds, so every scale, zero point, constant
and option is read back from the flatbuffer itself, through LiteRT's own generated schema
module (``ai_edge_litert.schema_py_generated``) and ``flatbuffers``: no hand-parsed bytes,
no TensorFlow import (verify must not import TF).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ghnq_deploy.errors import UserError

# TensorType enum value -> numpy dtype (the types a full-integer or float CNN file uses)
_DTYPES = {0: np.float32, 2: np.int32, 3: np.uint8, 4: np.int64, 6: np.bool_, 7: np.int16, 9: np.int8,
           10: np.float64}
_PADDING = {0: "SAME", 1: "VALID"}
_ACTIVATION = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH", 5: "SIGN_BIT"}
_MIRROR = {0: "REFLECT", 1: "SYMMETRIC"}

# The builtin ops this reader (and so the simulators) understand. Options are read
# generically from the schema's option object; the set is the registry of what a file may use.
SUPPORTED_OPS = frozenset({
    "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "AVERAGE_POOL_2D", "MAX_POOL_2D", "MEAN",
    "CONCATENATION", "PAD", "PADV2", "MIRROR_PAD", "RESHAPE", "QUANTIZE", "DEQUANTIZE", "SHAPE",
    "STRIDED_SLICE", "PACK", "HARD_SWISH", "LOGISTIC", "TRANSPOSE", "RESIZE_NEAREST_NEIGHBOR",
})


@dataclass
class Quantization:
    """Affine quantization of one tensor: real = (q - zero_point) * scale, per tensor or per channel."""

    scale: np.ndarray  # float32, shape (1,) per tensor or (C,) per channel
    zero_point: np.ndarray  # int64, same shape
    quantized_dimension: int

    @property
    def per_channel(self) -> bool:
        return self.scale.size > 1


@dataclass
class Tensor:
    index: int
    name: str
    shape: tuple[int, ...]  # as stored (batch 1 where the signature is dynamic)
    shape_signature: tuple[int, ...]  # -1 marks a dynamic dimension
    dtype: np.dtype
    data: np.ndarray | None  # constants (weights, biases, shapes); None for activations
    quantization: Quantization | None

    @property
    def scale(self) -> float:
        return float(self.quantization.scale[0])

    @property
    def zero_point(self) -> int:
        return int(self.quantization.zero_point[0])


@dataclass
class Operator:
    index: int
    op: str  # builtin name, e.g. "CONV_2D"
    inputs: tuple[int, ...]  # tensor indices; -1 marks an omitted optional input
    outputs: tuple[int, ...]
    options: dict = field(default_factory=dict)  # snake_case option names; enums as strings


@dataclass
class Graph:
    path: str
    tensors: list[Tensor]
    operators: list[Operator]  # execution order
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    def tensor(self, index: int) -> Tensor:
        return self.tensors[index]


def _builtin_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _options(opt) -> dict:
    """The schema's option object as a dict: snake_case keys, enums as their names, arrays as lists."""
    if opt is None:
        return {}
    out = {}
    for key, value in vars(opt).items():
        name = _snake(key)
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if name == "padding":
            value = _PADDING.get(value, value)
        elif name == "fused_activation_function":
            value = _ACTIVATION.get(value, value)
        elif name == "mode" and type(opt).__name__ == "MirrorPadOptionsT":
            value = _MIRROR.get(value, value)
        out[name] = value
    return out


def read_tflite(model_file: str | os.PathLike | bytes, supported=SUPPORTED_OPS) -> Graph:
    """Parse a .tflite file (or its bytes) into a :class:`Graph` of its first subgraph.

    An op outside ``supported`` is a UserError naming the op and the file, so a simulator
    never silently skips part of a network.
    """
    from ai_edge_litert import schema_py_generated as schema

    if isinstance(model_file, bytes):
        buf, name = model_file, "<tflite bytes>"
    else:
        name = str(model_file)
        try:
            buf = Path(model_file).read_bytes()
        except OSError as exc:
            raise UserError(f"{name}: cannot read the model file ({exc.strerror or exc})") from None
    try:
        if len(buf) < 8 or not schema.Model.ModelBufferHasIdentifier(buf, 0):
            raise ValueError("missing TFL3 identifier")
        model = schema.ModelT.InitFromPackedBuf(buf, 0)
    except Exception as exc:  # noqa: BLE001 - flatbuffers raises assorted errors on garbage
        raise UserError(f"{name}: not a TFLite flatbuffer ({str(exc)[:100]})") from None
    if not model.subgraphs:
        raise UserError(f"{name}: the model has no subgraph")
    names = _builtin_names()
    codes = [max(int(c.builtinCode), int(c.deprecatedBuiltinCode)) for c in model.operatorCodes or []]
    sub = model.subgraphs[0]

    tensors = []
    for i, t in enumerate(sub.tensors or []):
        if t.type not in _DTYPES:
            raise UserError(f"{name}: tensor {i} has TensorType {t.type}, which the simulator does not handle")
        dtype = np.dtype(_DTYPES[t.type])
        shape = tuple(int(v) for v in (t.shape if t.shape is not None else ()))
        signature = tuple(int(v) for v in t.shapeSignature) if t.shapeSignature is not None else shape
        data = None
        buffer = model.buffers[t.buffer] if model.buffers and t.buffer < len(model.buffers) else None
        if buffer is not None:
            raw = None
            if buffer.data is not None and len(buffer.data):
                raw = np.asarray(buffer.data, dtype=np.uint8).tobytes()
            elif buffer.offset > 1 and buffer.size:  # large models keep buffers after the flatbuffer
                raw = buf[buffer.offset:buffer.offset + buffer.size]
            if raw is not None:
                data = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        quant = None
        q = t.quantization
        if q is not None and q.scale is not None and len(q.scale):
            zero = q.zeroPoint if q.zeroPoint is not None and len(q.zeroPoint) else np.zeros(len(q.scale))
            quant = Quantization(np.asarray(q.scale, dtype=np.float32), np.asarray(zero, dtype=np.int64),
                                 int(q.quantizedDimension))
        tname = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        tensors.append(Tensor(i, tname, shape, signature, dtype, data, quant))

    operators = []
    for i, op in enumerate(sub.operators or []):
        code = codes[op.opcodeIndex]
        op_name = names.get(code, f"builtin code {code}")
        if op_name == "CUSTOM" or op_name not in supported:
            if op_name == "CUSTOM":
                custom = model.operatorCodes[op.opcodeIndex].customCode
                op_name = f"CUSTOM ({custom.decode() if isinstance(custom, bytes) else custom})"
            raise UserError(f"{name}: op {op_name} (operator {i}) is not supported by the simulator; "
                            f"supported: {', '.join(sorted(supported))}")
        operators.append(Operator(i, op_name, tuple(int(v) for v in (op.inputs if op.inputs is not None else ())),
                                  tuple(int(v) for v in (op.outputs if op.outputs is not None else ())),
                                  _options(op.builtinOptions)))
    return Graph(name, tensors, operators, tuple(int(v) for v in sub.inputs), tuple(int(v) for v in sub.outputs))
