"""GHNConfig.weight_standardization: per-output-channel zero mean and He variance of every predicted
weight (tiled, grouped, depthwise, classifier), equal with and without autograd; off for checkpoints
saved without the field, which therefore predict exactly as before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ghnq_deploy.arch.spec import load_spec, parse_spec
from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
from ghnq_deploy.ghn.graph import build_graph
from ghnq_deploy.ghn.model import GHNQ, GHNConfig

pytestmark = pytest.mark.usefixtures("torch_one_thread")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _spec():
    """Tiled (65, 130, 200 channels), grouped, depthwise, fan-in-1 and linear weights."""
    return parse_spec({"name": "ws", "input_shape": [3, 32, 32], "num_classes": 10, "nodes": [
        {"id": "c1", "op": "conv", "inputs": ["input"], "attributes": {"out_channels": 65, "kernel": 3}},
        {"id": "dw", "op": "conv", "inputs": ["c1"], "attributes": {"out_channels": 65, "kernel": 3, "groups": 65}},
        {"id": "pw", "op": "conv", "inputs": ["dw"], "attributes": {"out_channels": 130, "kernel": 1}},
        {"id": "g", "op": "conv", "inputs": ["pw"], "attributes": {"out_channels": 130, "kernel": 3, "groups": 2}},
        {"id": "one", "op": "conv", "inputs": ["g"], "attributes": {"out_channels": 130, "kernel": 1, "groups": 130}},
        {"id": "gap", "op": "global_avgpool", "inputs": ["one"]},
        {"id": "fc1", "op": "linear", "inputs": ["gap"], "attributes": {"out_features": 200}},
        {"id": "r", "op": "relu", "inputs": ["fc1"]},
        {"id": "fc", "op": "linear", "inputs": ["r"], "attributes": {"out_features": 10}},
        {"id": "out", "op": "output", "inputs": ["fc"]},
    ]})


@pytest.fixture(scope="module")
def graphs():
    return [build_graph(_spec()), build_graph(load_spec(EXAMPLES / "mobilenetv2_cifar.json"))]


def test_old_checkpoints_load_with_it_off():
    ghn, info = load_ghn_checkpoint("default")
    assert "weight_standardization" not in info["config"]
    assert ghn.config.weight_standardization is False
    assert GHNConfig.from_checkpoint({**info["config"], "weight_standardization": True}).weight_standardization


def test_every_output_channel_is_zero_mean_with_he_variance(graphs):
    torch.manual_seed(0)
    ghn = GHNQ(GHNConfig(weight_standardization=True)).eval()
    with torch.no_grad():
        predicted = ghn.predict_params(graphs)
    checked = 0
    for graph, params in zip(graphs, predicted):
        for t in graph.targets:
            if t.kind not in ("weight", "classifier_weight"):
                continue
            w = params[t.name].flatten(1).double()
            beta = 1.0 if w.dim() == 2 and len(t.shape) == 4 and t.shape[1] == 1 else 2.0
            fan_in = w.shape[1]
            if fan_in == 1:  # a per-channel scale: normalised by its whole RMS, not centred
                torch.testing.assert_close(w.square().mean(), torch.tensor(beta, dtype=w.dtype), rtol=1e-4, atol=0)
                assert w.mean().abs() > 1e-3
            else:
                assert w.mean(1).abs().max() < 1e-6, t.name
                torch.testing.assert_close(w.var(1, unbiased=False) * fan_in / beta, torch.ones(len(w), dtype=w.dtype),
                                           rtol=1e-4, atol=0, msg=lambda m: f"{t.name}: {m}")
            checked += 1
    assert checked > 50


def test_the_old_normalisation_is_not_per_channel(graphs):
    """The RMS path scales whole tensors: its channels keep non-zero means (so the test above can fail)."""
    torch.manual_seed(0)
    ghn = GHNQ(GHNConfig()).eval()
    with torch.no_grad():
        params = ghn.predict_params(graphs[:1])[0]
    w = params["layers.pw.weight"].flatten(1)
    assert w.mean(1).abs().max() > 1e-3


def test_autograd_and_inference_agree(graphs):
    torch.manual_seed(1)
    ghn = GHNQ(GHNConfig(weight_standardization=True))
    with torch.no_grad():
        a = ghn.predict_params(graphs)
    b = ghn.predict_params(graphs)
    for x, y in zip(a, b):
        for name in x:
            torch.testing.assert_close(x[name], y[name].detach(), rtol=1e-5, atol=1e-6)
    loss = sum(v.sum() for p in b for v in p.values() if v.dim() > 1)
    loss.backward()
    assert ghn.dec_channels[2].weight.grad.abs().sum() > 0
