"""arch spec -> torch.nn.Module with stable parameter names ``layers.<node id>.<param>``."""

from __future__ import annotations

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
    if op == "relu":
        return nn.ReLU()
    if op == "relu6":
        return nn.ReLU6()
    if op in ("identity", "output"):
        return nn.Identity()
    if op in ("maxpool", "avgpool"):
        cls = nn.MaxPool2d if op == "maxpool" else nn.AvgPool2d
        k = node.attr("kernel")
        return cls(k, stride=node.attr("stride") or k, padding=node.attr("padding"))
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
        self.info = info or analyze(spec)
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
