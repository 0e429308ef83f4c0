"""Where a fine-tune starts: the GHN-Q prediction, the builder's own init, or a perturbed prediction.

A registry of named starts so the comparison in benchmarks/ runs one recipe from each:

* ``ghn`` - the predicted parameters as they are.
* ``random`` - the builder's default (PyTorch) initialisation, seeded: the baseline.
* ``ghn-noise`` - predicted weights plus Gaussian noise of ``noise`` x each tensor's std. GHN-2
  decodes big tensors by tiling a 64x64 block (docs: ghn2-design.md, section 5.1), so filter j
  and j+64 start identical; noise breaks the tie.
* ``ghn-orth`` - conv / linear weights that hold such tiled (exactly repeated) filters are
  re-initialised orthogonally at the predicted tensor's norm; the others keep the prediction.
* ``ghn-rescale`` - every conv weight that feeds a BatchNorm is scaled to the norm the
  builder's init gives that tensor (its bias and the BN's running statistics with it), which
  leaves the net's function unchanged (BN divides the scale out) but not its training: under
  BN, SGD's effective step on a weight falls with the square of its norm, and the predicted
  weights are ~2.5x the init's norm (measured on ResNet-20), so they start ~6x slower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ghnq_deploy.arch.builder import build_model
from ghnq_deploy.errors import UserError
from ghnq_deploy.ghn.predict import PredictedModel


class InitError(UserError):
    """An unknown start or a bad noise level; one line."""


@dataclass
class Start:
    state_dict: dict[str, torch.Tensor]
    changed: list[str]  # parameters that differ from the prediction
    from_ghn: bool


def _ghn(model: PredictedModel, seed: int, noise: float) -> Start:
    return Start({k: v.clone() for k, v in model.state_dict.items()}, [], True)


def _random(model: PredictedModel, seed: int, noise: float) -> Start:
    state = build_model(model.spec, seed=seed).state_dict()
    return Start(state, [k for k in state if k in model.state_dict and "running" not in k and "num_batches" not in k],
                 False)


def _weights(model: PredictedModel) -> list[str]:
    """Names of conv / linear weights (4-D or 2-D tensors)."""
    return [k for k, v in model.state_dict.items() if k.endswith(".weight") and v.dim() in (2, 4)]


def _noise(model: PredictedModel, seed: int, noise: float) -> Start:
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.state_dict.items()}
    names = _weights(model)
    for k in names:
        w = state[k]
        w.add_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * (noise * w.std().clamp_min(1e-8)))
    return Start(state, names, True)


def tiled_filters(w: torch.Tensor) -> bool:
    """Whether some output filters of ``w`` are exact copies of others (the GHN's tiling)."""
    flat = w.reshape(w.shape[0], -1)
    return flat.shape[0] > 1 and torch.unique(flat, dim=0).shape[0] < flat.shape[0]


def _orthogonal(model: PredictedModel, seed: int, noise: float) -> Start:
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.state_dict.items()}
    changed = []
    for k in _weights(model):
        w = state[k]
        if not tiled_filters(w):
            continue
        fresh = torch.empty_like(w)
        torch.nn.init.orthogonal_(fresh, generator=gen)
        state[k] = fresh * (w.norm() / fresh.norm().clamp_min(1e-12))
        changed.append(k)
    return Start(state, changed, True)


def _rescale(model: PredictedModel, seed: int, noise: float) -> Start:
    reference = build_model(model.spec, seed=seed).state_dict()
    state = {k: v.clone() for k, v in model.state_dict.items()}
    changed = []
    for node in model.spec.nodes:
        if node.op != "bn" or len(node.inputs) != 1:
            continue
        conv = model.spec.node(node.inputs[0])
        weight = f"layers.{node.inputs[0]}.weight"
        if conv.op != "conv" or weight not in state or weight not in reference:
            continue
        norm = state[weight].norm()
        if not torch.isfinite(norm) or norm <= 0:
            continue
        factor = reference[weight].norm() / norm
        state[weight].mul_(factor)
        changed.append(weight)
        bias = f"layers.{node.inputs[0]}.bias"
        if bias in state:
            state[bias].mul_(factor)
            changed.append(bias)
        for stat, power in (("running_mean", 1), ("running_var", 2)):
            key = f"layers.{node.id}.{stat}"
            if key in state:
                state[key].mul_(factor ** power)
    return Start(state, changed, True)


INITS: dict[str, Callable[[PredictedModel, int, float], Start]] = {
    "ghn": _ghn, "random": _random, "ghn-noise": _noise, "ghn-orth": _orthogonal, "ghn-rescale": _rescale,
}
DEFAULT_NOISE = 0.05


def make_start(model: PredictedModel, init: str, seed: int, noise: float = DEFAULT_NOISE) -> Start:
    """The starting parameters (and buffers) for ``init``; refused when unknown."""
    if init not in INITS:
        raise InitError(f"unknown --init {init!r}; choose from {', '.join(INITS)}")
    if not (noise >= 0 and noise < 10):
        raise InitError(f"--noise is a fraction of each weight's std in [0, 10), got {noise}")
    return INITS[init](model, seed, noise)
