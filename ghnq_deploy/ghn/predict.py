"""Predict a net's parameters with a GHN, and the predicted-model file that later stages read."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from ghnq_deploy.arch.builder import ArchNet, build_model
from ghnq_deploy.arch.spec import ArchError, ArchInfo, ArchSpec, analyze, parse_spec
from ghnq_deploy.ghn.checkpoint import CheckpointError, check_finite, torch_load_file
from ghnq_deploy.ghn.graph import PRIMITIVES, ArchGraph, build_graph
from ghnq_deploy.ghn.model import BIT_OPTIONS, GHNQ
from ghnq_deploy.io import atomic_torch_save

PREDICTED_FORMAT = "ghnq-deploy/predicted-model"


@dataclass
class PredictedModel:
    spec: ArchSpec
    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)  # ghn checkpoint hash, seed, bits, bn_stats, timing

    def build(self, bn_mode: str | None = None) -> ArchNet:
        """The module with the predicted parameters loaded.

        BatchNorm running statistics are not predicted: unless ``meta['bn_stats']`` says they
        were calibrated, use ``bn_mode="batch"`` (the paper's protocol) or calibrate them.
        """
        from ghnq_deploy.arch.builder import set_bn_mode

        model = build_model(self.spec)
        model.load_state_dict(self.state_dict)
        model.eval()
        if bn_mode:
            set_bn_mode(model, bn_mode)
        return model

    def to_dict(self) -> dict:
        return {"format": PREDICTED_FORMAT, "version": 1, "spec": self.spec.to_dict(),
                "state_dict": self.state_dict, "meta": self.meta}


def check_compatible(ghn: GHNQ, spec: ArchSpec) -> None:
    """Refuse nets the GHN was not trained for (another class count or input size)."""
    cfg = ghn.config
    if spec.num_classes != cfg.num_classes:
        raise ArchError(f"{spec.source}: the GHN predicts {cfg.num_classes}-class classifiers ({cfg.dataset}); "
                        f"this net has num_classes={spec.num_classes}")
    if tuple(spec.input_shape) != tuple(cfg.input_shape):
        raise ArchError(f"{spec.source}: the GHN was trained on {cfg.dataset} inputs of shape "
                        f"{list(cfg.input_shape)}; this net expects {list(spec.input_shape)}")


def check_known_ops(ghn: GHNQ, graph: ArchGraph) -> None:
    """Refuse a net with an op type the checkpoint never embedded (its prediction would be garbage)."""
    known = ghn.config.num_primitives
    unknown = sorted({PRIMITIVES[int(p)] for p in graph.primitives if int(p) >= known})
    if unknown:
        ops = {"cse": "mul (squeeze-excitation)", "shuffle": "channel_shuffle"}
        raise ArchError(f"{graph.spec.source}: this GHN checkpoint was trained without op type(s) "
                        f"{', '.join(ops.get(u, u) for u in unknown)}; use a checkpoint trained on them")


def predict(ghn: GHNQ, specs: list[ArchSpec], bits: str = "fp32", seed: int = 0,
            ghn_info: dict | None = None, param_cap: int | None = None) -> list[PredictedModel]:
    """Parameters for every spec, in one GHN forward pass (a meta-batch).

    ``param_cap``: refuse nets with more parameters (None: no cap; the 10^7 cap bounds the
    sampled training space, not users' nets)."""
    if bits not in BIT_OPTIONS:
        raise ValueError(f"unknown bit-width {bits!r}; choose from {', '.join(BIT_OPTIONS)}")
    infos = [analyze(s, param_cap=_cap(param_cap)) for s in specs]
    for s in specs:
        check_compatible(ghn, s)
    torch.manual_seed(seed)
    start = time.perf_counter()
    graphs = [build_graph(s, i, s_max=ghn.config.s_max) for s, i in zip(specs, infos)]
    for g in graphs:
        check_known_ops(ghn, g)
    graph_seconds = time.perf_counter() - start
    ghn.eval()
    with torch.no_grad():
        params = ghn.predict_params(graphs, [BIT_OPTIONS.index(bits)] * len(graphs))
    seconds = time.perf_counter() - start
    conditioned = ghn.config.bit_conditioning
    results = []
    for spec, info, graph, p in zip(specs, infos, graphs, params):
        state = _state_dict(spec, info, {k: v.detach().cpu().contiguous() for k, v in p.items()}, seed)
        meta = {
            "ghn": {k: v for k, v in (ghn_info or {}).items() if k in ("path", "sha256", "config")},
            "seed": seed, "bits": bits if conditioned else "fp32",
            "bn_stats": "uncalibrated", "graph_nodes": graph.num_nodes,
            "seconds_graph": graph_seconds / len(specs), "seconds_total": seconds / len(specs),
        }
        results.append(PredictedModel(spec, state, meta))
    return results


_PARAMETRIC = {"conv": ("weight", "bias"), "linear": ("weight", "bias"), "bn": ("weight", "bias")}


def _state_dict(spec: ArchSpec, info: ArchInfo, predicted: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The net's state dict, in the module's key order: the predicted tensors plus BatchNorm's
    running statistics at their init (zeros, ones, 0 batches), as ``build_model(spec, seed=seed)``
    would hold them.

    Written from the spec, without building the module: its random init of weights that are
    overwritten anyway was most of ``predict``'s time per net. A net with a parameter the GHN does
    not predict falls back to the seeded build.
    """
    by_id = {n.id: n for n in spec.nodes}
    state: dict[str, torch.Tensor] = {}
    for node_id in info.order:
        node = by_id[node_id]
        for attr in _PARAMETRIC.get(node.op, ()):
            name = f"layers.{node_id}.{attr}"
            if name in predicted:
                state[name] = predicted[name]
            elif attr == "weight" or node.op == "bn" or node.attr("bias"):
                return {**build_model(spec, seed=seed).state_dict(), **predicted}
        if node.op == "bn":
            channels = predicted[f"layers.{node_id}.weight"].shape[0]
            state[f"layers.{node_id}.running_mean"] = torch.zeros(channels)
            state[f"layers.{node_id}.running_var"] = torch.ones(channels)
            state[f"layers.{node_id}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    if len(state) != len(predicted) + 3 * sum(by_id[i].op == "bn" for i in info.order):
        return {**build_model(spec, seed=seed).state_dict(), **predicted}  # a tensor of no known module
    return state


def save_predicted(path, model: PredictedModel) -> None:
    atomic_torch_save(path, model.to_dict())


def _cap(param_cap: int | None) -> int:
    return sys.maxsize if param_cap is None else param_cap


def load_predicted(path, param_cap: int | None = None) -> PredictedModel:
    """Read a predicted-model file (weights_only) and rebuild its spec; errors are one line."""
    data = torch_load_file(path, CheckpointError, "model")
    if not isinstance(data, dict) or data.get("format") != PREDICTED_FORMAT:
        raise CheckpointError(f"{path}: not a ghnq-deploy predicted model")
    if data.get("version") != 1:
        raise CheckpointError(f"{path}: predicted-model format version {data.get('version')!r} is not one this "
                              "release reads (1)")
    state, meta = data.get("state_dict"), data.get("meta", {})
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()) or not isinstance(meta, dict):
        raise CheckpointError(f"{path}: predicted model without a 'state_dict' of named tensors and a 'meta' dict")
    check_finite(path, state, CheckpointError, "model")
    spec = parse_spec(data.get("spec"), str(path))
    analyze(spec, param_cap=_cap(param_cap))
    model = PredictedModel(spec, state, meta)
    try:
        model.build()
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"{path}: parameters do not match the spec ({reason})") from None
    return model
