"""Which layers make the gap, and why: every intermediate tensor of a few samples, compared.

Three views of the same graph run on the same images, every tensor kept:
- the float file (the export of the same folded model; LiteRT, ``experimental_preserve_all_tensors``),
- the int8 file on the target's kernels (LiteRT, all tensors preserved),
- the integer simulator (``tflite_sim.simulate_all``).
The converter gives an op's output the same tensor name in the float and the int8 file, so
tensors pair up by name. Each int8 op output gets its error in its own output steps against
float (``|dequantized - float| / scale``) and against the simulator (``|runtime - sim|``).
The worst layers are then matched with the cause that fits, from a registry of checks:
an activation range blown by one outlier channel (traced back to the op that first produces
it), mismatched concat input ranges, the channel-range ratio of depthwise weights, and a
requantization multiplier out of range.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from ghnq_deploy.errors import UserError
from ghnq_deploy.quant import tflite_sim
from ghnq_deploy.quant.tflite_graph import Graph, Operator, read_tflite

DEFAULT_SAMPLES = 8
WORST = 3  # layers named with a cause
OUTLIER_RATIO = 20.0  # a channel's range this many times the median channel's: the range is blown
CONCAT_RATIO = 8.0  # concat inputs whose ranges differ this much share a grid badly
DEPTHWISE_RATIO = 100.0  # depthwise weight channel ranges max / min
_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


class LocaliseError(UserError):
    """Layer-wise comparison that cannot run as asked; one line."""


@dataclass
class LayerError:
    op_index: int
    op: str
    tensor: str
    scale: float
    vs_float_mean_steps: float | None  # mean |dequantized runtime - float| / scale (None: no float twin)
    vs_float_max_steps: float | None
    vs_sim_mean_steps: float  # mean |runtime - integer simulator| in steps
    vs_sim_max_steps: float


@dataclass
class Finding:
    cause: str  # a key of CAUSES
    op_index: int  # the layer the cause is in (may be upstream of the worst layer it explains)
    op: str
    tensor: str
    detail: str
    explains: int  # op index of the worst layer this finding was looked up for


@dataclass
class Localisation:
    samples: int
    kernels: str
    rounding: str
    layers: list[LayerError]  # ranked: largest error vs float first
    worst_vs_sim: list[int]  # op indices ranked by error vs the integer simulator
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Views:
    graph: Graph
    runtime: dict[int, np.ndarray]  # int8 file tensor index -> runtime values
    sim: dict[str, np.ndarray]  # tensor name -> simulator values
    floats: dict[str, np.ndarray]  # tensor name -> float file values
    producer: dict[int, Operator]  # tensor index -> the op writing it


def _interpreter_tensors(model_file, x: np.ndarray, kernels: str, indices) -> dict[int, np.ndarray]:
    from ghnq_deploy.runtime.litert_runner import make_interpreter

    it = make_interpreter(model_file, kernels, num_threads=1, preserve_all_tensors=True)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(inp["index"], x)
    it.invoke()
    return {i: it.get_tensor(i).copy() for i in indices}


def _views(int8_file, float_file, x_nhwc: np.ndarray, q: np.ndarray, kernels: str, rounding: str) -> _Views:
    graph = read_tflite(int8_file, supported=frozenset(tflite_sim.KERNELS))
    outputs = [o for op in graph.operators for o in op.outputs]
    runtime = _interpreter_tensors(int8_file, q, kernels, outputs)
    sim = tflite_sim.simulate_all(graph, q, "integer", rounding)
    fgraph = read_tflite(float_file)
    by_name = {fgraph.tensors[o].name: o for op in fgraph.operators for o in op.outputs}
    wanted = {graph.tensors[o].name for o in outputs} & set(by_name)
    ftensors = _interpreter_tensors(float_file, x_nhwc.astype(np.float32), "reference",
                                    [by_name[n] for n in wanted])
    floats = {n: ftensors[by_name[n]] for n in wanted}
    producer = {o: op for op in graph.operators for o in op.outputs}
    return _Views(graph, runtime, sim, floats, producer)


def _float_of(v: _Views, index: int) -> np.ndarray | None:
    return v.floats.get(v.graph.tensors[index].name)


def _layer_errors(v: _Views) -> list[LayerError]:
    rows = []
    for op in v.graph.operators:
        out = op.outputs[0]
        t = v.graph.tensors[out]
        if t.quantization is None or t.dtype.kind not in "iu" or out not in v.runtime:
            continue
        q = v.runtime[out].astype(np.float64)
        sim = v.sim.get(t.name)
        d_sim = np.abs(q - sim) if sim is not None and sim.shape == q.shape else np.zeros_like(q)
        f = _float_of(v, out)
        mean_f = max_f = None
        if f is not None and f.shape == q.shape:
            steps = np.abs((q - t.zero_point) * t.scale - f) / t.scale
            mean_f, max_f = float(steps.mean()), float(steps.max())
        rows.append(LayerError(op.index, op.op, t.name, t.scale, mean_f, max_f, float(d_sim.mean()),
                               float(d_sim.max())))
    return rows


# ----------------------------------------------------------------------------- causes


def _channel_ranges(values: np.ndarray) -> np.ndarray:
    """Per channel (last axis) max - min over every other axis."""
    flat = values.reshape(-1, values.shape[-1])
    return flat.max(axis=0) - flat.min(axis=0)


def _outlier(v: _Views, index: int) -> tuple[int, float, float] | None:
    """(channel, its range, median channel range) when one channel blows the tensor's range."""
    f = _float_of(v, index)
    if f is None or f.ndim < 2 or f.shape[-1] < 4:
        return None
    ranges = _channel_ranges(f.astype(np.float64))
    median = float(np.median(ranges))
    top = int(ranges.argmax())
    if median <= 0 or ranges[top] < OUTLIER_RATIO * median:
        return None
    return top, float(ranges[top]), median


def _outlier_origin(v: _Views, index: int) -> int:
    """Walk up while an input of the producing op carries the outlier too: the op that makes it."""
    seen = set()
    while index in v.producer and index not in seen:
        seen.add(index)
        op = v.producer[index]
        upstream = [i for i in op.inputs if i >= 0 and i in v.producer and _outlier(v, i) is not None]
        if not upstream:
            return index
        index = upstream[0]
    return index


def _check_outlier(v: _Views, op: Operator) -> Finding | None:
    for index in [op.outputs[0], *[i for i in op.inputs if i >= 0]]:
        if _outlier(v, index) is None or index not in v.producer:
            continue
        origin = _outlier_origin(v, index)
        channel, top, median = _outlier(v, origin)
        src = v.producer[origin]
        t = v.graph.tensors[origin]
        levels = median / t.scale if t.quantization is not None else float("nan")
        return Finding("outlier-channel activation range", src.index, src.op, t.name,
                       f"channel {channel} spans {top:.3g}, the median channel {median:.3g} ({top / median:.0f}x): "
                       f"the shared int8 grid leaves the other channels ~{levels:.1f} steps", op.index)
    return None


def _check_concat(v: _Views, op: Operator) -> Finding | None:
    if op.op != "CONCATENATION":
        return None
    spans = []
    for i in op.inputs:
        f = _float_of(v, i)
        if f is not None:
            spans.append((float(f.max() - f.min()), i))
    if len(spans) < 2 or min(spans)[0] <= 0:
        return None
    (lo, lo_i), (hi, hi_i) = min(spans), max(spans)
    if hi < CONCAT_RATIO * lo:
        return None
    return Finding("mismatched concat input ranges", op.index, op.op, v.graph.tensors[op.outputs[0]].name,
                   f"input {v.graph.tensors[lo_i].name!r} spans {lo:.3g}, {v.graph.tensors[hi_i].name!r} {hi:.3g} "
                   f"({hi / lo:.0f}x) on one shared grid", op.index)


def _check_depthwise(v: _Views, op: Operator) -> Finding | None:
    if op.op != "DEPTHWISE_CONV_2D":
        return None
    w = v.graph.tensors[op.inputs[1]]
    real = np.abs(w.data.astype(np.float64)).reshape(-1, w.data.shape[-1]).max(axis=0) * np.broadcast_to(
        w.quantization.scale.astype(np.float64), (w.data.shape[-1],))
    live = real[real > 0]
    if live.size < 2 or live.max() < DEPTHWISE_RATIO * live.min():
        return None
    return Finding("depthwise channel-range ratio", op.index, op.op, v.graph.tensors[op.outputs[0]].name,
                   f"weight channel ranges {live.min():.3g} .. {live.max():.3g} ({live.max() / live.min():.0f}x)",
                   op.index)


def _check_multiplier(v: _Views, op: Operator) -> Finding | None:
    if op.op not in _WEIGHTED:
        return None
    x, w, out = (v.graph.tensors[i] for i in (op.inputs[0], op.inputs[1], op.outputs[0]))
    channels = w.data.shape[-1] if op.op == "DEPTHWISE_CONV_2D" else w.data.shape[0]
    real = x.scale * np.broadcast_to(w.quantization.scale.astype(np.float64), (channels,)) / out.scale
    big, tiny = np.flatnonzero(real >= 1.0), np.flatnonzero((real > 0) & (real < 2.0 ** -31))
    if not big.size and not tiny.size:
        return None
    what = []
    if big.size:
        what.append(f"{big.size} channel(s) >= 1 (max {real.max():.3g}: a left shift, int32 overflow risk)")
    if tiny.size:
        what.append(f"{tiny.size} channel(s) below 2^-31 (quantized to 0: constant output)")
    return Finding("requantization multiplier out of range", op.index, op.op, out.name,
                   "requantization multiplier " + "; ".join(what), op.index)


CAUSES: dict[str, Callable[[_Views, Operator], Finding | None]] = {
    "outlier-channel activation range": _check_outlier,
    "mismatched concat input ranges": _check_concat,
    "depthwise channel-range ratio": _check_depthwise,
    "requantization multiplier out of range": _check_multiplier,
}


def localise(int8_file: str | os.PathLike, float_file: str | os.PathLike, x_nhwc: np.ndarray, q: np.ndarray,
             kernels: str = "reference", rounding: str = "double") -> Localisation:
    """Layer errors and causes for a few samples.

    ``x_nhwc``: the float file's input (normalised float32 NHWC); ``q``: the same images as the
    int8 file's input tensor. Keep the batch small: every tensor of every view is held.
    """
    if len(x_nhwc) != len(q) or not len(q):
        raise LocaliseError(f"localise needs the same images for both files (got {len(x_nhwc)} and {len(q)})")
    v = _views(int8_file, float_file, x_nhwc, q, kernels, rounding)
    layers = _layer_errors(v)
    if not layers:
        raise LocaliseError(f"{int8_file}: no quantized op outputs to compare")
    layers.sort(key=lambda r: -(r.vs_float_mean_steps if r.vs_float_mean_steps is not None else -1.0))
    worst_vs_sim = [r.op_index for r in sorted(layers, key=lambda r: -r.vs_sim_mean_steps)]
    ops = {op.index: op for op in v.graph.operators}
    findings: list[Finding] = []
    seen = set()
    for r in layers[:WORST]:
        for check in CAUSES.values():
            found = check(v, ops[r.op_index])
            if found is not None and (found.cause, found.op_index) not in seen:
                seen.add((found.cause, found.op_index))
                findings.append(found)
    return Localisation(len(q), kernels, rounding, layers, worst_vs_sim, findings)
