"""Fake-quant simulation of any ArchNet: weights and activations on the scheme's integer grid.

The network is compiled once into a flat list of steps (one per op, with conv + BatchNorm
+ ReLU fused the way an integer runtime fuses them) that a single loop runs with
``torch.nn.functional`` calls, reading parameters from a plain ``name -> tensor`` dict.
That gives the two public entry points:

* :func:`simulated_forward` - functional, for quantization-aware training: parameters are
  the GHN's predicted (non-leaf) tensors and gradients reach them straight-through.
* :class:`QuantSim` / :func:`simulate` - an ``nn.Module`` wrapping a built model for
  evaluation, with optional range calibration and a cache of quantized weights.

Where quantizers sit (a quantizer = fake-quant onto the grid of one tensor):
the input image (if ``scheme.quantize_input``); the output of every conv / linear (after
its folded BatchNorm and fused ReLU / ReLU6); every standalone BatchNorm, activation,
pooling, global-average-pool, add and mul; concat only if ``scheme.quantize_after_concat``.
Identity, channel shuffle (a TFLite reshape / transpose) and the output node pass values
(and their grid) through. Sigmoid (and SiLU's sigmoid) lands on TFLite's fixed LOGISTIC
output grid, [0, 1) in 2^bits steps (int8: scale 1/256, zero point -128), not a calibrated one.

BatchNorm after a conv is folded into it (Jacob et al. 2018; GHN-Q paper Eq. 1):
``w_fold = w * gamma / sqrt(var + eps)``, ``b_fold = beta + (b - mean) * gamma / sqrt(var + eps)``,
and the *folded* weights are quantized. With ``bn="batch"`` the mean and variance are the
statistics of the current batch (a float conv computes them, then the quantized folded
conv runs: two convs per folded layer, inherent to the paper's per-batch protocol; an
expanding 1x1 conv gets them from its input's covariance instead); with ``bn="running"``
they are the module's running statistics, folded once and cached.

Evaluation speed (no autograd) comes from quantizing each step's own output in place,
folding a fused ReLU into the code clamp, and keeping oneDNN's channels_last layout;
measured ratios vs float are in docs/quantization.md (benchmarks/eval_speed.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ghnq_deploy.arch.spec import INPUT_ID
from ghnq_deploy.errors import UserError
from ghnq_deploy.quant.scheme import (
    QuantScheme, fake_quant, fake_quant_bias, fake_quant_range, fake_quant_weight, get_scheme, tensor_range,
)

BN_MODES = ("batch", "running")


class SimulationError(UserError):
    """A simulation that cannot run as asked (e.g. calibrated ranges that were never calibrated); one line."""


@dataclass
class Step:
    """One fused op of the compiled network."""

    kind: str  # conv, linear, bn, act, sigmoid, silu, mul, shuffle, slice, maxpool, avgpool, adaptive, gap, add, concat, alias
    out: str  # the id whose value this step produces (the last node it absorbed)
    inputs: tuple[str, ...]
    nodes: tuple[str, ...]  # spec node ids folded into this step
    prefix: str = ""  # parameter prefix of the conv / linear / standalone bn ("layers.<id>.")
    bn: str | None = None  # parameter prefix of a BatchNorm folded into a conv
    eps: float = 1e-5
    act: str | None = None  # "relu" / "relu6" applied before the output quantizer
    quantize: bool = True
    kwargs: dict = field(default_factory=dict)  # conv / pool hyper-parameters
    gram_stats: bool = False  # 1x1 expanding conv: BN statistics from the input's covariance


def _act(x: torch.Tensor, kind: str | None, inplace: bool = False) -> torch.Tensor:
    """An activation; ``inplace`` only for tensors the step itself just made, and never under autograd."""
    inplace = inplace and not (x.requires_grad and torch.is_grad_enabled())
    if kind == "relu":
        return F.relu(x, inplace=inplace)
    if kind == "relu6":
        return F.hardtanh(x, 0.0, 6.0, inplace=inplace)
    if kind in _SMOOTH_ACTS:
        return _SMOOTH_ACTS[kind](x)
    return x


_SMOOTH_ACTS = {"hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "silu": F.silu, "sigmoid": torch.sigmoid}


def _fixed_unit_qparams(s: QuantScheme, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TFLite's fixed output grid of LOGISTIC: [0, 1) in 2^bits steps (int8: scale 1/256, zero point -128)."""
    qmin, qmax = s.act_qrange()
    if s.act_symmetric:  # zero point 0: the non-negative half of the grid
        return like.new_tensor(1.0 / (qmax + 1)), like.new_tensor(0.0)
    return like.new_tensor(1.0 / (qmax - qmin + 1)), like.new_tensor(float(qmin))


def compile_plan(net: nn.Module, fuse_activations: bool = True) -> list[Step]:
    """Flatten an ArchNet (also one on the meta device) into fused steps in topological order."""
    spec, info, layers = net.spec, net.info, net.layers
    by_id = {n.id: n for n in spec.nodes}
    consumers: dict[str, list[str]] = {}
    for n in spec.nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n.id)

    def sole(node_id: str, ops: tuple[str, ...]) -> str | None:
        users = consumers.get(node_id, [])
        if len(users) == 1 and by_id[users[0]].op in ops and by_id[users[0]].inputs == (node_id,):
            return users[0]
        return None

    plan: list[Step] = []
    absorbed: set[str] = set()
    for node_id in info.order:
        if node_id in absorbed:
            continue
        node, mod = by_id[node_id], layers[node_id]
        op, prefix = node.op, f"layers.{node_id}."
        if op in ("conv", "linear", "bn"):
            chain, bn_prefix, eps, act = [node_id], None, getattr(mod, "eps", 1e-5), None
            cur = node_id
            if op == "conv" and (b := sole(cur, ("bn",))):
                chain.append(b)
                bn_prefix, eps, cur = f"layers.{b}.", layers[b].eps, b
            if fuse_activations and (a := sole(cur, ("relu", "relu6"))):
                chain.append(a)
                act, cur = by_id[a].op, a
            absorbed.update(chain)
            kwargs, gram = {}, False
            if op == "conv":
                kwargs = {"stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation, "groups": mod.groups}
                gram = (bn_prefix is not None and tuple(mod.kernel_size) == (1, 1) and mod.groups == 1
                        and tuple(mod.padding) == (0, 0) and 2 * mod.in_channels <= mod.out_channels)
            plan.append(Step(op, cur, node.inputs, tuple(chain), prefix, bn_prefix, eps, act, True, kwargs, gram))
        elif op in ("relu", "relu6", "hardswish", "hardsigmoid"):
            plan.append(Step("act", node_id, node.inputs, (node_id,), act=op))
        elif op in ("sigmoid", "silu"):  # LOGISTIC (x MUL for SiLU): TFLite fixes the sigmoid's output grid
            plan.append(Step(op, node_id, node.inputs, (node_id,)))
        elif op == "mul":
            plan.append(Step("mul", node_id, node.inputs, (node_id,)))
        elif op == "channel_shuffle":  # reshape / transpose / reshape: values and grid unchanged
            plan.append(Step("shuffle", node_id, node.inputs, (node_id,), kwargs={"groups": mod.groups}))
        elif op == "channel_slice":  # STRIDED_SLICE keeps its input's grid
            plan.append(Step("slice", node_id, node.inputs, (node_id,), kwargs={"start": mod.start, "stop": mod.stop}))
        elif op == "adaptive_avgpool":
            plan.append(Step("adaptive", node_id, node.inputs, (node_id,), kwargs={"output_size": mod.output_size}))
        elif op in ("maxpool", "avgpool"):
            kwargs = {"kernel_size": mod.kernel_size, "stride": mod.stride, "padding": mod.padding,
                      "ceil_mode": mod.ceil_mode}
            if op == "maxpool":
                kwargs["dilation"] = mod.dilation
            else:
                kwargs["count_include_pad"] = mod.count_include_pad
            plan.append(Step(op, node_id, node.inputs, (node_id,), kwargs=kwargs))
        elif op == "global_avgpool":
            plan.append(Step("gap", node_id, node.inputs, (node_id,)))
        elif op in ("add", "concat"):
            plan.append(Step(op, node_id, node.inputs, (node_id,)))
        elif op in ("identity", "output"):
            plan.append(Step("alias", node_id, node.inputs, (node_id,), quantize=False))
        else:  # pragma: no cover - the spec validator knows every op
            raise SimulationError(f"no quantized form for op {op!r} (node {node_id})")
    return plan


def fold_batchnorm(w: torch.Tensor, b: torch.Tensor | None, gamma: torch.Tensor, beta: torch.Tensor,
                   mean: torch.Tensor, var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Eq. 1: the conv weights and bias that compute BN(conv(x)) in one conv."""
    a = gamma * torch.rsqrt(var + eps)
    w_fold = w * a.reshape(-1, *([1] * (w.dim() - 1)))
    b_fold = beta + ((b - mean) if b is not None else -mean) * a
    return w_fold, b_fold


@dataclass
class _Context:
    """Per-run state: scheme, BN mode, calibrated ranges, weight cache."""

    scheme: QuantScheme
    bn: str = "batch"
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    observe: bool = False  # calibration: run in float and widen ``ranges``
    weight_cache: dict[str, tuple] | None = None
    folded: list[torch.Tensor] | None = None  # QAT: every quantized layer's float (folded) weight, in order


def _quant_act(ctx: _Context, key: str, t: torch.Tensor, owned: bool = True, act: str | None = None):
    """Fake-quantize an activation; returns (tensor, (scale, zero_point) or None).

    ``owned``: ``t`` was made by this step and nothing else holds it, so without autograd
    it is quantized in place (no new activation-sized buffer). ``act``: a fused ReLU / ReLU6
    still to apply. With an asymmetric grid and no autograd it is folded into the quantizer
    instead of run: the post-activation range is [0, max] (capped at 6), real 0 is the
    lowest code, so the code clamp does the ReLU's work - bit-identical, one pass fewer.
    """
    s = ctx.scheme
    if act is not None and act not in ("relu", "relu6"):  # no code-clamp form: run it, then quantize
        t, act, owned = _act(t, act), None, True
    if act is not None:
        if s.act_bits is None or ctx.observe or s.act_symmetric or (t.requires_grad and torch.is_grad_enabled()):
            t = _act(t, act, inplace=owned)
        else:
            if s.range_source == "absolute":
                mn, mx = tensor_range(t)
                mn, mx = torch.clamp(mn, min=0.0), torch.clamp(mx, min=0.0)
                if act == "relu6":
                    mn, mx = torch.clamp(mn, max=6.0), torch.clamp(mx, max=6.0)
            else:
                mn, mx = _calibrated(ctx, key)
            out, scale, zp = fake_quant_range(t, mn, mx, s.act_bits, False, s.act_narrow_range, s.rounding,
                                              inplace=owned)
            return out, (scale, zp)
    if s.act_bits is None:
        return t, None
    if ctx.observe:
        mn, mx = tensor_range(t)
        old = ctx.ranges.get(key)
        ctx.ranges[key] = (mn, mx) if old is None else (torch.minimum(old[0], mn), torch.maximum(old[1], mx))
        return t, None
    mn, mx = tensor_range(t) if s.range_source == "absolute" else _calibrated(ctx, key)
    out, scale, zp = fake_quant_range(t, mn, mx, s.act_bits, s.act_symmetric, s.act_narrow_range, s.rounding,
                                      inplace=owned)
    return out, (scale, zp)


def _calibrated(ctx: _Context, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return ctx.ranges[key]
    except (KeyError, TypeError):
        raise SimulationError(f"scheme '{ctx.scheme.name}' uses calibrated ranges but '{key}' was never calibrated; "
                              "call calibrate() first") from None


def _weights(step: Step, params: dict[str, torch.Tensor], ctx: _Context, x: torch.Tensor, w: torch.Tensor,
             b: torch.Tensor | None):
    """(quantized weight, weight scale, float bias) of a conv/linear step, BN folded in.

    Returns a fourth item: the step's float output when batch statistics already needed it
    and the weights stay float (so the conv is not run twice for nothing).
    """
    s = ctx.scheme
    if step.bn is None or ctx.bn == "running":
        cache = ctx.weight_cache
        if cache is not None and step.out in cache:
            return (*cache[step.out], None)
        if step.bn is not None:
            bp = step.bn
            w, b = fold_batchnorm(w, b, params[bp + "weight"], params[bp + "bias"], params[bp + "running_mean"],
                                  params[bp + "running_var"], step.eps)
        if ctx.folded is not None and s.weight_bits is not None:
            ctx.folded.append(w)
        wq, ws = fake_quant_weight(w, s)
        if cache is not None:
            cache[step.out] = (wq, ws, b)
        return wq, ws, b, None
    # batch statistics of the float conv's output (paper Eq. 1)
    bp = step.bn
    gamma, beta = params[bp + "weight"], params[bp + "bias"]
    if s.weight_bits is None:  # float weights: plain batch norm is the same function, one conv cheaper
        y = F.conv2d(x, w, b, **step.kwargs)
        return None, None, None, F.batch_norm(y, None, None, gamma, beta, True, 0.0, step.eps)
    if step.gram_stats:
        stride = step.kwargs["stride"]
        mean, var = pointwise_conv_stats(x[:, :, ::stride[0], ::stride[1]], w, b)
    else:
        mean, var = batch_stats(F.conv2d(x, w, b, **step.kwargs))
    w, b = fold_batchnorm(w, b, gamma, beta, mean, var, step.eps)
    if ctx.folded is not None:
        ctx.folded.append(w)
    wq, ws = fake_quant_weight(w, s)
    return wq, ws, b, None


def pointwise_conv_stats(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``conv1x1(x, w, b)`` without running the conv.

    ``mean = W mu + b`` and ``var_c = w_c^T Cov(x) w_c`` with the input's channel covariance:
    N*H*W*Cin^2 multiply-adds instead of the conv's N*H*W*Cin*Cout, so an expanding 1x1 conv
    (MobileNetV2's, Cout = 2..6 x Cin) needs no second full conv for its batch statistics.
    The input is centred first, so there is no E[x^2] - E[x]^2 cancellation.
    """
    n, c = x.shape[:2]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # (pixels, channels), a view
        mu = rows.mean(dim=0)
        centred = rows - mu
        cov = (centred.T @ centred) / rows.shape[0]
    else:
        flat = x.reshape(n, c, -1)
        count = flat.shape[0] * flat.shape[2]
        mu = flat.sum(dim=(0, 2)) / count
        centred = flat - mu.reshape(1, -1, 1)
        cov = torch.bmm(centred, centred.transpose(1, 2)).sum(0) / count
    w2 = w.reshape(w.shape[0], -1)
    mean = w2 @ mu + (b if b is not None else 0.0)
    var = torch.clamp(((w2 @ cov) * w2).sum(1), min=0.0)
    return mean, var


def batch_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of an NCHW batch (what BatchNorm normalises with).

    Without autograd on a channels_last batch (what oneDNN convs produce from the
    channels_last images ``data.normalize`` returns): torch's own BatchNorm statistics
    kernel (Welford, ~1 ms for 64x24x32x32 on the dev box). Otherwise ``E[y^2] - E[y]^2``
    from reductions (3-10x faster than ``torch.var_mean`` over (0, 2, 3)); its
    cancellation error is ~1e-7 * (1 + mean^2 / var) relative, far below any quantization
    step. Either way the result is differentiable where it needs to be.
    """
    grad = y.requires_grad and torch.is_grad_enabled()
    if not grad and y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
        mean, var = torch.batch_norm_update_stats(y, None, None, 0.0)
        return mean, var
    count = y.numel() // y.shape[1]
    mean = y.sum(dim=(0, 2, 3)) / count
    if grad:
        sq = (y * y).sum(dim=(0, 2, 3)) / count
    else:
        sq = torch.linalg.vector_norm(y, 2, dim=(0, 2, 3)).square_() / count
    return mean, torch.clamp(sq - mean * mean, min=0.0)


def run_plan(plan: list[Step], params: dict[str, torch.Tensor], x: torch.Tensor, ctx: _Context) -> torch.Tensor:
    """Run the compiled network once; one Python iteration per fused step."""
    s = ctx.scheme
    values: dict[str, torch.Tensor] = {}
    qps: dict[str, tuple | None] = {}
    if s.quantize_input:
        values[INPUT_ID], qps[INPUT_ID] = _quant_act(ctx, INPUT_ID, x, owned=False)
    else:
        values[INPUT_ID], qps[INPUT_ID] = x, None
    out = x
    for step in plan:
        kind = step.kind
        xin = values[step.inputs[0]]
        qp = None
        if kind == "conv" or kind == "linear":
            w, b = params[step.prefix + "weight"], params.get(step.prefix + "bias")
            if kind == "linear":
                xin = xin.flatten(1)
            wq, ws, b, y = _weights(step, params, ctx, xin, w, b)
            if y is None:
                in_qp = qps[step.inputs[0]]
                if b is not None and s.bias == "int32" and s.weight_bits is not None and in_qp is not None:
                    b = fake_quant_bias(b, in_qp[0] * ws, s.rounding)
                y = F.conv2d(xin, wq, b, **step.kwargs) if kind == "conv" else F.linear(xin, wq, b)
            out, qp = _quant_act(ctx, step.out, y, act=step.act)
        elif kind == "bn":
            p = step.prefix
            if ctx.bn == "batch":
                y = F.batch_norm(xin, None, None, params[p + "weight"], params[p + "bias"], True, 0.0, step.eps)
            else:
                y = F.batch_norm(xin, params[p + "running_mean"], params[p + "running_var"], params[p + "weight"],
                                 params[p + "bias"], False, 0.0, step.eps)
            out, qp = _quant_act(ctx, step.out, y, act=step.act)
        elif kind == "act":
            out, qp = _quant_act(ctx, step.out, xin, owned=False, act=step.act)
        elif kind == "maxpool" or kind == "avgpool":
            y = F.max_pool2d(xin, **step.kwargs) if kind == "maxpool" else F.avg_pool2d(xin, **step.kwargs)
            in_qp = qps[step.inputs[0]]
            if s.pool_shares_input_qparams and in_qp is not None and s.act_bits is not None and not ctx.observe:
                qp = in_qp  # TFLite: same scale and zero point; a max of grid values stays on the grid
                if kind == "avgpool":
                    qmin, qmax = s.act_qrange()
                    y = fake_quant(y, in_qp[0], in_qp[1], qmin, qmax, s.rounding)
                out = y
            else:
                out, qp = _quant_act(ctx, step.out, y)
        elif kind == "sigmoid" or kind == "silu":
            gate = torch.sigmoid(xin)
            if s.act_bits is not None and not ctx.observe:
                scale, zp = _fixed_unit_qparams(s, gate)
                qmin, qmax = s.act_qrange()
                gate = fake_quant(gate, scale, zp, qmin, qmax, s.rounding)
                qp = (scale, zp)
            if kind == "sigmoid":
                out = gate
            else:
                out, qp = _quant_act(ctx, step.out, xin * gate)
        elif kind == "mul":
            y = xin
            for i in step.inputs[1:]:
                y = y * values[i]
            out, qp = _quant_act(ctx, step.out, y)
        elif kind == "shuffle":
            n, c, h, w = xin.shape
            g = step.kwargs["groups"]
            out, qp = xin.reshape(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w), qps[step.inputs[0]]
        elif kind == "slice":
            out, qp = xin[:, step.kwargs["start"]:step.kwargs["stop"]], qps[step.inputs[0]]
        elif kind == "adaptive":
            size = step.kwargs["output_size"]
            h = xin.shape[-1]
            y = F.adaptive_avg_pool2d(xin, size)
            in_qp = qps[step.inputs[0]]
            if size % h == 0 and in_qp is not None and not ctx.observe:
                out, qp = y, in_qp  # pure replication (nearest upsampling): values stay on the input grid
            else:
                out, qp = _quant_act(ctx, step.out, y)
        elif kind == "gap":
            out, qp = _quant_act(ctx, step.out, xin.mean(dim=(2, 3)))
        elif kind == "add":
            y = xin + values[step.inputs[1]] if len(step.inputs) > 1 else xin.clone()
            for i in step.inputs[2:]:
                y = y + values[i]
            out, qp = _quant_act(ctx, step.out, y)
        elif kind == "concat":
            y = torch.cat([values[i] for i in step.inputs], dim=1)
            out, qp = _quant_act(ctx, step.out, y) if s.quantize_after_concat else (y, None)
        else:  # alias
            out, qp = xin, qps[step.inputs[0]]
        values[step.out] = out
        qps[step.out] = qp
    return out


def simulated_forward(net: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                      scheme: str | QuantScheme = "paper", bits: str | None = None, bn: str = "batch",
                      ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                      folded: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of ``net`` (any ArchNet, meta device allowed) run quantized on ``params``.

    For QAT: ``params`` are predicted tensors; gradients flow straight-through every
    quantizer into them (and into the batch statistics of folded BatchNorms).
    ``bits`` (e.g. "w4a8") overrides the preset's bit-widths; ``ranges`` are needed only
    by schemes with calibrated ranges. ``folded``, a list, receives every quantized layer's
    float weight (BN folded in, before rounding) for :mod:`ghnq_deploy.quant.range_balance`.
    """
    if bn not in BN_MODES:
        raise SimulationError(f"unknown BatchNorm mode {bn!r}; choose from {', '.join(BN_MODES)}")
    sch = get_scheme(scheme, bits)
    if sch.range_source == "calibrated" and sch.act_bits is not None and ranges is None:
        raise SimulationError(f"scheme '{sch.name}' uses calibrated activation ranges: pass ranges= (from "
                              "QuantSim.calibrate) or use a scheme with range_source='absolute'")
    plan = compile_plan(net, sch.fuse_activations)
    return run_plan(plan, params, x, _Context(sch, bn, ranges, folded=folded))


class QuantSim(nn.Module):
    """A built model run as the scheme quantizes it (evaluation; training also works).

    ``bn="batch"`` is the paper protocol (statistics of each test batch, folded per batch);
    ``bn="running"`` folds the model's running statistics, which someone must have
    calibrated. Quantized weights that do not depend on the batch are cached while
    gradients are off and the parameters unchanged.
    """

    def __init__(self, model: nn.Module, scheme: str | QuantScheme = "paper", bits: str | None = None,
                 bn: str = "batch"):
        super().__init__()
        if bn not in BN_MODES:
            raise SimulationError(f"unknown BatchNorm mode {bn!r}; choose from {', '.join(BN_MODES)}")
        self.model = model
        self.scheme = get_scheme(scheme, bits)
        self.bn = bn
        self.plan = compile_plan(model, self.scheme.fuse_activations)
        self.ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache: dict[str, tuple] = {}
        self._cache_key: tuple | None = None
        if bn == "running":
            missing = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is None]
            if missing:
                raise SimulationError(f"bn='running' but BatchNorm {missing[0]} has no running statistics")

    def _params(self) -> dict[str, torch.Tensor]:
        return {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}

    def _context(self, params: dict[str, torch.Tensor]) -> _Context:
        cache = None
        if not torch.is_grad_enabled():
            key = tuple((id(t), t._version) for t in params.values())
            if key != self._cache_key:
                self._cache, self._cache_key = {}, key
            cache = self._cache
        return _Context(self.scheme, self.bn, self.ranges, weight_cache=cache)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self._params()
        return run_plan(self.plan, params, x, self._context(params))

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor], reset: bool = True) -> int:
        """Record each quantizer's min / max over float runs of ``batches``; returns images seen."""
        if reset:
            self.ranges.clear()
        params = self._params()
        # the float network is observed (weights unquantized), as a TFLite converter calibrates
        ctx = _Context(replace(self.scheme, weight_bits=None), self.bn, self.ranges, observe=True)
        seen = 0
        for x in batches:
            run_plan(self.plan, params, x, ctx)
            seen += len(x)
        if seen == 0:
            raise SimulationError("calibrate() got no images")
        return seen


def simulate(model: nn.Module, scheme: str | QuantScheme = "paper", bits: str | None = None,
             bn: str = "batch") -> QuantSim:
    """The quantized view of ``model`` (shares its parameters; the model is not modified)."""
    return QuantSim(model, scheme, bits, bn)
