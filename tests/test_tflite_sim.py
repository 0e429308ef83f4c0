"""The .tflite reader and the fake-quant / integer simulators against LiteRT's own kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ghnq_deploy.data import normalize
from ghnq_deploy.errors import UserError
from ghnq_deploy.export import tflite as tflite_export
from ghnq_deploy.quant import requantize as rq
from ghnq_deploy.quant import tflite_sim
from ghnq_deploy.quant.tflite_graph import read_tflite
from ghnq_deploy.runtime import litert_runner

from export_helpers import calibration_images, edge_spec, float_model, parity_inputs, sampled_specs
from new_ops_nets import NEW_OP_NETS

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def int8_files(tmp_path_factory):
    """Full-integer files of the edge-case net, a BN-free net and a concat/residual/dilated-depthwise net."""
    folder = tmp_path_factory.mktemp("tflite-sim")
    cal = normalize(calibration_images(32)).numpy()
    files = {}
    for spec in (edge_spec(), sampled_specs(space=1)[0], sampled_specs(space=1)[3]):
        path = folder / f"{spec.name}.tflite"
        path.write_bytes(tflite_export.convert_full_int8(tflite_export.build_keras_model(float_model(spec)), cal))
        files[spec.name] = path
    return files


@pytest.fixture(scope="module")
def space2_file(tmp_path_factory):
    """A space-2 sampled net with HARD_SWISH, LOGISTIC, MUL, TRANSPOSE, STRIDED_SLICE, PAD, concat, residual."""
    spec = sampled_specs(space=2)[5]
    path = tmp_path_factory.mktemp("tflite-sim-space2") / f"{spec.name}.tflite"
    cal = normalize(calibration_images(32)).numpy()
    path.write_bytes(tflite_export.convert_full_int8(tflite_export.build_keras_model(float_model(spec)), cal))
    return path


def _quantized_inputs(path, x: np.ndarray) -> np.ndarray:
    inp, _ = tflite_export.io_quantization(path)
    return litert_runner.quantize(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), inp.scale, inp.zero_point)


def _litert_raw(path, q: np.ndarray, resolver: str) -> np.ndarray:
    interpreter = litert_runner.make_interpreter(path, resolver)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(q.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], q)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"]).astype(np.int64)


def test_reader_matches_the_interpreter(int8_files):
    path = int8_files["edge_cases"]
    graph = read_tflite(path)
    interpreter = litert_runner.make_interpreter(path, "reference")
    ops = interpreter._get_ops_details()
    assert [op.op for op in graph.operators] == [o["op_name"] for o in ops]
    for op, ref in zip(graph.operators, ops):
        assert list(op.inputs) == [int(i) for i in ref["inputs"]]
        assert list(op.outputs) == [int(i) for i in ref["outputs"]]
    dw = next(op for op in graph.operators if op.op == "DEPTHWISE_CONV_2D")
    assert dw.options["depth_multiplier"] == 2 and dw.options["dilation_h_factor"] == 2
    assert dw.options["fused_activation_function"] == "RELU6" and dw.options["padding"] in ("SAME", "VALID")
    w = graph.tensor(dw.inputs[1])
    assert w.dtype == np.int8 and w.quantization.quantized_dimension == 3 and w.quantization.scale.size == 64
    np.testing.assert_array_equal(w.data, interpreter.get_tensor(dw.inputs[1]))
    b = graph.tensor(dw.inputs[2])
    assert b.dtype == np.int32 and b.data.shape == (64,)
    x = graph.tensor(graph.inputs[0])
    detail = interpreter.get_input_details()[0]
    assert x.shape_signature[0] == -1 and (x.scale, x.zero_point) == pytest.approx(detail["quantization"])


def test_unsupported_op_is_one_line(int8_files):
    with pytest.raises(UserError) as err:
        read_tflite(int8_files["edge_cases"], supported=frozenset({"CONV_2D"}))
    msg = str(err.value)
    assert "\n" not in msg and "edge_cases.tflite" in msg and "MUL" in msg


def test_not_a_flatbuffer(tmp_path):
    bad = tmp_path / "x.tflite"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(UserError, match="not a TFLite flatbuffer"):
        read_tflite(bad)


@pytest.mark.parametrize("name", ["edge_cases", "ood-bnfree-s0-00000", "id-test-s0-00000"])
def test_integer_equals_builtin_ref_on_images(int8_files, name):
    path = int8_files[name]
    q = _quantized_inputs(path, parity_inputs(32))
    ref = _litert_raw(path, q, "reference")
    out = tflite_sim.simulate(path, q, arithmetic="integer", batch_size=16)
    assert out.dtype == np.int8 and out.shape == ref.shape
    np.testing.assert_array_equal(out.astype(np.int64), ref)


def test_integer_equals_builtin_ref_on_a_space2_net(space2_file):
    ops = {op.op for op in read_tflite(space2_file).operators}
    assert {"HARD_SWISH", "LOGISTIC", "MUL", "TRANSPOSE"} <= ops
    q = _quantized_inputs(space2_file, parity_inputs(32))
    q[0] = -128  # saturated inputs
    np.testing.assert_array_equal(tflite_sim.simulate(space2_file, q, arithmetic="integer").astype(np.int64),
                                  _litert_raw(space2_file, q, "reference"))


def test_integer_equals_builtin_ref_on_random_int8(int8_files):
    path = int8_files["id-test-s0-00000"]
    q = np.random.default_rng(1).integers(-128, 128, size=(24, 32, 32, 3)).astype(np.int8)
    q[0] = -128
    q[1] = 127  # saturation at both ends
    np.testing.assert_array_equal(tflite_sim.simulate(path, q, arithmetic="integer").astype(np.int64),
                                  _litert_raw(path, q, "reference"))


def test_single_rounding_differs_from_reference(int8_files):
    path = int8_files["id-test-s0-00000"]
    q = _quantized_inputs(path, parity_inputs(32))
    ref = _litert_raw(path, q, "reference")
    single = tflite_sim.simulate(path, q, arithmetic="integer", rounding="single").astype(np.int64)
    assert (single != ref).any() and np.abs(single - ref).max() <= 8


@pytest.mark.parametrize("name", ["edge_cases", "id-test-s0-00000"])
def test_fake_quant_close_to_litert(int8_files, name):
    """The target-scheme fake-quant simulation: outputs within a few steps of both kernel sets."""
    path = int8_files[name]
    q = _quantized_inputs(path, parity_inputs(32))
    fq = tflite_sim.simulate(path, q).astype(np.int64)
    for resolver in ("reference", "xnnpack"):
        diff = np.abs(fq - _litert_raw(path, q, resolver))
        assert np.mean(diff <= 1) >= 0.8 and diff.max() <= 6, (resolver, np.mean(diff <= 1), diff.max())


def test_xnnpack_rounding_tracks_default_kernels(int8_files):
    path = int8_files["id-test-s0-00000"]
    q = _quantized_inputs(path, parity_inputs(32))
    xnn = _litert_raw(path, q, "xnnpack")
    mine = tflite_sim.simulate(path, q, arithmetic="integer", rounding="xnnpack").astype(np.int64)
    ref_mode = tflite_sim.simulate(path, q, arithmetic="integer").astype(np.int64)
    assert np.mean(mine == xnn) >= 0.95 and np.mean(mine == xnn) > np.mean(ref_mode == xnn)


def test_bad_inputs_and_options(int8_files):
    path = int8_files["edge_cases"]
    with pytest.raises(UserError, match="int8"):
        tflite_sim.simulate(path, np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(UserError, match="input shape"):
        tflite_sim.simulate(path, np.zeros((1, 3, 32, 32), np.int8))
    with pytest.raises(UserError, match="rounding"):
        tflite_sim.simulate(path, np.zeros((1, 32, 32, 3), np.int8), rounding="nearest")
    with pytest.raises(UserError, match="integer arithmetic only"):
        tflite_sim.simulate(path, np.zeros((1, 32, 32, 3), np.int8), arithmetic="fake-quant", rounding="single")


def test_simulate_all_keeps_named_intermediates(int8_files):
    path = int8_files["edge_cases"]
    q = _quantized_inputs(path, parity_inputs(4))
    tensors = tflite_sim.simulate_all(path, q)
    graph = read_tflite(path)
    assert graph.tensor(graph.outputs[0]).name in tensors
    assert any(v.ndim == 4 for v in tensors.values())


# -- the fixed-point primitives against hand-computed values ------------------------------------

def test_quantize_multiplier_hand_values():
    m, s = rq.quantize_multiplier([0.5, 0.75, 1.0, 0.0, 2.0 ** -40, 0.1])
    assert m.tolist()[:5] == [1 << 30, 3 << 29, 1 << 30, 0, 0]
    assert s.tolist()[:5] == [0, 0, 1, 0, 0]
    assert m[5] == round(0.8 * 2 ** 31) and s[5] == -3  # 0.1 = 0.8 * 2^-3
    m, s = rq.quantize_multiplier([1 - 2.0 ** -33])  # mantissa rounds up to 2^31: carried into the shift
    assert (int(m[0]), int(s[0])) == (1 << 30, 1)
    m, s = rq.quantize_multiplier([2.0 ** 40], single=True)  # single-rounding builds clamp the shift at 30
    assert (int(m[0]), int(s[0])) == (rq.INT32_MAX, 30)


def test_double_and_single_rounding_hand_values():
    half = 1 << 30  # the multiplier 0.5 in Q31 with shift 0: x * 0.5
    x = torch.tensor([5, -5, 3, -3, 7, -7])
    # SRDHM rounds half up (toward +inf): 2.5 -> 3, -2.5 -> -2, 1.5 -> 2, -1.5 -> -1
    assert rq.multiply_by_quantized_multiplier(x, half, 0).tolist() == [3, -2, 2, -1, 4, -3]
    # shift -1: x * 0.25, double rounding: SRDHM (x / 2 rounded) then a rounding divide by 2 (half away)
    # 5/2 -> 3 -> 3/2 -> 2;  -5/2 -> -2 -> -1;  3/2 -> 2 -> 1;  -3/2 -> -1 -> -1 (half away);  7/2->4->2;  -7->-3->-2
    assert rq.multiply_by_quantized_multiplier(x, half, -1).tolist() == [2, -1, 1, -1, 2, -2]
    # single rounding: (x * m + 2^(31 - shift - 1)) >> (31 - shift): one round half up of x / 4
    # 1.25 -> 1, -1.25 -> -1, 0.75 -> 1, -0.75 -> -1, 1.75 -> 2, -1.75 -> -2
    assert rq.multiply_by_quantized_multiplier(x, half, -1, "single").tolist() == [1, -1, 1, -1, 2, -2]
    # where they part: 4.5 / 2 via double rounding: 9 * 0.25 -> SRDHM(4.5) = 5 -> 5 / 2 = 2.5 -> 3; single: 2.25 -> 2
    assert rq.multiply_by_quantized_multiplier(torch.tensor([9]), half, -1).tolist() == [3]
    assert rq.multiply_by_quantized_multiplier(torch.tensor([9]), half, -1, "single").tolist() == [2]


def test_fast_requantization_equals_the_integer_definition():
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-(1 << 21), 1 << 21, (4096, 8), generator=g)
    m = np.random.default_rng(0).integers(1 << 30, (1 << 31) - 1, size=8)
    s = np.array([0, -1, -3, -7, -9, -12, -20, -31])
    for rounding in ("double", "single"):
        want = rq.multiply_by_quantized_multiplier(acc, m, s, rounding)
        got = rq.requantize_float_exact(acc.to(torch.float64), m, s, rounding)
        assert got is not None and torch.equal(got.to(torch.int64), want), rounding
    exact = rq.rounding_divide_by_pot(rq.saturating_rounding_doubling_high_mul(acc, torch.from_numpy(m)),
                                      torch.from_numpy(-s))
    assert torch.equal(exact, rq.multiply_by_quantized_multiplier(acc, m, s))
    assert rq.requantize_float_exact(torch.tensor([float(1 << 30)]), [rq.INT32_MAX], [0]) is None  # bound


@pytest.mark.parametrize("relu", [False, True])
def test_clamped_requantization_equals_the_integer_definition(relu):
    g = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    for trial in range(12):
        acc = torch.randint(-(1 << 21), 1 << 21, (2048, 8), generator=g)
        acc[:64] = torch.from_numpy(rng.integers(-40, 40, size=(64, 8)))  # many exact ties
        m = rng.integers(1 << 30, (1 << 31) - 1, size=8) if trial % 3 else np.full(8, 1 << 30)
        s = -rng.integers(0, 20, size=8)
        s[0] = 0  # a channel without the second rounding
        zero = int(rng.integers(-128, 128))
        lo, hi = (zero, 127) if relu else (-128, 127)
        work = torch.empty(acc.shape, dtype=torch.float64)
        for rounding in ("double", "single"):
            want = (rq.multiply_by_quantized_multiplier(acc, m, s, rounding) + zero).clamp(lo, hi)
            got = rq.requantize_clamped(acc.to(torch.float32 if trial % 2 else torch.float64), m, s, rounding, None,
                                        zero, lo, hi, torch.int8, work, torch.empty_like(work))
            assert got.dtype == torch.int8 and torch.equal(got.to(torch.int64), want), (trial, rounding)


@pytest.mark.slow
@pytest.mark.parametrize("space", [1, 2])
def test_integer_equals_builtin_ref_on_sampled_nets_full_eval_set(tmp_path, space):
    """The bar: 0 LSB vs BUILTIN_REF on the 20 sampled nets (all splits, depthwise, dilated,
    concat, residual, BN-free) on the 2,000 shipped evaluation images; space 2 adds the
    new ops' nets (HARD_SWISH, LOGISTIC, MUL, TRANSPOSE, RESIZE_NEAREST_NEIGHBOR, ...)."""
    from ghnq_deploy.calibration import load_eval_set

    x = normalize(load_eval_set().images).numpy()
    cal = normalize(calibration_images(64)).numpy()
    specs = list(sampled_specs(space=space))
    if space == 2:
        specs += [make() for make, _ in NEW_OP_NETS.values()]
    for spec in specs:
        path = tmp_path / f"{spec.name}.tflite"
        path.write_bytes(tflite_export.convert_full_int8(tflite_export.build_keras_model(float_model(spec)), cal))
        q = _quantized_inputs(path, x)
        ref = np.concatenate([_litert_raw(path, q[i:i + 250], "reference") for i in range(0, len(q), 250)])
        out = tflite_sim.simulate(path, q, arithmetic="integer").astype(np.int64)
        assert np.array_equal(out, ref), f"{spec.name}: {int((out != ref).sum())} logits differ"
