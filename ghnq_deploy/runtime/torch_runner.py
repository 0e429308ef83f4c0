"""The float reference: a predicted model (file or module) run by torch on the CPU."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ghnq_deploy.errors import UserError
from ghnq_deploy.runtime import batches, prepare, top1


def load(model_file: str | os.PathLike | nn.Module, bn_mode: str | None = None) -> nn.Module:
    """A module in eval mode; refuses a file whose BN statistics were never calibrated.

    Predicted models carry no BN running statistics (meta 'bn_stats': 'uncalibrated'):
    running them as they are would silently use the init values (mean 0, var 1). Pass
    ``bn_mode="batch"`` for the paper's batch-statistics protocol, or calibrate first.
    """
    if isinstance(model_file, nn.Module):
        return model_file.eval()
    from ghnq_deploy.arch.builder import set_bn_mode
    from ghnq_deploy.ghn.predict import load_predicted

    predicted = load_predicted(model_file)
    model = predicted.build()
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if has_bn and bn_mode is None and predicted.meta.get("bn_stats", "uncalibrated") == "uncalibrated":
        raise UserError(f"{model_file}: BatchNorm statistics are uncalibrated; calibrate them (export does) "
                        f"or run with bn_mode='batch'")
    if bn_mode:
        set_bn_mode(model, bn_mode)
    return model


@torch.no_grad()
def run_normalized(model_file, x: np.ndarray, batch_size: int = 256, bn_mode: str | None = None) -> np.ndarray:
    """Logits for normalised float NCHW inputs."""
    model = load(model_file, bn_mode)
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return torch.cat([model(x[s]) for s in batches(len(x), batch_size)]).numpy()


def run(model_file, images: np.ndarray, **kw) -> np.ndarray:
    """Logits for raw uint8 NHWC images."""
    return run_normalized(model_file, prepare(images), **kw)


def accuracy(model_file, images: np.ndarray, labels: np.ndarray, **kw) -> float:
    return top1(run(model_file, images, **kw), labels)


def describe() -> str:
    return f"torch {torch.__version__} (CPU, float32)"
