"""arch spec -> the computational graph a GHN reads (GHN-2 style), and meta-batches of them.

Nodes are operations: one per parameter tensor kind (conv/linear weight, bias, BatchNorm)
and one per parameter-free op that changes data flow (pooling, add, concat, global pooling).
Activations and identities are removed and their neighbours joined, as in GHN-2, so the
GHN sees the same graph for ReLU and ReLU6 nets. Nodes are numbered in topological order;
each node also gets its *level* (longest path from the input) so a sweep can update all
nodes of one level at once. Virtual edges join every ancestor/descendant pair up to
``s_max`` apart (weight 1/s). See docs/ghn.md for the design and its deviations from GHN-2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from ghnq_deploy.arch.spec import INPUT_ID, ArchInfo, ArchSpec, analyze

PRIMITIVES = (
    "input", "conv", "sep_conv", "dil_conv", "linear", "bias", "bn",
    "sum", "concat", "max_pool", "avg_pool", "glob_avg",
    "cse", "shuffle",
)
# GHN checkpoints trained before "cse" / "shuffle" existed embed only the first 12 types;
# GHNConfig.num_primitives records how many a checkpoint knows (the vocabulary only grows at the end).
LEGACY_NUM_PRIMITIVES = 12
PRIM_INDEX = {p: i for i, p in enumerate(PRIMITIVES)}
# activations leave no trace (GHN-2, ghn2-design.md 1.2): the GHN sees the same graph for
# ReLU, hard-swish or SiLU nets; the squeeze-excitation product is the "cse" node
# (a channel slice too: its consumers' weight shapes already say how many channels they read)
_REMOVED_OPS = {"relu", "relu6", "hardswish", "hardsigmoid", "silu", "sigmoid", "identity", "channel_slice", "output"}


@dataclass(frozen=True)
class ParamTarget:
    """A parameter tensor the GHN must produce, and how to decode it."""

    name: str  # state_dict key, e.g. "layers.conv1.weight"
    shape: tuple[int, ...]
    node: int  # graph node whose embedding decodes it
    kind: str  # "weight" (>=2-D), "classifier_weight", "bn_weight", "bias", "classifier_bias"
    groups: int = 1


@dataclass
class ArchGraph:
    spec: ArchSpec
    primitives: np.ndarray  # (N,) int64
    shapes: np.ndarray  # (N, 4) int64, 0 where a node has no shape
    levels: np.ndarray  # (N,) int64
    edges: np.ndarray  # (E, 3) int64: src, dst, distance (1 = real edge)
    targets: list[ParamTarget] = field(default_factory=list)

    @property
    def num_nodes(self) -> int:
        return len(self.primitives)


def _weight_primitive(groups: int, dilation: int) -> str:
    if dilation > 1:
        return "dil_conv"
    return "sep_conv" if groups > 1 else "conv"


def build_graph(spec: ArchSpec, info: ArchInfo | None = None, s_max: int = 10) -> ArchGraph:
    """Computational graph of ``spec`` with real and virtual (shortest-path) edges."""
    info = info or analyze(spec, param_cap=sys.maxsize)  # size limits belong to whoever loaded the spec
    shapes = {INPUT_ID: spec.input_shape, **{k: v.shape for k, v in info.nodes.items()}}
    by_id = {n.id: n for n in spec.nodes}
    prims: list[str] = ["input"]
    node_shapes: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]
    real_edges: list[tuple[int, int]] = []
    targets: list[ParamTarget] = []
    exits: dict[str, list[int]] = {INPUT_ID: [0]}  # spec node -> graph nodes its consumers connect to
    classifier = spec.output_node.inputs[0]

    def new_node(prim: str, shape=(0, 0, 0, 0), preds: list[int] = ()) -> int:
        index = len(prims)
        prims.append(prim)
        node_shapes.append(tuple(shape))
        real_edges.extend((p, index) for p in preds)
        return index

    for node_id in info.order:
        node = by_id[node_id]
        preds = sorted({p for i in node.inputs for p in exits[i]})
        op = node.op
        prefix = f"layers.{node_id}"
        if op in _REMOVED_OPS:
            exits[node_id] = preds
            continue
        if op in ("conv", "linear"):
            c_in = shapes[node.inputs[0]][0]
            if op == "conv":
                k, groups = node.attr("kernel"), node.attr("groups")
                shape = (node.attr("out_channels"), c_in // groups, k, k)
                prim = _weight_primitive(groups, node.attr("dilation"))
            else:
                groups = 1
                shape = (node.attr("out_features"), int(np.prod(shapes[node.inputs[0]])), 1, 1)
                prim = "linear"
            last = node_id == classifier
            w = new_node(prim, shape, preds)
            param_shape = shape if op == "conv" else shape[:2]
            kind = "classifier_weight" if last else "weight"
            targets.append(ParamTarget(f"{prefix}.weight", param_shape, w, kind, groups))
            exit_node = w
            if node.attr("bias"):
                exit_node = new_node("bias", (shape[0], 0, 0, 0), [w])
                kind = "classifier_bias" if last else "bias"
                targets.append(ParamTarget(f"{prefix}.bias", (shape[0],), exit_node, kind))
            exits[node_id] = [exit_node]
        elif op == "bn":
            c = shapes[node_id][0]
            b = new_node("bn", (c, 0, 0, 0), preds)
            targets.append(ParamTarget(f"{prefix}.weight", (c,), b, "bn_weight"))
            targets.append(ParamTarget(f"{prefix}.bias", (c,), b, "bias"))
            exits[node_id] = [b]
        elif op in ("maxpool", "avgpool"):
            k = node.attr("kernel")
            exits[node_id] = [new_node("max_pool" if op == "maxpool" else "avg_pool", (1, 1, k, k), preds)]
        elif op == "adaptive_avgpool":
            size_in, size_out = shapes[node.inputs[0]][1], node.attr("output_size")
            k = max(1, -(-size_in // size_out))  # the largest window torch's adaptive pooling uses
            exits[node_id] = [new_node("avg_pool", (1, 1, k, k), preds)]
        elif op == "global_avgpool":
            exits[node_id] = [new_node("glob_avg", preds=preds)]
        elif op == "mul":
            exits[node_id] = [new_node("cse", preds=preds)]
        elif op == "channel_shuffle":
            exits[node_id] = [new_node("shuffle", preds=preds)]
        elif op == "add":
            exits[node_id] = [new_node("sum", preds=preds)]
        elif op == "concat":
            exits[node_id] = [new_node("concat", preds=preds)]
        else:  # pragma: no cover - every op of the spec is handled above
            raise ValueError(f"graph: unhandled op {op!r}")

    n = len(prims)
    levels = np.zeros(n, dtype=np.int64)
    for src, dst in sorted(real_edges, key=lambda e: e[1]):
        levels[dst] = max(levels[dst], levels[src] + 1)
    edges = _with_virtual_edges(n, real_edges, s_max)
    return ArchGraph(
        spec=spec,
        primitives=np.array([PRIM_INDEX[p] for p in prims], dtype=np.int64),
        shapes=np.array(node_shapes, dtype=np.int64),
        levels=levels,
        edges=edges,
        targets=targets,
    )


def _with_virtual_edges(n: int, real_edges: list[tuple[int, int]], s_max: int) -> np.ndarray:
    """All (u, v, dist) with 1 <= dist(u, v) <= s_max, by repeated boolean matrix products."""
    adjacency = np.zeros((n, n), dtype=np.float32)
    for src, dst in real_edges:
        adjacency[src, dst] = 1.0
    dist = np.zeros((n, n), dtype=np.int64)
    frontier = adjacency.copy()
    for step in range(1, max(1, s_max) + 1):
        new = (frontier > 0) & (dist == 0)
        if not new.any():
            break
        dist[new] = step
        frontier = (frontier @ adjacency > 0).astype(np.float32)
    src, dst = np.nonzero(dist)
    return np.stack([src, dst, dist[src, dst]], axis=1).astype(np.int64)


@dataclass
class SweepSchedule:
    """One sweep direction with the nodes renumbered level by level (docs/ghn.md, "Speed").

    Position ``p`` of the sweep holds node ``order[p]``; ``levels[k] = (a, b, rows, bags,
    weight)`` updates positions ``a:b`` in one step. The sweep keeps a message table with two
    rows per position (``2p``: the real-edge message of that node, ``2p + 1``: its virtual-edge
    message); the messages a level receives are one bag per node of the level: table ``rows``
    starting at ``bags`` (embedding_bag offsets), summed with ``weight`` (1 for real edges,
    1/s for virtual ones). Within a bag, real edges come first, then virtual edges, each in
    edge order. ``rows``, ``bags`` and ``weight`` are None for a level without incoming edges.
    """

    order: torch.Tensor  # (N,) node at each position
    inverse: torch.Tensor  # (N,) position of each node
    levels: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]

    def to(self, device: torch.device | str) -> SweepSchedule:
        def move(t):
            return None if t is None else t.to(device)
        return SweepSchedule(self.order.to(device), self.inverse.to(device),
                             [(a, b, move(r), move(o), move(w)) for a, b, r, o, w in self.levels])


@dataclass
class GraphBatch:
    """Several graphs as one disjoint graph, with a schedule for each sweep direction."""

    graphs: list[ArchGraph]
    primitives: torch.Tensor
    shapes: torch.Tensor
    offsets: list[int]
    forward: SweepSchedule
    backward: SweepSchedule
    graph_index: torch.Tensor  # (N,) which graph each node belongs to

    @classmethod
    def from_graphs(cls, graphs: list[ArchGraph]) -> GraphBatch:
        offsets, total = [], 0
        for g in graphs:
            offsets.append(total)
            total += g.num_nodes
        prims = np.concatenate([g.primitives for g in graphs])
        shapes = np.concatenate([g.shapes for g in graphs])
        levels = np.concatenate([g.levels for g in graphs])
        edges = np.concatenate([g.edges + np.array([off, off, 0]) for g, off in zip(graphs, offsets)])
        graph_index = np.repeat(np.arange(len(graphs)), [g.num_nodes for g in graphs])
        forward = _schedule(levels, edges, reverse=False)
        # backward sweep: messages flow dst->src, levels counted from the sinks
        backward = _schedule(_reverse_levels(levels, edges), edges, reverse=True)
        return cls(graphs, torch.from_numpy(prims), torch.from_numpy(shapes), offsets, forward, backward,
                   torch.from_numpy(graph_index))

    @property
    def num_nodes(self) -> int:
        return len(self.primitives)

    def to(self, device: torch.device | str) -> GraphBatch:
        """Move the index tensors the GNN uses (shapes stay on the CPU for the encoder)."""
        return GraphBatch(self.graphs, self.primitives.to(device), self.shapes, self.offsets,
                          self.forward.to(device), self.backward.to(device), self.graph_index.to(device))


def _schedule(levels: np.ndarray, edges: np.ndarray, reverse: bool) -> SweepSchedule:
    """The sweep over ``levels`` (ascending); messages flow src->dst, or dst->src if ``reverse``.

    Every node's incoming edges come from lower levels, so when a level is updated all
    the messages it receives are final: the result equals a node-by-node sequential sweep.
    """
    n = len(levels)
    src, dst, dist = edges[:, 0], edges[:, 1], edges[:, 2]
    if reverse:
        src, dst = dst, src
    order = np.argsort(levels, kind="stable")
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    virtual = dist > 1
    # edges sorted by receiving position; within it real edges first, each kind in edge order
    key = np.lexsort((np.arange(len(edges)), virtual, position[dst]))
    receiver = position[dst[key]]
    rows = 2 * position[src[key]] + virtual[key]
    weight = np.where(virtual[key], 1.0 / dist[key].astype(np.float32), np.float32(1.0)).astype(np.float32)
    bags = np.searchsorted(receiver, np.arange(n))  # first edge of each position's bag

    node_counts = np.bincount(levels, minlength=int(levels.max()) + 1 if n else 0)
    edge_counts = np.bincount(levels[dst], minlength=len(node_counts)) if len(edges) else np.zeros_like(node_counts)
    node_end, edge_end = np.cumsum(node_counts), np.cumsum(edge_counts)
    rows_t, weight_t = torch.from_numpy(rows), torch.from_numpy(weight)
    plan = []
    for lvl in np.nonzero(node_counts)[0]:
        a, b = int(node_end[lvl] - node_counts[lvl]), int(node_end[lvl])
        e0, e1 = int(edge_end[lvl] - edge_counts[lvl]), int(edge_end[lvl])
        if e1 > e0:
            plan.append((a, b, rows_t[e0:e1], torch.from_numpy(bags[a:b] - e0), weight_t[e0:e1]))
        else:
            plan.append((a, b, None, None, None))
    return SweepSchedule(torch.from_numpy(order), torch.from_numpy(position), plan)


def _reverse_levels(levels: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Longest path to any sink along real edges, so a node comes after all its successors."""
    real = edges[edges[:, 2] == 1]
    height = np.zeros(len(levels), dtype=np.int64)
    if not len(real):
        return height
    # edges by destination level, highest first: each height is final before it is read
    dst_level = levels[real[:, 1]]
    real = real[np.argsort(-dst_level, kind="stable")]
    _, starts = np.unique(-dst_level[np.argsort(-dst_level, kind="stable")], return_index=True)
    for part in np.split(real, starts[1:]):
        np.maximum.at(height, part[:, 0], height[part[:, 1]] + 1)
    return height
