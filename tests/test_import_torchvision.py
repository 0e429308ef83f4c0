"""Every supported torchvision family at CIFAR size (3x32x32, 10 classes): import round trips (issue 11)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torchvision

from ghnq_deploy.arch.importer import resolve_source
from ghnq_deploy.arch.spec import ArchError

from test_importer import round_trip

# one model per family (the cheapest), plus the variants whose ops differ
FAMILIES = {
    "resnet18": set(), "resnet50": set(), "vgg11": {"adaptive_avgpool"}, "vgg11_bn": {"adaptive_avgpool"},
    "mobilenet_v2": set(), "mobilenet_v3_small": {"hardswish", "hardsigmoid", "mul"},
    "mobilenet_v3_large": {"hardswish", "mul"}, "efficientnet_b0": {"silu", "sigmoid", "mul"},
    "efficientnet_b3": {"silu", "mul"}, "mnasnet0_5": set(),
    "shufflenet_v2_x0_5": {"channel_shuffle", "channel_slice"}, "squeezenet1_0": {"maxpool"},
    "squeezenet1_1": {"maxpool"}, "googlenet": {"maxpool", "concat"}, "densenet121": {"concat"},
    "regnet_x_400mf": {"add"}, "regnet_y_400mf": {"mul", "sigmoid"},
}
HEAVY = {"vgg11", "vgg11_bn"}  # ~2-3 s each on 2 cores (120M-parameter heads)


def _params(name):
    return pytest.param(name, marks=pytest.mark.slow) if name in HEAVY else name


@pytest.mark.parametrize("name", [_params(n) for n in FAMILIES])
def test_torchvision_family_round_trip(name):
    torch.manual_seed(0)
    model = resolve_source(f"torchvision:{name}", 10)
    spec, diff = round_trip(model, name, batch=2)
    assert diff < 1e-4, f"{name}: rebuilt net differs by {diff:.3g}"
    ops = Counter(n.op for n in spec.nodes)
    assert FAMILIES[name] <= set(ops), f"{name}: {sorted(FAMILIES[name] - set(ops))} not imported"
    if name in ("squeezenet1_0", "googlenet"):  # ceil mode changes their pooled sizes at 32x32
        assert any(n.attr("ceil_mode") for n in spec.nodes if n.op == "maxpool")


@pytest.mark.parametrize("name, family", [("convnext_tiny", "ConvNeXt"), ("vit_b_16", "ViT"),
                                          ("swin_t", "Swin")])
def test_out_of_scope_families_are_named_in_one_line(name, family):
    with pytest.raises(ArchError, match=family) as exc:
        resolve_source(f"torchvision:{name}", 10)
    assert "out of scope" in str(exc.value) and "\n" not in str(exc.value)


def test_every_listed_family_is_covered():
    listed = torchvision.models.list_models(module=torchvision.models)
    for stem in ("resnet", "vgg", "mobilenet_v2", "mobilenet_v3", "efficientnet_b", "mnasnet", "shufflenet_v2",
                 "squeezenet", "googlenet", "densenet", "regnet"):
        assert any(n.startswith(stem) for n in FAMILIES) and any(n.startswith(stem) for n in listed), stem
