"""GHN-Q: a gated graph network that predicts every parameter of a CNN in one forward pass.

Design (docs/ghn.md): node embedding = op-type embedding + shape encoding (+ an optional
bit-width embedding); one forward and one backward sweep of a GRU-gated graph network,
a level at a time; LayerNorm; decoders produce a fixed maximum block (O, I, k, k) that is
cropped / tiled channel-wise to each parameter's exact shape, then normalised per op type.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ghnq_deploy.ghn.graph import PRIMITIVES, ArchGraph, GraphBatch, LevelPlan

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
    """One forward and one backward sweep; a level of nodes is updated in one batched step."""

    def __init__(self, hid: int):
        super().__init__()
        self.message = nn.Sequential(nn.Linear(hid, hid // 2), nn.ReLU(), nn.Linear(hid // 2, hid), nn.ReLU())
        self.virtual_message = nn.Sequential(nn.Linear(hid, hid // 2), nn.ReLU(), nn.Linear(hid // 2, hid), nn.ReLU())
        self.gru = nn.GRUCell(hid, hid)

    def _sweep(self, h: torch.Tensor, plans: list[LevelPlan]) -> torch.Tensor:
        for plan in plans:
            m = h.new_zeros(len(plan.nodes), h.shape[1])
            if len(plan.real_src):
                m = m.index_add(0, plan.real_pos, self.message(h[plan.real_src]))
            if len(plan.virt_src):
                m = m.index_add(0, plan.virt_pos, self.virtual_message(h[plan.virt_src]) * plan.virt_weight)
            h = h.index_copy(0, plan.nodes, self.gru(m, h[plan.nodes]))
        return h

    def forward(self, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        h = self._sweep(h, batch.forward_plan)
        return self._sweep(h, batch.backward_plan)


class GHNQ(nn.Module):
    def __init__(self, config: GHNConfig | None = None):
        super().__init__()
        self.config = cfg = config or GHNConfig()
        self.op_embedding = nn.Embedding(len(PRIMITIVES), cfg.hid)
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
    def _decode_blocks(self, h: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
        """(n, hid) -> (n, O, I, kh, kw), the top-left kh x kw positions of the spatial map."""
        cfg = self.config
        k = cfg.max_kernel
        z = torch.relu(self.dec_spatial(h)).view(len(h), cfg.decoder_hid, k, k)
        if kh > k or kw > k:  # tile the map for kernels larger than the decoder's
            z = z.repeat(1, 1, math.ceil(kh / k), math.ceil(kw / k))
        z = z[:, :, :kh, :kw].permute(0, 2, 3, 1)  # (n, kh, kw, dh)
        y = self.dec_channels(z).view(len(h), kh, kw, cfg.max_out, cfg.max_in)
        return y.permute(0, 3, 4, 1, 2)

    def predict_params(self, graphs: list[ArchGraph], bits: list[int] | None = None) -> list[dict[str, torch.Tensor]]:
        """Every parameter of every graph's net, as state_dict-style dicts (differentiable)."""
        device = self.op_embedding.weight.device
        batch = GraphBatch.from_graphs(graphs)
        if device.type != "cpu":
            batch = batch.to(device)
        h = self.embed(batch, bits)
        cfg = self.config
        out: list[dict[str, torch.Tensor]] = [{} for _ in graphs]
        # group >=2-D weights by kernel size so each group is one decoder call
        groups: dict[tuple[int, int], list[tuple[int, object]]] = {}
        vectors: list[tuple[int, object]] = []
        for g, (graph, offset) in enumerate(zip(graphs, batch.offsets)):
            for t in graph.targets:
                if t.kind in ("weight", "classifier_weight"):
                    kh, kw = (t.shape[2], t.shape[3]) if len(t.shape) == 4 else (1, 1)
                    groups.setdefault((kh, kw), []).append((g, t))
                else:
                    vectors.append((g, t))
        for (kh, kw), items in groups.items():
            idx = torch.tensor([batch.offsets[g] + t.node for g, t in items], device=device)
            blocks = self._decode_blocks(h[idx], kh, kw)
            for block, (g, t) in zip(blocks, items):
                if t.kind == "classifier_weight":
                    # (O, I) -> classes along the output dimension, as GHN-2's classifier head
                    block = self.dec_classifier(torch.relu(block[:, :, 0, 0]).t()).t()  # (classes, I)
                    block = block[:, :, None, None]
                out[g][t.name] = _normalize_weight(_tile(block, t.shape), t)
        if vectors:
            idx = torch.tensor([batch.offsets[g] + t.node for g, t in vectors], device=device)
            rows = self.dec_1d(h[idx]).view(len(vectors), 2, cfg.max_out)
            for row, (g, t) in zip(rows, vectors):
                if t.kind == "bn_weight":
                    out[g][t.name] = 2 * torch.sigmoid(_tile_vector(row[0], t.shape[0]) / 2)
                elif t.kind == "classifier_bias":
                    out[g][t.name] = torch.tanh(self.dec_classifier_bias(torch.relu(row[1])) / 5)
                else:
                    out[g][t.name] = torch.tanh(_tile_vector(row[1], t.shape[0]) / 5)
        return out

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, **meta) -> dict:
        return {"format": CHECKPOINT_FORMAT, "version": 1, "config": asdict(self.config),
                "state_dict": self.state_dict(), "meta": meta}


def _tile(block: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Crop / repeat the (O, I, kh, kw) block channel-wise to the target shape (GHN-2 tiling)."""
    o, i = shape[0], shape[1]
    if o != block.shape[0]:
        block = block[torch.arange(o, device=block.device) % block.shape[0]]
    if i != block.shape[1]:
        block = block[:, torch.arange(i, device=block.device) % block.shape[1]]
    return block.reshape(shape)


def _tile_vector(row: torch.Tensor, n: int) -> torch.Tensor:
    return row if n == len(row) else row[torch.arange(n, device=row.device) % len(row)]


def _normalize_weight(w: torch.Tensor, target) -> torch.Tensor:
    """He-scale the weight: w / rms(w) * sqrt(beta / fan_in) (differentiable).

    beta = 1 (linear gain) for depthwise kernels, 2 (ReLU gain) otherwise, as GHN-2.
    Dividing by the tensor's RMS (not in GHN-2, which relies on its init) pins the
    scale so predicted nets start at He-init variance whatever the decoder outputs.
    """
    fan_in = math.prod(w.shape[1:])
    depthwise = w.dim() == 4 and w.shape[1] == 1
    beta = 1.0 if depthwise else 2.0
    rms = w.pow(2).mean().add(1e-8).sqrt()
    return w / rms * math.sqrt(beta / fan_in)


def checkpoint_sha256(ckpt: dict) -> str:
    buffer = io.BytesIO()
    torch.save(ckpt["state_dict"], buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()
