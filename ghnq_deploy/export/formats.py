"""The export-format registry: one object per file format ``export`` writes and ``verify`` consumes.

A format knows its file name, how to write it from a folded net, how to read its I/O
encodings and weight quantization back, which file family (runtimes load families), and
which bit-widths it can carry. Adding a format is one :func:`register` call; nothing else
tests format names as strings. Importing this module does not import TensorFlow (the
converters import it lazily), so ``verify`` can use the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ghnq_deploy.errors import UserError
from ghnq_deploy.export import lowbit
from ghnq_deploy.export import onnx as onnx_export
from ghnq_deploy.export import tflite as tflite_export


@dataclass(frozen=True)
class ExportFormat:
    """One exportable file format."""

    name: str
    file_name: str
    description: str
    family: str  # "tflite" | "onnx": what a runtime must load
    integer: bool  # int8 file (activations and weights quantized)
    layout: str  # input layout of the file: "NHWC" | "NCHW"
    convert: Callable[..., None]  # (folded_net, out_path, calibration_nchw, method) -> None
    read_io: Callable[[Path], tuple]  # (input, output) quantization read back from the file
    weight_summary: Callable[[Path], dict] | None = None
    float_counterpart: str | None = None  # the float format of the same family (size / speed ratio)
    bits: tuple[str, ...] = ("fp32",)  # bit-widths the file can carry exactly
    default_runtime: str = ""  # registered runtime that checks the file at export time
    requantize: Callable[[Path, int], None] | None = None  # rewrite an int8 file's weights onto k-bit levels
    # fake-quant execution of the file itself with its own encodings: (file, host inputs) -> raw outputs
    # (int8 codes for int8-output files, floats on the output grid for QDQ files); the target sim
    simulate: Callable[[Path, np.ndarray], np.ndarray] | None = None
    integer_simulator: bool = False  # the bit-exact integer simulator (quant/tflite_sim.py) reads this family


FORMATS: dict[str, ExportFormat] = {}


def register(fmt: ExportFormat) -> ExportFormat:
    if fmt.name in FORMATS:
        raise ValueError(f"export format {fmt.name!r} registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> ExportFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(f"unknown export target {name!r}; choose from {', '.join(FORMATS)}") from None


def export_folder_name(name: str, bits: str = "w8a8") -> str:
    """The folder under ``<run>/export/`` for a format at a bit-width (W8A8 / fp32 keep the plain name)."""
    fmt = get_format(name)
    if bits not in fmt.bits:
        raise UserError(f"{name} cannot carry {bits}; it carries {', '.join(fmt.bits)}")
    return name if bits == fmt.bits[0] else f"{name}-{bits}"


# ----------------------------------------------------------------------------- simulators


def _simulate_tflite(path: Path, inputs: np.ndarray) -> np.ndarray:
    from ghnq_deploy.quant import tflite_sim

    return tflite_sim.simulate(path, inputs, "fake-quant")


def _simulate_onnx(path: Path, inputs: np.ndarray) -> np.ndarray:
    from ghnq_deploy.quant import onnx_sim

    return onnx_sim.simulate(path, inputs)


# ----------------------------------------------------------------------------- converters


def _onnx_float(folded, out: Path, calibration_nchw: np.ndarray, method: str) -> None:
    onnx_export.export_float(folded, out, folded.spec.input_shape)


def _onnx_int8(folded, out: Path, calibration_nchw: np.ndarray, method: str) -> None:
    float_file = out.with_name(".float-for-quantization.onnx")
    onnx_export.export_float(folded, float_file, folded.spec.input_shape)
    onnx_export.quantize_int8(float_file, out, calibration_nchw, method=method)
    float_file.unlink()


def _tflite_float(folded, out: Path, calibration_nchw: np.ndarray, method: str) -> None:
    out.write_bytes(tflite_export.convert_float(tflite_export.build_keras_model(folded)))


def _tflite_int8(folded, out: Path, calibration_nchw: np.ndarray, method: str) -> None:
    out.write_bytes(tflite_export.convert_full_int8(tflite_export.build_keras_model(folded), calibration_nchw))


def _tflite_requantize(path: Path, bits: int) -> None:
    path.write_bytes(lowbit.requantize_tflite(path.read_bytes(), bits))


def _tflite_weights(path: Path) -> dict:
    ops = tflite_export.weighted_ops(path)
    weights = [op["weight"] for op in ops]
    biases = [op["bias"] for op in ops if op["bias"] is not None]
    return {
        "weighted_ops": len(ops),
        "weight_dtypes": sorted({w["dtype"] for w in weights}),
        "per_channel": sum(len(w["scales"]) > 1 for w in weights),
        "all_zero_points_zero": all(not any(w["zero_points"]) for w in weights),
        "weight_int_range": [min((w["min"] for w in weights), default=None),
                             max((w["max"] for w in weights), default=None)],
        "bias_dtypes": sorted({b["dtype"] for b in biases}),
        "ops": sorted(set(tflite_export.op_names(path))),
    }


def _onnx_weights(path: Path) -> dict:
    rows = onnx_export.weight_quantization(path)
    weights = [r for r in rows if r["dtype"] == "int8"]
    return {
        "quantized_initializers": len(rows),
        "int8_weights": len(weights),
        "per_channel": sum(len(r["scales"] or []) > 1 for r in weights),
        "all_zero_points_zero": all(not any(r["zero_points"] or []) for r in weights),
        "weight_int_range": [min((r["min"] for r in weights), default=None),
                             max((r["max"] for r in weights), default=None)],
        "bias_dtypes": sorted({r["dtype"] for r in rows if r["dtype"] != "int8"}),
    }


register(ExportFormat(
    "onnx", onnx_export.FLOAT_FILE, "float32 ONNX (opset 17, BN folded, dynamic batch)",
    family="onnx", integer=False, layout="NCHW", convert=_onnx_float, read_io=onnx_export.io_quantization,
    default_runtime="onnxruntime"))
register(ExportFormat(
    "onnx-int8", onnx_export.INT8_FILE,
    "int8 QDQ ONNX (static quantization: per-channel symmetric int8 weights, int8 activations; float I/O)",
    family="onnx", integer=True, layout="NCHW", convert=_onnx_int8, read_io=onnx_export.io_quantization,
    weight_summary=_onnx_weights, float_counterpart="onnx", bits=("w8a8", "w4a8"), default_runtime="onnxruntime",
    requantize=lowbit.requantize_onnx, simulate=_simulate_onnx))
register(ExportFormat(
    "tflite", tflite_export.FLOAT_FILE, "float32 TFLite (BN folded, NHWC input)",
    family="tflite", integer=False, layout="NHWC", convert=_tflite_float, read_io=tflite_export.io_quantization,
    default_runtime="litert"))
register(ExportFormat(
    "tflite-int8", tflite_export.INT8_FILE,
    "full-integer int8 TFLite (int8 input and output, TFLITE_BUILTINS_INT8 only, per-channel weights)",
    family="tflite", integer=True, layout="NHWC", convert=_tflite_int8, read_io=tflite_export.io_quantization,
    weight_summary=_tflite_weights, float_counterpart="tflite", bits=("w8a8", "w4a8"), default_runtime="litert",
    requantize=_tflite_requantize, simulate=_simulate_tflite, integer_simulator=True))

TARGETS: tuple[str, ...] = tuple(FORMATS)
