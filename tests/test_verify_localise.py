"""The localiser names the layer a test breaks: one output channel of a mid-network conv scaled by 1000."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ghnq_deploy.arch.spec import analyze, parse_spec
from ghnq_deploy.data import normalize
from ghnq_deploy.export import tflite as tflite_export
from ghnq_deploy.runtime import litert_runner
from ghnq_deploy.verify import localise as loc

from export_helpers import calibration_images, float_model, parity_inputs

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _n(node_id: str, op: str, inputs: list[str], **attributes) -> dict:
    return {"id": node_id, "op": op, "inputs": inputs, "attributes": attributes}


def _spec():
    nodes = [_n("c1", "conv", ["input"], out_channels=16, kernel=3), _n("b1", "bn", ["c1"]), _n("r1", "relu", ["b1"]),
             _n("c2", "conv", ["r1"], out_channels=16, kernel=3), _n("b2", "bn", ["c2"]), _n("r2", "relu", ["b2"]),
             _n("mid", "conv", ["r2"], out_channels=16, kernel=3), _n("b3", "bn", ["mid"]), _n("r3", "relu", ["b3"]),
             _n("c4", "conv", ["r3"], out_channels=32, kernel=3, stride=2), _n("b4", "bn", ["c4"]),
             _n("r4", "relu", ["b4"]), _n("gap", "global_avgpool", ["r4"]), _n("fc", "linear", ["gap"], out_features=10),
             _n("output", "output", ["fc"])]
    spec = parse_spec({"name": "loc", "input_shape": [3, 32, 32], "num_classes": 10, "nodes": nodes})
    analyze(spec)
    return spec


def _export(model, folder, name):
    keras_model = tflite_export.build_keras_model(model)
    int8, f32 = folder / f"{name}.int8.tflite", folder / f"{name}.f32.tflite"
    int8.write_bytes(tflite_export.convert_full_int8(keras_model, normalize(calibration_images(64)).numpy()))
    f32.write_bytes(tflite_export.convert_float(keras_model))
    return int8, f32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("localise")
    clean = float_model(_spec())
    broken = float_model(_spec())
    with torch.no_grad():  # one output channel of the mid-network conv (folded BN) scaled by 1000
        broken.layers["mid"].weight[5] *= 1000
        broken.layers["mid"].bias[5] *= 1000
    return {"clean": _export(clean, folder, "clean"), "broken": _export(broken, folder, "broken")}


def _inputs(int8_file, count: int = 8):
    x = np.ascontiguousarray(parity_inputs(count)[:count].transpose(0, 2, 3, 1))
    inp, _ = tflite_export.io_quantization(int8_file)
    return x, litert_runner.quantize(x, inp.scale, inp.zero_point)


def test_localiser_names_the_broken_conv(files):
    int8, f32 = files["broken"]
    x, q = _inputs(int8)
    result = loc.localise(int8, f32, x, q, kernels="reference")
    outlier = [f for f in result.findings if f.cause == "outlier-channel activation range"]
    assert outlier, result.findings
    named = outlier[0]
    assert named.op == "CONV_2D" and "/mid_" in named.tensor, named  # the layer the test broke
    assert "channel 5" in named.detail
    assert named.explains != named.op_index  # found while explaining a worse layer downstream
    ranked = [r.tensor for r in result.layers]
    assert ranked.index(named.tensor) > 0  # its own output steps are fine: the damage shows downstream
    assert all(r.vs_sim_max_steps == 0 for r in result.layers)  # reference kernels == the integer simulator
    assert result.to_dict()["findings"][0]["cause"] in loc.CAUSES


def test_clean_net_has_no_outlier_finding(files):
    int8, f32 = files["clean"]
    x, q = _inputs(int8)
    result = loc.localise(int8, f32, x, q, kernels="xnnpack")
    assert not [f for f in result.findings if f.cause == "outlier-channel activation range"]
    assert result.layers[0].vs_float_mean_steps >= result.layers[-1].vs_float_mean_steps  # ranked


def test_mismatched_images_are_one_line(files):
    int8, f32 = files["clean"]
    x, q = _inputs(int8)
    with pytest.raises(loc.LocaliseError, match="same images"):
        loc.localise(int8, f32, x[:2], q[:3])
