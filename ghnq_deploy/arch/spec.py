"""The arch.json format: a CNN as a DAG of nodes, with validation and shape inference.

Everything downstream (builder, GHN graph, quantizer, exporters) consumes an
:class:`ArchSpec` that has passed :func:`analyze`, so every rule that can make a
later stage fail is checked here once, with one error line naming the node.
See docs/arch-spec.md for the format.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ghnq_deploy.errors import UserError

INPUT_ID = "input"
DEFAULT_PARAM_CAP = 10**7
_ID_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NAME_MAX = 100
# A spec name becomes a folder name (run folders, export files) on every OS: portable characters only.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
MAX_SPEC_BYTES = 16 * 2**20  # far above any real spec (a 10^7-parameter net is a few KB of JSON)
MAX_JSON_DEPTH = 64  # arch.json needs 4 levels; deeper input is refused before the parser recurses

# op -> {attribute: (python type, default)}; a default of REQUIRED must be given.
REQUIRED = object()
OP_ATTRIBUTES: dict[str, dict[str, tuple[type, Any]]] = {
    "conv": {
        "out_channels": (int, REQUIRED),
        "kernel": (int, REQUIRED),
        "stride": (int, 1),
        "padding": (int, None),  # None: "same"-style padding dilation*(kernel-1)//2
        "dilation": (int, 1),
        "groups": (int, 1),
        "bias": (bool, False),
    },
    "bn": {"eps": (float, 1e-5)},
    "relu": {},
    "relu6": {},
    "identity": {},
    "hardswish": {},
    "hardsigmoid": {},
    "silu": {},
    "sigmoid": {},
    "maxpool": {"kernel": (int, 2), "stride": (int, None), "padding": (int, 0), "ceil_mode": (bool, False)},
    "avgpool": {"kernel": (int, 2), "stride": (int, None), "padding": (int, 0)},
    "global_avgpool": {},
    "adaptive_avgpool": {"output_size": (int, REQUIRED)},  # torch AdaptiveAvgPool2d, square output
    "channel_shuffle": {"groups": (int, REQUIRED)},  # ShuffleNet: (g, C/g) -> (C/g, g) channel order
    "channel_slice": {"start": (int, REQUIRED), "stop": (int, REQUIRED)},  # channels start..stop-1 (chunk)
    "mul": {},  # elementwise product; the second input may be a (C,1,1) gate (squeeze-excitation)
    "linear": {"out_features": (int, REQUIRED), "bias": (bool, True)},
    "add": {},
    "concat": {},
    "output": {},
}
OPS = tuple(OP_ATTRIBUTES)
_MULTI_INPUT_OPS = {"add", "concat", "mul"}
ACTIVATION_OPS = ("relu", "relu6", "hardswish", "hardsigmoid", "silu", "sigmoid")


class ArchError(UserError):
    """An arch spec that cannot be used; the message is one line naming file and node."""


@dataclass(frozen=True)
class Node:
    id: str
    op: str
    inputs: tuple[str, ...]
    attributes: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)

    def attr(self, name: str) -> Any:
        """Attribute value with the op's default filled in."""
        if name in self.attributes:
            return self.attributes[name]
        return OP_ATTRIBUTES[self.op][name][1]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "op": self.op, "inputs": list(self.inputs), "attributes": dict(self.attributes)}


@dataclass(frozen=True)
class ArchSpec:
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    nodes: tuple[Node, ...]
    source: str = field(default="<spec>", compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "nodes": [n.to_dict() for n in self.nodes],
        }

    def dumps(self) -> str:
        """Canonical text: the same spec always gives the same bytes."""
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def sha256(self) -> str:
        return hashlib.sha256(self.dumps().encode()).hexdigest()

    def node(self, node_id: str) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    @property
    def output_node(self) -> Node:
        return next(n for n in self.nodes if n.op == "output")


@dataclass(frozen=True)
class NodeInfo:
    """What shape inference learns about one node."""

    shape: tuple[int, ...]
    params: int
    macs: int


@dataclass(frozen=True)
class ArchInfo:
    spec: ArchSpec
    order: tuple[str, ...]  # topological order of node ids (input excluded)
    nodes: dict[str, NodeInfo]

    @property
    def params(self) -> int:
        return sum(i.params for i in self.nodes.values())

    @property
    def macs(self) -> int:
        return sum(i.macs for i in self.nodes.values())


# ----------------------------------------------------------------------------- parsing


def _fail(source: str, message: str, node: str | None = None) -> ArchError:
    where = f"{source}: node '{node}': " if node is not None else f"{source}: "
    return ArchError(where + message)


def _check_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_name(name: Any, source: str = "<spec>") -> None:
    """Refuse a name that cannot be a folder name everywhere (docs/arch-spec.md, "Names")."""
    rule = (f"'name' must be a non-empty string usable as a folder name: 1-{NAME_MAX} ASCII letters, digits, "
            "'.', '_', '+' or '-', starting with a letter or digit")
    if not isinstance(name, str):
        raise _fail(source, f"{rule}; got a {type(name).__name__}")
    if len(name) > NAME_MAX:
        raise _fail(source, f"{rule}; got {len(name):,} characters")
    if not NAME_PATTERN.fullmatch(name):
        raise _fail(source, f"{rule}; got {ascii(name)}")


def _depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Bracket nesting of ``text`` (outside strings) stays within ``limit``: no RecursionError later."""
    if text.count("[") + text.count("{") <= limit:
        return True
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _has_surrogate(value: Any) -> bool:
    """A lone UTF-16 surrogate (JSON allows the escape \\ud800) in any key or string value."""
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def decode_json(raw: bytes, source: str) -> Any:
    """Bytes of an arch.json to Python objects; every way it can be malformed is one ArchError."""
    if len(raw) > MAX_SPEC_BYTES:
        raise ArchError(f"{source}: {len(raw):,} bytes is too large for an arch.json (at most {MAX_SPEC_BYTES:,})")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        hint = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:4] else ""
        raise ArchError(f"{source}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start}{hint}; "
                        "arch.json must be UTF-8 JSON") from None
    if not _depth_ok(text):
        raise ArchError(f"{source}: JSON nested deeper than {MAX_JSON_DEPTH} levels; an arch.json needs 4")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArchError(f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except ValueError as exc:  # Python refuses integer literals past its int-string limit
        if "integer string conversion" not in str(exc):
            raise ArchError(f"{source}: invalid JSON ({' '.join(str(exc).split())[:160]})") from None
        raise ArchError(f"{source}: an integer has more than {sys.get_int_max_str_digits()} digits; "
                        "no arch.json value is that large") from None
    except RecursionError:
        raise ArchError(f"{source}: JSON nested too deeply to read") from None
    if _has_surrogate(data):
        raise ArchError(f"{source}: a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), not text")
    return data


def parse_spec(data: Any, source: str = "<spec>") -> ArchSpec:
    """Turn decoded JSON into an ArchSpec, checking types and names (not the graph)."""
    if not isinstance(data, dict):
        raise _fail(source, "top level must be a JSON object")
    allowed = {"name", "input_shape", "num_classes", "nodes"}
    unknown = sorted(str(k) for k in set(data) - allowed)
    if unknown:
        raise _fail(source, f"unknown top-level key(s) {unknown}; allowed: {sorted(allowed)}")
    for key in ("name", "input_shape", "num_classes", "nodes"):
        if key not in data:
            raise _fail(source, f"missing top-level key '{key}'")
    check_name(data["name"], source)
    name = data["name"]
    shape = data["input_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(_check_int(v) and v > 0 for v in shape)):
        raise _fail(source, "'input_shape' must be [C, H, W] with positive integers")
    num_classes = data["num_classes"]
    if not (_check_int(num_classes) and num_classes >= 2):
        raise _fail(source, "'num_classes' must be an integer >= 2")
    raw_nodes = data["nodes"]
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise _fail(source, "'nodes' must be a non-empty list")

    nodes: list[Node] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_nodes):
        if not isinstance(raw, dict):
            raise _fail(source, f"nodes[{index}] must be an object")
        node_id = raw.get("id")
        if not isinstance(node_id, str) or not _ID_PATTERN.fullmatch(node_id):
            raise _fail(source, f"nodes[{index}]: 'id' must match {_ID_PATTERN.pattern}")
        extra = sorted(str(k) for k in set(raw) - {"id", "op", "inputs", "attributes"})
        if extra:
            raise _fail(source, f"unknown key(s) {extra}", node_id)
        if node_id == INPUT_ID:
            raise _fail(source, f"'{INPUT_ID}' is reserved for the network input", node_id)
        if node_id in seen:
            raise _fail(source, "duplicate id", node_id)
        seen.add(node_id)
        op = raw.get("op")
        if not isinstance(op, str) or op not in OP_ATTRIBUTES:
            raise _fail(source, f"unknown op {op!r}; known ops: {', '.join(OPS)}", node_id)
        inputs = raw.get("inputs", [])
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise _fail(source, "'inputs' must be a list of node ids", node_id)
        attributes = raw.get("attributes", {})
        if not isinstance(attributes, dict):
            raise _fail(source, "'attributes' must be an object", node_id)
        schema = OP_ATTRIBUTES[op]
        for key, value in attributes.items():
            if key not in schema:
                allowed_attrs = ", ".join(schema) or "none"
                raise _fail(source, f"unknown attribute {key!r} for op '{op}' (allowed: {allowed_attrs})", node_id)
            kind = schema[key][0]
            ok = isinstance(value, bool) if kind is bool else (
                _check_int(value) if kind is int else isinstance(value, (int, float)) and not isinstance(value, bool)
            )
            if not ok and not (value is None and schema[key][1] is None):
                raise _fail(source, f"attribute '{key}' must be {kind.__name__}, got {value!r}", node_id)
        for key, (_, default) in schema.items():
            if default is REQUIRED and key not in attributes:
                raise _fail(source, f"op '{op}' needs attribute '{key}'", node_id)
        nodes.append(Node(node_id, op, tuple(inputs), dict(attributes)))
    outputs = [n.id for n in nodes if n.op == "output"]
    if len(outputs) != 1:
        raise _fail(source, f"exactly one 'output' node is required, found {len(outputs)}")
    return ArchSpec(name, (shape[0], shape[1], shape[2]), num_classes, tuple(nodes), source)


def load_spec(path: str | Path, param_cap: int = DEFAULT_PARAM_CAP) -> ArchSpec:
    """Read, parse and validate an arch.json file (raises ArchError)."""
    return load_info(path, param_cap).spec


def load_info(path: str | Path, param_cap: int = DEFAULT_PARAM_CAP) -> ArchInfo:
    """:func:`load_spec`, keeping the analysis (shapes, params, MACs) instead of redoing it."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_SPEC_BYTES:
            raise ArchError(f"{path}: {path.stat().st_size:,} bytes is too large for an arch.json "
                            f"(at most {MAX_SPEC_BYTES:,})")
        raw = path.read_bytes()
    except OSError as exc:
        raise ArchError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    data = decode_json(raw, str(path))
    return analyze(parse_spec(data, str(path)), param_cap=param_cap)


def save_spec(spec: ArchSpec, path: str | Path) -> None:
    from ghnq_deploy.io import atomic_write_text

    atomic_write_text(Path(path), spec.dumps())


# ----------------------------------------------------------------------------- graph checks


def topological_order(spec: ArchSpec) -> tuple[str, ...]:
    """Kahn's algorithm in file order; reports dangling inputs and cycles."""
    ids = {n.id for n in spec.nodes}
    for n in spec.nodes:
        if not n.inputs:
            raise _fail(spec.source, f"op '{n.op}' has no inputs (no path from the input)", n.id)
        for i in n.inputs:
            if i != INPUT_ID and i not in ids:
                raise _fail(spec.source, f"input {i!r} does not exist (dangling reference)", n.id)
            if i == n.id:
                raise _fail(spec.source, "node feeds itself (cycle)", n.id)
    pending = {n.id: len(set(n.inputs) - {INPUT_ID}) for n in spec.nodes}
    consumers: dict[str, list[str]] = {n.id: [] for n in spec.nodes}
    for n in spec.nodes:
        for i in set(n.inputs) - {INPUT_ID}:
            consumers[i].append(n.id)
    ready = [n.id for n in spec.nodes if pending[n.id] == 0]
    order: list[str] = []
    position = {n.id: k for k, n in enumerate(spec.nodes)}
    while ready:
        ready.sort(key=position.__getitem__)
        current = ready.pop(0)
        order.append(current)
        for c in consumers[current]:
            pending[c] -= 1
            if pending[c] == 0:
                ready.append(c)
    if len(order) != len(spec.nodes):
        stuck = next(n.id for n in spec.nodes if pending[n.id] > 0)
        raise _fail(spec.source, "is part of a cycle", stuck)
    return tuple(order)


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_out(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool = False) -> int:
    """torch's pooled size; with ``ceil_mode`` a last partial window counts if it starts inside the padded input."""
    if not ceil_mode:
        return _conv_out(size, kernel, stride, padding)
    out = -(-(size + 2 * padding - kernel) // stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _infer_node(spec: ArchSpec, node: Node, in_shapes: list[tuple[int, ...]]) -> NodeInfo:
    fail = lambda msg: _fail(spec.source, msg, node.id)  # noqa: E731
    op = node.op
    if op not in _MULTI_INPUT_OPS and len(in_shapes) != 1:
        raise fail(f"op '{op}' takes exactly one input, got {len(in_shapes)}")
    if op in _MULTI_INPUT_OPS and len(in_shapes) < 2:
        raise fail(f"op '{op}' needs at least two inputs")
    x = in_shapes[0]
    if op in ("conv", "bn", "maxpool", "avgpool", "global_avgpool", "adaptive_avgpool", "channel_shuffle",
              "channel_slice") \
            and len(x) != 3:
        raise fail(f"op '{op}' needs a (C,H,W) feature map, got shape {x}")
    if op == "conv":
        c, h, w = x
        out_c, k = node.attr("out_channels"), node.attr("kernel")
        stride, dilation, groups = node.attr("stride"), node.attr("dilation"), node.attr("groups")
        pad = node.attr("padding")
        pad = dilation * (k - 1) // 2 if pad is None else pad
        if min(out_c, k, stride, dilation, groups) < 1 or pad < 0:
            raise fail("out_channels, kernel, stride, dilation and groups must be >= 1, padding >= 0")
        if c % groups or out_c % groups:
            raise fail(f"groups={groups} does not divide in_channels={c} and out_channels={out_c}")
        span = dilation * (k - 1) + 1
        if span > h + 2 * pad or span > w + 2 * pad:
            raise fail(f"kernel {k} (dilation {dilation}) is larger than the padded input {h}x{w}")
        oh, ow = _conv_out(h, k, stride, pad, dilation), _conv_out(w, k, stride, pad, dilation)
        params = out_c * (c // groups) * k * k + (out_c if node.attr("bias") else 0)
        return NodeInfo((out_c, oh, ow), params, out_c * oh * ow * (c // groups) * k * k)
    if op == "bn":
        eps = node.attr("eps")
        if not (math.isfinite(eps) and eps > 0):
            raise fail(f"eps must be a finite number > 0, got {eps!r}")
        return NodeInfo(x, 2 * x[0], 0)
    if op in ACTIVATION_OPS or op == "identity":
        return NodeInfo(x, 0, 0)
    if op in ("maxpool", "avgpool"):
        c, h, w = x
        k, pad = node.attr("kernel"), node.attr("padding")
        stride = k if node.attr("stride") is None else node.attr("stride")
        if k < 1 or stride < 1 or pad < 0 or pad > k // 2:
            raise fail("pool needs kernel >= 1, stride >= 1 and 0 <= padding <= kernel/2")
        if k > h + 2 * pad or k > w + 2 * pad:
            raise fail(f"kernel {k} is larger than the padded input {h}x{w}")
        ceil = op == "maxpool" and node.attr("ceil_mode")
        return NodeInfo((c, pool_out(h, k, stride, pad, ceil), pool_out(w, k, stride, pad, ceil)), 0, 0)
    if op == "global_avgpool":
        return NodeInfo((x[0],), 0, 0)
    if op == "adaptive_avgpool":
        size = node.attr("output_size")
        if size < 1:
            raise fail("output_size must be >= 1")
        return NodeInfo((x[0], size, size), 0, 0)
    if op == "channel_shuffle":
        groups = node.attr("groups")
        if groups < 1 or x[0] % groups:
            raise fail(f"channel_shuffle groups={groups} must be >= 1 and divide the {x[0]} channels")
        return NodeInfo(x, 0, 0)
    if op == "channel_slice":
        start, stop = node.attr("start"), node.attr("stop")
        if not 0 <= start < stop <= x[0]:
            raise fail(f"channel_slice needs 0 <= start < stop <= {x[0]} channels, got {start}..{stop}")
        return NodeInfo((stop - start,) + x[1:], 0, 0)
    if op == "mul":
        gate = (x[0],) + (1,) * (len(x) - 1)
        if any(s != x and s != gate for s in in_shapes[1:]):
            raise fail(f"mul needs inputs of the first input's shape {list(x)} or a per-channel gate {list(gate)}, "
                       f"got {[list(s) for s in in_shapes]}")
        return NodeInfo(x, 0, 0)
    if op == "linear":
        features = math.prod(x)
        out = node.attr("out_features")
        if out < 1:
            raise fail("out_features must be >= 1")
        return NodeInfo((out,), features * out + (out if node.attr("bias") else 0), features * out)
    if op == "add":
        if any(s != x for s in in_shapes):
            raise fail(f"add needs identical input shapes, got {[list(s) for s in in_shapes]} "
                       f"(channel mismatch)" if any(s[0] != x[0] for s in in_shapes) else
                       f"add needs identical input shapes, got {[list(s) for s in in_shapes]}")
        return NodeInfo(x, 0, 0)
    if op == "concat":
        if any(len(s) != 3 for s in in_shapes):
            raise fail("concat needs (C,H,W) feature maps")
        if any(s[1:] != x[1:] for s in in_shapes):
            raise fail(f"concat needs equal spatial sizes, got {[list(s[1:]) for s in in_shapes]}")
        return NodeInfo((sum(s[0] for s in in_shapes),) + x[1:], 0, 0)
    if op == "output":
        if x != (spec.num_classes,):
            raise fail(f"output must be a vector of num_classes={spec.num_classes} logits, got shape {x}")
        return NodeInfo(x, 0, 0)
    raise fail(f"unknown op {op!r}")  # pragma: no cover - parse_spec already rejects it


def analyze(spec: ArchSpec, param_cap: int = DEFAULT_PARAM_CAP) -> ArchInfo:
    """Validate the graph and infer every node's output shape, parameters and MACs."""
    order = topological_order(spec)
    by_id = {n.id: n for n in spec.nodes}
    shapes: dict[str, tuple[int, ...]] = {INPUT_ID: spec.input_shape}
    infos: dict[str, NodeInfo] = {}
    for node_id in order:
        node = by_id[node_id]
        info = _infer_node(spec, node, [shapes[i] for i in node.inputs])
        shapes[node_id] = info.shape
        infos[node_id] = info
    # every node must lie on a path to the output (dead branches are almost always mistakes)
    reaches_output = {spec.output_node.id}
    for node_id in reversed(order):
        if node_id in reaches_output:
            reaches_output.update(i for i in by_id[node_id].inputs if i != INPUT_ID)
    dead = [n for n in order if n not in reaches_output]
    if dead:
        raise _fail(spec.source, "has no path to the output node", dead[0])
    info = ArchInfo(spec, order, infos)
    if info.params > param_cap:
        raise _fail(spec.source, f"{info.params:,} parameters exceed the cap of {param_cap:,}")
    return info

