"""BatchNorm calibration (running statistics from real images) and conv+BN folding.

GHN-Q predicts weights but not BatchNorm running statistics, and a device runs a fixed
graph: so before export the running statistics are estimated once on the calibration set
(cumulative average over one pass) and every conv -> BN pair is folded into the conv with
torch's own :func:`torch.nn.utils.fusion.fuse_conv_bn_eval`. Folding scales each output
channel by gamma/sqrt(var+eps), which can widen weight ranges a lot (worst on depthwise
convs, whose per-channel scales differ most); the reports say by how much, layer by layer.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ghnq_deploy.arch.builder import ArchNet
from ghnq_deploy.errors import UserError

FOLD_ATOL = 1e-4  # folded vs unfolded logits: |diff| <= FOLD_ATOL + FOLD_RTOL * max|logit|
FOLD_RTOL = 1e-4


class FoldingError(UserError):
    """Folding changed the network's outputs beyond float rounding (or cannot be checked); one line."""


@dataclass
class FoldReport:
    """One BatchNorm node: folded into its conv, or kept (and why)."""

    bn: str
    conv: str | None  # the conv it was folded into; None when kept
    folded: bool
    reason: str  # "folded" or why it was kept
    depthwise: bool = False
    max_abs_before: float | None = None  # max |W| of the conv before folding
    max_abs_after: float | None = None
    growth: float | None = None  # max_abs_after / max_abs_before
    spread_before: float | None = None  # max over channels of max|W_c| / min over channels (per-tensor pain)
    spread_after: float | None = None
    bn_scale_min: float | None = None  # gamma / sqrt(var + eps), the per-channel factor folding applies
    bn_scale_max: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _batchnorms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _as_normalised(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 NHWC pixels are normalised here (the training preprocessing); float NCHW is used as is."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        from ghnq_deploy.data import normalize

        return normalize(images)
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        from ghnq_deploy.data import normalize

        return normalize(x)
    if x.ndim != 4 or not x.is_floating_point():
        raise UserError(f"BN calibration needs uint8 NHWC pixels or normalised float NCHW, got {x.dtype} {tuple(x.shape)}")
    return x.float()


@torch.no_grad()
def calibrate_bn(model: nn.Module, images: torch.Tensor | np.ndarray, batch_size: int = 64) -> nn.Module:
    """Estimate every BatchNorm's running mean/var on ``images`` in one pass, in place.

    Running statistics are reset and BN runs in train mode with ``momentum=None`` (a
    cumulative average over the batches, not an exponential one); everything else stays in
    eval mode. Afterwards the model is in eval mode, using the new statistics. A net
    without BatchNorm is returned unchanged.
    """
    bns = _batchnorms(model)
    if not bns:
        return model.eval()
    x = _as_normalised(images)
    if len(x) == 0:
        raise UserError("BN calibration needs at least one image")
    momenta = []
    model.eval()
    for bn in bns:
        momenta.append(bn.momentum)
        if bn.running_mean is None:  # built without running statistics ("batch" mode): add them
            bn.register_buffer("running_mean", torch.zeros(bn.num_features))
            bn.register_buffer("running_var", torch.ones(bn.num_features))
            bn.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        bn.track_running_stats = True
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for start in range(0, len(x), batch_size):
            model(x[start:start + batch_size])
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.eval()
    return model


def _channel_max(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().flatten(1).amax(dim=1)


def _spread(channel_max: torch.Tensor) -> float:
    lo = float(channel_max.min())
    return float("inf") if lo == 0 else float(channel_max.max()) / lo


def _consumers(model: ArchNet) -> dict[str, list[str]]:
    consumers: dict[str, list[str]] = {}
    for node_id, inputs in model._plan:
        for i in inputs:
            consumers.setdefault(i, []).append(node_id)
    return consumers


def _why_not_foldable(model: ArchNet, bn_id: str, consumers: dict[str, list[str]]) -> tuple[str | None, str]:
    """(conv id, "") if the BN directly follows a conv whose only consumer it is; else (None, reason)."""
    inputs = model.spec.node(bn_id).inputs
    source = inputs[0]
    if source == "input":
        return None, "kept as BatchNorm: it normalises the network input (no conv before it)"
    module = model.layers[source]
    if not isinstance(module, nn.Conv2d):
        op = model.spec.node(source).op
        return None, f"kept as BatchNorm (a per-channel affine): it follows '{source}' ({op}), not a conv"
    if len(consumers.get(source, [])) > 1:
        return None, f"kept as BatchNorm: conv '{source}' also feeds {[c for c in consumers[source] if c != bn_id]}"
    return source, ""


def fold_bn(model: ArchNet, check_inputs: torch.Tensor | np.ndarray | None = None) -> tuple[ArchNet, list[FoldReport]]:
    """A copy of ``model`` with every conv -> BN pair folded (BN node -> Identity), plus reports.

    Uses the running statistics, so calibrate them first. BNs that cannot be folded (not
    directly after a conv, or the conv output is also used elsewhere) stay BatchNorm2d in
    eval mode, i.e. a per-channel affine. With ``check_inputs`` the folded and unfolded nets
    must agree within float rounding (FOLD_ATOL + FOLD_RTOL * max|logit|), else FoldingError.
    """
    for bn in _batchnorms(model):
        if bn.running_mean is None or not bn.track_running_stats:
            raise FoldingError("BatchNorm has no running statistics (batch-statistics mode); run calibrate_bn first")
    source = model.eval()
    folded = copy.deepcopy(source).eval()
    consumers = _consumers(folded)
    reports: list[FoldReport] = []
    for node_id, _ in folded._plan:
        bn = folded.layers[node_id]
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        conv_id, reason = _why_not_foldable(folded, node_id, consumers)
        bn_scale = (bn.weight.detach() if bn.affine else torch.ones(bn.num_features)) / torch.sqrt(bn.running_var + bn.eps)
        if conv_id is None:
            reports.append(FoldReport(node_id, None, False, reason,
                                      bn_scale_min=float(bn_scale.min()), bn_scale_max=float(bn_scale.max())))
            continue
        conv = folded.layers[conv_id]
        before = _channel_max(conv.weight)
        fused = fuse_conv_bn_eval(conv, bn)
        after = _channel_max(fused.weight)
        folded.layers[conv_id] = fused
        folded.layers[node_id] = nn.Identity()
        depthwise = conv.groups > 1 and conv.groups == conv.in_channels
        reports.append(FoldReport(
            node_id, conv_id, True, "folded", depthwise,
            float(before.max()), float(after.max()),
            float(after.max()) / float(before.max()) if float(before.max()) > 0 else float("inf"),
            _spread(before), _spread(after), float(bn_scale.min()), float(bn_scale.max()),
        ))
    if check_inputs is not None:
        check_folding(source, folded, check_inputs)
    return folded, reports


@torch.no_grad()
def check_folding(model: nn.Module, folded: nn.Module, inputs: torch.Tensor | np.ndarray,
                  atol: float = FOLD_ATOL, rtol: float = FOLD_RTOL) -> float:
    """Max |logit difference| between the two nets; raises FoldingError beyond tolerance."""
    x = _as_normalised(inputs)
    ref = model.eval()(x)
    out = folded.eval()(x)
    diff = float((ref - out).abs().max())
    bound = atol + rtol * float(ref.abs().max())
    if not np.isfinite(diff) or diff > bound:
        raise FoldingError(f"folded and unfolded nets disagree: max |logit diff| {diff:.3g} > {bound:.3g}")
    return diff


def summarize(reports: list[FoldReport]) -> dict:
    """The folding numbers an export manifest records."""
    folded = [r for r in reports if r.folded]
    kept = [r for r in reports if not r.folded]
    worst = max(folded, key=lambda r: r.growth or 0.0, default=None)
    return {
        "batchnorms": len(reports),
        "folded": len(folded),
        "kept": [{"bn": r.bn, "reason": r.reason} for r in kept],
        "depthwise_folded": sum(r.depthwise for r in folded),
        "max_growth": None if worst is None else worst.growth,
        "max_growth_layer": None if worst is None else worst.conv,
        "max_spread_after": max((r.spread_after for r in folded), default=None),
        "max_spread_after_depthwise": max((r.spread_after for r in folded if r.depthwise), default=None),
    }
