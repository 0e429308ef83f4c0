"""``predict`` writes each net's state dict from the spec (no module build, no random init of the
weights it overwrites): it must equal, key for key and in order, what the seeded module build
with the predicted tensors loaded gave before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ghnq_deploy.arch.builder import build_model
from ghnq_deploy.arch.sampler import sample_arch
from ghnq_deploy.arch.spec import analyze, load_spec
from ghnq_deploy.ghn.graph import build_graph
from ghnq_deploy.ghn.model import GHNQ, GHNConfig
from ghnq_deploy.ghn.predict import _state_dict, predict

from new_ops_nets import adaptive_spec, se_spec, shuffle_spec, slice_spec

pytestmark = pytest.mark.usefixtures("torch_one_thread")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _specs():
    specs = [load_spec(p) for p in sorted(EXAMPLES.glob("*.json"))]
    specs += [sample_arch(split, 0, i) for split in ("id-test", "ood-bnfree", "ood-mobilenet") for i in range(2)]
    return specs + [se_spec(), shuffle_spec(), slice_spec(), adaptive_spec()]


@pytest.fixture(scope="module")
def ghn():
    torch.manual_seed(0)
    return GHNQ(GHNConfig()).eval()  # today's whole vocabulary, for the new-op nets


def test_state_equals_the_seeded_module_build(ghn):
    specs = _specs()
    for spec, model in zip(specs, predict(ghn, specs, seed=3)):
        expected = build_model(spec, seed=3).state_dict()
        for name, value in model.state_dict.items():
            if "running" not in name and "num_batches" not in name:
                expected[name] = value
        assert list(model.state_dict) == list(expected), spec.name
        for name, value in expected.items():
            got = model.state_dict[name]
            assert got.dtype == value.dtype and torch.equal(got, value), f"{spec.name}: {name}"
        model.build()  # loads strictly


def test_a_parameter_the_ghn_does_not_predict_falls_back_to_the_seeded_build(ghn):
    spec = load_spec(EXAMPLES / "resnet20.json")
    info = analyze(spec)
    with torch.no_grad():
        predicted = ghn.predict_params([build_graph(spec, info)])[0]
    missing = next(name for name in predicted if name.endswith(".weight") and predicted[name].dim() == 4)
    partial = {k: v for k, v in predicted.items() if k != missing}
    state = _state_dict(spec, info, partial, seed=5)
    assert torch.equal(state[missing], build_model(spec, seed=5).state_dict()[missing])
    assert list(state) == list(build_model(spec).state_dict())
