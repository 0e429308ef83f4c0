"""How badly one per-tensor grid fits a layer's output channels: a differentiable QAT penalty.

Why: under the paper's scheme every conv's *BN-folded* weights share one per-tensor range.
``w_fold[c] = w[c] * gamma[c] / sqrt(var[c] + eps)``, so one channel with a large
``gamma / sigma`` (a near-dead channel, a large gamma) sets the range and the 4-bit step
becomes wider than most other channels' weights: they round to zero. Measured on the
float checkpoint (12 id-test nets, 512 images): W4A8 21.8 % per-tensor vs 29.9 % with the
same bits per channel, float 31.8 % (docs/quantization.md). Straight-through fake-quant
gradients treat rounding as identity and barely see this; this penalty names it directly.

For each quantized layer and output channel ``c``, the noise-to-signal ratio of uniform
rounding on the layer's per-tensor grid of ``bits`` bits::

    nsr[c] = (step^2 / 12) / mean(w[c]^2),   step = (max(w) - min(w)) / (2^bits - 1)

The penalty is the mean over channels and layers of ``nsr / (1 + nsr)``, the share of a
channel's output power that is rounding noise: scale-invariant (a global rescale of a layer
changes nothing), near zero for balanced layers, and bounded. Bounded matters: a dead
channel (gamma ~ 0, nsr ~ 1e12 on the float checkpoint) is harmless, and ``log1p(nsr)``
would give it a ``1 / power`` gradient that swamps every other term through the gradient
clip; here its gradient vanishes. Gradients reach the range-setting weights (pulled in),
every small channel (grown), and through the batch statistics the GHN's gammas and filter
directions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_TINY = 1e-12


def channel_noise_ratio(w: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Per-output-channel rounding-noise / signal power of ``w`` on one per-tensor ``bits`` grid."""
    flat = w.reshape(w.shape[0], -1)
    lo = torch.clamp(flat.min(), max=0.0)  # the asymmetric grid always holds real zero
    hi = torch.clamp(flat.max(), min=0.0)
    step = (hi - lo) / (2**bits - 1)
    power = flat.pow(2).mean(dim=1)
    return step.pow(2) / 12.0 / (power + _TINY)


def range_balance_penalty(weights: Iterable[torch.Tensor], bits: int = 4) -> torch.Tensor | None:
    """Mean over layers of mean_c nsr[c] / (1 + nsr[c]); None when ``weights`` is empty."""
    terms = []
    for w in weights:
        nsr = channel_noise_ratio(w, bits)
        terms.append((nsr / (1.0 + nsr)).mean())
    if not terms:
        return None
    return torch.stack(terms).mean()
