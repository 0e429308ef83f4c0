"""The ONNX file simulator (quant/onnx_sim.py): QDQ semantics per op, and whole exported nets vs ONNX Runtime."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ghnq_deploy.data import normalize
from ghnq_deploy.export import onnx as onnx_export
from ghnq_deploy.quant import onnx_sim

from export_helpers import calibration_images, edge_spec, example_specs, float_model, parity_inputs, sampled_specs
import new_ops_nets


def _ort(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the ops as written, no fusion
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _qdq_model(scale: np.ndarray, zero: np.ndarray, axis: int = 1) -> bytes:
    inits = [numpy_helper.from_array(scale.astype(np.float32), "s"), numpy_helper.from_array(zero, "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=axis),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=axis)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("scale", [1e-6, 3.7e-3, 0.25, 1e2])
def test_quantize_dequantize_matches_onnxruntime_on_ties_and_saturation(dtype, scale):
    lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
    rng = np.random.default_rng(0)
    for zero in (lo, 0 if dtype == np.int8 else 128, hi):
        k = np.arange(-300, 300, dtype=np.float64)
        ties = (k + 0.5) * scale  # exact halves: ONNX rounds half to even
        noise = rng.normal(scale=200 * scale, size=600)
        huge = np.array([1e30, -1e30, 1e6 * scale, -1e6 * scale])  # saturate at both ends
        x = np.concatenate([ties, noise, huge]).astype(np.float32).reshape(1, -1)
        model = _qdq_model(np.array(scale), np.array(zero, dtype))
        sim = onnx_sim.run(onnx_sim.QDQGraph(model), x)[0]
        np.testing.assert_array_equal(sim, _ort(model, x))


def test_per_channel_quantization_matches_onnxruntime():
    scales = np.array([1e-6, 1e-3, 0.5, 1e2], np.float32)
    zeros = np.array([-128, -5, 0, 127], np.int8)
    x = np.random.default_rng(1).normal(size=(2, 4, 3, 3)).astype(np.float32) * scales.reshape(1, 4, 1, 1) * 300
    model = _qdq_model(scales, zeros, axis=1)
    np.testing.assert_array_equal(onnx_sim.run(onnx_sim.QDQGraph(model), x)[0], _ort(model, x))


def test_an_op_outside_the_registry_is_one_error_naming_it():
    nodes = [helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->ij")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    with pytest.raises(onnx_sim.OnnxSimError, match="no kernel for Einsum"):
        onnx_sim.QDQGraph(model)
    with pytest.raises(onnx_sim.OnnxSimError, match="not a readable ONNX model"):
        onnx_sim.QDQGraph(b"not onnx at all")


def _specs():
    """(spec, params): GHN-predicted where the shipped GHN knows the ops (the product's case), else builder init.

    A builder-initialised deep net is chaotic under int8: ONNX Runtime with and without its own graph
    fusions already differs by up to 14 output steps on the MobileNetV2 example, so it cannot judge
    a simulator; the predicted nets and the tiny new-op nets can."""
    sampled = sampled_specs(space=1)  # the op set of the shipped checkpoint's nets
    nets = [(s, "ghn") for s in [edge_spec(), sampled[0], sampled[2], sampled[3], sampled[5]] + example_specs()]
    nets += [(s, "init") for s in (new_ops_nets.se_spec(), new_ops_nets.shuffle_spec(), new_ops_nets.slice_spec(),
                                   new_ops_nets.ceil_pool_spec(), new_ops_nets.adaptive_spec())]
    nets += [(new_ops_nets._act(op), "init") for op in ("hardswish", "hardsigmoid", "silu", "sigmoid")]
    return nets


@functools.cache
def _ghn():
    from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint

    return load_ghn_checkpoint()[0]


def _predicted_float_model(spec):
    from ghnq_deploy.ghn.predict import predict
    from ghnq_deploy.quant.bn_calibrate import calibrate_bn, fold_bn

    model = predict(_ghn(), [spec])[0].build()
    calibrate_bn(model, calibration_images())
    return fold_bn(model, check_inputs=calibration_images(16))[0].eval()


@pytest.mark.parametrize("spec,params", _specs(), ids=lambda v: getattr(v, "name", v))
def test_exported_qdq_nets_match_onnxruntime(spec, params, tmp_path):
    """The file's own encodings in fake-quant reproduce ONNX Runtime's integer kernels to within one step."""
    model = _predicted_float_model(spec) if params == "ghn" else float_model(spec)
    float_path, int8_path = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx_export.export_float(model, float_path, spec.input_shape)
    onnx_export.quantize_int8(float_path, int8_path, normalize(calibration_images(64)).numpy())
    x = parity_inputs(48)[:48]
    _, out = onnx_export.io_quantization(int8_path)
    sim = onnx_sim.simulate(int8_path, x, batch=16) / out.scale
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    real = ort.InferenceSession(str(int8_path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    diff = np.abs(sim - real / out.scale)
    assert diff.max() <= 3 + 1e-4, diff.max()  # ORT's fused integer kernels requantize in fp32: a few steps at most
    assert (diff <= 1 + 1e-4).mean() >= 0.98, (diff <= 1 + 1e-4).mean()
    real_steps = np.round(real / out.scale)
    top2 = np.sort(real_steps, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2
    assert (sim.argmax(1)[clear] == real.argmax(1)[clear]).all()
    # a different graph would not pass this: the float model is a few steps off everywhere
    assert onnx.load(str(int8_path)).graph.node[0].op_type == "QuantizeLinear"
