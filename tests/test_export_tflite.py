"""TFLite export: float parity with torch through LiteRT, and what the full-integer file really holds."""

from __future__ import annotations

import numpy as np
import pytest

from ghnq_deploy.export import tflite as tflite_export
from ghnq_deploy.runtime import litert_runner

from export_helpers import (EXAMPLES, PARITY_ATOL, calibration_images, core_specs, edge_spec, example_specs,
                            float_model, parity_inputs, sampled_specs, torch_logits)
from ghnq_deploy.data import normalize

CORE_NAMES = {s.name for s in core_specs()}


def _float_parity(spec, tmp_path) -> float:
    model = float_model(spec)
    path = tmp_path / tflite_export.FLOAT_FILE
    path.write_bytes(tflite_export.convert_float(tflite_export.build_keras_model(model)))
    x = parity_inputs()
    diff = float(np.abs(litert_runner.run_normalized(path, x) - torch_logits(model, x)).max())
    assert diff <= PARITY_ATOL, f"{spec.name}: LiteRT vs torch max |logit diff| {diff:.3g}"
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
@pytest.mark.parametrize("spec", [s for s in sampled_specs() if s.name not in CORE_NAMES], ids=lambda s: s.name)
def test_float_parity_sampled_nets(spec, tmp_path):
    _float_parity(spec, tmp_path)


@pytest.fixture(scope="module")
def int8_edge(tmp_path_factory):
    spec = edge_spec()
    model = float_model(spec)
    path = tmp_path_factory.mktemp("tflite-int8") / tflite_export.INT8_FILE
    keras_model = tflite_export.build_keras_model(model)
    path.write_bytes(tflite_export.convert_full_int8(keras_model, normalize(calibration_images(64)).numpy()))
    return model, path


def test_int8_file_has_int8_io_and_no_float_tensor(int8_edge):
    _, path = int8_edge
    inp, out = tflite_export.io_quantization(path)
    assert inp.dtype == "int8" and out.dtype == "int8"
    assert inp.scale > 0 and -128 <= inp.zero_point <= 127 and out.scale > 0
    assert inp.shape[0] == -1 and inp.shape[1:] == [32, 32, 3]  # dynamic batch, NHWC
    assert tflite_export.float_ops(path) == []
    interpreter = litert_runner.make_interpreter(path, resolver="reference")
    assert {d["dtype"].__name__ for d in interpreter.get_tensor_details()} <= {"int8", "int32"}
    assert not {"QUANTIZE", "DEQUANTIZE"} & set(tflite_export.op_names(path))


def test_int8_weights_are_per_channel_symmetric_and_biases_int32(int8_edge):
    _, path = int8_edge
    ops = tflite_export.weighted_ops(path)
    assert [op["op"] for op in ops].count("DEPTHWISE_CONV_2D") == 1 and len(ops) == 6  # 4 convs, 2 linear
    for op in ops:
        w, b, x = op["weight"], op["bias"], op["input"]
        channels = w["shape"][w["axis"]]
        assert w["dtype"] == "int8" and len(w["scales"]) == channels > 1, op["op"]
        assert set(w["zero_points"]) == {0} and -127 <= w["min"] and w["max"] <= 127
        assert w["axis"] == (3 if op["op"] == "DEPTHWISE_CONV_2D" else 0)
        if b is not None:
            assert b["dtype"] == "int32" and set(b["zero_points"]) == {0}
            expected = np.asarray(w["scales"]) * x["scales"][0]  # bias scale = input scale x weight scale
            np.testing.assert_allclose(b["scales"], expected, rtol=1e-6)
    # a dilated, strided depthwise conv stays one native op (no SpaceToBatch, no separate bias ADD)
    names = tflite_export.op_names(path)
    assert "SPACE_TO_BATCH_ND" not in names and "BATCH_TO_SPACE_ND" not in names


def test_int8_outputs_follow_the_float_net_and_kernel_paths_agree_within_a_few_lsb(int8_edge):
    model, path = int8_edge
    x = parity_inputs()[:32]
    ref = torch_logits(model, x)
    fast = litert_runner.run_detailed(path, x, resolver="xnnpack")
    slow = litert_runner.run_detailed(path, x, resolver="reference")
    assert fast.raw.dtype == np.int8 and fast.output_scale > 0
    assert np.abs(fast.logits - ref).mean() <= 0.05 * np.abs(ref).max()
    assert (fast.logits.argmax(1) == ref.argmax(1)).mean() >= 0.75
    # XNNPACK requantizes in fp32, the reference kernels in fixed point: measured on 500 images of
    # this net, 71% of outputs identical and at most 2 LSB apart (docs/export.md)
    lsb = np.abs(fast.raw.astype(int) - slow.raw.astype(int))
    assert lsb.max() <= 3 and lsb.mean() <= 0.5


def test_a_leftover_float_op_fails_the_full_integer_conversion():
    tf = tflite_export._tf()
    keras = tf.keras
    inp = keras.Input((8, 8, 3))
    y = keras.layers.GlobalAveragePooling2D()(keras.ops.sin(keras.layers.Conv2D(4, 3)(inp)))
    model = keras.Model(inp, y)
    with pytest.raises(tflite_export.TFLiteExportError) as info:
        tflite_export.convert_full_int8(model, np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32))
    assert "SIN" in str(info.value) and "\n" not in str(info.value)


def test_quantize_rounds_half_away_from_zero_and_saturates():
    q = litert_runner.quantize(np.array([0.5, -0.5, 1.5, -1.5, 2.49, 1000.0, -1000.0]), 1.0, 0)
    assert q.tolist() == [1, -1, 2, -2, 2, 127, -128]
    assert litert_runner.quantize(np.array([0.0]), 0.5, -5).tolist() == [-5]
    np.testing.assert_allclose(litert_runner.dequantize(np.array([-5, 5], np.int8), 0.5, -5), [0.0, 5.0])


def test_runner_refuses_a_wrong_input_shape_and_a_corrupt_file(int8_edge, tmp_path):
    _, path = int8_edge
    with pytest.raises(Exception, match="input shape"):
        litert_runner.run_normalized(path, np.zeros((1, 3, 28, 28), np.float32))
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer")
    with pytest.raises(Exception) as info:
        litert_runner.run_normalized(bad, np.zeros((1, 3, 32, 32), np.float32))
    assert "bad.tflite" in str(info.value) and "\n" not in str(info.value)
