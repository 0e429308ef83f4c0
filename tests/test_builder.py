"""arch spec -> nn.Module: every example builds, runs, and matches shape inference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ghnq_deploy.arch.builder import build_model, param_count, set_bn_mode
from ghnq_deploy.arch.spec import analyze, load_spec

pytestmark = pytest.mark.usefixtures("torch_one_thread")
EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.json"))


def test_all_examples_are_present():
    assert {p.stem for p in EXAMPLES} >= {"resnet20", "mobilenetv2_cifar", "vgg11_bn", "bnfree_cnn", "dilated_depthwise"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_builds_and_runs(path: Path):
    spec = load_spec(path)
    info = analyze(spec)
    model = build_model(spec, seed=0).eval()
    assert param_count(model) == info.params
    # every parameter is named layers.<node id>.<param> for a node of the spec
    ids = {n.id for n in spec.nodes}
    assert {name.split(".")[1] for name, _ in model.named_parameters()} <= ids
    # hooks check every node's output shape against shape inference
    seen: dict[str, tuple[int, ...]] = {}
    for node_id, module in model.layers.items():
        module.register_forward_hook(lambda m, i, o, node_id=node_id: seen.__setitem__(node_id, tuple(o.shape[1:])))
    with torch.no_grad():
        out = model(torch.randn(2, *spec.input_shape))
    assert out.shape == (2, spec.num_classes)
    assert torch.isfinite(out).all()
    assert seen == {k: v.shape for k, v in info.nodes.items()}


@pytest.mark.parametrize("stem", ["resnet20", "bnfree_cnn"])
def test_seed_makes_init_reproducible_and_bn_modes_differ(stem: str):
    spec = load_spec(Path(__file__).parent.parent / "examples" / f"{stem}.json")
    a, b = build_model(spec, seed=3), build_model(spec, seed=3)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    x = torch.randn(4, *spec.input_shape)
    with torch.no_grad():
        batch = set_bn_mode(a, "batch")(x)
        running = set_bn_mode(a, "running")(x)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in a.modules())
    assert has_bn == (stem == "resnet20")
    assert has_bn == (not torch.allclose(batch, running))
    with pytest.raises(ValueError):
        set_bn_mode(a, "other")
