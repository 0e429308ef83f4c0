"""Per-op bit-exactness of the integer simulator against BUILTIN_REF and TFLite Micro on single-op files.

Each file is written with chosen encodings (scales 1e-6 .. 1e2, zero points at both ends);
inputs cover every int8 code (ties, negatives, saturation at -128 and 127). Every case runs
against both reference kernel sets, each with the simulator's matching ``kernels``.
"""

from __future__ import annotations

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

from ghnq_deploy.quant import tflite_sim
from ghnq_deploy.quant import unary_int8 as unary

from tflite_op_files import T, run_reference, run_tflm, single_op_file

try:
    import tflite_micro  # noqa: F401

    ORACLES = {"litert-ref": run_reference, "tflm": run_tflm}
except ImportError:  # the TFLite Micro wheel is a dependency; without it only BUILTIN_REF is checked
    ORACLES = {"litert-ref": run_reference}

ALL_CODES = np.arange(-128, 128, dtype=np.int8).reshape(1, 16, 16, 1)


def _random_codes(shape, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).integers(-128, 128, size=shape).astype(np.int8)
    x.reshape(-1)[:2] = (-128, 127)  # saturation at both ends
    return x


def _assert_exact(model: bytes, x: np.ndarray) -> None:
    for kernels, oracle in ORACLES.items():
        ref = oracle(model, x).astype(np.int64)
        out = tflite_sim.simulate(model, x, arithmetic="integer", kernels=kernels).astype(np.int64)
        assert out.shape == ref.shape
        bad = np.flatnonzero(out != ref)
        assert not bad.size, f"{kernels}: {bad.size} of {out.size} differ; first at {bad[0]}: sim " \
                             f"{out.flat[bad[0]]} ref {ref.flat[bad[0]]}"


# (input scale, input zero point, output scale, output zero point)
HARD_SWISH_CASES = [(0.05, 0, 0.04, -20), (0.1, -128, 0.05, -128), (0.02, 127, 0.1, 0), (1e-3, 5, 1e-3, -3),
                    (0.5, -60, 0.6, -128), (3.0, 10, 4.0, 0), (20.0, 0, 30.0, 100), (1e-5, -128, 1e-4, 127),
                    (0.03125, 0, 0.0625, -128)]  # power-of-two scales: exact ties in every multiplier


@pytest.mark.parametrize("si,zi,so,zo", HARD_SWISH_CASES)
def test_hard_swish_every_code(si, zi, so, zo):
    model = single_op_file("HARD_SWISH", [T((1, 16, 16, 1), si, zi)], T((1, 16, 16, 1), so, zo))
    _assert_exact(model, ALL_CODES)


@pytest.mark.parametrize("si,zi", [(0.1, 0), (0.02, -128), (0.5, 127), (1e-3, 3), (0.0625, -7), (4.0, 0)])
def test_logistic_every_code(si, zi):
    # TFLite requires the int8 LOGISTIC output encoding 1/256, -128
    model = single_op_file("LOGISTIC", [T((1, 16, 16, 1), si, zi)], T((1, 16, 16, 1), 1.0 / 256, -128))
    _assert_exact(model, ALL_CODES)


# (a scale, a zp, b scale, b zp, out scale, out zp)
BINARY_CASES = [(0.1, 0, 0.05, 3, 0.2, -5), (0.02, -128, 0.5, 127, 0.03, 127), (1e-6, 10, 1e2, -10, 1e-3, 0),
                (0.25, 0, 0.5, 0, 0.125, 0), (1.0, -1, 1.0, 1, 200.0, -128), (1e-3, 0, 1e-3, 0, 1e-7, 0)]


@pytest.mark.parametrize("op", ["MUL", "ADD"])
@pytest.mark.parametrize("sa,za,sb,zb,so,zo", BINARY_CASES)
def test_binary_ops(op, sa, za, sb, zb, so, zo):
    shape = (1, 16, 16, 4)
    b = _random_codes(shape, 7)
    options = schema.MulOptionsT() if op == "MUL" else schema.AddOptionsT()
    model = single_op_file(op, [T(shape, sa, za), T(shape, sb, zb, data=b)], T(shape, so, zo), options)
    for seed in (0, 1):
        _assert_exact(model, _random_codes(shape, seed))
    _assert_exact(model, np.tile(ALL_CODES, (1, 1, 1, 4)))


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("in_zero,out_zero,out_scale", [(-128, 127, 0.05), (127, -128, 0.5), (0, 0, 20.0),
                                                        (-3, 9, 1e-3)])
def test_conv_per_channel_scales_1e_6_to_1e2(depthwise, in_zero, out_zero, out_scale):
    channels = 9
    w_scale = np.logspace(-6, 2, channels).astype(np.float32)  # 1e-6 .. 1e2, one per output channel
    rng = np.random.default_rng(3)
    if depthwise:
        w = rng.integers(-127, 128, size=(1, 3, 3, channels)).astype(np.int8)
        options, op, axis = schema.DepthwiseConv2DOptionsT(), "DEPTHWISE_CONV_2D", 3
        options.depthMultiplier, in_ch = 1, channels
    else:
        w = rng.integers(-127, 128, size=(channels, 3, 3, 4)).astype(np.int8)
        options, op, axis, in_ch = schema.Conv2DOptionsT(), "CONV_2D", 0, 4
    options.padding, options.strideW, options.strideH = schema.Padding.SAME, 1, 1
    options.dilationWFactor = options.dilationHFactor = 1
    in_scale = 0.02
    bias = rng.integers(-5000, 5000, size=channels).astype(np.int32)
    model = single_op_file(op, [T((1, 8, 8, in_ch), in_scale, in_zero),
                                T(w.shape, tuple(w_scale), 0, data=w, axis=axis),
                                T((channels,), tuple(np.float32(in_scale) * w_scale), 0, np.int32, bias)],
                           T((1, 8, 8, channels), out_scale, out_zero), options)
    _assert_exact(model, _random_codes((2, 8, 8, in_ch), 5))


def test_concatenation_shared_encoding():
    # int8 CONCATENATION on the reference kernels requires one scale and zero point for all
    # inputs and the output (Prepare refuses others): the converter shares them
    options = schema.ConcatenationOptionsT()
    options.axis = 3
    b = _random_codes((1, 4, 4, 2), 2)
    model = single_op_file("CONCATENATION", [T((1, 4, 4, 3), 0.07, -128), T((1, 4, 4, 2), 0.07, -128, data=b)],
                           T((1, 4, 4, 5), 0.07, -128), options)
    for seed in (4, 5, 6):  # the constant input fixes the batch at 1
        _assert_exact(model, _random_codes((1, 4, 4, 3), seed))


def test_average_pool_rounding_ties():
    options = schema.Pool2DOptionsT()
    options.padding, options.strideW, options.strideH = schema.Padding.SAME, 2, 2
    options.filterWidth = options.filterHeight = 2
    model = single_op_file("AVERAGE_POOL_2D", [T((1, 16, 16, 1), 0.1, -5)], T((1, 8, 8, 1), 0.1, -5), options)
    _assert_exact(model, ALL_CODES)  # 4-tap sums of consecutive codes: x.5 ties of both signs


def test_requantize_int8_to_int8():
    model = single_op_file("QUANTIZE", [T((1, 16, 16, 1), 0.37, -128)], T((1, 16, 16, 1), 0.011, 127))
    _assert_exact(model, ALL_CODES)


def test_hard_swish_table_hand_values():
    # input 1/16 per code, zero point 0; output 1/16: hard_swish(x) = x (x + 3) / 6 for |x| < 3
    table = unary.hard_swish_table(1 / 16, 0, 1 / 16, 0)
    code = {int(c): int(v) for c, v in zip(unary.CODES, table)}
    assert code[0] == 0 and code[-128] == 0  # x = -8: relu6(x + 3) = 0
    assert code[127] == 127  # x = 7.94 >= 3: hard_swish(x) = x
    assert code[16] == 11  # x = 1: 4/6 = 0.667 -> 10.67 steps -> 11
    assert code[-24] == -6  # x = -1.5: -1.5 * 1.5 / 6 = -0.375 = -6 steps, the minimum
    assert np.all(np.diff(table[unary.CODES >= -24]) >= 0)  # non-decreasing from the minimum on


def _run_default_kernels(model: bytes, x: np.ndarray) -> np.ndarray:
    from ghnq_deploy.runtime.litert_runner import make_interpreter

    it = make_interpreter(model, "xnnpack")
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]).copy()


@pytest.mark.parametrize("si,zi,so,zo", HARD_SWISH_CASES[:5])
def test_xnnpack_mode_activations_equal_the_default_kernels(si, zi, so, zo):
    for op, out in (("HARD_SWISH", T((1, 16, 16, 1), so, zo)), ("LOGISTIC", T((1, 16, 16, 1), 1.0 / 256, -128))):
        model = single_op_file(op, [T((1, 16, 16, 1), si, zi)], out)
        want = _run_default_kernels(model, ALL_CODES).astype(np.int64)
        got = tflite_sim.simulate(model, ALL_CODES, arithmetic="integer", rounding="xnnpack").astype(np.int64)
        np.testing.assert_array_equal(got, want, err_msg=op)


# BINARY_CASES[2] is left out: its scale ratio 1e5 is outside XNNPACK's range, and LiteRT's builtin
# fallback kernel overflows int32 there (measured: half the pairs saturate the wrong way)
XNNPACK_BINARY_CASES = BINARY_CASES[:2] + BINARY_CASES[3:5] + [(0.0747, -1, 0.1073, 15, 0.0235, -128)]


@pytest.mark.parametrize("op", ["ADD", "MUL"])
@pytest.mark.parametrize("sa,za,sb,zb,so,zo", XNNPACK_BINARY_CASES)
def test_xnnpack_mode_binary_ops_equal_the_default_kernels(op, sa, za, sb, zb, so, zo):
    codes = np.arange(-128, 128)
    a, b = (c.reshape(1, 256, 256, 1).astype(np.int8) for c in np.meshgrid(codes, codes, indexing="ij"))
    options = schema.MulOptionsT() if op == "MUL" else schema.AddOptionsT()
    shape = (1, 256, 256, 1)
    model = single_op_file(op, [T(shape, sa, za), T(shape, sb, zb, data=b)], T(shape, so, zo), options)
    want = _run_default_kernels(model, a).astype(np.int64)  # every pair of int8 codes
    got = tflite_sim.simulate(model, a, arithmetic="integer", rounding="xnnpack").astype(np.int64)
    assert int((got != want).sum()) == 0, f"{int((got != want).sum())} of 65536 pairs differ"


@pytest.mark.parametrize("si", list(np.logspace(-3, 1.5, 24)))
def test_logistic_input_scales_across_the_fixed_point_paths(si):
    # TFLite Micro's fixed-point LOGISTIC takes another path per input scale (the frexp shift,
    # the saturation radius); BUILTIN_REF's float table does not: both must match their kernels
    zi = int(np.round(np.log10(si) * 37)) % 256 - 128
    model = single_op_file("LOGISTIC", [T((1, 16, 16, 1), float(si), zi)], T((1, 16, 16, 1), 1.0 / 256, -128))
    _assert_exact(model, ALL_CODES)


def _per_channel_fc(seed: int, rows: int = 128) -> bytes:
    # small weight codes keep the accumulators small, so the real multipliers can be large
    # (right shifts of 4 to 8): the two roundings then part on a few percent of the outputs
    rng = np.random.default_rng(seed)
    out_ch, k = 48, 64
    w = rng.integers(-4, 5, size=(out_ch, k)).astype(np.int8)
    w_scale = np.logspace(-3, -2, out_ch).astype(np.float32)
    in_scale = np.float32(0.05)
    bias = rng.integers(-2000, 2000, size=out_ch).astype(np.int32)
    options = schema.FullyConnectedOptionsT()
    return single_op_file("FULLY_CONNECTED", [T((rows, k), float(in_scale), 3),
                                              T((out_ch, k), tuple(w_scale), 0, data=w, axis=0),
                                              T((out_ch,), tuple(in_scale * w_scale), 0, np.int32, bias)],
                          T((rows, out_ch), 0.01, -7), options)


def test_fully_connected_per_channel_parts_the_two_reference_kernel_sets():
    # BUILTIN_REF requantizes the per-channel int8 FULLY_CONNECTED with single rounding, TFLite
    # Micro with double: the simulator's kernel sets follow each, and here they really differ
    model = _per_channel_fc(0)
    x = _random_codes((128, 64), 1)
    _assert_exact(model, x)
    if "tflm" in ORACLES:
        ref = tflite_sim.simulate(model, x, arithmetic="integer", kernels="litert-ref")
        tflm = tflite_sim.simulate(model, x, arithmetic="integer", kernels="tflm")
        assert (ref != tflm).any()


def test_mean_over_height_and_width():
    options = schema.ReducerOptionsT()
    options.keepDims = False
    axes = np.array([1, 2], np.int32)
    model = single_op_file("MEAN", [T((1, 8, 8, 6), 0.043, -17), T((2,), None, 0, np.int32, axes)],
                           T((1, 6), 0.011, 5), options)
    for seed in (0, 1, 2):
        _assert_exact(model, _random_codes((1, 8, 8, 6), seed))
