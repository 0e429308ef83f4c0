"""Low-bit weights in int8 files: W4A8 as a full-integer file an int8 runtime executes exactly.

No edge runtime here has 4-bit kernels, but an int8 kernel computes exactly W4A8 when every
weight is one of the 4-bit per-channel levels ``k * s4`` with ``k`` in [-7, 7]. So a W4A8
export (1) snaps the folded float weights onto those levels before conversion, so that
activation ranges are calibrated on the net that will run, (2) converts as for W8A8, and
(3) rewrites the file's weight tensors to store ``k`` itself with scale ``s4`` per channel,
and each bias (int32 at ``s_in * s_w``) at the new weight scale. The file is then an ordinary
int8 model whose weights take at most 15 values per channel; :func:`weight_levels` reads that
back to prove it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ghnq_deploy.errors import UserError

WEIGHT_BITS = {"w8a8": 8, "w4a8": 4}


def levels(bits: int) -> int:
    """Largest symmetric level of a ``bits``-bit signed weight (narrow range: 4 bits -> 7)."""
    return 2 ** (bits - 1) - 1


def weight_bits(bits: str) -> int:
    try:
        return WEIGHT_BITS[bits]
    except KeyError:
        raise UserError(f"no integer export for {bits}; choose from {', '.join(WEIGHT_BITS)} "
                        f"(lower bit-widths are simulation-only: see `ghnq-deploy evaluate`)") from None


def _snap(w: torch.Tensor, qmax: int) -> torch.Tensor:
    flat = w.reshape(len(w), -1)
    scale = flat.abs().amax(1).clamp_min(torch.finfo(w.dtype).tiny) / qmax
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.round(w / scale.view(shape)).clamp(-qmax, qmax) * scale.view(shape)


def snap_weights(model: nn.Module, bits: int) -> nn.Module:
    """A copy of ``model`` whose conv / linear weights sit on the per-output-channel symmetric grid."""
    if bits >= 8:
        return model
    snapped = copy.deepcopy(model)
    with torch.no_grad():
        for m in snapped.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(_snap(m.weight, levels(bits)))
    return snapped


def _requantize(q: np.ndarray, scales: np.ndarray, axis: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 values + per-channel scales -> values in [-qmax, qmax] + new scales (same real values, snapped)."""
    moved = np.moveaxis(q.astype(np.int64), axis, 0)
    real = moved.reshape(len(moved), -1) * scales.reshape(-1, 1).astype(np.float64)
    peak = np.abs(real).max(1)
    new_scales = np.where(peak > 0, peak / qmax, scales.astype(np.float64))
    k = np.clip(np.round(real / new_scales[:, None]), -qmax, qmax).astype(np.int8)
    return np.moveaxis(k.reshape(moved.shape), 0, axis), new_scales.astype(np.float32)


# ----------------------------------------------------------------------------- TFLite


_TFLITE_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def requantize_tflite(data: bytes, bits: int) -> bytes:
    """Rewrite a full-integer .tflite's weights (and their biases) onto ``bits``-bit levels."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    qmax = levels(bits)
    for sub in model.subgraphs:
        for op in sub.operators:
            code = model.operatorCodes[op.opcodeIndex]
            name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode))
            if name not in _TFLITE_WEIGHTED:
                continue
            w = sub.tensors[op.inputs[1]]
            if w.type != schema.TensorType.INT8 or w.quantization is None:
                raise UserError(f"{name} weight {w.name!r} is not int8: cannot store {bits}-bit levels")
            wbuf = model.buffers[w.buffer]
            q = np.frombuffer(bytes(bytearray(wbuf.data)), np.int8).reshape(w.shape)
            old = np.asarray(w.quantization.scale, np.float32)
            axis = w.quantization.quantizedDimension if len(old) > 1 else 0
            if len(old) == 1:
                old = np.full(q.shape[axis], old[0], np.float32)
            k, new = _requantize(q, old, axis, qmax)
            wbuf.data = np.frombuffer(k.tobytes(), np.uint8).copy()
            w.quantization.scale = new.tolist()
            w.quantization.zeroPoint = [0] * len(new)
            w.quantization.quantizedDimension = axis
            if len(op.inputs) > 2 and op.inputs[2] >= 0:
                b = sub.tensors[op.inputs[2]]
                bbuf = model.buffers[b.buffer]
                bq = np.frombuffer(bytes(bytearray(bbuf.data)), np.int32).astype(np.float64)
                bscale = np.asarray(b.quantization.scale, np.float64)
                new_bscale = bscale * (new.astype(np.float64) / old.astype(np.float64))
                nb = np.clip(np.round(bq * bscale / new_bscale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
                bbuf.data = np.frombuffer(nb.tobytes(), np.uint8).copy()
                b.quantization.scale = new_bscale.astype(np.float32).tolist()
    builder = flatbuffers.Builder(len(data) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


# ----------------------------------------------------------------------------- ONNX QDQ


def requantize_onnx(path: str | os.PathLike, bits: int) -> None:
    """Rewrite a QDQ .onnx's int8 weights (and their int32 biases) onto ``bits``-bit levels, in place."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    producer = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init}
    qmax = levels(bits)

    def replace(name: str, array: np.ndarray) -> None:
        init[name].CopyFrom(numpy_helper.from_array(array, name))

    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in producer:
            continue
        dq = producer[node.input[1]]
        q = numpy_helper.to_array(init[dq.input[0]])
        if q.dtype != np.int8:
            continue
        scale_t = numpy_helper.to_array(init[dq.input[1]])
        if scale_t.size > 1:  # per-channel along the DequantizeLinear's axis
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % q.ndim
            old = scale_t.reshape(-1).astype(np.float32)
            k, new = _requantize(q, old, axis, qmax)
        else:  # per-tensor stays per-tensor: the whole tensor is one "channel"
            old = scale_t.reshape(1).astype(np.float32)
            k, new = _requantize(q.reshape(1, -1), old, 0, qmax)
            k = k.reshape(q.shape)
        replace(dq.input[0], k)
        replace(dq.input[1], new.astype(scale_t.dtype).reshape(scale_t.shape))
        if len(node.input) > 2 and node.input[2] in producer:
            bdq = producer[node.input[2]]
            bq = numpy_helper.to_array(init[bdq.input[0]]).astype(np.float64)
            bscale_t = numpy_helper.to_array(init[bdq.input[1]])
            bscale = bscale_t.astype(np.float64).reshape(-1)
            ratio = new.astype(np.float64) / old.astype(np.float64)
            new_bscale = bscale * (ratio if ratio.size == bscale.size else ratio[0])
            nb = np.clip(np.round(bq * bscale / new_bscale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
            replace(bdq.input[0], nb)
            replace(bdq.input[1], new_bscale.astype(bscale_t.dtype).reshape(bscale_t.shape))
    tmp = Path(path).with_name(f".{Path(path).name}.requantize.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def weight_levels(rows: list[dict]) -> dict:
    """From weight rows (name, min, max): the largest integer magnitude used, i.e. the bits the weights fit."""
    peak = max((max(abs(r["min"]), abs(r["max"])) for r in rows if r.get("min") is not None), default=0)
    fits = next((b for b in (2, 3, 4, 5, 6, 7, 8) if peak <= levels(b)), 8)
    return {"max_abs_int": int(peak), "fits_bits": fits}
