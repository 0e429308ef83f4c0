"""torch.fx importer: round trips give identical outputs for identical weights."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ghnq_deploy.arch.builder import ArchNet, build_model
from ghnq_deploy.arch.importer import import_model, resolve_source, source_name, trace_model
from ghnq_deploy.arch.spec import ArchError, analyze, load_spec

pytestmark = pytest.mark.usefixtures("torch_one_thread")
EXAMPLES = Path(__file__).parent.parent / "examples"


# ----------------------------------------------------------------------------- test models


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block, option-B (1x1 conv + BN) shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """ResNet-20 for CIFAR (He et al. 2016): 3 stages x ``n`` blocks of 16/32/64 channels."""

    def __init__(self, n: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1)
        out = out.view(out.size(0), -1)
        return self.linear(out)


class FunctionalZoo(nn.Module):
    """Every functional spelling the importer supports, in one net."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.b = nn.Conv2d(3, 8, 5, padding="same", dilation=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16)
        self.bn = nn.BatchNorm2d(16, eps=1e-3)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10, bias=False)
        self.act6 = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), torch.relu(self.b(x))], dim=1)
        y = F.relu6(self.bn(self.dw(y)))
        y = torch.add(y, self.ident(y))
        y = F.max_pool2d(y, 2)
        y = self.pool(y)
        y.mean((2, 3), keepdim=True)  # computed but unused: a dead branch the importer drops
        y = self.drop(torch.flatten(y, 1))
        y = self.act6(self.fc1(y)).relu()
        return self.fc2(F.dropout(y, 0.1, self.training))


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics so a wrong mapping cannot go unnoticed."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def round_trip(model: nn.Module, name: str, shape=(3, 32, 32), batch: int = 3) -> tuple:
    """Import, rebuild, copy the weights; return (spec, max abs output difference)."""
    _randomize_bn(model)
    imported = trace_model(model, name, shape, 10)
    rebuilt = ArchNet(imported.spec, analyze(imported.spec, param_cap=10**9))
    imported.load_weights(model, rebuilt)
    model.eval()
    rebuilt.eval()
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(x), rebuilt(x)
    assert got.shape == expected.shape == (batch, 10)
    return imported.spec, (expected - got).abs().max().item()


# ----------------------------------------------------------------------------- round trips


def test_cifar_resnet20_round_trip_matches_the_example():
    torch.manual_seed(0)
    model = CifarResNet()
    spec, diff = round_trip(model, "resnet20")
    assert diff < 1e-5
    example = load_spec(EXAMPLES / "resnet20.json")
    assert analyze(spec).params == analyze(example).params == sum(p.numel() for p in model.parameters())
    assert Counter(n.op for n in spec.nodes) == Counter(n.op for n in example.nodes)
    assert analyze(spec).macs == analyze(example).macs


def test_torchvision_mobilenet_v2_round_trip():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
    spec, diff = round_trip(model, "mobilenet_v2", batch=2)
    assert diff < 1e-5
    ops = Counter(n.op for n in spec.nodes)
    assert ops["conv"] == 52 and ops["bn"] == 52 and ops["relu6"] == 35 and ops["add"] == 10
    depthwise = [n for n in spec.nodes if n.op == "conv" and n.attr("groups") > 1]
    assert len(depthwise) == 17


def test_torchvision_resnet18_imports_above_the_space_cap():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    spec, diff = round_trip(model, "resnet18", batch=2)
    assert diff < 1e-5
    assert analyze(spec, param_cap=10**8).params == 11_181_642
    with pytest.raises(ArchError, match="exceed the cap"):
        import_model(model, "resnet18", (3, 32, 32), 10, param_cap=10**7)


def test_functional_spellings_round_trip():
    torch.manual_seed(0)
    spec, diff = round_trip(FunctionalZoo(), "zoo", shape=(3, 16, 16))
    assert diff < 1e-5
    ops = Counter(n.op for n in spec.nodes)
    assert ops == Counter(conv=3, bn=1, relu=2, relu6=2, concat=1, add=1, maxpool=1, avgpool=1, linear=2, output=1)
    by_op = {n.op: n for n in spec.nodes}
    assert by_op["bn"].attributes == {"eps": 1e-3}
    assert by_op["avgpool"].attributes == {"kernel": 3, "stride": 2, "padding": 1}


def test_weight_mapping_covers_every_entry_and_rebuild_from_spec_alone():
    model = CifarResNet()
    imported = trace_model(model, "r20", (3, 32, 32), 10)
    rebuilt = build_model(imported.spec)
    assert set(imported.state_map) == set(rebuilt.state_dict())
    assert set(imported.state_map.values()) == set(model.state_dict())
    assert imported.state_map["layers.conv1.weight"] == "conv1.weight"
    # the spec alone is deterministic: importing twice gives the same bytes
    assert import_model(model, "r20", (3, 32, 32), 10).dumps() == imported.spec.dumps()


def test_import_leaves_the_model_mode_and_statistics_alone():
    model = CifarResNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    import_model(model, "r20", (3, 32, 32), 10)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- errors


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(x)
        y = torch.sin(self.gelu(c))
        y = torch.sin(y)
        return self.fc((y + c * 2).mean((2, 3)))


def test_unsupported_ops_are_listed_in_one_error():
    with pytest.raises(ArchError) as info:
        import_model(Unsupported(), "bad", (3, 16, 16), 10)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("bad: cannot import 4 unsupported operation(s): ")
    assert "nn.GELU (1x: gelu)" in message
    assert "torch.sin (2x: sin, sin_1)" in message
    assert "mul with a non-tensor operand (1x: mul)" in message


class LostInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y.relu_()  # fx records a new value; y itself is read again below
        return y.mean((2, 3))


class NonSquare(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, (1, 3))
        self.fc = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), (1, 1)), 1))


@pytest.mark.parametrize(("model", "needle"), [
    (LostInplace(), "in-place Tensor.relu_ whose input is used again"),
    (NonSquare(), "nn.Conv2d with a non-square kernel, stride or dilation (1x: conv)"),
])
def test_unsafe_or_inexpressible_layers_are_refused(model: nn.Module, needle: str):
    with pytest.raises(ArchError) as info:
        import_model(model, "m", (3, 16, 16), 10)
    assert needle in str(info.value)


def test_wrong_num_classes_and_input_shape_are_one_line_errors():
    with pytest.raises(ArchError) as info:
        import_model(CifarResNet(num_classes=10), "r", (3, 32, 32), 100)
    assert str(info.value) == "r: node 'output': output must be a vector of num_classes=100 logits, got shape (10,)"
    with pytest.raises(ArchError, match="^r/x: 'name' must be a non-empty string usable as a folder name: .*; got 'r/x'$"):
        import_model(CifarResNet(), "r/x", (3, 32, 32), 10)
    with pytest.raises(ArchError) as info:
        import_model(CifarResNet(), "r", (1, 32, 32), 10)
    assert str(info.value).startswith("r: the model fails on a 1x1x32x32 input: RuntimeError: ")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- sources


def test_resolve_torchvision_and_factories(tmp_path: Path):
    model = resolve_source("torchvision:resnet18", 7)
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 7
    factory = tmp_path / "nets.py"
    factory.write_text(
        "import torch.nn as nn\n"
        "def make(num_classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))\n"
        "def plain():\n    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))\n"
        "INSTANCE = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))\n"
        "def broken():\n    return 42\n"
    )
    assert resolve_source(f"{factory}:make", 4)[1].out_features == 4
    assert resolve_source(f"{factory}:plain", 4)[1].out_features == 3
    assert resolve_source(f"{factory}:INSTANCE", 4)[1].out_features == 5
    spec = import_model(resolve_source(f"{factory}:make", 4), "lin", (3, 2, 2), 4)
    assert [n.op for n in spec.nodes] == ["linear", "output"]
    assert source_name("torchvision:resnet18") == "resnet18" and source_name(f"{factory}:make") == "make"
    with pytest.raises(ArchError, match="returned int, not an nn.Module"):
        resolve_source(f"{factory}:broken", 4)


@pytest.mark.parametrize(("source", "message"), [
    ("torchvision:resnet1", "unknown torchvision classification model 'resnet1'; did you mean resnet18"),
    ("no_such_package_xyz.models:make", "cannot load 'no_such_package_xyz.models:make': ModuleNotFoundError"),
    ("torchvision", "source 'torchvision' must look like 'torchvision:resnet18' or 'package.module:factory'"),
    ("/nonexistent/file.py:make", "source file /nonexistent/file.py does not exist"),
    ("torch.nn:NoSuchLayer", "cannot load 'torch.nn:NoSuchLayer': AttributeError"),
])
def test_bad_sources_are_one_line_errors(source: str, message: str):
    with pytest.raises(ArchError) as info:
        resolve_source(source, 10)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
