"""The architecture space (ConvNets-250K-like): seeded random CNNs for training and evaluation.

Every net is a stem, 2-3 stages of blocks and a classifier head. Blocks are drawn from
plain conv, ResNet basic blocks, depthwise-separable, dilated depthwise, MobileNetV2
inverted residuals and two-branch concat blocks. Splits change the knobs (depth, width,
BatchNorm, block family); docs/architecture-space.md lists the ranges.

``id-train`` and ``id-test`` come from the same generator and are made disjoint by
construction: a net belongs to ``id-test`` iff the SHA-256 of its structure (the spec
without its name) falls in bucket 0 of 10, otherwise it belongs to ``id-train``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from ghnq_deploy.arch.spec import DEFAULT_PARAM_CAP, INPUT_ID, ArchError, ArchSpec, Node, analyze

SPLITS = ("id-train", "id-test", "ood-deep", "ood-wide", "ood-bnfree", "ood-mobilenet")
_TEST_BUCKETS = 10
# Space 2 adds MobileNetV3 / EfficientNet / ShuffleNetV2 blocks and hard-swish / SiLU nets to
# id-train and id-test. Space 1 draws exactly the nets the shipped checkpoints were trained
# and evaluated on (their graphs have no "cse" / "shuffle" node types): see space_for().
SPACES = (1, 2)
SPACE_VERSION = 2


@dataclass(frozen=True)
class SplitConfig:
    widths: tuple[int, ...]  # stem channel choices
    blocks_per_stage: tuple[int, int]  # inclusive range
    stages: tuple[int, int]
    block_types: tuple[str, ...]
    batchnorm: bool = True
    max_params: int = DEFAULT_PARAM_CAP
    space2_blocks: tuple[str, ...] = ()  # block families added in space 2
    space2_acts: tuple[str, ...] = ()  # net-wide activations added in space 2


_ALL_BLOCKS = ("plain", "basic", "sep", "dil", "inverted", "inception")
_SPACE2_BLOCKS = ("mbv3", "mbconv", "shuffle")
_SPACE2_ACTS = ("hardswish", "silu")
SPLIT_CONFIGS: dict[str, SplitConfig] = {
    "id-train": SplitConfig((16, 24, 32, 48), (1, 3), (2, 3), _ALL_BLOCKS, max_params=2_000_000,
                            space2_blocks=_SPACE2_BLOCKS, space2_acts=_SPACE2_ACTS),
    "id-test": SplitConfig((16, 24, 32, 48), (1, 3), (2, 3), _ALL_BLOCKS, max_params=2_000_000,
                           space2_blocks=_SPACE2_BLOCKS, space2_acts=_SPACE2_ACTS),
    "ood-deep": SplitConfig((16, 24, 32), (5, 8), (3, 3), _ALL_BLOCKS),
    "ood-wide": SplitConfig((96, 128, 160, 192), (1, 3), (2, 3), _ALL_BLOCKS),
    "ood-bnfree": SplitConfig((16, 24, 32, 48), (1, 3), (2, 3), _ALL_BLOCKS, batchnorm=False, max_params=2_000_000),
    "ood-mobilenet": SplitConfig((16, 24, 32), (2, 4), (3, 3), ("inverted",)),
}


class _Graph:
    """Appends nodes with generated ids while tracking the current channels and size."""

    def __init__(self, rng: random.Random, batchnorm: bool):
        self.rng = rng
        self.batchnorm = batchnorm
        self.nodes: list[Node] = []
        self.shape: dict[str, tuple[int, int]] = {}  # id -> (channels, spatial)
        self.counts: dict[str, int] = {}

    def _add(self, op: str, inputs: list[str], shape: tuple[int, int], **attrs) -> str:
        self.counts[op] = self.counts.get(op, 0) + 1
        node_id = f"{op}{self.counts[op]}"
        self.nodes.append(Node(node_id, op, tuple(inputs), attrs))
        self.shape[node_id] = shape
        return node_id

    def conv(self, x: str, out: int, kernel: int, stride: int = 1, groups: int = 1, dilation: int = 1,
             bias: bool = False) -> str:
        c, s = self.shape[x]
        attrs = {"out_channels": out, "kernel": kernel}
        if bias:
            attrs["bias"] = True
        if stride != 1:
            attrs["stride"] = stride
        if groups != 1:
            attrs["groups"] = groups
        if dilation != 1:
            attrs["dilation"] = dilation
        return self._add("conv", [x], (out, (s - 1) // stride + 1), **attrs)

    def bn(self, x: str) -> str:
        return self._add("bn", [x], self.shape[x]) if self.batchnorm else x

    def act(self, x: str, kind: str) -> str:
        return self._add(kind, [x], self.shape[x]) if kind != "identity" else x

    def conv_bn_act(self, x: str, out: int, kernel: int, act: str, **kw) -> str:
        return self.act(self.bn(self.conv(x, out, kernel, **kw)), act)

    def pool(self, x: str, kind: str) -> str:
        c, s = self.shape[x]
        return self._add(kind, [x], (c, s // 2), kernel=2)

    def se(self, x: str, squeeze: int, act: str, gate: str) -> str:
        """Squeeze-excitation: pool to 1x1, 1x1 conv (bias) + act, 1x1 conv (bias) + gate, multiply."""
        c, _ = self.shape[x]
        p = self._add("adaptive_avgpool", [x], (c, 1), output_size=1)
        h = self.act(self.conv(p, squeeze, 1, bias=True), act)
        w = self.act(self.conv(h, c, 1, bias=True), gate)
        return self._add("mul", [x, w], self.shape[x])

    def slice(self, x: str, start: int, stop: int) -> str:
        return self._add("channel_slice", [x], (stop - start, self.shape[x][1]), start=start, stop=stop)

    def shuffle(self, x: str, groups: int) -> str:
        return self._add("channel_shuffle", [x], self.shape[x], groups=groups)

    def add(self, a: str, b: str) -> str:
        return self._add("add", [a, b], self.shape[a])

    def concat(self, xs: list[str]) -> str:
        return self._add("concat", xs, (sum(self.shape[x][0] for x in xs), self.shape[xs[0]][1]))


def _round8(value: float) -> int:
    return max(8, int(round(value / 8)) * 8)


def _block(g: _Graph, x: str, kind: str, out: int, stride: int, act: str) -> str:
    rng = g.rng
    c, _ = g.shape[x]
    if kind == "plain":
        return g.conv_bn_act(x, out, rng.choice((1, 3, 3, 5)), act, stride=stride)
    if kind == "basic":
        h = g.conv_bn_act(x, out, 3, act, stride=stride)
        h = g.bn(g.conv(h, out, 3))
        skip = x if (stride == 1 and c == out) else g.bn(g.conv(x, out, 1, stride=stride))
        return g.act(g.add(h, skip), act)
    if kind in ("sep", "dil"):
        kernel, dilation = (rng.choice((3, 5)), 1) if kind == "sep" else (3, 2)
        h = g.conv_bn_act(x, c, kernel, act, stride=stride, groups=c, dilation=dilation)
        return g.conv_bn_act(h, out, 1, act)
    if kind == "inverted":
        expand = _round8(c * rng.choice((2, 3, 4, 6)))
        h = g.conv_bn_act(x, expand, 1, "relu6")
        h = g.conv_bn_act(h, expand, rng.choice((3, 3, 5)), "relu6", stride=stride, groups=expand)
        h = g.bn(g.conv(h, out, 1))
        return g.add(h, x) if (stride == 1 and c == out) else h
    if kind in ("mbv3", "mbconv"):  # MobileNetV3 / EfficientNet inverted residual with squeeze-excitation
        inner = ("hardswish" if act == "hardswish" or rng.random() < 0.5 else "relu") if kind == "mbv3" else "silu"
        gate = "hardsigmoid" if kind == "mbv3" else "sigmoid"
        expand = _round8(c * rng.choice((3, 4, 6) if kind == "mbv3" else (4, 6)))
        h = g.conv_bn_act(x, expand, 1, inner)
        h = g.conv_bn_act(h, expand, rng.choice((3, 5)), inner, stride=stride, groups=expand)
        h = g.se(h, _round8(expand / 4), "relu" if kind == "mbv3" else "silu", gate)
        h = g.bn(g.conv(h, out, 1))
        return g.add(h, x) if (stride == 1 and c == out) else h
    if kind == "shuffle":  # ShuffleNetV2 unit: split (or two branches when downsampling), concat, shuffle
        half = out // 2
        if stride == 1 and c == out:
            left, right = g.slice(x, 0, c // 2), g.slice(x, c // 2, c)
        else:
            left = g.bn(g.conv(x, c, 3, stride=stride, groups=c))
            left = g.conv_bn_act(left, half, 1, "relu")
            right = x
        r = g.conv_bn_act(right, half, 1, "relu")
        r = g.bn(g.conv(r, half, 3, stride=stride, groups=half))
        r = g.conv_bn_act(r, out - g.shape[left][0], 1, "relu")
        return g.shuffle(g.concat([left, r]), 2)
    if kind == "inception":
        half = _round8(out / 2)
        a = g.conv_bn_act(x, half, 1, act, stride=stride)
        if rng.random() < 0.5:
            b = g.conv_bn_act(x, out - half if out > half else half, 3, act, stride=stride)
        else:
            b = g.conv_bn_act(x, c, 3, act, stride=stride, groups=c)
            b = g.conv_bn_act(b, out - half if out > half else half, 1, act)
        return g.concat([a, b])
    raise ValueError(kind)


def _generate(split: str, rng: random.Random, name: str, input_shape, num_classes: int, space: int) -> ArchSpec:
    cfg = SPLIT_CONFIGS[split]
    g = _Graph(rng, cfg.batchnorm)
    g.shape[INPUT_ID] = (input_shape[0], input_shape[1])
    block_types = cfg.block_types + (cfg.space2_blocks if space >= 2 else ())
    act = rng.choice(("relu", "relu", "relu", "relu6") + (cfg.space2_acts if space >= 2 else ()))
    width = rng.choice(cfg.widths)
    x = g.conv_bn_act(INPUT_ID, width, rng.choice((3, 3, 3, 5)), act)
    n_stages = rng.randint(*cfg.stages)
    for stage in range(n_stages):
        if stage > 0:
            width = _round8(width * rng.choice((1.5, 2, 2)))
        for b in range(rng.randint(*cfg.blocks_per_stage)):
            downsample = stage > 0 and b == 0
            stride = 1
            if downsample:
                how = rng.choice(("stride", "maxpool", "avgpool"))
                if how == "stride":
                    stride = 2
                else:
                    x = g.pool(x, how)
            x = _block(g, x, rng.choice(block_types), width, stride, act)
    channels, spatial = g.shape[x]
    if spatial <= 4 and rng.random() < 0.1:
        x = g._add("linear", [x], (0, 0), out_features=rng.choice((64, 128)))  # VGG-style flatten head
        x = g.act(x, "relu")
    else:
        x = g._add("global_avgpool", [x], (channels, 1))
        if rng.random() < 0.2:
            x = g.act(g._add("linear", [x], (0, 0), out_features=rng.choice((64, 128, 256))), "relu")
    x = g._add("linear", [x], (num_classes, 1), out_features=num_classes)
    g.nodes.append(Node("output", "output", (x,), {}))
    return ArchSpec(name, tuple(input_shape), num_classes, tuple(g.nodes), source=name)


def structure_hash(spec: ArchSpec) -> str:
    """Hash of everything but the name: two nets with the same hash are the same net."""
    data = spec.to_dict()
    data.pop("name")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def in_test_bucket(spec: ArchSpec) -> bool:
    return int(structure_hash(spec)[:8], 16) % _TEST_BUCKETS == 0


def space_for(num_primitives: int) -> int:
    """The space a GHN was trained on: 1 if its vocabulary predates space 2's op types."""
    from ghnq_deploy.ghn.graph import PRIMITIVES

    return SPACE_VERSION if num_primitives >= len(PRIMITIVES) else 1


def sample_arch(split: str, seed: int, index: int, input_shape=(3, 32, 32), num_classes: int = 10,
                space: int = SPACE_VERSION) -> ArchSpec:
    """The ``index``-th net of ``split`` for ``seed``; independent of any other index."""
    if split not in SPLIT_CONFIGS:
        raise ArchError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if space not in SPACES:
        raise ArchError(f"unknown architecture space {space!r}; choose from {', '.join(map(str, SPACES))}")
    cfg = SPLIT_CONFIGS[split]
    name = f"{split}-s{seed}-{index:05d}"
    for attempt in range(10_000):
        key = f"{split}|{seed}|{index}|{attempt}".encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
        spec = _generate(split, rng, name, input_shape, num_classes, space)
        if split == "id-train" and in_test_bucket(spec):
            continue
        if split == "id-test" and not in_test_bucket(spec):
            continue
        try:
            analyze(spec, param_cap=cfg.max_params)
        except ArchError:
            continue  # e.g. over the parameter cap: redraw
        return spec
    raise ArchError(f"could not sample a valid net for split {split!r}")  # pragma: no cover


def sample_split(split: str, n: int, seed: int, **kw) -> list[ArchSpec]:
    return [sample_arch(split, seed, i, **kw) for i in range(n)]
