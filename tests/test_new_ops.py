"""The ops added for the torchvision families (issue 11), each through builder, simulator, GHN graph and both exporters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ghnq_deploy.arch.builder import build_model
from ghnq_deploy.arch.spec import ArchError
from ghnq_deploy.data import normalize
from ghnq_deploy.export import onnx as onnx_export
from ghnq_deploy.export import tflite as tflite_export
from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
from ghnq_deploy.ghn.graph import PRIMITIVES, build_graph
from ghnq_deploy.ghn.predict import predict
from ghnq_deploy.quant.simulate import simulate
from ghnq_deploy.runtime import litert_runner

from export_helpers import PARITY_ATOL, calibration_images, float_model, parity_inputs, torch_logits
from new_ops_nets import NEW_OP_NETS, se_spec, shuffle_spec


@pytest.fixture(scope="module", params=sorted(NEW_OP_NETS))
def exported(request, tmp_path_factory):
    """One tiny net per new op: float and int8 TFLite and ONNX files of its folded float model."""
    make, builtins = NEW_OP_NETS[request.param]
    model = float_model(make())
    out = tmp_path_factory.mktemp(request.param)
    keras_model = tflite_export.build_keras_model(model)
    cal = normalize(calibration_images(64)).numpy()
    files = {"tflite": out / "f.tflite", "tflite-int8": out / "q.tflite", "onnx": out / "f.onnx",
             "onnx-int8": out / "q.onnx"}
    files["tflite"].write_bytes(tflite_export.convert_float(keras_model))
    files["tflite-int8"].write_bytes(tflite_export.convert_full_int8(keras_model, cal))
    onnx_export.export_float(model, files["onnx"], model.spec.input_shape)
    onnx_export.quantize_int8(files["onnx"], files["onnx-int8"], cal)
    return request.param, model, builtins, files


def test_float_parity_tflite_and_onnx(exported):
    import onnxruntime as ort

    name, model, _, files = exported
    x = parity_inputs()
    ref = torch_logits(model, x)
    tfl = litert_runner.run_normalized(files["tflite"], x)
    ort_out = ort.InferenceSession(str(files["onnx"])).run(None, {onnx_export.INPUT_NAME: x})[0]
    assert np.abs(tfl - ref).max() <= PARITY_ATOL, name
    assert np.abs(ort_out - ref).max() <= PARITY_ATOL, name


def test_int8_tflite_holds_the_builtin_and_no_float_op(exported):
    name, _, builtins, files = exported
    ops = set(tflite_export.op_names(files["tflite-int8"]))
    assert builtins <= ops, f"{name}: {sorted(builtins - ops)} missing from {sorted(ops)}"
    assert tflite_export.float_ops(files["tflite-int8"]) == []
    interp = litert_runner.make_interpreter(files["tflite-int8"], resolver="reference")
    for op in interp._get_ops_details():
        if op["op_name"] == "LOGISTIC":  # TFLite fixes its int8 output grid (the simulator copies it)
            assert interp._get_tensor_details(int(op["outputs"][0]), 0)["quantization"] == (1 / 256, -128)


def test_int8_files_follow_the_float_net(exported):
    """Both int8 files run and mostly agree with float on labels (tiny random nets: a loose bound)."""
    import onnxruntime as ort

    name, model, _, files = exported
    x = parity_inputs()
    ref = torch_logits(model, x).argmax(1)
    tfl = litert_runner.run_normalized(files["tflite-int8"], x).argmax(1)
    ort_out = ort.InferenceSession(str(files["onnx-int8"])).run(None, {onnx_export.INPUT_NAME: x})[0].argmax(1)
    assert (tfl == ref).mean() >= 0.6, name
    assert (ort_out == ref).mean() >= 0.6, name


def test_simulator_runs_every_new_op_and_logistic_uses_the_fixed_tflite_grid():
    """LOGISTIC's int8 output is scale 1/256, zero point -128 in the file; the simulator uses the same grid."""
    for name, (make, _) in NEW_OP_NETS.items():
        model = build_model(make(), seed=0).eval()
        x = torch.randn(4, 3, 32, 32)
        sim = simulate(model, "tflite-int8", bn="batch")
        sim.calibrate([x])
        with torch.no_grad():
            y = sim(x)
        assert y.shape == (4, 10) and torch.isfinite(y).all(), name
    make, _ = NEW_OP_NETS["sigmoid"]
    model = build_model(make(), seed=0).eval()
    sim = simulate(model, "tflite-int8", bn="batch")
    sim.calibrate([torch.randn(2, 3, 32, 32)])
    captured = {}
    from ghnq_deploy.quant import simulate as sim_mod

    original = sim_mod.fake_quant

    def spy(t, scale, zp, qmin, qmax, rounding):
        captured.setdefault("grids", []).append((float(scale), float(zp)))
        return original(t, scale, zp, qmin, qmax, rounding)

    sim_mod.fake_quant = spy
    try:
        with torch.no_grad():
            sim(torch.randn(2, 3, 32, 32))
    finally:
        sim_mod.fake_quant = original
    assert (1 / 256, -128.0) in captured["grids"]


def test_ghn_graph_types_for_new_ops():
    se, sh = build_graph(se_spec()), build_graph(shuffle_spec())
    assert PRIMITIVES.index("cse") in se.primitives.tolist()
    assert PRIMITIVES.index("shuffle") in sh.primitives.tolist()


@pytest.mark.parametrize("make, op", [(se_spec, "mul"), (shuffle_spec, "channel_shuffle")])
def test_a_checkpoint_without_an_op_type_refuses_the_net_naming_it(make, op):
    ghn, info = load_ghn_checkpoint("default")
    with pytest.raises(ArchError, match=op) as exc:
        predict(ghn, [make()], ghn_info=info)
    assert "\n" not in str(exc.value)
