"""GHN-Q: graph construction, decoding to every shape, normalisation, determinism, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from ghnq_deploy.arch.builder import build_model
from ghnq_deploy.arch.sampler import sample_split
from ghnq_deploy.arch.spec import ArchError, parse_spec
from ghnq_deploy.ghn.checkpoint import CheckpointError, load_ghn_checkpoint
from ghnq_deploy.ghn.graph import PRIM_INDEX, build_graph
from ghnq_deploy.ghn.model import GHNQ, GHNConfig
from ghnq_deploy.ghn.predict import predict
from ghnq_deploy.io import atomic_torch_save

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _spec(nodes, name="edge", num_classes=10, input_shape=(3, 32, 32)):
    return parse_spec({"name": name, "input_shape": list(input_shape), "num_classes": num_classes, "nodes": nodes})


def _edge_case_spec():
    """Every op, channel counts around the decoder's 64 block, kernels beyond its 7x7 map."""
    return _spec([
        {"id": "c1", "op": "conv", "inputs": ["input"], "attributes": {"out_channels": 1, "kernel": 3}},
        {"id": "c2", "op": "conv", "inputs": ["c1"], "attributes": {"out_channels": 65, "kernel": 9, "bias": True}},
        {"id": "b2", "op": "bn", "inputs": ["c2"]},
        {"id": "r2", "op": "relu6", "inputs": ["b2"]},
        {"id": "dw", "op": "conv", "inputs": ["r2"], "attributes": {"out_channels": 65, "kernel": 3, "groups": 65}},
        {"id": "dil", "op": "conv", "inputs": ["r2"],
         "attributes": {"out_channels": 65, "kernel": 3, "groups": 65, "dilation": 2}},
        {"id": "sum", "op": "add", "inputs": ["dw", "dil"]},
        {"id": "mp", "op": "maxpool", "inputs": ["sum"]},
        {"id": "c3", "op": "conv", "inputs": ["mp"], "attributes": {"out_channels": 130, "kernel": 1}},
        {"id": "c4", "op": "conv", "inputs": ["mp"], "attributes": {"out_channels": 63, "kernel": 5, "stride": 2,
                                                                     "padding": 2}},
        {"id": "ap", "op": "avgpool", "inputs": ["c3"]},
        {"id": "cat", "op": "concat", "inputs": ["ap", "c4"]},
        {"id": "id", "op": "identity", "inputs": ["cat"]},
        {"id": "fc1", "op": "linear", "inputs": ["id"], "attributes": {"out_features": 200}},
        {"id": "r", "op": "relu", "inputs": ["fc1"]},
        {"id": "fc", "op": "linear", "inputs": ["r"], "attributes": {"out_features": 10}},
        {"id": "out", "op": "output", "inputs": ["fc"]},
    ])


@pytest.fixture(scope="module")
def ghn():
    torch.manual_seed(0)
    return GHNQ().eval()


def test_every_op_and_channel_edge_case_gets_exact_shapes(ghn):
    spec = _edge_case_spec()
    (pm,) = predict(ghn, [spec])
    model = build_model(spec)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in pm.state_dict.items()} == expected
    model = pm.build(bn_mode="batch")
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert all(torch.isfinite(v.float()).all() for v in pm.state_dict.values())


def test_graph_removes_activations_and_keeps_param_nodes():
    graph = build_graph(_edge_case_spec())
    names = [PRIM_INDEX_INV[p] for p in graph.primitives]
    assert names[0] == "input"
    assert names.count("bias") == 3 and names.count("bn") == 1  # c2, fc1, fc biases; b2
    assert names.count("sep_conv") == 1 and names.count("dil_conv") == 1
    assert names.count("linear") == 2 and names.count("sum") == 1 and names.count("concat") == 1
    # topological numbering: every real edge goes forward, levels increase along edges
    real = graph.edges[graph.edges[:, 2] == 1]
    assert (real[:, 0] < real[:, 1]).all()
    assert (graph.levels[real[:, 1]] > graph.levels[real[:, 0]]).all()
    # virtual edges only up to s_max and only between ancestor/descendant pairs
    assert graph.edges[:, 2].max() <= 10


PRIM_INDEX_INV = {v: k for k, v in PRIM_INDEX.items()}


def test_tiling_repeats_the_64_channel_block(ghn):
    (pm,) = predict(ghn, [_edge_case_spec()])
    w = pm.state_dict["layers.c3.weight"]  # 130 x 65 x 1 x 1
    assert torch.equal(w[0], w[64]) and torch.equal(w[1], w[129])
    assert torch.equal(w[:, 0], w[:, 64])


def test_normalisation_gives_he_scale(ghn):
    specs = sample_split("id-test", 3, 0)
    for pm in predict(ghn, specs):
        for name, w in pm.state_dict.items():
            if name.endswith(".weight") and w.dim() == 4:
                fan_in = w[0].numel()
                beta = 1.0 if w.shape[1] == 1 else 2.0
                assert w.pow(2).mean().item() == pytest.approx(beta / fan_in, rel=1e-3)
                assert w.std().item() == pytest.approx(math.sqrt(beta / fan_in), rel=0.2)
            if name.endswith(".weight") and w.dim() == 1:  # BatchNorm gamma in (0, 2)
                assert (w > 0).all() and (w < 2).all()


def test_same_seed_same_parameters(ghn):
    specs = sample_split("ood-mobilenet", 2, 3)
    first = predict(ghn, specs, seed=5)
    second = predict(ghn, specs, seed=5)
    for a, b in zip(first, second):
        assert a.state_dict.keys() == b.state_dict.keys()
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_meta_batch_equals_one_by_one(ghn):
    specs = sample_split("id-test", 3, 1)
    together = predict(ghn, specs)
    for spec, batched in zip(specs, together):
        (alone,) = predict(ghn, [spec])
        for k in alone.state_dict:
            torch.testing.assert_close(alone.state_dict[k], batched.state_dict[k], rtol=1e-5, atol=1e-6)


def test_incompatible_class_count_or_input_is_refused(ghn):
    spec = _spec([
        {"id": "c", "op": "conv", "inputs": ["input"], "attributes": {"out_channels": 8, "kernel": 3}},
        {"id": "g", "op": "global_avgpool", "inputs": ["c"]},
        {"id": "fc", "op": "linear", "inputs": ["g"], "attributes": {"out_features": 100}},
        {"id": "out", "op": "output", "inputs": ["fc"]},
    ], num_classes=100)
    with pytest.raises(ArchError, match="10-class"):
        predict(ghn, [spec])


def test_checkpoint_round_trip(tmp_path, ghn):
    path = tmp_path / "ghn.pt"
    atomic_torch_save(path, ghn.checkpoint(note="test"))
    loaded, info = load_ghn_checkpoint(path)
    assert info["meta"] == {"note": "test"} and len(info["sha256"]) == 64
    for k, v in ghn.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_corrupt_and_foreign_checkpoints_give_one_line(tmp_path, ghn):
    corrupt = tmp_path / "corrupt.pt"
    atomic_torch_save(corrupt, ghn.checkpoint())
    corrupt.write_bytes(corrupt.read_bytes()[:1000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.zeros(3)}, foreign)
    mismatched = tmp_path / "mismatched.pt"
    ckpt = ghn.checkpoint()
    ckpt["config"] = {**ckpt["config"], "hid": 48}
    torch.save(ckpt, mismatched)
    for path, pattern in ((corrupt, "not a readable checkpoint"), (foreign, "not a GHN-Q checkpoint"),
                          (mismatched, "does not match"), (tmp_path / "missing.pt", "not found")):
        with pytest.raises(CheckpointError, match=pattern) as err:
            load_ghn_checkpoint(path)
        assert "\n" not in str(err.value)


def test_bit_conditioning_starts_neutral_and_changes_predictions():
    torch.manual_seed(0)
    ghn = GHNQ(GHNConfig(bit_conditioning=True)).eval()
    spec = sample_split("id-test", 1, 0)[0]
    (float_pm,) = predict(ghn, [spec], bits="fp32")
    (w4_pm,) = predict(ghn, [spec], bits="w4a4")
    assert all(torch.equal(float_pm.state_dict[k], w4_pm.state_dict[k]) for k in float_pm.state_dict)
    with torch.no_grad():
        ghn.bit_embedding.weight.normal_()
    (w4_pm,) = predict(ghn, [spec], bits="w4a4")
    assert any(not torch.equal(float_pm.state_dict[k], w4_pm.state_dict[k]) for k in float_pm.state_dict)
