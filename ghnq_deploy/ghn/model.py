"""GHN-Q: a gated graph network that predicts every parameter of a CNN in one forward pass.

Design (docs/ghn.md): node embedding = op-type embedding + shape encoding (+ an optional
bit-width embedding); one forward and one backward sweep of a GRU-gated graph network,
a level at a time; LayerNorm; decoders produce a fixed maximum block (O, I, k, k) that is
cropped / tiled channel-wise to each parameter's exact shape, then normalised per op type.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ghnq_deploy.ghn.graph import LEGACY_NUM_PRIMITIVES, PRIMITIVES, ArchGraph, GraphBatch, SweepSchedule

BIT_OPTIONS = ("fp32", "w8a8", "w4a8", "w4a4", "w2a2")  # index 0 = float
CHECKPOINT_FORMAT = "ghnq-deploy/ghn-q"


@dataclass
class GHNConfig:
    hid: int = 32
    max_out: int = 64
    max_in: int = 64
    max_kernel: int = 7
    decoder_hid: int = 64
    decoder_hid2: int = 256
    s_max: int = 10
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (3, 32, 32)
    dataset: str = "cifar10"
    bit_conditioning: bool = False
    num_primitives: int = len(PRIMITIVES)  # op types this GHN embeds: graph.PRIMITIVES[:num_primitives]
    # Normalise each output channel of a predicted weight to zero mean and He scale (scaled weight
    # standardisation) instead of the whole tensor to He scale: BN-free nets then do not collapse
    # to their channel means (docs/ghn.md, "BN-free nets"). Off for checkpoints saved without it.
    weight_standardization: bool = False

    @classmethod
    def from_checkpoint(cls, data: dict) -> GHNConfig:
        """A saved config; one saved before ``num_primitives`` existed embeds the 12 original types,
        one saved before ``weight_standardization`` existed normalises whole tensors."""
        return cls.from_dict({"num_primitives": LEGACY_NUM_PRIMITIVES, "weight_standardization": False, **data})

    @classmethod
    def from_dict(cls, data: dict) -> GHNConfig:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        if "input_shape" in values:
            values["input_shape"] = tuple(values["input_shape"])
        return cls(**values)


def _channel_vocab(num_classes: int) -> np.ndarray:
    values = {0, 1, 3, num_classes}
    values.update(range(8, 64, 8))
    values.update(range(64, 4096, 16))
    values.update(range(4096, 8193, 32))
    return np.array(sorted(values), dtype=np.int64)


_SPATIAL_VOCAB = np.array([0, 1, 3, 5, 7, 9, 11, 14, 16], dtype=np.int64)


def _nearest(vocab: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of the nearest vocabulary value (ties to the smaller); 0 stays 0 ("no shape")."""
    values = np.minimum(values, vocab[-1])
    right = np.clip(np.searchsorted(vocab, values), 1, len(vocab) - 1)
    left = right - 1
    choose_right = (vocab[right] - values) < (values - vocab[left])
    index = np.where(choose_right, right, left)
    return np.where(values == 0, 0, np.maximum(index, 1))


class ShapeEncoder(nn.Module):
    """Four lookups (c_out, c_in, k_h, k_w), each hid/4 wide, concatenated."""

    def __init__(self, hid: int, num_classes: int):
        super().__init__()
        self.channel_vocab = _channel_vocab(num_classes)  # numpy: lookups happen on the CPU
        self.channels = nn.Embedding(len(self.channel_vocab), hid // 4)
        self.spatial = nn.Embedding(len(_SPATIAL_VOCAB), hid // 4)

    def forward(self, shapes: torch.Tensor) -> torch.Tensor:
        s = shapes.numpy()
        ch = torch.from_numpy(_nearest(self.channel_vocab, s[:, :2]))
        sp = torch.from_numpy(_nearest(_SPATIAL_VOCAB, s[:, 2:]))
        device = self.channels.weight.device
        return torch.cat([self.channels(ch.to(device)).flatten(1), self.spatial(sp.to(device)).flatten(1)], dim=1)


class GatedGNN(nn.Module):
    """One forward and one backward sweep; a level of nodes is updated in one batched step.

    A node's outgoing messages depend only on its own state, so they are computed once, right
    after the node's level is updated (both MLPs in one pair of matmuls), and kept in a table
    that later levels read with one weighted embedding_bag (docs/ghn.md, "Speed").
    """

    def __init__(self, hid: int):
        super().__init__()
        self.message = nn.Sequential(nn.Linear(hid, hid // 2), nn.ReLU(), nn.Linear(hid // 2, hid), nn.ReLU())
        self.virtual_message = nn.Sequential(nn.Linear(hid, hid // 2), nn.ReLU(), nn.Linear(hid // 2, hid), nn.ReLU())
        self.gru = nn.GRUCell(hid, hid)

    def _message_weights(self) -> tuple[torch.Tensor, ...]:
        """Both message MLPs as one: first layers stacked, second layers block-diagonal.

        Its output row is [real-edge message | virtual-edge message] of a node; the weight
        matrices come transposed, for addmm.
        """
        r1, r2 = self.message[0], self.message[2]
        v1, v2 = self.virtual_message[0], self.virtual_message[2]
        return (torch.cat([r1.weight, v1.weight]).t(), torch.cat([r1.bias, v1.bias]),
                torch.block_diag(r2.weight, v2.weight).t(), torch.cat([r2.bias, v2.bias]))

    def _sweep(self, h: torch.Tensor, schedule: SweepSchedule, mlp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``h`` and the result are in the schedule's position order."""
        w1, b1, w2, b2 = mlp
        gru = self.gru
        hid = h.shape[1]
        table = h.new_zeros(2 * len(h), hid)  # rows 2p, 2p + 1: real / virtual message of position p
        out = []
        last = len(schedule.levels) - 1
        parts = h.split([b - a for a, b, *_ in schedule.levels])
        for k, ((a, b, rows, bags, weight), old) in enumerate(zip(schedule.levels, parts)):
            if rows is None:
                m = h.new_zeros(b - a, hid)
            else:
                m = torch.embedding_bag(table, rows, bags, False, 0, False, weight, False)[0]
            new = torch.gru_cell(m, old, gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh)
            out.append(new)
            if k < last:
                message = torch.addmm(b2, torch.addmm(b1, new, w1).relu_(), w2).relu_()
                table.narrow(0, 2 * a, 2 * (b - a)).copy_(message.view(-1, hid))
        return torch.cat(out)

    def forward(self, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        mlp = self._message_weights()
        fwd, bwd = batch.forward, batch.backward
        h = self._sweep(h[fwd.order], fwd, mlp)  # forward-sweep positions
        h = self._sweep(h[fwd.inverse[bwd.order]], bwd, mlp)  # backward-sweep positions
        return h[bwd.inverse]


class GHNQ(nn.Module):
    def __init__(self, config: GHNConfig | None = None):
        super().__init__()
        self.config = cfg = config or GHNConfig()
        self.op_embedding = nn.Embedding(cfg.num_primitives, cfg.hid)
        self.shape_encoder = ShapeEncoder(cfg.hid, cfg.num_classes)
        self.bit_embedding = nn.Embedding(len(BIT_OPTIONS), cfg.hid) if cfg.bit_conditioning else None
        if self.bit_embedding is not None:
            nn.init.zeros_(self.bit_embedding.weight)
        self.gnn = GatedGNN(cfg.hid)
        self.norm = nn.LayerNorm(cfg.hid)
        k = cfg.max_kernel
        self.dec_spatial = nn.Linear(cfg.hid, cfg.decoder_hid * k * k)
        self.dec_channels = nn.Sequential(
            nn.Linear(cfg.decoder_hid, cfg.decoder_hid2), nn.ReLU(),
            nn.Linear(cfg.decoder_hid2, cfg.max_out * cfg.max_in),
        )
        self.dec_classifier = nn.Linear(cfg.max_out, cfg.num_classes)
        self.dec_1d = nn.Sequential(nn.Linear(cfg.hid, 64), nn.ReLU(), nn.Linear(64, 2 * cfg.max_out))
        self.dec_classifier_bias = nn.Linear(cfg.max_out, cfg.num_classes)

    # ------------------------------------------------------------------ embeddings
    def embed(self, batch: GraphBatch, bits: list[int] | None = None) -> torch.Tensor:
        """Node embeddings after message passing and LayerNorm, (N, hid)."""
        h = self.op_embedding(batch.primitives) + self.shape_encoder(batch.shapes)
        if self.bit_embedding is not None:
            per_graph = torch.tensor(bits if bits is not None else [0] * len(batch.graphs), device=h.device)
            h = h + self.bit_embedding(per_graph[batch.graph_index])
        return self.norm(self.gnn(h, batch))

    # ------------------------------------------------------------------ decoders
    def predict_params(self, graphs: list[ArchGraph], bits: list[int] | None = None) -> list[dict[str, torch.Tensor]]:
        """Every parameter of every graph's net, as state_dict-style dicts (differentiable).

        Every returned tensor has its own storage, so saving one net never saves another's.
        """
        device = self.op_embedding.weight.device
        batch = GraphBatch.from_graphs(graphs)
        if device.type != "cpu":
            batch = batch.to(device)
        plan = _DecodePlan.build(graphs, batch.offsets, self.config)

        def index(array: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(array)
            return t if device.type == "cpu" else t.to(device)

        # Without autograd, run in inference mode (less overhead per op); the per-tensor copies
        # at the end are made outside it, so callers get ordinary tensors.
        # (kind, values, sizes of its tensors or the crop class that tiles them)
        chunks: list[tuple[str, torch.Tensor, list[int] | _CropClass]] = []
        with torch.inference_mode(not torch.is_grad_enabled()):
            h = self.embed(batch, bits)
            if plan.groups:
                chunks += [("weight", values, crop) for values, crop in self._decode_weights(h, plan, index)]
            if len(plan.vector_nodes):
                rows = self.dec_1d(h[index(plan.vector_nodes)])  # (n, 2 * max_out): a weight row, a bias row
                flat = rows.reshape(-1)
                if plan.bn_numel:  # BatchNorm gamma = 2 sigmoid(p / 2), channels tiled
                    chunks.append(("bn_weight", 2 * torch.sigmoid(flat[index(plan.bn_gather)] / 2), plan.bn_numel))
                if plan.bias_numel:  # every bias = tanh(p / 5)
                    chunks.append(("bias", torch.tanh(flat[index(plan.bias_gather)] / 5), plan.bias_numel))
                if len(plan.classifier_bias_rows):
                    head = rows[index(plan.classifier_bias_rows), self.config.max_out:]
                    cls = torch.tanh(self.dec_classifier_bias(torch.relu(head)) / 5)
                    chunks.append(("classifier_bias", cls.reshape(-1), [cls.shape[1]] * len(cls)))
        tensors: dict[str, list[torch.Tensor]] = {}
        for kind, values, sizes in chunks:
            if isinstance(sizes, _CropClass):
                tensors.setdefault(kind, []).extend(sizes.weights(values))
            else:
                tensors.setdefault(kind, []).extend(torch.split_with_sizes_copy(values, sizes))
        out: list[dict[str, torch.Tensor]] = [{} for _ in graphs]
        for g, name, kind, i, shape in plan.slots:
            out[g][name] = tensors[kind][i].view(shape)
        return out

    def _decode_weights(self, h: torch.Tensor, plan: _DecodePlan, index) -> list[tuple[torch.Tensor, _CropClass]]:
        """Every >=2-D weight of the plan, in the plan's decoding order: (blocks, crop class) by class.

        The conv decoder gives a (max_out, max_in, kh, kw) block per weight. It is computed one
        crop class at a time (with autograd: one kernel size at a time), only the block rows the
        class uses, cropped to its (rows, cols) corner and normalised; ``_CropClass.weights``
        then tiles each block channel-wise to its weight's shape (outside inference mode).
        """
        cfg = self.config
        k, mo, mi = cfg.max_kernel, cfg.max_out, cfg.max_in
        z_all = torch.relu(self.dec_spatial(h[index(plan.weight_nodes)])).view(-1, cfg.decoder_hid, k, k)
        first, last = self.dec_channels[0], self.dec_channels[2]
        last_w, last_b = last.weight.view(mo, mi, -1), last.bias.view(mo, mi)
        acc = torch.float32 if h.device.type == "mps" else torch.float64  # for sums of squares
        # Without autograd each crop class decodes only what it uses; with autograd, slicing the
        # last layer's weights per class would cost a zero-filled weight-sized gradient per class.
        autograd = torch.is_grad_enabled()
        out = []
        # torch.split, not slicing, for the parts: its gradient is one op, not a zero-filled
        # gradient of the whole tensor for every part
        z_groups = z_all.split([g1 - g0 for _, _, g0, g1, _ in plan.groups])
        for (kh, kw, g0, g1, classes), z in zip(plan.groups, z_groups):
            if kh > k or kw > k:  # tile the map for kernels larger than the decoder's
                z = z.repeat(1, 1, math.ceil(kh / k), math.ceil(kw / k))
            z = torch.relu(first(z[:, :, :kh, :kw].permute(0, 2, 3, 1)))  # (n, kh, kw, decoder_hid2)
            sizes = [c.end - c.start for c in classes]
            if autograd:  # one matmul for the kernel size: the weights' gradient is one matmul too
                rows = max(c.rows for c in classes)
                parts = F.linear(z, last.weight[:rows * mi], last.bias[:rows * mi]).view(g1 - g0, kh * kw, rows, mi)
            else:
                parts = z
            for c, part in zip(classes, parts.split(sizes)):
                o, i, n = c.rows, c.cols, c.end - c.start
                if autograd:
                    y = part[:, :, :o, :i]
                elif c.copy_corner:  # the (o, i) corner of the last layer's weights, copied
                    y = F.linear(part, last_w[:o, :i].reshape(o * i, -1), last_b[:o, :i].reshape(-1)).view(n, kh * kw, o, i)
                else:  # block rows 0..o, a prefix of the last layer's rows (no copy), then the columns
                    y = F.linear(part, last.weight[:o * mi], last.bias[:o * mi]).view(n, kh * kw, o, mi)[..., :i]
                if c.classifier:
                    # the (O, I) block -> classes along the output dimension, as GHN-2's classifier head
                    y = self.dec_classifier(torch.relu(y[:, 0]).transpose(1, 2)).transpose(1, 2)
                else:
                    y = y.permute(0, 2, 3, 1)
                y = y.contiguous().view(n, -1)  # a row per weight: its block in (O, I, kh, kw) order
                if cfg.weight_standardization:
                    y = _standardize(y, i * kh * kw, None if c.repeats is None else index(c.repeats), index(c.scale), acc)
                    y = y.view(-1)
                else:
                    # He-scale: w / rms(w) * sqrt(beta / fan_in), rms over the tiled weight; tiling
                    # only repeats block elements, c.repeats times each. Sums of squares in float64:
                    # the gradient through rms is sensitive to their rounding.
                    if c.repeats is None:
                        square = torch.linalg.vector_norm(y, dim=1, keepdim=True, dtype=acc).square()
                    else:
                        square = (y.square() * index(c.repeats)).sum(1, keepdim=True, dtype=acc)
                    rms = (square / index(c.numel)).add(1e-8).sqrt().to(y.dtype)
                    y = (y / rms * index(c.scale)).view(-1)
                out.append((y, c))
        return out

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, **meta) -> dict:
        return {"format": CHECKPOINT_FORMAT, "version": 1, "config": asdict(self.config),
                "state_dict": self.state_dict(), "meta": meta}


def _standardize(y: torch.Tensor, row: int, repeats: torch.Tensor | None, scale: torch.Tensor,
                 acc: torch.dtype) -> torch.Tensor:
    """Scaled weight standardisation of blocks ``y`` (n, O * row): per output channel, zero mean and
    variance beta / fan_in over the *tiled* weight's fan-in.

    Tiling repeats block elements ``repeats`` times each (None: no tiling); within an output
    channel the row's repeat factor is common to all its elements, so weighting by ``repeats``
    gives the tiled channel's mean and variance. Sums in float64, like the RMS path. A weight
    with a fan-in of one element (a per-channel scale: centring would zero it) is normalised by
    its whole RMS, as without the option.
    """
    n = y.shape[0]
    if row == 1:
        if repeats is None:
            square = y.square().mean(1, keepdim=True, dtype=acc)
        else:
            square = (y.square() * repeats).sum(1, keepdim=True, dtype=acc) / repeats.sum(1, keepdim=True, dtype=acc)
        return y / square.add(1e-8).sqrt().to(y.dtype) * scale
    rows = y.view(n, -1, row)
    if repeats is None:
        mean = rows.mean(2, keepdim=True, dtype=acc)
        centred = rows - mean.to(y.dtype)
        var = centred.square().mean(2, keepdim=True, dtype=acc)
    else:
        r = repeats.view(n, -1, row)
        count = r.sum(2, keepdim=True, dtype=acc)
        mean = (rows * r).sum(2, keepdim=True, dtype=acc) / count
        centred = rows - mean.to(y.dtype)
        var = (centred.square() * r).sum(2, keepdim=True, dtype=acc) / count
    std = var.add(1e-8).sqrt().to(y.dtype)
    return (centred / std * scale.view(n, 1, 1)).reshape(n, -1)


@functools.lru_cache(maxsize=4096)
def _repeat_counts(shape: tuple[int, ...], rows: int, cols: int) -> np.ndarray:
    """How often each element of a (rows, cols, kh, kw) block occurs in a weight of ``shape``.

    Channels are tiled (GHN-2): output channel c reads block row c mod rows, input channels
    likewise; a 2-D weight is a (O, I, 1, 1) one. Depends only on shapes, so it is cached.
    """
    spatial = shape[2] * shape[3] if len(shape) == 4 else 1
    counts = np.repeat(np.outer(np.bincount(np.arange(shape[0]) % rows, minlength=rows),
                                np.bincount(np.arange(shape[1]) % cols, minlength=cols)).reshape(-1),
                       spatial).astype(np.float32)
    counts.flags.writeable = False
    return counts


def _tile(block: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A (rows, cols, spatial) block tiled channel-wise to ``shape``, in a storage of its own size."""
    rows, cols = block.shape[0], block.shape[1]
    tiled = block.repeat(-(-shape[0] // rows), -(-shape[1] // cols), 1)
    if tiled.shape[0] != shape[0] or tiled.shape[1] != shape[1]:
        tiled = tiled[:shape[0], :shape[1]].clone(memory_format=torch.contiguous_format)
    return tiled.view(shape)


@dataclass
class _CropClass:
    """Weights ``start:end`` (decoding order) that use the same (rows, cols) corner of the block.

    A class's normalised decoder output has a row per weight: its (rows, cols, kh, kw) block, a
    classifier's (classes, cols) block after the classifier head. ``tiled`` (None when no weight
    is wider than its block) says which weights tile their block; ``repeats`` then counts how
    often each block element occurs in its weight. ``numel`` and ``scale`` (sqrt(beta / fan_in))
    are (n, 1).
    """

    start: int
    end: int
    rows: int  # decoder rows used (max_out for a classifier, whose block then has `classes` rows)
    cols: int
    classifier: bool
    copy_corner: bool  # decode from a copy of the weights' (rows, cols) corner, else all columns
    sizes: list[int]
    numel: np.ndarray
    scale: np.ndarray
    shapes: list[tuple[int, ...]]
    block_rows: int
    tiled: list[bool] | None = None
    repeats: np.ndarray | None = None

    @classmethod
    def build(cls, start: int, shapes: list[tuple[int, ...]], rows: int, cols: int, classifier: bool,
              classes: int, max_in: int) -> _CropClass:
        block_rows = classes if classifier else rows
        spatial = shapes[0][2] * shapes[0][3] if len(shapes[0]) == 4 else 1
        sizes = [math.prod(shape) for shape in shapes]
        # beta = 1 (linear gain) for depthwise kernels, 2 (ReLU gain) otherwise, as GHN-2
        betas = [1.0 if len(shape) == 4 and shape[1] == 1 else 2.0 for shape in shapes]
        scale = [math.sqrt(beta / (size // shape[0])) for beta, size, shape in zip(betas, sizes, shapes)]
        # Copying the weights' corner costs rows * cols * hid2 floats; decoding all max_in columns
        # instead costs n * kh * kw * rows * (max_in - cols) * hid2 more multiply-adds. Measured on
        # CPU, a copied float (a fresh buffer) costs about as much as 64 multiply-adds.
        copy_corner = len(shapes) * spatial * (max_in - cols) > 64 * cols
        crop = cls(start, start + len(shapes), rows, cols, classifier, copy_corner, sizes,
                   np.array(sizes, dtype=np.float32)[:, None], np.array(scale, dtype=np.float32)[:, None],
                   [tuple(shape) for shape in shapes], block_rows)
        tiled = [shape[0] != block_rows or shape[1] != cols for shape in shapes]
        if any(tiled):
            crop.tiled = tiled
            crop.repeats = np.stack([_repeat_counts(shape, block_rows, cols) for shape in crop.shapes])
        return crop

    def weights(self, values: torch.Tensor) -> list[torch.Tensor]:
        """The class's weights, each in a storage of its own, from its normalised blocks ``values``."""
        if self.tiled is None:
            return list(torch.split_with_sizes_copy(values, self.sizes))
        blocks = values.view(self.end - self.start, self.block_rows, self.cols, -1)
        return [_tile(block, shape) if tiled else block.reshape(shape).clone()
                for block, shape, tiled in zip(blocks, self.shapes, self.tiled)]


@dataclass
class _DecodePlan:
    """Index arithmetic (numpy) that lets one meta-batch's targets decode in a few batched ops.

    Weights are decoded sorted by (kh, kw, classifier, rows, cols): ``groups`` holds, per kernel
    size, the range of weights (rows of ``weight_nodes``) and its crop classes. Vector targets
    read rows of the 1-D decoder, whose inputs are ``vector_nodes``. ``slots`` says where each
    (graph, name) finds its tensor, in the graphs' target order.
    """

    weight_nodes: np.ndarray
    groups: list[tuple[int, int, int, int, list[_CropClass]]]
    vector_nodes: np.ndarray
    bn_gather: np.ndarray
    bn_numel: list[int]
    bias_gather: np.ndarray
    bias_numel: list[int]
    classifier_bias_rows: np.ndarray
    slots: list[tuple[int, str, str, int, tuple[int, ...]]]

    @classmethod
    def build(cls, graphs: list[ArchGraph], offsets: list[int], cfg: GHNConfig) -> _DecodePlan:
        mo, mi, width = cfg.max_out, cfg.max_in, 2 * cfg.max_out
        weights, slots = [], []
        vector_row: dict[int, int] = {}
        bn_gather, bn_numel, bias_gather, bias_numel, cls_rows = [], [], [], [], []
        for g, (graph, offset) in enumerate(zip(graphs, offsets)):
            for t in graph.targets:
                node = offset + t.node
                if t.kind in ("weight", "classifier_weight"):
                    classifier = t.kind == "classifier_weight"
                    if classifier and len(t.shape) != 2:
                        raise ValueError(f"{t.name}: a classifier weight must be 2-D, got {t.shape}")
                    kh, kw = (t.shape[2], t.shape[3]) if len(t.shape) == 4 else (1, 1)
                    key = (kh, kw, classifier, mo if classifier else min(t.shape[0], mo), min(t.shape[1], mi))
                    slots.append((g, t.name, "weight", len(weights), t.shape))
                    weights.append((key, len(weights), node, tuple(t.shape)))
                    continue
                row = vector_row.setdefault(node, len(vector_row))
                if t.kind == "classifier_bias":
                    slots.append((g, t.name, "classifier_bias", len(cls_rows), (-1,)))
                    cls_rows.append(row)
                    continue
                gamma = t.kind == "bn_weight"
                gather, numel = (bn_gather, bn_numel) if gamma else (bias_gather, bias_numel)
                slots.append((g, t.name, "bn_weight" if gamma else "bias", len(numel), (t.shape[0],)))
                gather.append(row * width + (0 if gamma else mo) + np.arange(t.shape[0]) % mo)
                numel.append(t.shape[0])

        weights.sort()  # by (kh, kw, classifier, rows, cols), then target order
        rank = np.empty(len(weights), dtype=np.int64)
        rank[[w[1] for w in weights]] = np.arange(len(weights))
        slots = [(g, name, src, int(rank[j]) if src == "weight" else j, shape) for g, name, src, j, shape in slots]
        groups: list = []
        start = 0
        for (kh, kw, classifier, rows, cols), members in itertools.groupby(weights, lambda w: w[0]):
            shapes = [w[3] for w in members]
            crop = _CropClass.build(start, shapes, rows, cols, classifier, cfg.num_classes, mi)
            if groups and groups[-1][:2] == [kh, kw]:
                groups[-1][3] = crop.end
                groups[-1][4].append(crop)
            else:
                groups.append([kh, kw, start, crop.end, [crop]])
            start = crop.end
        empty = np.zeros(0, dtype=np.int64)
        return cls(
            weight_nodes=np.array([w[2] for w in weights], dtype=np.int64),
            groups=[tuple(group) for group in groups],
            vector_nodes=np.array(list(vector_row), dtype=np.int64),
            bn_gather=np.concatenate(bn_gather) if bn_gather else empty,
            bn_numel=bn_numel,
            bias_gather=np.concatenate(bias_gather) if bias_gather else empty,
            bias_numel=bias_numel,
            classifier_bias_rows=np.array(cls_rows, dtype=np.int64),
            slots=slots,
        )


def checkpoint_sha256(ckpt: dict) -> str:
    buffer = io.BytesIO()
    torch.save(ckpt["state_dict"], buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()
