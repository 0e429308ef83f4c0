"""ONNX export: float parity with torch through ONNX Runtime, int8 QDQ structure and behaviour."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

from ghnq_deploy.export import onnx as onnx_export
from ghnq_deploy.runtime import onnxruntime_runner

from export_helpers import (EXAMPLES, PARITY_ATOL, core_specs, edge_spec, example_specs, float_model, parity_inputs,
                            sampled_specs, torch_logits)
from ghnq_deploy.data import normalize


def _float_parity(spec, tmp_path) -> float:
    model = float_model(spec)
    path = tmp_path / onnx_export.FLOAT_FILE
    onnx_export.export_float(model, path, spec.input_shape)
    x = parity_inputs()
    diff = float(np.abs(onnxruntime_runner.run_normalized(path, x) - torch_logits(model, x)).max())
    assert diff <= PARITY_ATOL, f"{spec.name}: ONNX Runtime vs torch max |logit diff| {diff:.3g}"
    return diff


@pytest.mark.skipif(not EXAMPLES, reason="no examples/ folder")
@pytest.mark.parametrize("spec", example_specs(), ids=lambda s: s.name)
def test_float_parity_examples(spec, tmp_path):
    _float_parity(spec, tmp_path)


@pytest.mark.parametrize("spec", core_specs(), ids=lambda s: s.name)
def test_float_parity_core_nets(spec, tmp_path):
    """The edge-case net, a BN-free net and a concat/residual/dilated-depthwise net (fast subset)."""
    _float_parity(spec, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [s for s in sampled_specs() if s.name not in {c.name for c in core_specs()}],
                         ids=lambda s: s.name)
def test_float_parity_sampled_nets(spec, tmp_path):
    _float_parity(spec, tmp_path)


def test_float_file_has_opset_17_dynamic_batch_and_passes_the_checker(tmp_path):
    spec = core_specs()[2]
    model = float_model(spec)
    path = tmp_path / onnx_export.FLOAT_FILE
    onnx_export.export_float(model, path, spec.input_shape)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch" and proto.graph.input[0].name == "input"
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # folded
    x = parity_inputs()[:7]
    for n in (1, 7):  # any batch size
        assert onnxruntime_runner.run_normalized(path, x[:n]).shape == (n, 10)


@functools.cache
def _int8(method: str, tmp_dir) -> tuple:
    spec = edge_spec()
    model = float_model(spec)
    float_path = tmp_dir / f"f-{method}.onnx"
    onnx_export.export_float(model, float_path, spec.input_shape)
    out = tmp_dir / f"q-{method}.onnx"
    from export_helpers import calibration_images

    onnx_export.quantize_int8(float_path, out, normalize(calibration_images(64)).numpy(), method=method)
    return model, out


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-int8")


def test_int8_qdq_has_per_channel_symmetric_weights_and_runs(int8_dir):
    model, path = _int8("minmax", int8_dir)
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [w for w in onnx_export.weight_quantization(path) if w["dtype"] == "int8"]
    convs_and_fcs = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in proto.graph.node)
    assert len(weights) == convs_and_fcs
    for w in weights:
        assert len(w["scales"]) == w["shape"][w["axis"] or 0] > 1  # one scale per output channel
        assert not any(w["zero_points"]) and -127 <= w["min"] and w["max"] <= 127
    biases = [w for w in onnx_export.weight_quantization(path) if w["dtype"] == "int32"]
    assert biases and all(not any(b["zero_points"] or [0]) for b in biases)
    inp, out = onnx_export.io_quantization(path)
    assert inp.dtype == "float32" and inp.quant_dtype == "int8" and inp.scale > 0
    assert out.quant_dtype == "int8" and out.scale > 0
    x = parity_inputs()[:32]  # real images only: noise lies outside the calibrated ranges
    q = onnxruntime_runner.run_normalized(path, x)
    f = torch_logits(model, x)
    # int8 is close to float (a few percent of the logit range), far from a broken graph
    assert np.abs(q - f).mean() <= 0.05 * np.abs(f).max()
    assert np.abs(q - f).max() <= 0.2 * np.abs(f).max()
    assert (q.argmax(1) == f.argmax(1)).mean() >= 0.75


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_calibration_method_changes_the_activation_ranges(method, int8_dir):
    _, minmax = _int8("minmax", int8_dir)
    _, other = _int8(method, int8_dir)
    scales = lambda p: {w["name"]: w["scales"] for w in onnx_export.weight_quantization(p)}  # noqa: E731

    def activation_scales(path):
        from onnx import numpy_helper

        graph = onnx.load(str(path)).graph
        init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        return {n.input[0]: float(init[n.input[1]]) for n in graph.node
                if n.op_type == "QuantizeLinear" and n.input[1] in init and init[n.input[1]].size == 1}

    a, b = activation_scales(minmax), activation_scales(other)
    common = set(a) & set(b)
    assert len(common) >= 5
    assert any(abs(a[k] - b[k]) > 1e-6 * a[k] for k in common)  # the method was really used
    assert scales(minmax).keys() == scales(other).keys()  # weights are quantized the same way
    assert onnxruntime_runner.run_normalized(other, parity_inputs()[:4]).shape == (4, 10)


def test_unknown_method_and_unloadable_files_are_one_line_errors(tmp_path, int8_dir):
    _, path = _int8("minmax", int8_dir)
    with pytest.raises(onnx_export.ONNXExportError, match="unknown calibration method"):
        onnx_export.quantize_int8(path, tmp_path / "x.onnx", np.zeros((1, 3, 32, 32), np.float32), method="kl")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(Exception) as info:
        onnxruntime_runner.run_normalized(bad, parity_inputs()[:1])
    assert "\n" not in str(info.value) and "bad.onnx" in str(info.value)
