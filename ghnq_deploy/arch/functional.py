"""Run an :class:`~ghnq_deploy.arch.builder.ArchNet` on parameter tensors it does not own.

GHN training runs every sampled net on the GHN's predicted (non-leaf) tensors. Calling the
functional ops directly along the net's plan does what ``torch.func.functional_call`` does
without swapping each tensor into the module tree and back, and lets training choose per op:

* ``channels_last``: images and conv weights in NHWC, oneDNN's fast layout on CPU (conv
  outputs, and so the activations after them, follow the layout of their inputs);
* ``fp32_depthwise``: under bf16 autocast, depthwise convs still run in float32 (their output
  goes back to bf16). Measured on
  a 2-core Xeon with AMX / AVX512-BF16 (1 thread): oneDNN's bf16 weight gradient of a
  depthwise 5x5 conv (32x128x32x32) takes 283 ms against 59 ms in float32, while dense convs
  are 2-5x faster in bf16.

Without options the results are ``functional_call``'s, bit for bit. Channels-last changes the
rounding: torch's channels-last BatchNorm kernels sum in another order, and the gradients of a
training step's 4 sampled nets (CIFAR-10 batch 32, fresh GHN) differ from float64 by 2.8e-3
relative (NCHW: 1e-4; bf16 autocast: 5-8e-2), cosine 0.999996 (``tests/test_train_speed_forward.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ghnq_deploy.arch.builder import ArchNet, FlattenLinear
from ghnq_deploy.arch.spec import INPUT_ID


@dataclass(frozen=True)
class ForwardOptions:
    """How the ops of a net run (defaults: exactly as the module tree would)."""

    channels_last: bool = False
    fp32_depthwise: bool = False


def is_depthwise(conv: nn.Conv2d) -> bool:
    """One input channel per group (the convs oneDNN's bf16 backward is slow on)."""
    return conv.groups > 1 and conv.in_channels == conv.groups


def _conv(module: nn.Conv2d, params: Mapping[str, torch.Tensor], prefix: str, x: torch.Tensor,
          options: ForwardOptions) -> torch.Tensor:
    weight, bias = params[prefix + "weight"], params.get(prefix + "bias")
    if options.channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    device = x.device.type
    if options.fp32_depthwise and is_depthwise(module) and torch.is_autocast_enabled(device):
        with torch.autocast(device_type=device, enabled=False):
            out = module._conv_forward(x.float(), weight.float(), None if bias is None else bias.float())
        # back to the autocast dtype: the BatchNorm and activation after it run in bf16 as after
        # any other conv (measured: nets' forward + backward 1.15x faster than leaving them fp32)
        return out.to(torch.get_autocast_dtype(device))
    return module._conv_forward(x, weight, bias)


def _batch_norm(module: nn.BatchNorm2d, params: Mapping[str, torch.Tensor], prefix: str, x: torch.Tensor,
                options: ForwardOptions) -> torch.Tensor:
    # the GHN protocol: statistics of this batch, nothing tracked (ArchNet(bn_running_stats=False))
    return F.batch_norm(x, None, None, params[prefix + "weight"], params[prefix + "bias"], True, 0.0, module.eps)


def _linear(module: FlattenLinear, params: Mapping[str, torch.Tensor], prefix: str, x: torch.Tensor,
            options: ForwardOptions) -> torch.Tensor:
    return F.linear(x.flatten(1), params[prefix + "weight"], params.get(prefix + "bias"))


# the modules that hold parameters; every other ArchNet module is parameter-free and runs itself
_RUNNERS: dict[type[nn.Module], Callable[..., torch.Tensor]] = {
    nn.Conv2d: _conv, nn.BatchNorm2d: _batch_norm, FlattenLinear: _linear,
}


def run_with_params(net: ArchNet, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                    options: ForwardOptions = ForwardOptions()) -> torch.Tensor:
    """Logits of ``net`` (any device, meta included) on ``params`` (``layers.<id>.<name>``)."""
    if options.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    values = {INPUT_ID: x}
    for node_id, inputs in net._plan:
        module = net.layers[node_id]
        runner = _RUNNERS.get(type(module))
        if runner is not None:
            values[node_id] = runner(module, params, f"layers.{node_id}.", values[inputs[0]], options)
        elif next(module.parameters(recurse=False), None) is not None:
            raise ValueError(f"no functional runner for {type(module).__name__} (node {node_id}), which has parameters")
        else:
            values[node_id] = module(*(values[i] for i in inputs))
    return values[net.output_id]
