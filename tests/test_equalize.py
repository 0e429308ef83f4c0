"""Cross-layer equalization of folded nets (issue 11, depthwise BN folding)."""

from __future__ import annotations

import torch

from ghnq_deploy.arch.builder import build_model
from ghnq_deploy.arch.spec import analyze, parse_spec
from ghnq_deploy.quant.bn_calibrate import fold_bn
from ghnq_deploy.quant.equalize import equalize


def _n(node_id, op, inputs, **attributes):
    return {"id": node_id, "op": op, "inputs": inputs, "attributes": attributes}


def _spec(act: str):
    nodes = [_n("pw", "conv", ["input"], out_channels=8, kernel=1), _n("pw_bn", "bn", ["pw"]), _n("a", act, ["pw_bn"]),
             _n("dw", "conv", ["a"], out_channels=8, kernel=3, groups=8), _n("dw_bn", "bn", ["dw"]),
             _n("b", "relu", ["dw_bn"]), _n("pw2", "conv", ["b"], out_channels=16, kernel=1), _n("g", "global_avgpool", ["pw2"]),
             _n("fc", "linear", ["g"], out_features=10), _n("output", "output", ["fc"])]
    spec = parse_spec({"name": "dw", "input_shape": [3, 16, 16], "num_classes": 10, "nodes": nodes})
    analyze(spec)
    return spec


def _folded(act: str):
    model = build_model(_spec(act), seed=0).eval()
    with torch.no_grad():  # one depthwise channel with a tiny variance: folding grows it ~300x
        model.layers["dw_bn"].running_var.fill_(1.0)
        model.layers["dw_bn"].running_var[3] = 1e-5
        model.layers["pw_bn"].running_var.uniform_(0.5, 2.0)
    folded, reports = fold_bn(model)
    return folded


def test_equalization_keeps_the_function_and_balances_the_depthwise_channels():
    folded = _folded("relu")
    eq, pairs = equalize(folded)
    assert {(p.first, p.second) for p in pairs} >= {("pw", "dw"), ("dw", "pw2")}
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref, got = folded(x), eq(x)
    assert (ref - got).abs().max() <= 1e-4 * (1 + ref.abs().max())
    dw_pair = next(p for p in pairs if p.second == "dw")
    assert dw_pair.spread_before > 50 and dw_pair.spread_after < dw_pair.spread_before / 10
    assert torch.equal(folded.layers["dw"].weight, _folded("relu").layers["dw"].weight)  # the input is not modified


def test_relu6_pairs_are_left_alone():
    eq, pairs = equalize(_folded("relu6"))
    assert ("pw", "dw") not in {(p.first, p.second) for p in pairs}
