"""Cross-layer equalization (Nagel et al. 2019) of a BN-folded ArchNet, for per-tensor activations.

Why: folding BatchNorm multiplies each output channel by ``gamma / sqrt(var + eps)``. In a
GHN-predicted MnasNet the depthwise convs grow up to 394x this way (a channel with a tiny
variance gets a huge factor). Per-channel int8 weights absorb that, but the *activation* the
depthwise conv reads is quantized per tensor: the tiny channel sits below one step of the
grid and the fold then amplifies its rounding noise. Equalization moves the factor upstream:
for a conv ``A`` whose output reaches conv ``B`` only through a ReLU (or directly), output
channel ``c`` of ``A`` is divided by ``s_c`` and input channel ``c`` of ``B`` multiplied by it,
``s_c = sqrt(r_A[c] / r_B[c])`` with ``r`` the channel's max |weight|, so both get the range
``sqrt(r_A r_B)``. ReLU is positively homogeneous, so the float network is unchanged
(ReLU6 is not, and is left alone). Measured effect: docs/export.md, "Depthwise folding".
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ghnq_deploy.arch.builder import ArchNet

_TINY = 1e-12


@dataclass
class EqualizedPair:
    """One equalized (A, B) pair: the spread of B's input-channel ranges before and after."""

    first: str
    second: str
    channels: int
    spread_before: float  # max / min over channels of B's per-input-channel max |w|
    spread_after: float

    def to_dict(self) -> dict:
        return asdict(self)


def _pairs(model: ArchNet) -> list[tuple[str, str]]:
    """(A, B) conv ids where A's only consumer is B, directly or through one ReLU / identity."""
    spec = model.spec
    by_id = {n.id: n for n in spec.nodes}
    users: dict[str, list[str]] = {}
    for n in spec.nodes:
        for i in n.inputs:
            users.setdefault(i, []).append(n.id)
    pairs = []
    for n in spec.nodes:
        if n.op != "conv":
            continue
        cur = n.id
        nxt = users.get(cur, [])
        if len(nxt) == 1 and by_id[nxt[0]].op in ("relu", "identity", "bn"):
            if by_id[nxt[0]].op == "bn" and not isinstance(model.layers[nxt[0]], nn.Identity):
                continue  # a kept (unfolded) BatchNorm sits between them
            cur = nxt[0]
            nxt = users.get(cur, [])
            if len(nxt) == 1 and by_id[nxt[0]].op in ("relu", "identity"):
                cur = nxt[0]
                nxt = users.get(cur, [])
        if len(nxt) == 1 and by_id[nxt[0]].op == "conv" and by_id[nxt[0]].inputs == (cur,):
            pairs.append((n.id, nxt[0]))
    return pairs


def _input_ranges(conv: nn.Conv2d) -> torch.Tensor:
    """max |w| per input channel of ``conv`` (grouped convs: each group's own input channels)."""
    w = conv.weight.detach().abs()
    g = conv.groups
    per_group = w.reshape(g, conv.out_channels // g, conv.in_channels // g, -1).amax(dim=(1, 3))
    return per_group.reshape(-1)


@torch.no_grad()
def equalize(model: ArchNet, iterations: int = 2) -> tuple[ArchNet, list[EqualizedPair]]:
    """A copy of the folded ``model`` with every (conv, ReLU, conv) pair equalized; the float function is kept."""
    model = copy.deepcopy(model)
    pairs = _pairs(model)
    spreads: dict[tuple[str, str], float] = {}
    for _ in range(iterations):
        for a_id, b_id in pairs:
            a, b = model.layers[a_id], model.layers[b_id]
            r_a = a.weight.abs().reshape(a.out_channels, -1).amax(dim=1)
            r_b = _input_ranges(b)
            spreads.setdefault((a_id, b_id), float(r_b.max() / r_b.clamp(min=_TINY).min()))
            ok = (r_a > _TINY) & (r_b > _TINY)
            s = torch.where(ok, torch.sqrt(r_a.clamp(min=_TINY) / r_b.clamp(min=_TINY)), torch.ones_like(r_a))
            a.weight.div_(s.reshape(-1, 1, 1, 1))
            if a.bias is not None:
                a.bias.div_(s)
            if b.groups == 1:
                b.weight.mul_(s.reshape(1, -1, 1, 1))
            else:  # grouped: input channel c of group k is weight[:, c % (in/groups)] of that group's outputs
                per_out = s.reshape(b.groups, -1)  # (groups, in/groups)
                rows = per_out.repeat_interleave(b.out_channels // b.groups, dim=0)  # (out, in/groups)
                b.weight.mul_(rows.reshape(b.out_channels, -1, 1, 1))
    report = []
    for a_id, b_id in pairs:
        r_b = _input_ranges(model.layers[b_id])
        report.append(EqualizedPair(a_id, b_id, len(r_b), spreads[(a_id, b_id)],
                                    float(r_b.max() / r_b.clamp(min=_TINY).min())))
    return model, report
