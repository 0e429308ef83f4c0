"""arch spec -> torch.nn.Module with stable parameter names ``layers.<node id>.<param>``."""

from __future__ import annotations

import sys

import torch
from torch import nn

from ghnq_deploy.arch.spec import INPUT_ID, ArchInfo, ArchSpec, Node, analyze


class Add(nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Concat(nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=1)


class Mul(nn.Module):
    """Elementwise product; a (N, C, 1, 1) second input broadcasts (a squeeze-excitation gate)."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out * x
        return out


class ChannelShuffle(nn.Module):
    """ShuffleNet's shuffle: channels viewed as (groups, C/groups), transposed, flattened back."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def adaptive_windows(size_in: int, size_out: int) -> list[tuple[int, int]]:
    """torch's adaptive-pooling windows along one axis: [floor(i*n/o), ceil((i+1)*n/o))."""
    return [((i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)) for i in range(size_out)]


class AdaptiveAvgPool(nn.AdaptiveAvgPool2d):
    """AdaptiveAvgPool2d that an ONNX export can express for any sizes.

    The TorchScript exporter only handles output sizes that divide the input; while
    exporting, the same windows are written as average pools, nearest upsampling or, in
    general, slices + means + concats (exact: each window's mean is a mean of row means).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            return super().forward(x)
        size = self.output_size if isinstance(self.output_size, int) else self.output_size[0]
        h, w = int(x.shape[-2]), int(x.shape[-1])  # static sizes: the windows must be constants of the file
        if h == w and h % size == 0:
            return nn.functional.avg_pool2d(x, h // size)
        if h == w and size % h == 0:
            return nn.functional.interpolate(x, size=(size, size), mode="nearest")
        for dim, n in ((2, h), (3, w)):
            parts = [(x[:, :, a:b] if dim == 2 else x[:, :, :, a:b]).mean(dim=dim, keepdim=True)
                     for a, b in adaptive_windows(n, size)]
            x = torch.cat(parts, dim=dim)
        return x


class ChannelSlice(nn.Module):
    """Channels ``start:stop`` (ShuffleNetV2's ``chunk``)."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.start:self.stop]


_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid,
                "silu": nn.SiLU, "sigmoid": nn.Sigmoid}


class GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class FlattenLinear(nn.Linear):
    """A Linear layer that flattens a feature map first (VGG-style heads)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1))


def _make_module(node: Node, in_shapes: list[tuple[int, ...]], bn_running_stats: bool) -> nn.Module:
    op = node.op
    if op == "conv":
        k, d = node.attr("kernel"), node.attr("dilation")
        pad = node.attr("padding")
        return nn.Conv2d(
            in_shapes[0][0], node.attr("out_channels"), k,
            stride=node.attr("stride"), padding=d * (k - 1) // 2 if pad is None else pad,
            dilation=d, groups=node.attr("groups"), bias=node.attr("bias"),
        )
    if op == "bn":
        return nn.BatchNorm2d(in_shapes[0][0], eps=node.attr("eps"), track_running_stats=bn_running_stats)
    if op in _ACTIVATIONS:
        return _ACTIVATIONS[op]()
    if op in ("identity", "output"):
        return nn.Identity()
    if op == "maxpool":
        k = node.attr("kernel")
        return nn.MaxPool2d(k, stride=node.attr("stride") or k, padding=node.attr("padding"),
                            ceil_mode=node.attr("ceil_mode"))
    if op == "avgpool":
        k = node.attr("kernel")
        return nn.AvgPool2d(k, stride=node.attr("stride") or k, padding=node.attr("padding"))
    if op == "adaptive_avgpool":
        return AdaptiveAvgPool(node.attr("output_size"))
    if op == "channel_shuffle":
        return ChannelShuffle(node.attr("groups"))
    if op == "channel_slice":
        return ChannelSlice(node.attr("start"), node.attr("stop"))
    if op == "mul":
        return Mul()
    if op == "global_avgpool":
        return GlobalAvgPool()
    if op == "linear":
        features = 1
        for v in in_shapes[0]:
            features *= v
        return FlattenLinear(features, node.attr("out_features"), bias=node.attr("bias"))
    if op == "add":
        return Add()
    if op == "concat":
        return Concat()
    raise ValueError(f"no module for op {op!r}")


class ArchNet(nn.Module):
    """The network an arch spec describes; one submodule per node, run in topological order."""

    def __init__(self, spec: ArchSpec, info: ArchInfo | None = None, bn_running_stats: bool = True):
        super().__init__()
        self.spec = spec
        self.info = info or analyze(spec, param_cap=sys.maxsize)  # size limits belong to whoever loaded the spec
        shapes = {INPUT_ID: spec.input_shape, **{k: v.shape for k, v in self.info.nodes.items()}}
        by_id = {n.id: n for n in spec.nodes}
        self.layers = nn.ModuleDict()
        self._plan: list[tuple[str, tuple[str, ...]]] = []
        for node_id in self.info.order:
            node = by_id[node_id]
            self.layers[node_id] = _make_module(node, [shapes[i] for i in node.inputs], bn_running_stats)
            self._plan.append((node_id, node.inputs))
        self.output_id = spec.output_node.id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {INPUT_ID: x}
        for node_id, inputs in self._plan:
            values[node_id] = self.layers[node_id](*(values[i] for i in inputs))
        return values[self.output_id]


def build_model(spec: ArchSpec, bn_running_stats: bool = True, seed: int | None = None) -> ArchNet:
    """Build the module; ``seed`` makes the (unpredicted) default init reproducible."""
    if seed is None:
        return ArchNet(spec, bn_running_stats=bn_running_stats)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ArchNet(spec, bn_running_stats=bn_running_stats)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def set_bn_mode(model: nn.Module, mode: str) -> nn.Module:
    """"batch": BatchNorm normalises with each batch's statistics and updates nothing (the
    GHN / paper protocol); "running": BatchNorm uses its (calibrated) running statistics."""
    if mode not in ("batch", "running"):
        raise ValueError(f"unknown BatchNorm mode {mode!r}")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            if mode == "batch":
                m.train()
                m.track_running_stats = False
            else:
                if m.running_mean is None:
                    raise ValueError("BatchNorm has no running statistics to use")
                m.eval()
                m.track_running_stats = True
    return model
