"""Validation accuracy as the deployed file will compute it, never on training images.

Each measurement works on a copy: BatchNorm running statistics are calibrated on the
calibration images (the export's protocol), then the net runs under the deployment scheme
itself (``tflite-int8``: calibrated activation ranges, BN folded from running statistics),
not the per-batch QAT form it trains with. fp32 runs the float net with calibrated BN.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ghnq_deploy.data import ImageSet, normalize
from ghnq_deploy.quant.bn_calibrate import calibrate_bn
from ghnq_deploy.quant.scheme import get_scheme
from ghnq_deploy.quant.simulate import QuantSim

EVAL_BATCH = 250


def normalized_batches(images: np.ndarray, size: int = EVAL_BATCH):
    for start in range(0, len(images), size):
        yield normalize(images[start:start + size])


def deployed_net(model: nn.Module, calibration: np.ndarray, scheme: str, bits: str) -> nn.Module:
    """A copy of ``model`` calibrated as export calibrates it, run as ``scheme`` at ``bits`` runs it."""
    net = calibrate_bn(copy.deepcopy(model), calibration)
    sch = get_scheme(scheme, bits)
    if sch.is_float:
        return net.eval()
    sim = QuantSim(net, sch, bn="running")
    if sch.range_source == "calibrated" and sch.act_bits is not None:
        sim.calibrate(normalized_batches(calibration))
    return sim


@torch.no_grad()
def deployed_accuracy(model: nn.Module, calibration: np.ndarray, val: ImageSet, scheme: str, bits: str) -> float:
    """Top-1 on ``val`` of the deployed form of ``model``."""
    net = deployed_net(model, calibration, scheme, bits)
    correct = 0
    for start, x in zip(range(0, len(val), EVAL_BATCH), normalized_batches(val.images)):
        y = torch.from_numpy(val.labels[start:start + EVAL_BATCH])
        correct += int((net(x).argmax(1) == y).sum())
    return correct / max(1, len(val))
