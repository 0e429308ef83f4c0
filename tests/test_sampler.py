"""The architecture space: deterministic, split-disjoint, capped, and every net runs."""

from __future__ import annotations

import statistics

import pytest
import torch

from ghnq_deploy.arch.builder import build_model, param_count
from ghnq_deploy.arch.sampler import SPLIT_CONFIGS, SPLITS, in_test_bucket, sample_arch, sample_split, structure_hash
from ghnq_deploy.arch.spec import INPUT_ID, ArchError, ArchSpec, analyze

N_PER_SPLIT = 50
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def nets() -> dict[str, list[ArchSpec]]:
    return {split: sample_split(split, N_PER_SPLIT, seed=0) for split in SPLITS}


def conv_depth(spec: ArchSpec) -> int:
    """Convs on the longest input -> output path."""
    info = analyze(spec, param_cap=10**9)
    depth = {INPUT_ID: 0}
    for node_id in info.order:
        node = spec.node(node_id)
        depth[node_id] = max(depth[i] for i in node.inputs) + (node.op == "conv")
    return depth[spec.output_node.id]


@pytest.mark.parametrize("split", SPLITS)
def test_sampling_is_deterministic_and_index_independent(split: str):
    first = [s.dumps() for s in sample_split(split, 5, seed=7)]
    assert first == [s.dumps() for s in sample_split(split, 5, seed=7)]
    assert sample_arch(split, 7, 3).dumps() == first[3]  # index 3 alone gives the same net
    assert first != [s.dumps() for s in sample_split(split, 5, seed=8)]
    assert len(set(first)) == 5


def test_id_train_and_id_test_are_disjoint():
    train = sample_split("id-train", 300, seed=0)
    test = sample_split("id-test", 100, seed=0)
    train_hashes = {structure_hash(s) for s in train}
    test_hashes = {structure_hash(s) for s in test}
    assert not train_hashes & test_hashes
    assert not any(in_test_bucket(s) for s in train)
    assert all(in_test_bucket(s) for s in test)
    assert len(train_hashes) > 290 and len(test_hashes) > 95  # diverse, not a handful of repeats


def test_unknown_split_is_a_user_error():
    with pytest.raises(ArchError, match="unknown split 'nope'; choose from id-train"):
        sample_arch("nope", 0, 0)


@pytest.mark.parametrize("split", SPLITS)
def test_every_net_is_valid_capped_builds_and_runs(split: str, nets: dict[str, list[ArchSpec]]):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for spec in nets[split]:
        info = analyze(spec, param_cap=SPLIT_CONFIGS[split].max_params)
        assert info.params <= SPLIT_CONFIGS[split].max_params <= 10**7
        model = build_model(spec, seed=0).eval()
        assert param_count(model) == info.params
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, 10), spec.name
        assert torch.isfinite(out).all(), spec.name


def test_splits_have_their_character(nets: dict[str, list[ArchSpec]]):
    def ops(split: str) -> list[set[str]]:
        return [{n.op for n in s.nodes} for s in nets[split]]

    assert all("bn" not in o for o in ops("ood-bnfree"))
    assert all("bn" in o for o in ops("id-train"))
    # OOD-wide: every stem is wider than any in-distribution stem
    assert min(s.nodes[0].attributes["out_channels"] for s in nets["ood-wide"]) > max(
        SPLIT_CONFIGS["id-train"].widths)
    # OOD-deep: much deeper on average
    mean_depth = {k: statistics.mean(conv_depth(s) for s in nets[k]) for k in ("id-train", "ood-deep")}
    assert mean_depth["ood-deep"] > 2 * mean_depth["id-train"]
    # OOD-mobilenet: inverted residuals only, i.e. depthwise convs and ReLU6 everywhere
    for spec in nets["ood-mobilenet"]:
        info = analyze(spec)
        shapes = {INPUT_ID: spec.input_shape, **{k: v.shape for k, v in info.nodes.items()}}
        depthwise = [n for n in spec.nodes if n.op == "conv" and n.attr("groups") == shapes[n.inputs[0]][0] > 1]
        assert len(depthwise) >= 6, spec.name
        assert "relu6" in {n.op for n in spec.nodes}
    # the in-distribution space mixes every block family: depthwise, dilated, residual, concat, pooling
    seen = set().union(*ops("id-train"))
    assert {"conv", "bn", "add", "concat", "maxpool", "avgpool", "global_avgpool", "linear"} <= seen
    assert any(n.attr("dilation") > 1 for s in nets["id-train"] for n in s.nodes if n.op == "conv")


def test_space_2_draws_the_mobilenet_v3_efficientnet_and_shufflenet_blocks_in_id_splits():
    from collections import Counter

    from ghnq_deploy.arch.sampler import sample_split

    for split in ("id-train", "id-test"):
        ops = Counter(n.op for s in sample_split(split, 40, 0) for n in s.nodes)
        for op in ("hardswish", "hardsigmoid", "silu", "sigmoid", "mul", "adaptive_avgpool", "channel_shuffle",
                   "channel_slice"):
            assert ops[op] > 0, (split, op)
    for split in ("ood-deep", "ood-mobilenet"):  # the OOD splits do not change
        assert [s.dumps() for s in sample_split(split, 5, 0)] == [s.dumps() for s in sample_split(split, 5, 0, space=1)]


def test_space_1_has_none_of_the_new_ops_and_the_shipped_checkpoint_maps_to_it():
    from ghnq_deploy.arch.sampler import space_for, sample_split
    from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
    from ghnq_deploy.ghn.graph import PRIMITIVES

    new = {"hardswish", "hardsigmoid", "silu", "sigmoid", "mul", "adaptive_avgpool", "channel_shuffle", "channel_slice"}
    assert not any(n.op in new for s in sample_split("id-train", 40, 0, space=1) for n in s.nodes)
    ghn, _ = load_ghn_checkpoint("default")
    assert space_for(ghn.config.num_primitives) == 1 and space_for(len(PRIMITIVES)) == 2


def test_a_fresh_ghn_predicts_space_2_nets():
    import torch

    from ghnq_deploy.arch.builder import build_model
    from ghnq_deploy.arch.sampler import sample_split
    from ghnq_deploy.ghn.model import GHNQ
    from ghnq_deploy.ghn.predict import predict

    torch.manual_seed(0)
    specs = [s for s in sample_split("id-train", 20, 0) if any(n.op in ("mul", "channel_shuffle") for n in s.nodes)][:2]
    for pm in predict(GHNQ().eval(), specs):
        model = build_model(pm.spec)
        model.load_state_dict(pm.state_dict)
        with torch.no_grad():
            assert torch.isfinite(model.eval()(torch.randn(2, 3, 32, 32))).all()
