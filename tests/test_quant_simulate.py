"""The fake-quant simulator: float equivalence, BN folding, 8 vs 2 bits on a trained net, QAT gradients."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ghnq_deploy.arch.builder import ArchNet, build_model, set_bn_mode
from ghnq_deploy.arch.sampler import sample_split
from ghnq_deploy.arch.spec import analyze, parse_spec
from ghnq_deploy.quant.scheme import get_scheme
from ghnq_deploy.quant.simulate import (
    QuantSim, SimulationError, batch_stats, compile_plan, fold_batchnorm, simulate, simulated_forward,
)

HAVE_DATA = bool(os.environ.get("GHNQ_CIFAR10")) or os.path.isdir("/work/shared/data/cifar10")


def _n(node_id, op, inputs, **attributes):
    return {"id": node_id, "op": op, "inputs": inputs, "attributes": attributes}


# A small net with every op the simulator handles: conv+BN+ReLU, depthwise, a residual add,
# a two-branch concat, max / avg pooling, standalone BN and ReLU6, GAP, two linears.
TINY = {
    "name": "tiny", "input_shape": [3, 32, 32], "num_classes": 10,
    "nodes": [
        _n("c1", "conv", ["input"], out_channels=16, kernel=3, stride=2), _n("b1", "bn", ["c1"]), _n("r1", "relu", ["b1"]),
        _n("p1", "maxpool", ["r1"]),
        _n("dw", "conv", ["p1"], out_channels=16, kernel=3, groups=16), _n("b2", "bn", ["dw"]), _n("r2", "relu", ["b2"]),
        _n("pw", "conv", ["r2"], out_channels=16, kernel=1), _n("b3", "bn", ["pw"]),
        _n("add", "add", ["b3", "p1"]), _n("r3", "relu", ["add"]),
        _n("ca", "conv", ["r3"], out_channels=16, kernel=1, bias=True), _n("ra", "relu", ["ca"]),
        _n("cb", "conv", ["r3"], out_channels=16, kernel=3), _n("bb", "bn", ["cb"]), _n("rb", "relu6", ["bb"]),
        _n("cat", "concat", ["ra", "rb"]), _n("p2", "avgpool", ["cat"]),
        _n("b4", "bn", ["p2"]), _n("r4", "relu6", ["b4"]), _n("id", "identity", ["r4"]),
        _n("gap", "global_avgpool", ["id"]), _n("fc1", "linear", ["gap"], out_features=32), _n("r5", "relu", ["fc1"]),
        _n("fc2", "linear", ["r5"], out_features=10), _n("output", "output", ["fc2"]),
    ],
}


def tiny_spec():
    spec = parse_spec(TINY, "tiny")
    analyze(spec)
    return spec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a 2-core machine shared with a training job, two threads
    spin against each other (measured ~60x slower), and results stay deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.fixture(scope="module")
def trained():
    """The tiny net trained 300 steps on 1,024 CIFAR-10 images, with 512 held-out images."""
    if not HAVE_DATA:
        pytest.skip("needs the CIFAR-10 copy")
    from ghnq_deploy.data import load_cifar10, normalize

    images = load_cifar10("val")  # one file set, split into a training part and a held-out part
    x, y = normalize(images.images[:1024]), torch.from_numpy(images.labels[:1024])
    xv, yv = normalize(images.images[-512:]), torch.from_numpy(images.labels[-512:])
    model = build_model(tiny_spec(), seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(300):
            idx = torch.randint(0, len(y), (64,), generator=gen)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    set_bn_mode(model, "batch")  # after eval(): batch statistics, as the paper evaluates
    return model, xv, yv


def _accuracy(fn, x, y, batch=64) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        logits = torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])
    return float((logits.argmax(1) == y).float().mean()), logits


# ----------------------------------------------------------------------------- structure and float equivalence


def test_plan_fuses_conv_bn_relu_and_keeps_shared_outputs():
    model = build_model(tiny_spec(), seed=0)
    plan = {s.out: s for s in compile_plan(model)}
    assert plan["r1"].nodes == ("c1", "b1", "r1") and plan["r1"].bn == "layers.b1." and plan["r1"].act == "relu"
    assert plan["b3"].nodes == ("pw", "b3")  # its output feeds an add: no activation to fuse
    assert plan["ra"].nodes == ("ca", "ra") and plan["ra"].bn is None
    assert plan["r4"].kind == "bn" and plan["r4"].act == "relu6"  # standalone BN (after a pool) + fused ReLU6
    assert plan["r3"].kind == "act"  # ReLU after an add stays its own op
    assert plan["r5"].kind == "linear" and plan["r5"].act == "relu"
    unfused = {s.out: s for s in compile_plan(model, fuse_activations=False)}
    assert unfused["b1"].nodes == ("c1", "b1") and unfused["r1"].kind == "act"


@pytest.mark.parametrize("split", ["id-test", "ood-bnfree", "ood-mobilenet"])
def test_float_scheme_equals_the_float_model(split):
    x = torch.randn(16, 3, 32, 32)
    for spec in [*sample_split(split, 2, 5), tiny_spec()]:
        model = set_bn_mode(build_model(spec, seed=1), "batch")
        with torch.no_grad():
            ref = model(x)
            out = QuantSim(model, "paper", "fp32")(x)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4), spec.name


@pytest.mark.parametrize("has_bias", [False, True])
def test_per_batch_bn_folding_equals_unfolded_bn_in_float(has_bias):
    torch.manual_seed(0)
    x = torch.randn(32, 8, 12, 12)
    w = torch.randn(16, 8, 3, 3) * 0.2
    b = torch.randn(16) if has_bias else None
    gamma, beta = torch.rand(16) + 0.5, torch.randn(16)
    y = F.conv2d(x, w, b, padding=1)
    ref = F.batch_norm(y, None, None, gamma, beta, True, 0.0, 1e-5)
    mean, var = batch_stats(y)
    assert torch.allclose(mean, y.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(var, y.var((0, 2, 3), unbiased=False), rtol=1e-4)
    w_fold, b_fold = fold_batchnorm(w, b, gamma, beta, mean, var, 1e-5)
    folded = F.conv2d(x, w_fold, b_fold, padding=1)
    assert torch.allclose(folded, ref, atol=1e-4)


def test_weight_only_quantization_folds_bn_per_batch():
    """w8a32: the float reference differs from the folded conv only by 8-bit weight rounding."""
    model = set_bn_mode(build_model(tiny_spec(), seed=2), "batch")
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        w8 = QuantSim(model, "paper", "w8a32")(x)
        w2 = QuantSim(model, "paper", "w2a32")(x)
    err8, err2 = (w8 - ref).pow(2).mean(), (w2 - ref).pow(2).mean()
    assert 0 < err8 < 1e-3 * ref.var()
    assert err2 > 50 * err8


def test_running_bn_folds_the_running_statistics():
    model = build_model(tiny_spec(), seed=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    set_bn_mode(model, "running")
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = QuantSim(model, "paper", "fp32", bn="running")(x)
        one = QuantSim(model, "paper", "w8a8", bn="running")
        # folded once: the result for a sample does not depend on the rest of its batch
        # (only on the activation ranges, which are fixed here by calibration)
        cal = QuantSim(model, replace(get_scheme("paper", "w8a8"), range_source="calibrated"), bn="running")
        cal.calibrate([x])
        assert torch.allclose(cal(x)[:4], cal(x[:4]), atol=1e-6)
        assert one(x).shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_batch_statistics_make_each_batch_count():
    """Paper protocol: the same image in another batch gets other BN statistics."""
    model = set_bn_mode(build_model(tiny_spec(), seed=4), "batch")
    x = torch.randn(32, 3, 32, 32)
    sim = QuantSim(model, "paper", "w8a8")
    with torch.no_grad():
        assert not torch.allclose(sim(x)[:8], sim(x[:8]), atol=1e-4)


# ----------------------------------------------------------------------------- quantizers in place


def test_logits_live_on_the_output_grid():
    model = set_bn_mode(build_model(tiny_spec(), seed=5), "batch")
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        for bits, levels in (("w8a8", 256), ("w4a4", 16), ("w2a2", 4)):
            logits = QuantSim(model, "paper", bits)(x)
            assert 1 < len(torch.unique(logits)) <= levels, bits


def test_concat_quantizer_is_a_scheme_choice():
    model = set_bn_mode(build_model(tiny_spec(), seed=6), "batch")
    x = torch.randn(16, 3, 32, 32)
    paper = get_scheme("paper", "w4a4")
    with torch.no_grad():
        a = QuantSim(model, paper)(x)
        b = QuantSim(model, replace(paper, quantize_after_concat=True))(x)
    assert not torch.allclose(a, b)


def test_calibrated_scheme_needs_calibration():
    model = set_bn_mode(build_model(tiny_spec(), seed=7), "batch")
    sim = QuantSim(model, "tflite-int8")
    x = torch.randn(16, 3, 32, 32)
    with pytest.raises(SimulationError, match="calibrate"):
        with torch.no_grad():
            sim(x)
    assert sim.calibrate([x[:8], x[8:]]) == 16
    assert "input" in sim.ranges and "r1" in sim.ranges and "cat" in sim.ranges
    lo, hi = sim.ranges["input"]
    assert float(lo) == float(x.min()) and float(hi) == float(x.max())
    with torch.no_grad():
        assert torch.isfinite(sim(x)).all()


def test_weight_cache_follows_parameter_changes():
    model = set_bn_mode(build_model(tiny_spec(), seed=8), "batch")
    sim = QuantSim(model, "paper", "w8a8")
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        before = sim(x)
        assert torch.equal(sim(x), before)
        model.layers["fc2"].weight.mul_(2.0)
        after = sim(x)
    assert not torch.allclose(before, after)


def test_bad_bn_mode():
    model = build_model(tiny_spec(), seed=0)
    with pytest.raises(SimulationError):
        QuantSim(model, bn="frozen")
    with pytest.raises(SimulationError):
        simulated_forward(model, _params(model), torch.zeros(1, 3, 32, 32), bn="frozen")


# ----------------------------------------------------------------------------- trained net: 8 bits vs 2 bits


def test_8bit_close_to_float_and_2bit_not(trained):
    model, x, y = trained
    acc_f, logits_f = _accuracy(model, x, y)
    assert acc_f > 0.3  # it did learn something (chance: 0.1)
    results = {}
    for preset in ("paper", "tflite-int8"):
        for bits in ("w8a8", "w2a2"):
            sim = simulate(model, preset, bits)
            if sim.scheme.range_source == "calibrated":
                sim.calibrate([x[i:i + 64] for i in range(0, 256, 64)])
            acc, logits = _accuracy(sim, x, y)
            agree = float((logits.argmax(1) == logits_f.argmax(1)).float().mean())
            results[preset, bits] = (acc, agree)
    for preset in ("paper", "tflite-int8"):
        acc8, agree8 = results[preset, "w8a8"]
        acc2, agree2 = results[preset, "w2a2"]
        assert abs(acc8 - acc_f) < 0.03 and agree8 > 0.9, (preset, results)
        assert acc2 < acc_f - 0.1 and agree2 < 0.5, (preset, results)


def test_simulated_forward_matches_quantsim(trained):
    model, x, _ = trained
    with torch.no_grad():
        a = simulated_forward(model, _params(model), x[:64], "paper", "w4a8")
        b = QuantSim(model, "paper", "w4a8")(x[:64])
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- gradients (QAT)


def _meta_net(spec):
    with torch.device("meta"):
        return ArchNet(spec, bn_running_stats=False)


@pytest.mark.parametrize("preset,bits", [("paper", "w4a8"), ("paper", "w2a2"), ("tflite-int8", "w8a8")])
def test_gradients_flow_into_every_parameter(preset, bits):
    spec = tiny_spec()
    src = build_model(spec, seed=9)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in src.named_parameters()}
    predicted = {k: v * 1.0 for k, v in params.items()}  # non-leaf, as the GHN's outputs
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    net = _meta_net(spec)
    scheme = get_scheme(preset, bits)
    ranges = None
    if scheme.range_source == "calibrated":
        sim = QuantSim(src, scheme)
        sim.calibrate([x])
        ranges = sim.ranges
    loss = F.cross_entropy(simulated_forward(net, predicted, x, scheme=preset, bits=bits, ranges=ranges), y)
    loss.backward()
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_qat_steps_lower_the_quantized_loss():
    spec = tiny_spec()
    src = build_model(spec, seed=10)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in src.named_parameters()}
    net = _meta_net(spec)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    opt = torch.optim.Adam(params.values(), lr=1e-2)

    def loss_now():
        return F.cross_entropy(simulated_forward(net, params, x, scheme="paper", bits="w4a4"), y)

    with torch.no_grad():
        first = float(loss_now())
    for _ in range(40):
        loss = loss_now()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(loss_now()) < 0.5 * first


def test_train_net_loss_uses_the_simulator():
    """ghn/train.py's QAT path: the GHN's predicted parameters get gradients through the quantizers."""
    from ghnq_deploy.ghn.graph import build_graph
    from ghnq_deploy.ghn.model import GHNQ
    from ghnq_deploy.ghn.train import net_loss

    torch.manual_seed(0)
    ghn = GHNQ()
    spec = sample_split("id-test", 1, 0)[0]
    params = ghn.predict_params([build_graph(spec)])[0]
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss, _ = net_loss(params, spec, x, y, bits="w4a8", scheme="paper")
    loss.backward()
    grads = [p.grad for p in ghn.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_fast_inplace_path_matches_the_autograd_path_and_touches_no_inputs():
    """No-grad evaluation quantizes its own intermediates in place; it must not change the
    input, the parameters, or (beyond float-rounding ties) the numbers of the autograd path."""
    spec = tiny_spec()
    model = set_bn_mode(build_model(spec, seed=11), "batch")
    x = torch.randn(32, 3, 32, 32)
    x_before = x.clone()
    params_before = {k: v.detach().clone() for k, v in _params(model).items()}
    for preset in ("paper", "tflite-int8"):
        sim = QuantSim(model, preset, "w8a8")
        if sim.scheme.range_source == "calibrated":
            sim.calibrate([x])
        with torch.no_grad():
            fast = sim(x)
        leaf = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in _params(model).items()}
        slow = simulated_forward(_meta_net(spec), leaf, x, scheme=preset, bits="w8a8", ranges=sim.ranges or None)
        assert slow.requires_grad
        assert (fast - slow.detach()).pow(2).mean() < 1e-4 * slow.detach().var(), preset
    assert torch.equal(x, x_before)
    for k, v in _params(model).items():
        assert torch.equal(v, params_before[k]), k


@pytest.mark.parametrize("preset,bits", [("paper", "w4a4"), ("paper", "w8a8"), ("tflite-int8", "w8a8")])
def test_evaluation_fast_path_is_bit_identical_with_running_bn(preset, bits):
    """With folded running statistics the no-grad path (ReLU folded into the code clamp,
    in-place quantizers) and the autograd path (explicit ReLU, torch fake-quant ops) must
    give exactly the same logits."""
    spec = tiny_spec()
    model = build_model(spec, seed=12)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    set_bn_mode(model, "running")
    x = torch.randn(16, 3, 32, 32)
    sim = QuantSim(model, preset, bits, bn="running")
    if sim.scheme.range_source == "calibrated":
        sim.calibrate([x])
    with torch.no_grad():
        fast = sim(x)
    leaf = {k: v.detach().clone() for k, v in _params(model).items()}
    for k, _ in model.named_parameters():
        leaf[k].requires_grad_(True)
    slow = simulated_forward(_meta_net(spec), leaf, x, scheme=preset, bits=bits, bn="running",
                             ranges=sim.ranges or None)
    assert torch.equal(fast, slow.detach())


def test_functional_calibrated_scheme_without_ranges_is_a_user_error():
    from ghnq_deploy.errors import UserError

    model = build_model(tiny_spec(), seed=0)
    with pytest.raises(UserError, match="range_source='absolute'"):
        simulated_forward(model, _params(model), torch.zeros(2, 3, 32, 32), scheme="tflite-int8")
