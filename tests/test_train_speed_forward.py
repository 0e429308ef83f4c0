"""The training forward path (arch/functional.py) computes what functional_call on the module tree does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ghnq_deploy.arch.builder import ArchNet
from ghnq_deploy.arch.functional import ForwardOptions, is_depthwise, run_with_params
from ghnq_deploy.arch.sampler import sample_arch
from ghnq_deploy.arch.spec import load_spec
from ghnq_deploy.data import load_cifar10
from ghnq_deploy.ghn.graph import PRIMITIVES, build_graph
from ghnq_deploy.ghn.model import GHNQ, GHNConfig
from ghnq_deploy.ghn.train import MetaBatchSource, TrainConfig
from new_ops_nets import NEW_OP_NETS

pytestmark = pytest.mark.usefixtures("torch_one_thread")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _specs():
    specs = [load_spec(p) for p in sorted(EXAMPLES.glob("*.json"))]
    specs += [make() for make, _ in NEW_OP_NETS.values()]
    specs += [sample_arch("id-train", 0, k, space=space) for space in (1, 2) for k in range(3)]
    return specs


SPECS = _specs()


@pytest.fixture(scope="module")
def ghn() -> GHNQ:
    torch.manual_seed(0)
    return GHNQ(GHNConfig.from_dict({"num_primitives": len(PRIMITIVES)}))


def _predicted(ghn: GHNQ, spec) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        params = ghn.predict_params([build_graph(spec)])[0]
    return {k: v.clone().requires_grad_() for k, v in params.items()}


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_functional_forward_equals_functional_call(ghn, spec):
    torch.manual_seed(1)
    x = torch.randn(6, 3, 32, 32)
    params = _predicted(ghn, spec)
    with torch.device("meta"):
        net = ArchNet(spec, bn_running_stats=False)
    want = torch.func.functional_call(net, params, (x,))
    want_grads = torch.autograd.grad(want.square().sum(), list(params.values()))
    want = want.detach()
    got = run_with_params(net, params, x)
    got_grads = torch.autograd.grad(got.square().sum(), list(params.values()))
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same ops on the same tensors
    for name, a, b in zip(params, got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with torch.no_grad():  # channels-last: other kernels, the same values up to rounding
        fast = run_with_params(net, params, x, ForwardOptions(channels_last=True))
    torch.testing.assert_close(fast, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.skipif(not any(p and os.path.isdir(p) for p in (os.environ.get("GHNQ_CIFAR10"),
                                                              "/work/shared/data/cifar10")),
                    reason="needs the CIFAR-10 copy")
def test_channels_last_gradients_of_a_training_step_match_float64(ghn):
    """The 4 nets of a real step (batch 32): channels-last gradients within 1e-2 of float64's
    (measured 2.8e-3; torch's channels-last BatchNorm sums in another order), NCHW within 1e-3."""
    cfg = TrainConfig(batch_size=32, meta_batch=4, seed=0)
    specs, x, y, _ = MetaBatchSource(cfg, load_cifar10("train").subset(512))(0)
    with torch.no_grad():
        predicted = ghn.predict_params([build_graph(s) for s in specs])
    for options, bound in ((ForwardOptions(), 1e-3), (ForwardOptions(channels_last=True), 1e-2)):
        errors = []
        for p, spec in zip(predicted, specs):
            with torch.device("meta"):
                net = ArchNet(spec, bn_running_stats=False)
            grads = {}
            for dtype in (torch.float64, torch.float32):
                q = {k: v.to(dtype).requires_grad_() for k, v in p.items()}
                loss = F.cross_entropy(run_with_params(net, q, x.to(dtype), options), y)
                grads[dtype] = torch.cat([g.double().flatten() for g in torch.autograd.grad(loss, list(q.values()))])
            ref = grads[torch.float64]
            errors.append(float((grads[torch.float32] - ref).norm() / ref.norm()))
        assert max(errors) < bound, (options, errors)


class _ConvDtypes(TorchDispatchMode):
    """Records (groups, input dtype, weight dtype) of every convolution, and BatchNorm input dtypes."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, torch.dtype, torch.dtype]] = []
        self.bn_inputs: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.seen.append((args[8], args[0].dtype, args[1].dtype))
        if func.__name__.startswith("native_batch_norm") or "batch_norm" in func.__name__:
            self.bn_inputs.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_under_bf16_autocast_dense_convs_run_bf16_and_depthwise_float32(ghn):
    spec = load_spec(EXAMPLES / "mobilenetv2_cifar.json")  # dense 1x1 and depthwise 3x3 convs
    with torch.device("meta"):
        net = ArchNet(spec, bn_running_stats=False)
    depthwise = {m.groups for m in net.modules() if isinstance(m, torch.nn.Conv2d) and is_depthwise(m)}
    assert depthwise
    params = _predicted(ghn, spec)
    with _ConvDtypes() as mode, torch.autocast("cpu", dtype=torch.bfloat16):
        logits = run_with_params(net, params, torch.randn(4, 3, 32, 32),
                                 ForwardOptions(channels_last=True, fp32_depthwise=True))
    assert mode.seen
    # the depthwise convs' outputs go back to bf16: what follows them runs in bf16
    assert mode.bn_inputs and set(mode.bn_inputs) == {torch.bfloat16}
    for groups, x_dtype, w_dtype in mode.seen:
        want = torch.float32 if groups in depthwise else torch.bfloat16
        assert (x_dtype, w_dtype) == (want, want), groups
    assert logits.dtype == torch.bfloat16  # the classifier ran under autocast too


def test_a_parameter_holding_module_without_runner_is_refused(ghn):
    spec = load_spec(EXAMPLES / "resnet20.json")
    with torch.device("meta"):
        net = ArchNet(spec, bn_running_stats=False)
    node = next(iter(net.layers))
    net.layers[node] = torch.nn.PReLU(device="meta")  # parameters, and no functional runner
    with pytest.raises(ValueError, match="no functional runner for PReLU"):
        run_with_params(net, _predicted(ghn, spec), torch.randn(2, 3, 32, 32))
