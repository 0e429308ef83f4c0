"""The decoder's tiling by repeat (cached shape arrays, no per-call index plan) gives bit-identical
parameters to the previous gather-based implementation, kept frozen in tests/legacy_ghn_model.py
(the model as of the commit before the change), on nets with grouped, depthwise, dilated, linear
and wide (tiled, non-multiple-of-64) layers, for the shipped checkpoint and a weight-standardised GHN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ghnq_deploy.arch.sampler import sample_arch
from ghnq_deploy.arch.spec import load_spec, parse_spec
from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
from ghnq_deploy.ghn.graph import build_graph
from ghnq_deploy.ghn.model import GHNQ, GHNConfig

import legacy_ghn_model as legacy

pytestmark = pytest.mark.usefixtures("torch_one_thread")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _grouped_spec():
    """Grouped (not depthwise) convs, channel counts off the 64 grid, a wide linear head."""
    return parse_spec({"name": "grouped", "input_shape": [3, 32, 32], "num_classes": 10, "nodes": [
        {"id": "c1", "op": "conv", "inputs": ["input"], "attributes": {"out_channels": 96, "kernel": 3}},
        {"id": "b1", "op": "bn", "inputs": ["c1"]},
        {"id": "g1", "op": "conv", "inputs": ["b1"], "attributes": {"out_channels": 192, "kernel": 3, "groups": 4}},
        {"id": "r1", "op": "relu", "inputs": ["g1"]},
        {"id": "g2", "op": "conv", "inputs": ["r1"], "attributes": {"out_channels": 200, "kernel": 1, "groups": 8,
                                                                     "bias": True}},
        {"id": "dw", "op": "conv", "inputs": ["g2"], "attributes": {"out_channels": 200, "kernel": 5, "groups": 200}},
        {"id": "gap", "op": "global_avgpool", "inputs": ["dw"]},
        {"id": "fc1", "op": "linear", "inputs": ["gap"], "attributes": {"out_features": 130, "bias": True}},
        {"id": "r2", "op": "relu", "inputs": ["fc1"]},
        {"id": "fc", "op": "linear", "inputs": ["r2"], "attributes": {"out_features": 10}},
        {"id": "out", "op": "output", "inputs": ["fc"]},
    ]})


@pytest.fixture(scope="module")
def graphs():
    specs = [load_spec(EXAMPLES / name) for name in ("resnet20.json", "mobilenetv2_cifar.json", "bnfree_cnn.json",
                                                     "dilated_depthwise.json", "vgg11_bn.json")]
    specs += [_grouped_spec(), sample_arch("id-test", 0, 0, space=1), sample_arch("ood-wide", 0, 1, space=1)]
    return [build_graph(s) for s in specs]


def _pair(config: GHNConfig, state: dict) -> tuple[GHNQ, legacy.GHNQ]:
    new, old = GHNQ(config), legacy.GHNQ(legacy.GHNConfig(**vars(config)))
    new.load_state_dict(state)
    old.load_state_dict(state)
    return new.eval(), old.eval()


def _assert_identical(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for name in x:
            assert x[name].shape == y[name].shape, name
            assert torch.equal(x[name], y[name]), f"{name}: max diff {(x[name] - y[name]).abs().max()}"
            assert x[name].untyped_storage().nbytes() == x[name].numel() * x[name].element_size(), name


@pytest.mark.parametrize("standardize", [False, True])
def test_repeat_tiling_equals_gather_tiling(graphs, standardize):
    shipped, _ = load_ghn_checkpoint("default")
    config = GHNConfig(**{**vars(shipped.config), "weight_standardization": standardize})
    new, old = _pair(config, shipped.state_dict())
    assert any(t.shape[0] > 64 for g in graphs for t in g.targets)  # the tiled path is exercised
    with torch.no_grad():
        _assert_identical(new.predict_params(graphs), old.predict_params(graphs))  # one meta-batch
        _assert_identical(new.predict_params(graphs[5:6]), old.predict_params(graphs[5:6]))  # one net


def test_repeat_tiling_with_autograd_equals_gather_tiling(graphs):
    torch.manual_seed(0)
    fresh = GHNQ(GHNConfig())
    new, old = _pair(fresh.config, fresh.state_dict())
    a, b = new.predict_params(graphs[4:6]), old.predict_params(graphs[4:6])
    _assert_identical([{k: v.detach() for k, v in p.items()} for p in a],
                      [{k: v.detach() for k, v in p.items()} for p in b])
    gen = torch.Generator().manual_seed(1)
    probes = [torch.randn(v.shape, generator=gen) for p in a for v in p.values()]  # not scale-invariant
    ga = torch.autograd.grad(sum((v * r).sum() for v, r in zip((v for p in a for v in p.values()), probes)),
                             list(new.parameters()), allow_unused=True)
    gb = torch.autograd.grad(sum((v * r).sum() for v, r in zip((v for p in b for v in p.values()), probes)),
                             list(old.parameters()), allow_unused=True)
    for x, y in zip(ga, gb):  # repeat's backward sums in another order than the gather's: rounding only
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * float(y.abs().max()))
