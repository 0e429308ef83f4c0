"""The paper's evaluation (GHN-Q Table 1): predict each net, run it float and quantized on CIFAR-10 test.

Protocol (paper section 3): parameters predicted by the GHN in meta-batches; every net is
evaluated at every bit-width with BatchNorm in *batch* mode (statistics of each test batch
of 64, folded into the conv weights per batch before quantization), weights and activations
fake-quantized with the scheme's quantizers (``paper`` preset: tensorwise asymmetric,
absolute per-batch ranges, no quantizer after concat).

Test order. The test file is sorted by class, and batch-statistics BN on a batch of one
class is badly biased (every image is normalised against its own class's mean). So the
test images are evaluated in a fixed seeded permutation, ``numpy.random.default_rng(order_seed)
.permutation(N)`` (order_seed 0 by default), the same for every net and every bit-width;
``limit_images`` keeps the first images *of that order* (class-mixed). The last batch may be
smaller than 64 (10,000 = 156 x 64 + 16) and is kept, as a plain test loader would.

Per net: float and quantized top-1 / top-5 (percent), the drop from float, the mean
squared error of quantized vs float logits on the same batches, top-1 agreement with
float, and range statistics of every predicted conv / linear weight. Aggregates per
(split, bit-width): mean, standard error of the mean, max.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ghnq_deploy.arch.builder import set_bn_mode
from ghnq_deploy.arch.spec import ArchSpec, analyze
from ghnq_deploy.calibration import ImageSetFile, load_calibration
from ghnq_deploy.data import load_cifar10, normalize
from ghnq_deploy.errors import UserError
from ghnq_deploy.ghn.model import BIT_OPTIONS, GHNQ
from ghnq_deploy.ghn.predict import PredictedModel, predict
from ghnq_deploy.quant.scheme import get_scheme, parse_bits
from ghnq_deploy.quant.simulate import BN_MODES, QuantSim

PAPER_SPLITS = ("id-test", "ood-deep", "ood-wide", "ood-bnfree")
PAPER_BITS = ("fp32", "w8a8", "w4a8", "w4a4", "w2a2")
REPORT_FORMAT = "ghnq-deploy/evaluation"


class EvalError(UserError):
    """An evaluation that cannot run as configured; one line."""


@dataclass
class EvalConfig:
    bits: tuple[str, ...] = PAPER_BITS
    scheme: str = "paper"
    bn: str = "batch"  # "batch": the paper protocol; "running": calibrate running stats, fold once
    batch_size: int = 64
    limit_images: int | None = None
    order_seed: int = 0  # seed of the fixed test-order permutation
    predict_seed: int = 0
    meta_batch: int = 8
    # the calibration set (.npz) for calibrated ranges / running BN; None: the shipped one, as export
    calibration: str | None = None
    data: str | None = None

    def validate(self) -> None:
        """Raise one clear line for anything that cannot work, before any net runs."""
        if not self.bits:
            raise EvalError("no bit-widths to evaluate")
        seen = set()
        for b in self.bits:
            parse_bits(b)  # QuantSchemeError names the bad one
            if b in seen:
                raise EvalError(f"bit-width {b!r} given twice")
            seen.add(b)
        get_scheme(self.scheme)
        if self.bn not in BN_MODES:
            raise EvalError(f"unknown BatchNorm mode {self.bn!r}; choose from {', '.join(BN_MODES)}")
        for label, value in (("batch size", self.batch_size), ("meta-batch", self.meta_batch)):
            if value < 1:
                raise EvalError(f"{label} must be at least 1, got {value}")
        if self.limit_images is not None and self.limit_images < 1:
            raise EvalError(f"--limit-images must be at least 1, got {self.limit_images}")

    @property
    def needs_calibration(self) -> bool:
        return self.bn == "running" or get_scheme(self.scheme).range_source == "calibrated"


@dataclass
class NetInput:
    spec: ArchSpec
    split: str  # a sampler split, or "files" for arch.json paths


@dataclass
class BitResult:
    bits: str
    top1: float  # percent
    top5: float
    drop_top1: float  # float minus quantized, percentage points
    drop_top5: float
    logits_mse: float  # mean over images and classes of (quantized - float logits)^2
    top1_agreement: float  # percent of images whose top-1 class equals the float net's


@dataclass
class LayerStats:
    """Range statistics of one predicted weight tensor (before any BN folding)."""

    name: str
    op: str
    shape: list[int]
    min: float
    max: float
    absmax: float
    std: float
    channel_range_spread: float  # max / median of the per-output-channel ranges (1 = uniform)


@dataclass
class NetResult:
    name: str
    split: str
    spec_sha256: str
    params: int
    macs: int
    images: int
    float_top1: float
    float_top5: float
    bits: dict[str, BitResult]
    layers: list[LayerStats]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Aggregate:
    """One (split, bit-width) cell: mean, standard error of the mean (None for n < 2), max."""

    split: str
    bits: str
    n: int
    top1_mean: float
    top1_sem: float | None
    top1_max: float
    top5_mean: float
    top5_sem: float | None
    top5_max: float
    drop_top1_mean: float
    logits_mse_mean: float
    top1_agreement_mean: float


@dataclass
class EvalReport:
    config: EvalConfig
    scheme: dict
    checkpoint: dict
    data: dict
    nets: list[NetResult] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def splits(self) -> list[str]:
        out: list[str] = []
        for n in self.nets:
            if n.split not in out:
                out.append(n.split)
        return out

    def aggregates(self) -> list[Aggregate]:
        cells = []
        for split in self.splits:
            nets = [n for n in self.nets if n.split == split]
            for b in self.config.bits:
                rs = [n.bits[b] for n in nets]
                t1, t5 = [r.top1 for r in rs], [r.top5 for r in rs]
                cells.append(Aggregate(
                    split, b, len(rs), _mean(t1), sem(t1), max(t1), _mean(t5), sem(t5), max(t5),
                    _mean([r.drop_top1 for r in rs]), _mean([r.logits_mse for r in rs]),
                    _mean([r.top1_agreement for r in rs]),
                ))
        return cells

    def to_dict(self) -> dict:
        return {
            "format": REPORT_FORMAT, "version": 1,
            "config": asdict(self.config), "scheme": self.scheme, "checkpoint": self.checkpoint,
            "data": self.data, "environment": self.environment, "seconds": self.seconds,
            "aggregates": [asdict(a) for a in self.aggregates()],
            "nets": [n.to_dict() for n in self.nets],
        }


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def sem(values: list[float]) -> float | None:
    """Standard error of the mean, sample standard deviation (ddof=1) / sqrt(n)."""
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


# ----------------------------------------------------------------------------- data


def eval_order(n: int, seed: int = 0) -> np.ndarray:
    """The fixed permutation of the test set (the file is sorted by class; see module doc)."""
    return np.random.default_rng(seed).permutation(n)


@dataclass
class EvalImages:
    x: torch.Tensor  # normalised NCHW, in evaluation order
    y: torch.Tensor
    description: str
    order: str


def load_test_images(cfg: EvalConfig) -> EvalImages:
    """CIFAR-10 test in the fixed seeded order, cut to ``limit_images``."""
    data = load_cifar10("test", cfg.data)
    order = eval_order(len(data), cfg.order_seed)
    if cfg.limit_images is not None:
        order = order[:cfg.limit_images]
    how = f"numpy default_rng({cfg.order_seed}).permutation({len(data)})" + (
        f"[:{cfg.limit_images}]" if cfg.limit_images is not None and cfg.limit_images < len(data) else "")
    return EvalImages(normalize(data.images[order]), torch.from_numpy(data.labels[order]), data.description, how)


def load_calibration_images(cfg: EvalConfig, input_shape, num_classes: int) -> ImageSetFile:
    """The export's calibration set (train images only, never test images): one path for both.

    ``evaluate --bn running`` and calibrated ranges then see exactly the BN statistics and ranges
    that ``export`` folds and ``verify`` checks (same file, same :func:`prepare_bn` routine)."""
    from ghnq_deploy.export.pipeline import MIN_CALIBRATION_IMAGES

    return load_calibration(cfg.calibration, image_shape=input_shape, min_count=MIN_CALIBRATION_IMAGES,
                            num_classes=num_classes)


def prepare_bn(model: nn.Module, calibration: ImageSetFile) -> nn.Module:
    """Running BN statistics on the calibration set, exactly as ``export.pipeline.prepare_model`` computes them."""
    from ghnq_deploy.export.pipeline import calibrate_running_bn

    calibrate_running_bn(model, calibration.images)
    return set_bn_mode(model, "running") if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) else model


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, len(x), size)]


# ----------------------------------------------------------------------------- one net


def weight_stats(model: PredictedModel) -> list[LayerStats]:
    """Range statistics of every conv / linear weight the GHN predicted."""
    out = []
    for node in model.spec.nodes:
        if node.op not in ("conv", "linear"):
            continue
        w = model.state_dict[f"layers.{node.id}.weight"].detach().float()
        flat = w.flatten(1)
        ranges = flat.max(1).values - flat.min(1).values
        median = float(ranges.median())
        spread = float(ranges.max()) / median if median > 0 else math.inf
        out.append(LayerStats(node.id, node.op, list(w.shape), float(w.min()), float(w.max()),
                              float(w.abs().max()), float(w.std()) if w.numel() > 1 else 0.0, spread))
    return out


class _Tally:
    """Running top-1 / top-5 / MSE / agreement counts over batches."""

    def __init__(self) -> None:
        self.n = self.top1 = self.top5 = self.agree = 0
        self.sq = 0.0
        self.elements = 0

    def add(self, logits: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None) -> None:
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        self.n += len(y)
        self.top1 += int((top[:, 0] == y).sum())
        self.top5 += int((top == y[:, None]).any(1).sum())
        if ref is not None:
            self.agree += int((top[:, 0] == ref.argmax(1)).sum())
            self.sq += float((logits - ref).double().pow(2).sum())
            self.elements += logits.numel()

    def pct(self, count: int) -> float:
        return 100.0 * count / self.n


def evaluate_net(float_model: PredictedModel, images: EvalImages, cfg: EvalConfig, split: str,
                 quant_models: dict[str, PredictedModel] | None = None,
                 calibration: ImageSetFile | None = None) -> NetResult:
    """Float and every quantized bit-width of one net, on the same batches.

    ``quant_models`` holds per-bit-width predictions of a bit-conditioned GHN; otherwise
    every bit-width quantizes ``float_model``'s parameters.
    """
    start = time.perf_counter()
    scheme = get_scheme(cfg.scheme)
    calib_batches = _batches(normalize(calibration.images), cfg.batch_size) if calibration is not None else []

    def build(pm: PredictedModel) -> nn.Module:
        model = pm.build(bn_mode="batch")
        if cfg.bn == "running":
            prepare_bn(model, calibration)
        return model

    ref = build(float_model)
    sims: dict[str, QuantSim] = {}
    for b in cfg.bits:
        if b == "fp32":
            continue
        src = (quant_models or {}).get(b)
        sim = QuantSim(ref if src is None else build(src), scheme.with_bits(b), bn=cfg.bn)
        if sim.scheme.range_source == "calibrated":
            sim.calibrate(calib_batches)
        sims[b] = sim
    ftally = _Tally()
    qtally = {b: _Tally() for b in sims}
    with torch.no_grad():
        for i in range(0, len(images.y), cfg.batch_size):
            x, y = images.x[i:i + cfg.batch_size], images.y[i:i + cfg.batch_size]
            lf = ref(x)
            ftally.add(lf, y, None)
            for b, sim in sims.items():
                qtally[b].add(sim(x), y, lf)
    f1, f5 = ftally.pct(ftally.top1), ftally.pct(ftally.top5)
    results: dict[str, BitResult] = {}
    for b in cfg.bits:
        if b == "fp32":
            results[b] = BitResult(b, f1, f5, 0.0, 0.0, 0.0, 100.0)
        else:
            t = qtally[b]
            q1, q5 = t.pct(t.top1), t.pct(t.top5)
            results[b] = BitResult(b, q1, q5, f1 - q1, f5 - q5, t.sq / max(1, t.elements), t.pct(t.agree))
    info = analyze(float_model.spec, param_cap=sys.maxsize)
    return NetResult(float_model.spec.name, split, float_model.spec.sha256(), info.params, info.macs,
                     len(images.y), f1, f5, results, weight_stats(float_model), time.perf_counter() - start)


# ----------------------------------------------------------------------------- many nets


def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine()}


def evaluate(ghn: GHNQ, ghn_info: dict, nets: list[NetInput], cfg: EvalConfig,
             on_result: Callable[[NetResult], None] | None = None, images: EvalImages | None = None) -> EvalReport:
    """Predict (meta-batched) and evaluate every net; ``on_result`` is called after each net."""
    cfg.validate()
    if not nets:
        raise EvalError("no networks to evaluate")
    start = time.perf_counter()
    images = images or load_test_images(cfg)
    first = nets[0].spec
    calibration = load_calibration_images(cfg, first.input_shape, first.num_classes) if cfg.needs_calibration else None
    conditioned = bool(getattr(ghn.config, "bit_conditioning", False))
    if conditioned and (odd := [b for b in cfg.bits if b not in BIT_OPTIONS]):
        raise EvalError(f"this GHN is bit-conditioned and predicts only {', '.join(BIT_OPTIONS)}; not {', '.join(odd)}")
    report = EvalReport(
        config=cfg, scheme=get_scheme(cfg.scheme).to_dict(),
        checkpoint={"path": ghn_info.get("path"), "sha256": ghn_info.get("sha256"),
                    "steps": (ghn_info.get("meta") or {}).get("steps"), "bit_conditioning": conditioned},
        data={"test": images.description, "images": len(images.y), "order": images.order,
              "batch_size": cfg.batch_size, "bn": cfg.bn,
              "calibration": None if calibration is None else {
                  "description": calibration.description, "images": len(calibration.images),
                  "sha256": calibration.sha256}},
        environment=environment(),
    )
    for lo in range(0, len(nets), cfg.meta_batch):
        chunk = nets[lo:lo + cfg.meta_batch]
        specs = [n.spec for n in chunk]
        floats = predict(ghn, specs, bits="fp32", seed=cfg.predict_seed, ghn_info=ghn_info)
        per_bits: dict[str, list[PredictedModel]] = {}
        if conditioned:
            for b in cfg.bits:
                if b != "fp32":
                    per_bits[b] = predict(ghn, specs, bits=b, seed=cfg.predict_seed, ghn_info=ghn_info)
        for k, (net, pm) in enumerate(zip(chunk, floats)):
            quant = {b: models[k] for b, models in per_bits.items()}
            result = evaluate_net(pm, images, cfg, net.split, quant, calibration)
            report.nets.append(result)
            if on_result is not None:
                on_result(result)
    report.seconds = time.perf_counter() - start
    return report
