"""BN calibration (cumulative running statistics) and conv+BN folding with torch's fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ghnq_deploy.quant.bn_calibrate as bnc
from ghnq_deploy.arch.builder import build_model, set_bn_mode
from ghnq_deploy.arch.spec import parse_spec
from ghnq_deploy.data import normalize
from ghnq_deploy.errors import UserError
from ghnq_deploy.quant.bn_calibrate import FoldingError, calibrate_bn, check_folding, fold_bn, summarize

from export_helpers import calibration_images, edge_spec, example_specs, features, sampled_specs


def _spec(nodes: list[dict], name: str = "t"):
    return parse_spec({"name": name, "input_shape": [3, 32, 32], "num_classes": 10, "nodes": nodes})


def _n(node_id, op, inputs, **attributes):
    return {"id": node_id, "op": op, "inputs": inputs, "attributes": attributes}


def _conv_bn_net():
    return _spec([_n("c", "conv", ["input"], out_channels=8, kernel=3), _n("b", "bn", ["c"]),
                  _n("r", "relu", ["b"]), _n("g", "global_avgpool", ["r"]), _n("fc", "linear", ["g"], out_features=10),
                  _n("output", "output", ["fc"])])


def test_calibrate_bn_is_a_cumulative_average_over_one_pass():
    model = build_model(_conv_bn_net(), seed=0)
    bn = model.layers["b"]
    bn.running_mean.fill_(123.0)  # stale values must be reset
    images = calibration_images(100)
    calibrate_bn(model, images, batch_size=32)
    x = normalize(images)
    with torch.no_grad():
        conv_out = model.layers["c"](x)
    batches = [conv_out[i:i + 32] for i in range(0, 100, 32)]  # 32, 32, 32, 4: equal weight per batch
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 4
    assert bn.momentum == 0.1 and not model.training and not bn.training  # restored, eval mode


def test_calibrate_bn_adds_running_stats_to_batch_mode_nets_and_accepts_float_input():
    model = build_model(_conv_bn_net(), seed=0, bn_running_stats=False)
    assert model.layers["b"].running_mean is None
    x = normalize(calibration_images(64))
    calibrate_bn(model, x)  # normalised float NCHW is used as is
    bn = model.layers["b"]
    assert bn.running_mean is not None and bn.track_running_stats and not bn.training
    assert float(bn.running_var.min()) > 0


def test_calibrate_bn_refuses_bad_input_and_leaves_bn_free_nets_alone():
    with pytest.raises(UserError):
        calibrate_bn(build_model(_conv_bn_net(), seed=0), np.zeros((4, 32, 32), np.float32))
    bnfree = next(s for s in sampled_specs() if "bnfree" in features(s))
    model = build_model(bnfree, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate_bn(model, calibration_images(16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    folded, reports = fold_bn(model)
    assert reports == [] and summarize(reports)["folded"] == 0


def test_fold_uses_torch_fusion_and_replaces_bn_by_identity(monkeypatch):
    calls = []
    real = bnc.fuse_conv_bn_eval

    def counting(conv, bn, *args, **kw):
        calls.append((conv, bn))
        return real(conv, bn, *args, **kw)

    monkeypatch.setattr(bnc, "fuse_conv_bn_eval", counting)
    spec = next((s for s in example_specs() if s.name == "resnet20"), sampled_specs()[3])
    model = build_model(spec, seed=1)
    calibrate_bn(model, calibration_images())
    original = {k: v.clone() for k, v in model.state_dict().items()}
    folded, reports = fold_bn(model, check_inputs=calibration_images(32))
    bn_ids = [n.id for n in spec.nodes if n.op == "bn"]
    folded_ids = [r.bn for r in reports if r.folded]
    assert len(calls) == len(folded_ids) and folded_ids
    for r in reports:
        if r.folded:
            assert isinstance(folded.layers[r.bn], nn.Identity)
            assert isinstance(folded.layers[r.conv], nn.Conv2d) and folded.layers[r.conv].bias is not None
            assert r.growth == pytest.approx(r.max_abs_after / r.max_abs_before)
            weight = folded.layers[r.conv].weight.detach().abs()
            assert r.max_abs_after == pytest.approx(float(weight.max()))
    assert {r.bn for r in reports} == set(bn_ids)
    # the input model is untouched (folding works on a copy) and is still the ArchNet it was
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    assert type(folded) is type(model) and folded.spec == model.spec


def test_fold_reports_depthwise_and_keeps_bn_that_has_no_conv_before_it():
    spec = edge_spec()
    model = build_model(spec, seed=0)
    calibrate_bn(model, calibration_images())
    folded, reports = fold_bn(model, check_inputs=calibration_images(32))
    by_bn = {r.bn: r for r in reports}
    assert not by_bn["bn_in"].folded and "input" in by_bn["bn_in"].reason
    assert not by_bn["bn_add"].folded and "add" in by_bn["bn_add"].reason
    assert isinstance(folded.layers["bn_add"], nn.BatchNorm2d) and not folded.layers["bn_add"].training
    assert by_bn["dw_bn"].folded and by_bn["dw_bn"].depthwise and by_bn["dw_bn"].conv == "dw"
    summary = summarize(reports)
    assert summary["folded"] == 1 and len(summary["kept"]) == 2 and summary["depthwise_folded"] == 1


def test_conv_with_a_second_consumer_is_not_folded():
    spec = _spec([_n("c", "conv", ["input"], out_channels=8, kernel=3), _n("b", "bn", ["c"]),
                  _n("a", "add", ["b", "c"]), _n("g", "global_avgpool", ["a"]),
                  _n("fc", "linear", ["g"], out_features=10), _n("output", "output", ["fc"])])
    model = build_model(spec, seed=0)
    calibrate_bn(model, calibration_images(64))
    folded, reports = fold_bn(model, check_inputs=calibration_images(16))
    assert len(reports) == 1 and not reports[0].folded and "also feeds" in reports[0].reason


def test_fold_refuses_batch_statistics_and_detects_a_wrong_fold():
    model = build_model(_conv_bn_net(), seed=0)
    set_bn_mode(model, "batch")
    with pytest.raises(FoldingError, match="calibrate_bn"):
        fold_bn(model)
    model = build_model(_conv_bn_net(), seed=0)
    calibrate_bn(model, calibration_images(64))
    folded, _ = fold_bn(model)
    with torch.no_grad():
        folded.layers["c"].weight[0] *= 1.01  # a 1% error in one channel is far above float rounding
    with pytest.raises(FoldingError, match="disagree"):
        check_folding(model, folded, calibration_images(16))


def _fold_check(spec) -> None:
    model = build_model(spec, seed=0)
    calibrate_bn(model, calibration_images(64))
    folded, reports = fold_bn(model)
    diff = check_folding(model, folded, calibration_images(16))  # raises beyond 1e-4 + 1e-4 * max|logit|
    assert diff < 1e-3
    assert len(reports) == sum(n.op == "bn" for n in spec.nodes)
    assert all(isinstance(folded.layers[r.bn], nn.Identity) for r in reports if r.folded)


@pytest.mark.parametrize("spec", example_specs() + [edge_spec()], ids=lambda s: s.name)
def test_folded_equals_unfolded_on_real_images(spec):
    _fold_check(spec)


@pytest.mark.slow
@pytest.mark.parametrize("spec", sampled_specs(), ids=lambda s: s.name)
def test_folded_equals_unfolded_on_sampled_nets(spec):
    _fold_check(spec)
