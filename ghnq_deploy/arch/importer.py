"""Import a PyTorch model into arch.json by tracing it with torch.fx.

Why: users bring a ResNet or MobileNet they already have; the toolchain only understands
arch specs. The importer walks the fx graph once, emits one spec node per layer, and
records which source ``state_dict`` entry feeds each parameter of the rebuilt
:class:`~ghnq_deploy.arch.builder.ArchNet`, so the same weights give the same outputs.

Reshapes are not spec nodes: a traced value is "a spec node's tensor seen with some
logical shape" (``flatten`` after a pooled map, ``AdaptiveAvgPool2d(1)`` that keeps a
1x1 map). Ops that only alias (Identity, Dropout in eval, flatten, view) add nothing.
Everything the spec cannot express is collected and reported in one :class:`ArchError`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import operator
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ghnq_deploy.arch.spec import _ID_PATTERN, INPUT_ID, ArchError, ArchSpec, Node, analyze, parse_spec

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ImportedArch:
    """An imported spec plus where each rebuilt parameter/buffer comes from in the source."""

    spec: ArchSpec
    state_map: dict[str, str]  # ArchNet state_dict key -> source state_dict key

    def load_weights(self, source: nn.Module, target: nn.Module) -> None:
        """Copy the source model's parameters and buffers into a model built from ``spec``."""
        src = source.state_dict()
        wanted = target.state_dict()
        missing = sorted(set(wanted) - set(self.state_map))
        if missing:
            raise ArchError(f"{self.spec.name}: no source for target entries {missing[:5]}")
        target.load_state_dict({key: src[self.state_map[key]] for key in wanted}, strict=True)


@dataclass(frozen=True)
class _Value:
    """A traced tensor: spec node ``node`` holding shape ``spec_shape``, seen as ``shape``."""

    node: str
    spec_shape: Shape
    shape: Shape
    pooled_from: _Value | None = None  # a keepdim global pool: the map it averaged (for SE convs)

    @property
    def is_map(self) -> bool:
        """A real (C,H,W) feature map, not a reshaped view of one."""
        return len(self.shape) == 3 and self.shape == self.spec_shape


class _Meta:
    """A traced non-tensor (``x.size(0)``, ``x.shape``): only usable as a view size."""


@dataclass(frozen=True)
class _Grouped:
    """``x.view(b, g, C/g, H, W)`` of a feature map (half of a channel shuffle), maybe transposed."""

    value: _Value
    groups: int
    transposed: bool = False


@dataclass(frozen=True)
class _Chunks:
    """``x.chunk(k, dim=1)`` / ``split``: channel ranges, each becoming a channel_slice when indexed."""

    value: _Value
    bounds: tuple[tuple[int, int], ...]


class _Poison:
    """Result of an unsupported op; consumers stay silent so each problem is listed once."""


_META, _POISON = _Meta(), _Poison()
_ACT_MODULES: dict[type, str] = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish",
                                 nn.Hardsigmoid: "hardsigmoid", nn.SiLU: "silu", nn.Sigmoid: "sigmoid"}
_ACT_FUNCTIONS = {F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.silu: "silu", torch.sigmoid: "sigmoid",
                  F.sigmoid: "sigmoid"}
_ACT_METHODS = {"sigmoid": "sigmoid"}
_MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul)
# families whose ops (LayerNorm, GELU, attention, permutes) have no int8 edge path here
OUT_OF_SCOPE = {"convnext": "ConvNeXt models", "vit_": "vision transformers (ViT)", "swin": "Swin transformers",
                "maxvit": "MaxViT"}
_ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_GAP_DIMS = ({2, 3}, {-2, -1})


def _pair(value: Any) -> int | None:
    """An int for ``k`` or ``(k, k)``; None for anything non-square."""
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1] and isinstance(value[0], int):
        return value[0]
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _describe(node: fx.Node, module: nn.Module | None) -> str:
    """A readable name for what a traced node calls, e.g. ``nn.Sigmoid`` or ``torch.sigmoid``."""
    if node.op == "call_module":
        return f"nn.{type(module).__name__}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    name = getattr(target, "__name__", str(target))
    for prefix, namespace in (("F", F), ("torch", torch), ("operator", operator)):
        if getattr(namespace, name, None) is target:
            return f"{prefix}.{name}"
    mod = getattr(target, "__module__", None)
    return f"{mod}.{name}" if mod else name


def _mutation_lost(node: fx.Node, module: nn.Module | None, order: dict[fx.Node, int]) -> bool:
    """True for an in-place op fx cannot follow: its result is unused, or its input is read again later."""
    if node.op == "call_module":
        inplace = bool(getattr(module, "inplace", False))
    else:
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        inplace = (isinstance(name, str) and name.endswith("_") and not name.startswith("__")) \
            or name == "iadd" or node.kwargs.get("inplace") is True
    if not inplace or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    return not node.users or any(order[u] > order[node] for u in node.args[0].users if u is not node)


@dataclass
class _Importer:
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    gm: fx.GraphModule
    nodes: list[Node] = field(default_factory=list)
    expected: dict[str, Shape] = field(default_factory=dict)  # spec id -> traced shape
    state_map: dict[str, str] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)  # description -> where
    values: dict[fx.Node, Any] = field(default_factory=dict)
    used_ids: set[str] = field(default_factory=lambda: {INPUT_ID, "output"})
    pool_maps: dict[str, _Value] = field(default_factory=dict)  # pooled map id -> its adaptive_avgpool(1)

    # ------------------------------------------------------------------ helpers

    def problem(self, what: str, where: fx.Node) -> _Poison:
        self.problems.setdefault(what, []).append(str(where.target if where.op == "call_module" else where.name))
        return _POISON

    def new_id(self, fx_node: fx.Node) -> str:
        base = fx_node.name if _ID_PATTERN.fullmatch(fx_node.name) else "n_" + "".join(
            c if c.isalnum() else "_" for c in fx_node.name)
        node_id, k = base, 1
        while node_id in self.used_ids:
            node_id, k = f"{base}_{k}", k + 1
        self.used_ids.add(node_id)
        return node_id

    def emit(self, fx_node: fx.Node, op: str, inputs: list[_Value], spec_shape: Shape,
             shape: Shape | None = None, **attrs: Any) -> _Value:
        node_id = self.new_id(fx_node)
        self.nodes.append(Node(node_id, op, tuple(v.node for v in inputs), attrs))
        self.expected[node_id] = spec_shape
        return _Value(node_id, spec_shape, spec_shape if shape is None else shape)

    def map_state(self, node_id: str, target: str, names: tuple[str, ...]) -> None:
        for n in names:
            self.state_map[f"layers.{node_id}.{n}"] = f"{target}.{n}" if target else n

    @staticmethod
    def traced_shape(fx_node: fx.Node) -> Shape | None:
        meta = fx_node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        return tuple(shape[1:]) if shape is not None else None

    def tensors(self, fx_node: fx.Node, args: list[Any], what: str, need_map: bool) -> list[_Value] | _Poison:
        """Resolve tensor arguments; poison if any is unusable for ``what``."""
        out: list[_Value] = []
        for a in args:
            v = self.values.get(a) if isinstance(a, fx.Node) else None
            if v is _POISON:
                return _POISON
            if not isinstance(v, _Value):
                return self.problem(f"{what} with a non-tensor operand", fx_node)
            if need_map and not v.is_map and v.pooled_from is not None and len(v.shape) == 3:
                v = self.map_pool(fx_node, v)  # SE: a 1x1 conv on the pooled vector needs the (C,1,1) map
            if need_map and not v.is_map:
                return self.problem(f"{what} on a reshaped tensor of shape {list(v.shape)}", fx_node)
            out.append(v)
        return out

    def map_pool(self, fx_node: fx.Node, v: _Value) -> _Value:
        """The (C,1,1) map a keepdim global pool produced, as an adaptive_avgpool(1) node (made once)."""
        source = v.pooled_from
        if source.node not in self.pool_maps:
            c = source.shape[0]
            node_id = self.new_id(fx_node) + "_pool"
            self.used_ids.add(node_id)
            self.nodes.append(Node(node_id, "adaptive_avgpool", (source.node,), {"output_size": 1}))
            self.expected[node_id] = (c, 1, 1)
            self.pool_maps[source.node] = _Value(node_id, (c, 1, 1), (c, 1, 1))
        return self.pool_maps[source.node]

    # ------------------------------------------------------------------ ops

    def conv(self, n: fx.Node, m: nn.Conv2d) -> Any:
        k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
        if None in (k, s, d):
            return self.problem("nn.Conv2d with a non-square kernel, stride or dilation", n)
        if m.padding_mode != "zeros":
            return self.problem(f"nn.Conv2d with padding_mode={m.padding_mode!r}", n)
        if m.padding == "valid":
            pad = 0
        elif m.padding == "same":
            if s != 1 or (d * (k - 1)) % 2:
                return self.problem("nn.Conv2d with asymmetric 'same' padding", n)
            pad = d * (k - 1) // 2
        else:
            pad = _pair(m.padding)
            if pad is None:
                return self.problem("nn.Conv2d with non-square padding", n)
        args = self.tensors(n, [n.args[0]], "nn.Conv2d", need_map=True)
        if args is _POISON:
            return args
        attrs: dict[str, Any] = {"out_channels": m.out_channels, "kernel": k}
        if s != 1:
            attrs["stride"] = s
        if pad != d * (k - 1) // 2:
            attrs["padding"] = pad
        if d != 1:
            attrs["dilation"] = d
        if m.groups != 1:
            attrs["groups"] = m.groups
        if m.bias is not None:
            attrs["bias"] = True
        v = self.emit(n, "conv", args, self.traced_shape(n), **attrs)
        self.map_state(v.node, n.target, ("weight", "bias") if m.bias is not None else ("weight",))
        return v

    def bn(self, n: fx.Node, m: nn.BatchNorm2d) -> Any:
        if not (m.affine and m.track_running_stats):
            return self.problem("nn.BatchNorm2d without affine parameters or running statistics", n)
        args = self.tensors(n, [n.args[0]], "nn.BatchNorm2d", need_map=True)
        if args is _POISON:
            return args
        attrs = {} if m.eps == 1e-5 else {"eps": float(m.eps)}
        v = self.emit(n, "bn", args, args[0].spec_shape, **attrs)
        self.map_state(v.node, n.target, ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))
        return v

    def linear(self, n: fx.Node, m: nn.Linear) -> Any:
        args = self.tensors(n, [n.args[0]], "nn.Linear", need_map=False)
        if args is _POISON:
            return args
        x = args[0]
        if len(x.shape) != 1 or x.shape[0] != math.prod(x.spec_shape):
            return self.problem(f"nn.Linear on a tensor of shape {list(x.shape)} (flatten it first)", n)
        attrs = {"out_features": m.out_features} | ({} if m.bias is not None else {"bias": False})
        v = self.emit(n, "linear", args, (m.out_features,), **attrs)
        self.map_state(v.node, n.target, ("weight", "bias") if m.bias is not None else ("weight",))
        return v

    def act(self, n: fx.Node, op: str, x: Any) -> Any:
        args = self.tensors(n, [x], op, need_map=False)
        if args is _POISON:
            return args
        return self.emit(n, op, args, args[0].spec_shape, args[0].shape)

    def pool(self, n: fx.Node, op: str, x: Any, kernel: Any, stride: Any, padding: Any, ok: bool,
             ceil_mode: bool = False) -> Any:
        k, p = _pair(kernel), _pair(padding)
        s = k if stride is None or stride == [] else _pair(stride)
        if None in (k, s, p) or not ok:
            what = "dilated or return_indices" if op == "maxpool" else "ceil_mode, divisor_override or count_include_pad=False"
            return self.problem(f"{op} with non-square, {what} settings", n)
        args = self.tensors(n, [x], op, need_map=True)
        if args is _POISON:
            return args
        attrs: dict[str, Any] = {"kernel": k}
        if s != k:
            attrs["stride"] = s
        if p:
            attrs["padding"] = p
        if ceil_mode and self.traced_shape(n)[1:] != tuple(
                (h + 2 * p - k) // s + 1 for h in args[0].shape[1:]):  # ceil changes nothing: leave it out
            attrs["ceil_mode"] = True
        return self.emit(n, op, args, self.traced_shape(n), **attrs)

    def global_pool(self, n: fx.Node, x: Any, keepdim: bool) -> Any:
        args = self.tensors(n, [x], "global average pooling", need_map=True)
        if args is _POISON:
            return args
        c = args[0].shape[0]
        v = self.emit(n, "global_avgpool", args, (c,), (c, 1, 1) if keepdim else (c,))
        return _Value(v.node, v.spec_shape, v.shape, pooled_from=args[0]) if keepdim else v

    def adaptive_pool(self, n: fx.Node, x: Any, size: Any) -> Any:
        v = self.values.get(x)
        if v is _POISON:
            return v
        sizes = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
        if isinstance(v, _Value) and v.is_map and len(sizes) == 2:
            target = tuple(v.shape[1 + i] if s is None else s for i, s in enumerate(sizes))
            if target == (1, 1):
                return self.global_pool(n, x, keepdim=True)
            if target == v.shape[1:]:
                return v  # output size equals input size: a no-op
            if target[0] == target[1]:
                return self.emit(n, "adaptive_avgpool", [v], (v.shape[0], *target), output_size=target[0])
        return self.problem(f"adaptive_avg_pool2d to output size {size!r} (only square sizes are supported)", n)

    def flatten(self, n: fx.Node, x: Any, start: Any, end: Any = -1) -> Any:
        v = self.values.get(x)
        if v is _POISON:
            return v
        if not isinstance(v, _Value) or start != 1 or end != -1:
            return self.problem(f"flatten(start_dim={start}, end_dim={end}) (only flatten(x, 1) is supported)", n)
        return _Value(v.node, v.spec_shape, (math.prod(v.shape),))

    def view(self, n: fx.Node) -> Any:
        v = self.values.get(n.args[0])
        if v is _POISON:
            return v
        traced = self.traced_shape(n)
        if isinstance(v, _Value) and v.is_map and traced is not None and len(traced) == 4 \
                and traced[0] * traced[1] == v.shape[0] and traced[2:] == v.shape[1:]:
            return _Grouped(v, traced[0])  # (b, g, C/g, H, W): the first half of a channel shuffle
        if isinstance(v, _Grouped) and traced is not None and traced == v.value.shape:
            if not v.transposed:
                return v.value
            return self.emit(n, "channel_shuffle", [v.value], v.value.shape, groups=v.groups)
        sizes = n.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        if isinstance(v, _Value) and len(sizes) == 2:
            batch, rest = sizes
            numel = math.prod(v.shape)
            batch_ok = self.values.get(batch) is _META if isinstance(batch, fx.Node) else (batch == -1 and rest == numel)
            if batch_ok and rest in (-1, numel):
                return _Value(v.node, v.spec_shape, (numel,))
        return self.problem(f"Tensor.{n.target} other than to (batch, -1)", n)

    def transpose(self, n: fx.Node) -> Any:
        v = self.values.get(n.args[0])
        if v is _POISON:
            return v
        dims = {_arg(n, 1, "dim0"), _arg(n, 2, "dim1")}
        if isinstance(v, _Grouped) and dims == {1, 2}:
            return _Grouped(v.value, v.groups, not v.transposed)
        return self.problem("transpose other than a channel shuffle's (view to groups, transpose(1, 2), view back)", n)

    def chunk(self, n: fx.Node, split: bool) -> Any:
        args = self.tensors(n, [n.args[0]], "Tensor.split" if split else "Tensor.chunk", need_map=True)
        if args is _POISON:
            return args
        x = args[0]
        c = x.shape[0]
        dim = _arg(n, 2, "dim", 0)
        amount = _arg(n, 1, "split_size_or_sections" if split else "chunks")
        if dim not in (1, -3) or not isinstance(amount, int) or amount < 1:
            return self.problem(f"chunk/split along dim={dim} (only the channel dim 1 with an int is supported)", n)
        size = amount if split else -(-c // amount)
        return _Chunks(x, tuple((a, min(a + size, c)) for a in range(0, c, size)))

    def mul(self, n: fx.Node, a: Any, b: Any) -> Any:
        args = self.tensors(n, [a, b], "mul", need_map=True)
        if args is _POISON:
            return args
        x, g = args
        if x.shape != g.shape and x.shape == (g.shape[0], 1, 1):  # gate * x (torchvision's SE order)
            x, g = g, x
        if g.shape != x.shape and g.shape != (x.shape[0], 1, 1):
            return self.problem("mul of tensors other than same shapes or a per-channel (C,1,1) gate", n)
        return self.emit(n, "mul", [x, g], x.spec_shape)

    def add(self, n: fx.Node, a: Any, b: Any) -> Any:
        args = self.tensors(n, [a, b], "add", need_map=False)
        if args is _POISON:
            return args
        if args[0].shape != args[1].shape or args[0].spec_shape != args[1].spec_shape:
            return self.problem("add of tensors with different (or broadcast) shapes", n)
        return self.emit(n, "add", args, args[0].spec_shape, args[0].shape)

    def cat(self, n: fx.Node) -> Any:
        xs, dim = _arg(n, 0, "tensors"), _arg(n, 1, "dim", 0)
        if dim not in (1, -3) or not isinstance(xs, (list, tuple)):
            return self.problem(f"torch.cat along dim={dim} (only the channel dim 1 is supported)", n)
        args = self.tensors(n, list(xs), "torch.cat", need_map=True)
        if args is _POISON:
            return args
        if len(args) == 1:
            return args[0]
        return self.emit(n, "concat", args, self.traced_shape(n))

    # ------------------------------------------------------------------ dispatch

    def visit(self, n: fx.Node) -> Any:
        if n.op == "call_module":
            return self.visit_module(n, self.gm.get_submodule(n.target))
        if n.op == "call_function":
            return self.visit_function(n)
        if n.op == "call_method":
            return self.visit_method(n)
        if n.op == "get_attr":
            return self.problem(f"direct use of tensor attribute '{n.target}'", n)
        return self.problem(f"fx node kind {n.op!r}", n)  # pragma: no cover

    def visit_module(self, n: fx.Node, m: nn.Module) -> Any:
        if len(n.args) != 1 or n.kwargs:
            return self.problem(f"nn.{type(m).__name__} called with extra arguments", n)
        x = n.args[0]
        if isinstance(m, nn.Conv2d):
            return self.conv(n, m)
        if isinstance(m, nn.BatchNorm2d):
            return self.bn(n, m)
        if isinstance(m, nn.Linear):
            return self.linear(n, m)
        for cls, op in _ACT_MODULES.items():
            if type(m) is cls:
                return self.act(n, op, x)
        if type(m) is nn.Hardtanh and (m.min_val, m.max_val) == (0.0, 6.0):
            return self.act(n, "relu6", x)
        if isinstance(m, _ALIAS_MODULES):
            return self.alias(n, x)
        if isinstance(m, nn.MaxPool2d):
            ok = _pair(m.dilation) == 1 and not m.return_indices
            return self.pool(n, "maxpool", x, m.kernel_size, m.stride, m.padding, ok, m.ceil_mode)
        if isinstance(m, nn.AvgPool2d):
            ok = not m.ceil_mode and m.divisor_override is None and (m.count_include_pad or _pair(m.padding) == 0)
            return self.pool(n, "avgpool", x, m.kernel_size, m.stride, m.padding, ok)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self.adaptive_pool(n, x, m.output_size)
        if isinstance(m, nn.Flatten):
            return self.flatten(n, x, m.start_dim, m.end_dim)
        return self.problem(_describe(n, m), n)

    def alias(self, n: fx.Node, x: Any) -> Any:
        v = self.values.get(x)
        return v if isinstance(v, (_Value, _Grouped)) or v is _POISON else self.problem("identity of a non-tensor", n)

    def visit_function(self, n: fx.Node) -> Any:
        f = n.target
        if f is getattr or f is operator.getitem:
            base = self.values.get(n.args[0])
            if base is _META or (isinstance(base, _Value) and f is getattr and n.args[1] == "shape"):
                return _META
            if isinstance(base, _Chunks) and f is operator.getitem and isinstance(n.args[1], int) \
                    and -len(base.bounds) <= n.args[1] < len(base.bounds):
                start, stop = base.bounds[n.args[1]]
                if (start, stop) == (0, base.value.shape[0]):
                    return base.value
                return self.emit(n, "channel_slice", [base.value], (stop - start, *base.value.shape[1:]),
                                 start=start, stop=stop)
        elif f is operator.floordiv and self.values.get(n.args[0]) is _META:
            return _META  # channels // groups in a channel shuffle
        elif f in _MUL_FUNCTIONS:
            return self.mul(n, n.args[0], n.args[1])
        elif f in _ACT_FUNCTIONS:
            return self.act(n, _ACT_FUNCTIONS[f], n.args[0])
        elif getattr(f, "__name__", "") == "stochastic_depth" and "torchvision" in getattr(f, "__module__", ""):
            return self.alias(n, n.args[0])  # identity at inference (the model is traced in eval mode)
        elif f is torch.transpose:
            return self.transpose(n)
        elif f in _ADD_FUNCTIONS:
            if f is torch.add and _arg(n, 2, "alpha", 1) != 1:
                return self.problem("torch.add with alpha != 1", n)
            return self.add(n, n.args[0], n.args[1])
        elif f in _RELU_FUNCTIONS:
            return self.act(n, "relu", n.args[0])
        elif f is F.relu6 or (f is F.hardtanh and (_arg(n, 1, "min_val", -1.0), _arg(n, 2, "max_val", 1.0)) == (0.0, 6.0)):
            return self.act(n, "relu6", n.args[0])
        elif f is F.dropout or f is F.dropout2d:
            return self.alias(n, n.args[0])
        elif f is F.max_pool2d:
            ok = _pair(_arg(n, 4, "dilation", 1)) == 1 and not _arg(n, 6, "return_indices", False)
            return self.pool(n, "maxpool", n.args[0], _arg(n, 1, "kernel_size"), _arg(n, 2, "stride"),
                             _arg(n, 3, "padding", 0), ok, bool(_arg(n, 5, "ceil_mode", False)))
        elif f is F.avg_pool2d:
            pad = _arg(n, 3, "padding", 0)
            ok = not _arg(n, 4, "ceil_mode", False) and _arg(n, 6, "divisor_override") is None \
                and (_arg(n, 5, "count_include_pad", True) or _pair(pad) == 0)
            return self.pool(n, "avgpool", n.args[0], _arg(n, 1, "kernel_size"), _arg(n, 2, "stride"), pad, ok)
        elif f is F.adaptive_avg_pool2d:
            return self.adaptive_pool(n, n.args[0], _arg(n, 1, "output_size"))
        elif f is torch.flatten:
            return self.flatten(n, n.args[0], _arg(n, 1, "start_dim", 0), _arg(n, 2, "end_dim", -1))
        elif f is torch.cat or f is torch.concat:
            return self.cat(n)
        elif f is torch.mean:
            return self.mean(n)
        return self.problem(_describe(n, None), n)

    def visit_method(self, n: fx.Node) -> Any:
        name = n.target
        if name == "size":
            return _META
        if name in ("relu", "relu_"):
            return self.act(n, "relu", n.args[0])
        if name in ("add", "add_", "__add__", "__iadd__"):
            if _arg(n, 2, "alpha", 1) != 1:
                return self.problem("Tensor.add with alpha != 1", n)
            return self.add(n, n.args[0], n.args[1])
        if name == "flatten":
            return self.flatten(n, n.args[0], _arg(n, 1, "start_dim", 0), _arg(n, 2, "end_dim", -1))
        if name in ("view", "reshape"):
            return self.view(n)
        if name in _ACT_METHODS:
            return self.act(n, _ACT_METHODS[name], n.args[0])
        if name in ("mul", "mul_", "__mul__"):
            return self.mul(n, n.args[0], n.args[1])
        if name == "transpose":
            return self.transpose(n)
        if name in ("chunk", "split"):
            return self.chunk(n, name == "split")
        if name == "mean":
            return self.mean(n)
        if name == "contiguous":
            return self.alias(n, n.args[0])
        return self.problem(_describe(n, None), n)

    def mean(self, n: fx.Node) -> Any:
        dims = _arg(n, 1, "dim")
        if isinstance(dims, (tuple, list)) and len(dims) == 2 and set(dims) in _GAP_DIMS and _arg(n, 3, "dtype") is None:
            return self.global_pool(n, n.args[0], keepdim=bool(_arg(n, 2, "keepdim", False)))
        return self.problem(f"mean over dims {dims!r} (only the spatial dims (2, 3) are supported)", n)

    # ------------------------------------------------------------------ driver

    def run(self, param_cap: int | None) -> ImportedArch:
        graph = self.gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ArchError(f"{self.name}: forward must take exactly one tensor, it takes {len(placeholders)}")
        result: Any = None
        order = {n: k for k, n in enumerate(graph.nodes)}
        for n in graph.nodes:
            if n.op == "placeholder":
                self.values[n] = _Value(INPUT_ID, self.input_shape, self.input_shape)
            elif n.op == "output":
                result = self.values.get(n.args[0]) if isinstance(n.args[0], fx.Node) else None
                if not isinstance(result, (_Value, _Poison)):
                    self.problem("returning something other than one tensor", n)
            else:
                module = self.gm.get_submodule(n.target) if n.op == "call_module" else None
                if _mutation_lost(n, module, order):
                    # fx records x.relu_() as a new value, so code that keeps reading x would import wrongly
                    self.values[n] = self.problem(f"in-place {_describe(n, module)} whose input is used again", n)
                    continue
                self.values[n] = self.visit(n)
        if self.problems:
            listed = "; ".join(
                f"{what} ({len(where)}x: {', '.join(where[:3])}{', ...' if len(where) > 3 else ''})"
                for what, where in self.problems.items()
            )
            raise ArchError(f"{self.name}: cannot import {sum(map(len, self.problems.values()))} "
                            f"unsupported operation(s): {listed}")
        if result.node == INPUT_ID:
            raise ArchError(f"{self.name}: the model returns its input unchanged")
        if result.shape != result.spec_shape:
            raise ArchError(f"{self.name}: the model returns a reshaped feature map of shape {list(result.shape)}; "
                            "end it with global pooling or a linear layer")
        return self.finish(result, param_cap)

    def finish(self, result: _Value, param_cap: int | None) -> ImportedArch:
        # drop dead branches (computed but unused in the source): they are harmless there
        by_id = {node.id: node for node in self.nodes}
        live, stack = set(), [result.node]
        while stack:
            node_id = stack.pop()
            if node_id in live or node_id == INPUT_ID:
                continue
            live.add(node_id)
            stack.extend(by_id[node_id].inputs)
        nodes = [node for node in self.nodes if node.id in live]
        nodes.append(Node("output", "output", (result.node,), {}))
        spec = ArchSpec(self.name, self.input_shape, self.num_classes, tuple(nodes), source=self.name)
        spec = parse_spec(spec.to_dict(), source=self.name)  # the same checks as a file gets (name, ids, ...)
        info = analyze(spec, param_cap=sys.maxsize if param_cap is None else param_cap)
        for node_id, shape in self.expected.items():
            if node_id in live and info.nodes[node_id].shape != shape:
                raise ArchError(f"{self.name}: node '{node_id}': imported shape {list(info.nodes[node_id].shape)} "
                                f"differs from the traced shape {list(shape)}")
        prefix = tuple(f"layers.{n.id}." for n in nodes)
        state_map = {k: v for k, v in self.state_map.items() if k.startswith(prefix)}
        return ImportedArch(spec, state_map)


def trace_model(module: nn.Module, name: str, input_shape: tuple[int, int, int] | list[int],
                num_classes: int, param_cap: int | None = None) -> ImportedArch:
    """Trace ``module`` with torch.fx and translate it; raises ArchError listing every unsupported op.

    ``param_cap`` is None by default: an existing model is imported whatever its size (a
    torchvision ResNet-18 has 11.2M parameters, above the sampler space's 10^7 cap).
    """
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ArchError(f"{name}: input shape must be C,H,W with positive sizes, got {list(input_shape)}")
    was_training = {m: m.training for m in module.modules()}
    module.eval()  # dropout becomes identity and BatchNorm statistics stay untouched
    try:
        try:
            gm = fx.symbolic_trace(module)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is a user-facing import error
            raise ArchError(f"{name}: torch.fx cannot trace the model: {_first_line(exc)}") from None
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
        except Exception as exc:  # noqa: BLE001
            raise ArchError(f"{name}: the model fails on a 1x{'x'.join(map(str, input_shape))} input: "
                            f"{_first_line(exc)}") from None
        return _Importer(name, input_shape, num_classes, gm).run(param_cap)
    finally:
        for m, mode in was_training.items():
            m.training = mode


def import_model(module: nn.Module, name: str, input_shape: tuple[int, int, int] | list[int],
                 num_classes: int, param_cap: int | None = None) -> ArchSpec:
    """The arch spec of ``module`` (see :func:`trace_model` for the weight mapping too)."""
    return trace_model(module, name, input_shape, num_classes, param_cap).spec


# ----------------------------------------------------------------------------- sources


def _load_python_module(path: str) -> Any:
    if path.endswith(".py") or "/" in path:
        file = Path(path)
        if not file.is_file():
            raise ArchError(f"source file {path} does not exist")
        mod_name = f"_ghnq_import_{file.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, file)
        if spec is None or spec.loader is None:
            raise ArchError(f"cannot load {path} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(path)


def resolve_source(source: str, num_classes: int) -> nn.Module:
    """Instantiate ``torchvision:<model>`` (random weights, no download) or ``<module or file.py>:<factory>``.

    The factory gets ``num_classes=`` when its signature accepts it; an ``nn.Module``
    instance found at that name is used as is.
    """
    prefix, sep, attr = source.rpartition(":")
    if not sep or not prefix or not attr:
        raise ArchError(f"source {source!r} must look like 'torchvision:resnet18' or 'package.module:factory'")
    if prefix == "torchvision":
        import torchvision

        for stem, family in OUT_OF_SCOPE.items():
            if attr.startswith(stem):
                raise ArchError(f"torchvision:{attr}: {family} are out of scope (LayerNorm, GELU, attention and "
                                "permutes have no int8 edge path here); supported: ResNet, VGG, MobileNetV2/V3, "
                                "EfficientNet, MnasNet, ShuffleNetV2, SqueezeNet, GoogLeNet, DenseNet, RegNet")

        names = torchvision.models.list_models(module=torchvision.models)
        if attr not in names:
            close = difflib.get_close_matches(attr, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
            raise ArchError(f"unknown torchvision classification model {attr!r}{hint}")
        try:
            return torchvision.models.get_model(attr, weights=None, num_classes=num_classes)
        except Exception as exc:  # noqa: BLE001
            raise ArchError(f"torchvision:{attr} cannot be built: {_first_line(exc)}") from None
    try:
        obj: Any = _load_python_module(prefix)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ArchError:
        raise
    except Exception as exc:  # noqa: BLE001 - ImportError, AttributeError, errors in user code
        raise ArchError(f"cannot load {source!r}: {_first_line(exc)}") from None
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ArchError(f"{source!r} is neither an nn.Module nor a factory function")
    try:
        params = inspect.signature(obj).parameters
        takes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        takes = False
    try:
        model = obj(num_classes=num_classes) if takes else obj()
    except Exception as exc:  # noqa: BLE001
        raise ArchError(f"{source!r} failed: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ArchError(f"{source!r} returned {type(model).__name__}, not an nn.Module")
    return model


def source_name(source: str) -> str:
    """A default spec name for a source string: the factory name, e.g. ``resnet18``."""
    attr = source.rpartition(":")[2] or source
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in attr.rsplit(".", 1)[-1]) or "imported"
