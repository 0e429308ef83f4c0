"""Tiny nets, one per op added for the torchvision families (issue 11), and the TFLite builtin each must become."""

from __future__ import annotations

from ghnq_deploy.arch.spec import ArchSpec, analyze, parse_spec


def _n(node_id: str, op: str, inputs: list[str], **attributes) -> dict:
    return {"id": node_id, "op": op, "inputs": inputs, "attributes": attributes}


def _head(last: str, pool: bool = True) -> list[dict]:
    nodes = [_n("gap", "global_avgpool", [last])] if pool else []
    return nodes + [_n("fc", "linear", ["gap" if pool else last], out_features=10), _n("output", "output", ["fc"])]


def _stem(channels: int = 8) -> list[dict]:
    return [_n("c1", "conv", ["input"], out_channels=channels, kernel=3), _n("b1", "bn", ["c1"])]


def _net(name: str, body: list[dict], last: str, pool: bool = True) -> ArchSpec:
    spec = parse_spec({"name": name, "input_shape": [3, 32, 32], "num_classes": 10,
                       "nodes": _stem() + body + _head(last, pool)})
    analyze(spec)
    return spec


def _act(op: str) -> ArchSpec:
    return _net(op, [_n("a", op, ["b1"]), _n("c2", "conv", ["a"], out_channels=8, kernel=3, stride=2),
                     _n("b2", "bn", ["c2"]), _n("a2", op, ["b2"])], "a2")


def se_spec() -> ArchSpec:
    """MobileNetV3's squeeze-excitation: pool to 1x1 -> 1x1 conv -> ReLU -> 1x1 conv -> hard-sigmoid -> multiply."""
    body = [
        _n("r", "relu", ["b1"]),
        _n("sq", "adaptive_avgpool", ["r"], output_size=1),
        _n("fc1", "conv", ["sq"], out_channels=4, kernel=1, bias=True),
        _n("fr", "relu", ["fc1"]),
        _n("fc2", "conv", ["fr"], out_channels=8, kernel=1, bias=True),
        _n("gate", "hardsigmoid", ["fc2"]),
        _n("scaled", "mul", ["r", "gate"]),
        _n("c2", "conv", ["scaled"], out_channels=8, kernel=1),
    ]
    return _net("se_block", body, "c2")


def shuffle_spec() -> ArchSpec:
    body = [_n("r", "relu", ["b1"]), _n("sh", "channel_shuffle", ["r"], groups=2),
            _n("c2", "conv", ["sh"], out_channels=8, kernel=3, groups=8)]
    return _net("channel_shuffle", body, "c2")


def slice_spec() -> ArchSpec:
    """ShuffleNetV2's unit: split the channels, convolve one half, concatenate, shuffle."""
    body = [_n("r", "relu", ["b1"]), _n("lo", "channel_slice", ["r"], start=0, stop=4),
            _n("hi", "channel_slice", ["r"], start=4, stop=8), _n("c2", "conv", ["hi"], out_channels=4, kernel=1),
            _n("cat", "concat", ["lo", "c2"]), _n("sh", "channel_shuffle", ["cat"], groups=2)]
    return _net("channel_slice", body, "sh")


def ceil_pool_spec() -> ArchSpec:
    """Ceil-mode max-pools after a ReLU (SqueezeNet / GoogLeNet) and on signed values."""
    body = [_n("r", "relu", ["b1"]), _n("mp", "maxpool", ["r"], kernel=3, stride=2, ceil_mode=True),
            _n("c2", "conv", ["mp"], out_channels=8, kernel=3), _n("mp2", "maxpool", ["c2"], kernel=3, stride=2,
                                                                     ceil_mode=True)]
    return _net("ceil_maxpool", body, "mp2")


def adaptive_spec() -> ArchSpec:
    """Adaptive average pools: 32 -> 4 (a plain pool), 4 -> 3 (uneven windows), 1 -> 7 (replication, VGG)."""
    body = [_n("r", "relu", ["b1"]), _n("p4", "adaptive_avgpool", ["r"], output_size=4),
            _n("p3", "adaptive_avgpool", ["p4"], output_size=3), _n("c2", "conv", ["p3"], out_channels=8, kernel=1),
            _n("p1", "adaptive_avgpool", ["c2"], output_size=1), _n("p7", "adaptive_avgpool", ["p1"], output_size=7)]
    return _net("adaptive_avgpool", body, "p7", pool=False)


# net -> TFLite builtins its full-integer file must contain
NEW_OP_NETS: dict[str, tuple] = {
    "hardswish": (lambda: _act("hardswish"), {"HARD_SWISH"}),
    "hardsigmoid": (lambda: _act("hardsigmoid"), {"MUL"}),
    "silu": (lambda: _act("silu"), {"LOGISTIC", "MUL"}),
    "sigmoid": (lambda: _act("sigmoid"), {"LOGISTIC"}),
    "se": (se_spec, {"MUL"}),
    "channel_shuffle": (shuffle_spec, {"RESHAPE", "TRANSPOSE"}),
    "channel_slice": (slice_spec, {"STRIDED_SLICE", "CONCATENATION", "TRANSPOSE"}),
    "ceil_maxpool": (ceil_pool_spec, {"MAX_POOL_2D"}),
    "adaptive_avgpool": (adaptive_spec, {"AVERAGE_POOL_2D", "RESIZE_NEAREST_NEIGHBOR", "CONCATENATION"}),
}
