"""GHN-Q's batched predict path (level schedules, message table, crop-class decoder) against a
straightforward reference: a node-by-node GHN-2 sweep and a per-tensor decode loop, written
here independently of ghnq_deploy/ghn/model.py. Also: meta-batch vs one-by-one, inference vs
autograd, gradients, and the sweep schedules' invariants."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ghnq_deploy.arch.sampler import sample_arch
from ghnq_deploy.arch.spec import load_spec, parse_spec
from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
from ghnq_deploy.ghn.graph import GraphBatch, build_graph
from ghnq_deploy.ghn.model import GHNQ, GHNConfig

pytestmark = pytest.mark.usefixtures("torch_one_thread")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ---------------------------------------------------------------------------------- reference
def _reference_gnn(gnn, h: torch.Tensor, graph) -> torch.Tensor:
    """GHN-2's sequential sweeps: nodes one at a time in topological (id) order, then reversed."""
    edges = [tuple(int(v) for v in e) for e in graph.edges]
    for backward in (False, True):
        nodes = range(graph.num_nodes - 1, -1, -1) if backward else range(graph.num_nodes)
        for v in nodes:
            m = h.new_zeros(1, h.shape[1])
            for src, dst, dist in edges:
                if backward:
                    src, dst = dst, src
                if dst != v:
                    continue
                if dist == 1:
                    m = m + gnn.message(h[src:src + 1])
                else:
                    m = m + gnn.virtual_message(h[src:src + 1]) * (1.0 / dist)
            h = torch.cat([h[:v], gnn.gru(m, h[v:v + 1]), h[v + 1:]])
    return h


def _reference_params(ghn: GHNQ, graph, bits: int = 0) -> dict[str, torch.Tensor]:
    """Every target decoded on its own: full (64, 64, kh, kw) block, crop / tile, normalise."""
    cfg = ghn.config
    h = ghn.op_embedding(torch.from_numpy(graph.primitives)) + ghn.shape_encoder(torch.from_numpy(graph.shapes))
    if ghn.bit_embedding is not None:
        h = h + ghn.bit_embedding(torch.tensor([bits]))
    h = ghn.norm(_reference_gnn(ghn.gnn, h, graph))
    k = cfg.max_kernel
    out = {}
    for t in graph.targets:
        x = h[t.node]
        if t.kind in ("weight", "classifier_weight"):
            kh, kw = (t.shape[2], t.shape[3]) if len(t.shape) == 4 else (1, 1)
            z = torch.relu(ghn.dec_spatial(x)).view(cfg.decoder_hid, k, k)
            z = z.repeat(1, math.ceil(kh / k), math.ceil(kw / k))[:, :kh, :kw]
            rows = []
            for a in range(kh):
                rows.append([ghn.dec_channels(z[:, a, b]).view(cfg.max_out, cfg.max_in) for b in range(kw)])
            block = torch.stack([torch.stack(r, -1) for r in rows], -2)  # (O, I, kh, kw)
            if t.kind == "classifier_weight":
                block = ghn.dec_classifier(torch.relu(block[:, :, 0, 0]).t()).t()[:, :, None, None]
            o_idx = [c % block.shape[0] for c in range(t.shape[0])]
            i_idx = [c % block.shape[1] for c in range(t.shape[1])]
            w = block[o_idx][:, i_idx].reshape(t.shape)
            fan_in = math.prod(t.shape[1:])
            beta = 1.0 if len(t.shape) == 4 and t.shape[1] == 1 else 2.0
            w = w / w.pow(2).mean().add(1e-8).sqrt() * math.sqrt(beta / fan_in)
        else:
            row = ghn.dec_1d(x).view(2, cfg.max_out)
            tiled = [c % cfg.max_out for c in range(t.shape[0])]
            if t.kind == "bn_weight":
                w = 2 * torch.sigmoid(row[0][tiled] / 2)
            elif t.kind == "classifier_bias":
                w = torch.tanh(ghn.dec_classifier_bias(torch.relu(row[1])) / 5)
            else:
                w = torch.tanh(row[1][tiled] / 5)
        out[t.name] = w
    return out


# ---------------------------------------------------------------------------------- fixtures
def _wide_spec():
    """Channels around and beyond the decoder's 64 block, kernels beyond its 7x7 map, a tiled
    classifier input, depthwise / dilated / 1x1 convs, biases, BN and a BN-free branch."""
    return parse_spec({"name": "wide", "input_shape": [3, 32, 32], "num_classes": 10, "nodes": [
        {"id": "c1", "op": "conv", "inputs": ["input"], "attributes": {"out_channels": 65, "kernel": 9, "bias": True}},
        {"id": "b1", "op": "bn", "inputs": ["c1"]},
        {"id": "r1", "op": "relu", "inputs": ["b1"]},
        {"id": "dw", "op": "conv", "inputs": ["r1"], "attributes": {"out_channels": 65, "kernel": 3, "groups": 65}},
        {"id": "dil", "op": "conv", "inputs": ["r1"],
         "attributes": {"out_channels": 65, "kernel": 3, "groups": 65, "dilation": 2}},
        {"id": "sum", "op": "add", "inputs": ["dw", "dil"]},
        {"id": "pw", "op": "conv", "inputs": ["sum"], "attributes": {"out_channels": 130, "kernel": 1}},
        {"id": "mp", "op": "maxpool", "inputs": ["pw"]},
        {"id": "c2", "op": "conv", "inputs": ["mp"], "attributes": {"out_channels": 1, "kernel": 3}},
        {"id": "c3", "op": "conv", "inputs": ["mp"], "attributes": {"out_channels": 63, "kernel": 5, "padding": 2}},
        {"id": "cat", "op": "concat", "inputs": ["c2", "c3"]},
        {"id": "g", "op": "global_avgpool", "inputs": ["cat"]},
        {"id": "fc1", "op": "linear", "inputs": ["g"], "attributes": {"out_features": 200, "bias": True}},
        {"id": "r", "op": "relu", "inputs": ["fc1"]},
        {"id": "fc", "op": "linear", "inputs": ["r"], "attributes": {"out_features": 10}},
        {"id": "out", "op": "output", "inputs": ["fc"]},
    ]})


@pytest.fixture(scope="module")
def ghn():
    model, _ = load_ghn_checkpoint("default")
    return model


@pytest.fixture(scope="module")
def graphs():
    specs = [load_spec(EXAMPLES / "resnet20.json"), load_spec(EXAMPLES / "bnfree_cnn.json"), _wide_spec(),
             sample_arch("id-test", 0, 0, space=1), sample_arch("ood-mobilenet", 0, 1)]  # the checkpoint's space
    return [build_graph(s) for s in specs]


def _assert_params_close(a: dict, b: dict, atol: float = 1e-6, rtol: float = 1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------- tests
def test_batched_path_equals_reference(ghn, graphs):
    with torch.no_grad():
        fast = ghn.predict_params(graphs)
        for graph, params in zip(graphs, fast):
            _assert_params_close(params, _reference_params(ghn, graph))


def test_bit_conditioned_path_equals_reference():
    torch.manual_seed(0)
    ghn = GHNQ(GHNConfig(bit_conditioning=True)).eval()
    with torch.no_grad():
        ghn.bit_embedding.weight.normal_()
        graph = build_graph(_wide_spec())
        (fast,) = ghn.predict_params([graph], [3])
        _assert_params_close(fast, _reference_params(ghn, graph, bits=3))


def test_meta_batch_equals_one_by_one(ghn, graphs):
    with torch.no_grad():
        together = ghn.predict_params(graphs)
        for graph, batched in zip(graphs, together):
            (alone,) = ghn.predict_params([graph])
            _assert_params_close(alone, batched)


def test_autograd_and_inference_give_the_same_values(ghn, graphs):
    """Without autograd the decoder crops before its last matmul, with it after (one matmul per
    kernel size): the values agree to float rounding."""
    with torch.no_grad():
        inference = ghn.predict_params(graphs)
    autograd = ghn.predict_params(graphs)
    for a, b in zip(inference, autograd):
        assert all(v.requires_grad for v in b.values())
        _assert_params_close(a, {k: v.detach() for k, v in b.items()})
    # ordinary tensors, one storage each: saving one net's tensors saves nothing else
    values = list(inference[0].values())
    assert not any(v.is_inference() for v in values)
    assert len({v.untyped_storage().data_ptr() for v in values}) == len(values)
    assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in values)


def test_gradients_equal_reference(ghn, graphs):
    chosen = [graphs[0], graphs[2]]
    generator = torch.Generator().manual_seed(0)
    probes = [{t.name: torch.randn(t.shape, generator=generator) for t in g.targets} for g in chosen]

    def loss_of(params_list):
        return sum((p[name] * probe[name]).sum() + p[name].pow(2).sum()
                   for p, probe in zip(params_list, probes) for name in p)

    ghn.zero_grad()
    loss_of(ghn.predict_params(chosen)).backward()
    fast = {k: v.grad.clone() for k, v in ghn.named_parameters() if v.grad is not None}
    ghn.zero_grad()
    loss_of([_reference_params(ghn, g) for g in chosen]).backward()
    slow = {k: v.grad.clone() for k, v in ghn.named_parameters() if v.grad is not None}
    ghn.zero_grad()
    assert fast.keys() == slow.keys()
    for name in fast:
        scale = slow[name].abs().max()
        assert (fast[name] - slow[name]).abs().max() <= 1e-5 * scale, name


def test_sweep_schedules_respect_every_edge(graphs):
    batch = GraphBatch.from_graphs(graphs)
    edges = np.concatenate([g.edges + np.array([off, off, 0]) for g, off in zip(graphs, batch.offsets)])
    for schedule, reverse in ((batch.forward, False), (batch.backward, True)):
        position = schedule.inverse.numpy()
        assert np.array_equal(schedule.order.numpy()[position], np.arange(batch.num_nodes))
        level_of = np.empty(batch.num_nodes, dtype=np.int64)
        received = []
        for k, (a, b, rows, bags, weight) in enumerate(schedule.levels):
            level_of[schedule.order.numpy()[a:b]] = k
            if rows is None:
                continue
            ends = np.append(bags.numpy()[1:], len(rows))
            for p, (start, end) in enumerate(zip(bags.numpy(), ends)):
                for row, w in zip(rows.numpy()[start:end], weight.numpy()[start:end]):
                    received.append((row // 2, a + p, row % 2, float(w)))
        src, dst = (edges[:, 1], edges[:, 0]) if reverse else (edges[:, 0], edges[:, 1])
        # every edge delivered once, to the right node, with its weight, from an earlier level
        expected = sorted((int(position[s]), int(position[d]), int(dist > 1), 1.0 if dist == 1 else float(np.float32(1) / np.float32(dist)))
                          for s, d, dist in zip(src, dst, edges[:, 2]))
        assert sorted(received) == expected
        assert (level_of[src] < level_of[dst]).all()


def test_decode_plan_groups_each_kernel_size_once(graphs):
    from ghnq_deploy.ghn.model import _DecodePlan

    batch = GraphBatch.from_graphs(graphs)
    plan = _DecodePlan.build(graphs, batch.offsets, GHNConfig())
    kernels = [(kh, kw) for kh, kw, *_ in plan.groups]
    assert len(kernels) == len(set(kernels))
    covered = [c for *_, classes in plan.groups for c in classes]
    assert [c.start for c in covered] == [0] + [c.end for c in covered[:-1]]
    assert covered[-1].end == sum(len([t for t in g.targets if "weight" in t.kind and t.kind != "bn_weight"])
                                  for g in graphs)
    assert {c.copy_corner for c in covered} == {True, False}  # both ways of cropping are exercised


def test_reverse_levels_match_the_sequential_definition(graphs):
    from ghnq_deploy.ghn.graph import _reverse_levels

    for graph in graphs:
        height = np.zeros(graph.num_nodes, dtype=np.int64)
        real = graph.edges[graph.edges[:, 2] == 1]
        for _ in range(graph.num_nodes):  # relax to the fixed point: longest path to a sink
            for src, dst, _dist in real:
                height[src] = max(height[src], height[dst] + 1)
        assert np.array_equal(_reverse_levels(graph.levels, graph.edges), height)
