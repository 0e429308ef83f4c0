"""Shared by the export tests: the nets to export (examples + sampled nets covering every feature)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from ghnq_deploy.arch.builder import ArchNet, build_model
from ghnq_deploy.arch.sampler import sample_arch
from ghnq_deploy.arch.spec import ArchSpec, analyze, load_spec
from ghnq_deploy.calibration import load_calibration, load_eval_set
from ghnq_deploy.data import normalize
from ghnq_deploy.quant.bn_calibrate import calibrate_bn, fold_bn

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.json")) if EXAMPLES_DIR.is_dir() else []
FEATURES = ("depthwise", "dilated", "concat", "residual", "bnfree", "flatten_head", "maxpool", "avgpool", "relu6")
PARITY_ATOL = 1e-4  # max |logit difference| float runtime vs torch


def features(spec: ArchSpec) -> set[str]:
    """Which translation-relevant features a net uses."""
    info = analyze(spec)
    shapes = {"input": spec.input_shape, **{k: v.shape for k, v in info.nodes.items()}}
    found = set()
    for n in spec.nodes:
        if n.op == "conv" and n.attr("groups") > 1:
            found.add("depthwise")
        if n.op == "conv" and n.attr("dilation") > 1:
            found.add("dilated")
        if n.op == "concat":
            found.add("concat")
        if n.op == "add":
            found.add("residual")
        if n.op == "linear" and len(shapes[n.inputs[0]]) == 3:
            found.add("flatten_head")
        if n.op in ("maxpool", "avgpool", "relu6"):
            found.add(n.op)
    if not any(n.op == "bn" for n in spec.nodes):
        found.add("bnfree")
    return found


@functools.cache
def sampled_specs(count: int = 20, **kw) -> tuple[ArchSpec, ...]:
    """``count`` sampled nets: 2 BN-free, 1 MobileNet-style, then the first id-test nets (seed 0).

    ``kw`` goes to ``sample_arch`` (``space=1``: the op set of the shipped checkpoints' nets).
    """
    chosen = [sample_arch("ood-bnfree", 0, i, **kw) for i in range(2)] + [sample_arch("ood-mobilenet", 0, 0, **kw)]
    chosen += [sample_arch("id-test", 0, i, **kw) for i in range(count - len(chosen))]
    return tuple(chosen)


def _node(node_id: str, op: str, inputs: list[str], **attributes) -> dict:
    return {"id": node_id, "op": op, "inputs": inputs, "attributes": attributes}


def edge_spec() -> ArchSpec:
    """A net of the translation corner cases the sampler never draws: BN on the input and after an
    add (kept, not folded), max-pool padding on negative values, grouped conv, a depthwise conv with
    multiplier 2 that is dilated and strided, padded avg-pool, and a linear layer on a 4x4 map."""
    from ghnq_deploy.arch.spec import parse_spec

    n = _node
    nodes = [
        n("bn_in", "bn", ["input"]),
        n("c1", "conv", ["bn_in"], out_channels=16, kernel=3, bias=True),
        n("c0", "conv", ["input"], out_channels=16, kernel=3, stride=2, padding=1),
        n("mp", "maxpool", ["c1"], kernel=3, stride=2, padding=1),
        n("add0", "add", ["mp", "c0"]),
        n("bn_add", "bn", ["add0"]),
        n("g", "conv", ["bn_add"], out_channels=32, kernel=3, groups=4),
        n("dw", "conv", ["g"], out_channels=64, kernel=3, groups=32, dilation=2, stride=2),
        n("dw_bn", "bn", ["dw"]),
        n("r", "relu6", ["dw_bn"]),
        n("mp2", "maxpool", ["r"], kernel=3, stride=2, padding=1),
        n("ap", "avgpool", ["mp2"], kernel=3, stride=1, padding=1),
        n("fc1", "linear", ["ap"], out_features=32),
        n("fc1_relu", "relu", ["fc1"]),
        n("fc", "linear", ["fc1_relu"], out_features=10),
        n("output", "output", ["fc"]),
    ]
    spec = parse_spec({"name": "edge_cases", "input_shape": [3, 32, 32], "num_classes": 10, "nodes": nodes})
    analyze(spec)
    return spec


def core_specs() -> tuple[ArchSpec, ...]:
    """The fast default subset: the edge-case net, a BN-free net and a BN net with concat,
    residual and dilated depthwise blocks (together: every feature)."""
    sampled = sampled_specs()
    return (edge_spec(), sampled[0], sampled[3])


def example_specs() -> list[ArchSpec]:
    return [load_spec(p) for p in EXAMPLES]


@functools.cache
def calibration_images(count: int = 128) -> np.ndarray:
    return load_calibration().images[:count]


@functools.cache
def parity_inputs(count: int = 32) -> np.ndarray:
    """Normalised float NCHW real test images (JPEG copy) plus a few noise images."""
    real = normalize(load_eval_set().images[:count]).numpy()
    noise = np.random.default_rng(0).normal(size=(4, *real.shape[1:])).astype(np.float32)
    return np.concatenate([real, noise])


def float_model(spec: ArchSpec, seed: int = 0) -> ArchNet:
    """Builder init, BN calibrated on real images, folded: the float net an export starts from."""
    model = build_model(spec, seed=seed)
    calibrate_bn(model, calibration_images())
    folded, _ = fold_bn(model, check_inputs=calibration_images(16))  # raises if folding changed the outputs
    return folded.eval()


@torch.no_grad()
def torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    return model(torch.as_tensor(x)).numpy()
