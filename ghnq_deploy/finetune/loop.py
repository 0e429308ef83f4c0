"""The fine-tune: quantization-aware SGD on one net, from its prediction, resumable exactly.

Recipe (the same for every start, so GHN-Q init and random init compare fairly): SGD with
Nesterov momentum, weight decay on conv / linear weights only, a one-cycle rate
(:mod:`ghnq_deploy.finetune.schedule`), standard CIFAR augmentation (crop 32 pad 4, flip)
on the project's normalisation. A run has up to three phases, in this order:
- float (the first ``float_fraction`` of the steps): the plain net, bf16 autocast where the
  CPU computes bf16 natively (``precision``); several times cheaper per step than the
  simulator, so a short budget buys more steps (float training, then QAT: the usual recipe
  of AIMET and TensorFlow's QAT guide);
- QAT: quantized bit-widths train through the fake-quant simulator in the QAT form of the
  deployment scheme (per-batch activation ranges, BatchNorm folded with batch statistics,
  :func:`~ghnq_deploy.quant.scheme.qat_scheme`), float32;
- frozen (the last ``freeze_bn`` of the steps): BatchNorm running statistics and activation
  ranges calibrated as ``export`` calibrates them and frozen, so training ends on the
  deployed arithmetic itself (running-statistics BN folded, calibrated ranges).
A ``--minutes`` run times both kinds of step in its probe and fits the phases to the budget.

Every random choice of a step (images, augmentation) is a pure function of (seed, step),
and the state saved atomically every ``checkpoint_every`` steps holds the weights, the
optimiser, the frozen ranges and the schedule's length: a run killed at any point (kill -9)
and resumed gives the same weights and losses as one that was never stopped, and its log
is cut back to the checkpoint, so it has neither gaps nor repeats.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ghnq_deploy.arch.builder import build_model
from ghnq_deploy.data import augment, normalize
from ghnq_deploy.errors import UserError
from ghnq_deploy.export.manifest import sha256_file
from ghnq_deploy.finetune.ancestry import finetuned_meta
from ghnq_deploy.finetune.init import DEFAULT_NOISE, INITS, make_start
from ghnq_deploy.finetune.schedule import OneCycle
from ghnq_deploy.finetune.split import FinetuneData, load_finetune_data
from ghnq_deploy.finetune.validate import deployed_accuracy, normalized_batches
from ghnq_deploy.ghn.checkpoint import CheckpointError, torch_load_file
from ghnq_deploy.ghn.precision import PRECISIONS, net_autocast, resolve_precision
from ghnq_deploy.ghn.predict import PredictedModel, load_predicted, save_predicted
from ghnq_deploy.io import atomic_torch_save, atomic_write_text
from ghnq_deploy.quant.bn_calibrate import calibrate_bn
from ghnq_deploy.quant.scheme import get_scheme, qat_scheme
from ghnq_deploy.quant.simulate import QuantSim, simulated_forward

STATE_FORMAT = "ghnq-deploy/finetune-state"
MODEL_NAME, STATE_NAME, LOG_NAME, CONFIG_NAME = "model.pt", "state.pt", "finetune_log.jsonl", "finetune_config.json"
PROBE_STEPS = 10  # a --minutes run times this many steps before fixing its length


class FinetuneError(UserError):
    """A fine-tune that cannot run as asked; one line."""


@dataclass
class FinetuneConfig:
    model: str  # the model file it starts from (a prediction or an earlier fine-tune)
    out_dir: str
    data: str | None = None  # CIFAR-10 copy or class-per-folder image folder
    bits: str = "w8a8"
    scheme: str = "tflite-int8"
    steps: int | None = None
    epochs: float | None = None
    minutes: float | None = None
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    init: str = "ghn"
    noise: float = DEFAULT_NOISE
    seed: int = 0
    val_count: int | None = 1000
    val_fraction: float = 0.1
    val_every: int = 100
    freeze_bn: float = 0.1  # last fraction of the steps on frozen (calibrated) BN statistics and ranges
    float_fraction: float = 0.7  # first fraction of the steps in float (no simulator), quantized runs only
    precision: str = "auto"  # float-phase arithmetic: bf16 autocast where native (auto), bf16, fp32
    grad_clip: float | None = None  # clip the global gradient norm (BN-free predictions can explode without)
    train_images: int | None = None
    checkpoint_every: int = 50
    log_every: int = 10


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float  # exponential moving average of the training loss
    accuracy: float  # same, training batch top-1 (augmented images)
    lr: float
    val_top1: float | None  # set on the steps that validated


@dataclass
class FinetuneResult:
    out_dir: Path
    model_file: Path | None  # None when the call stopped early (stop_after) and the run is resumable
    log_file: Path
    steps: int
    total: int
    val_top1_start: float | None
    val_top1_final: float | None
    train_seconds: float
    validation: str
    train_images: int


# what a resumed run must repeat: the batches, rates and arithmetic of every step follow from these
RESUME_MUST_MATCH = ("data", "bits", "scheme", "steps", "epochs", "minutes", "batch_size", "lr", "momentum",
                     "weight_decay", "init", "noise", "seed", "val_count", "val_fraction", "val_every", "freeze_bn",
                     "train_images", "grad_clip", "float_fraction", "precision")


def check_config(cfg: FinetuneConfig) -> None:
    """Refuse a bad configuration before any data or model work."""
    get_scheme(cfg.scheme, cfg.bits)  # unknown scheme / malformed bits: one line
    budgets = [name for name, v in (("--steps", cfg.steps), ("--epochs", cfg.epochs), ("--minutes", cfg.minutes))
               if v is not None]
    if len(budgets) > 1:
        raise FinetuneError(f"give one budget, not {' and '.join(budgets)}")
    for name, value in (("--epochs", cfg.epochs), ("--minutes", cfg.minutes), ("--lr", cfg.lr),
                        ("--grad-clip", cfg.grad_clip)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise FinetuneError(f"{name} must be a finite number above 0, got {value}")
    if cfg.steps is not None and cfg.steps < 1:
        raise FinetuneError(f"--steps must be at least 1, got {cfg.steps}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise FinetuneError(f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}")
    if cfg.init not in INITS:
        raise FinetuneError(f"unknown --init {cfg.init!r}; choose from {', '.join(INITS)}")
    if not 0.0 <= cfg.noise < 10.0:  # also refuses NaN
        raise FinetuneError(f"--noise is a fraction of each weight's std in [0, 10), got {cfg.noise}")
    if not 0.0 <= cfg.freeze_bn < 1.0:
        raise FinetuneError(f"--freeze-bn is a fraction of the run in [0, 1), got {cfg.freeze_bn}")
    if not 0.0 <= cfg.float_fraction < 1.0:  # also refuses NaN
        raise FinetuneError(f"--float-fraction is a fraction of the run in [0, 1), got {cfg.float_fraction}")
    if cfg.float_fraction + cfg.freeze_bn >= 1.0:
        raise FinetuneError(f"--float-fraction {cfg.float_fraction} + --freeze-bn {cfg.freeze_bn} leave no steps "
                            "for quantization-aware training; their sum must stay below 1")
    if cfg.precision not in PRECISIONS:
        raise FinetuneError(f"unknown --precision {cfg.precision!r}; choose from {', '.join(PRECISIONS)}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise FinetuneError(f"--val-fraction must lie strictly between 0 and 1, got {cfg.val_fraction}")
    for name, value in (("--batch-size", cfg.batch_size), ("--val-every", cfg.val_every),
                        ("--checkpoint-every", cfg.checkpoint_every), ("--log-every", cfg.log_every)):
        if value < 1:
            raise FinetuneError(f"{name} must be at least 1, got {value}")


def _rng(seed: int, *keys: int) -> np.random.Generator:
    digest = hashlib.sha256("|".join(map(str, (seed, *keys))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


class Batches:
    """The (augmented images, labels) of any step: epoch permutations and crops from (seed, step)."""

    def __init__(self, data: FinetuneData, batch_size: int, seed: int):
        self.images, self.labels = data.train.images, torch.from_numpy(data.train.labels)
        self.batch_size = min(batch_size, len(self.labels))
        self.seed = seed
        self.per_epoch = max(1, len(self.labels) // self.batch_size)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, within = divmod(step, self.per_epoch)
        order = _rng(self.seed, 1, epoch).permutation(len(self.labels))
        idx = np.sort(order[within * self.batch_size:(within + 1) * self.batch_size])
        gen = torch.Generator().manual_seed(int(_rng(self.seed, 2, step).integers(2**62)))
        return augment(normalize(self.images[idx]), gen), self.labels[idx]


def _optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.SGD:
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.dim() <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


class _Trainer:
    """Model, optimiser and the forward of one step (QAT form, or frozen deployed form)."""

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, calibration: np.ndarray):
        self.model, self.cfg, self.calibration = model, cfg, calibration
        self.deploy = get_scheme(cfg.scheme, cfg.bits)
        self.train_scheme = qat_scheme(cfg.scheme, cfg.bits)
        self.optimizer = _optimizer(model, cfg)
        self.frozen = False
        self.ranges: dict | None = None
        self.precision = resolve_precision(cfg.precision)  # what the float phase runs in, on this CPU

    def freeze(self) -> None:
        """Calibrate BN statistics (and activation ranges) as export does; later steps use them fixed."""
        with torch.no_grad():
            calibrate_bn(self.model, self.calibration)
            if not self.deploy.is_float and self.deploy.range_source == "calibrated" and self.deploy.act_bits:
                sim = QuantSim(self.model, self.deploy, bn="running")
                sim.calibrate(normalized_batches(self.calibration))
                self.ranges = dict(sim.ranges)
        self.frozen = True

    def logits(self, x: torch.Tensor, float_phase: bool = False) -> torch.Tensor:
        model = self.model
        if self.deploy.is_float or (float_phase and not self.frozen):
            model.train(not self.frozen)
            if self.frozen:
                return model(x)
            with net_autocast(self.precision):
                return model(x).float()
        params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        if self.frozen:
            return simulated_forward(model, params, x, scheme=self.deploy, bn="running", ranges=self.ranges)
        return simulated_forward(model, params, x, scheme=self.train_scheme, bn="batch")

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, float_phase: bool = False) -> tuple[float, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        logits = self.logits(x, float_phase)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise FinetuneError(f"the training loss became {loss.item()} at this step (try --grad-clip 1, a lower --lr, "
                                "or more bits)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        return loss.item(), float((logits.argmax(1) == y).float().mean())


def _plain(value):
    return json.loads(json.dumps(value))


def _read_state(path: Path, cfg: FinetuneConfig, model_sha: str) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: no fine-tune state to resume from (drop --resume to start a new run, or "
                              "point --output at the run to continue)")
    state = torch_load_file(path, CheckpointError, "fine-tune state")
    if not (isinstance(state, dict) and state.get("format") == STATE_FORMAT and isinstance(state.get("step"), int)):
        raise CheckpointError(f"{path}: not a ghnq-deploy fine-tune state")
    before, now = state["config"], asdict(cfg)
    changed = [f"{k} {_plain(before.get(k))} -> {_plain(now[k])}" for k in RESUME_MUST_MATCH
               if _plain(before.get(k)) != _plain(now[k])]
    if state.get("model_sha256") != model_sha:
        changed.append("the starting model file changed")
    if changed:
        raise CheckpointError(f"{path}: --resume with changed settings ({'; '.join(changed)}); a resumed run must "
                              "repeat them (pass the same options, or start a new --output)")
    return state


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed from."""
    if not path.exists():
        atomic_write_text(path, "")
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by kill -9 mid-write
            continue
        at = record.get("step", 0)
        # a phase event at the checkpoint's own step came after it was saved: the resumed run logs it again
        if at < step or (at == step and record.get("event") not in ("qat", "freeze")):
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _total_steps(cfg: FinetuneConfig, per_epoch: int) -> int | None:
    """Steps of a --steps / --epochs run (None: a --minutes run sets it after its probe)."""
    if cfg.minutes is not None:
        return None
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil((cfg.epochs or 1.0) * per_epoch))


def _qat_start(cfg: FinetuneConfig, total: int) -> int:
    """First step of the simulator phases (the float phase is steps [0, this))."""
    return round(cfg.float_fraction * total)


class _PhaseClock:
    """Seconds per step of each kind (float, simulator), so a --minutes run fits its phases."""

    def __init__(self, record: dict | None = None):
        self.record = {k: list(v) for k, v in (record or {"float": [0.0, 0], "sim": [0.0, 0]}).items()}

    def add(self, kind: str, seconds: float) -> None:
        self.record[kind][0] += seconds
        self.record[kind][1] += 1

    def per_step(self, kind: str) -> float:
        seconds, n = self.record[kind]
        if n:
            return seconds / n
        other = self.record["sim" if kind == "float" else "float"]
        return other[0] / max(1, other[1])  # not timed yet: the other kind's figure


def _fit_minutes(cfg: FinetuneConfig, step: int, elapsed: float, clock: _PhaseClock, val_seconds: float,
                 float_steps: bool) -> int:
    """Total steps so the run (validations and the final save included) ends within --minutes.

    ``float_steps``: whether the run has a float phase (its steps cost ``clock.per_step("float")``).
    """
    remaining = max(0.0, cfg.minutes * 60 - elapsed - 2 * val_seconds)  # the final validation and calibration
    t_float = clock.per_step("float") if float_steps else clock.per_step("sim")
    t_sim = clock.per_step("sim")

    def cost(total: int) -> float:
        start = _qat_start(cfg, total) if float_steps else 0
        n_float = max(0, start - step)
        n_sim = total - max(step, start)
        steps = n_float + n_sim
        return n_float * t_float + n_sim * t_sim + steps / cfg.val_every * val_seconds

    lo, hi = step, step + int(remaining / max(1e-6, min(t_float, t_sim))) + 1
    while lo < hi:  # the largest total whose cost fits 95 % of what is left
        mid = (lo + hi + 1) // 2
        if cost(mid) <= 0.95 * remaining:
            lo = mid
        else:
            hi = mid - 1
    return max(step, lo)


def finetune(cfg: FinetuneConfig, resume: bool = False, on_step: Callable[[StepInfo], None] | None = None,
             stop_after: int | None = None) -> FinetuneResult:
    """Run (or resume) the fine-tune; writes ``<out_dir>/model.pt`` at the end.

    ``stop_after`` ends this call after that many steps (the run stays resumable).
    """
    check_config(cfg)
    source = Path(cfg.model)
    parent = load_predicted(source)
    spec = parent.spec
    out = Path(cfg.out_dir)
    model_sha = sha256_file(source)
    state_path, log_path = out / STATE_NAME, out / LOG_NAME
    state = _read_state(state_path, cfg, model_sha) if resume else None
    data = load_finetune_data(cfg.data, tuple(spec.input_shape), spec.num_classes, cfg.val_count, cfg.val_fraction,
                              cfg.seed, cfg.train_images)
    batches = Batches(data, cfg.batch_size, cfg.seed)
    start = make_start(parent, cfg.init, cfg.seed, cfg.noise)
    model = build_model(spec)
    model.load_state_dict(start.state_dict)
    trainer = _Trainer(model, cfg, data.calibration)
    total = _total_steps(cfg, batches.per_epoch)
    has_float = cfg.float_fraction > 0 and not trainer.deploy.is_float
    clock = _PhaseClock()
    qat_started = False  # whether the first simulator step after the float phase has run (its log event)
    probe = 0
    step, train_seconds, wall_before, val_start, ema = 0, 0.0, 0.0, None, (None, None)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            trainer.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise CheckpointError(f"{state_path}: fine-tune state does not match this net ({reason})") from None
        step, total, probe = state["step"], state["total"], state["probe"]
        train_seconds, val_start, ema = state["train_seconds"], state["val_top1_start"], tuple(state["ema"])
        wall_before = state["wall_seconds"]
        trainer.frozen, trainer.ranges = state["frozen"], state["ranges"]
        clock = _PhaseClock(state.get("phase_clock"))
        qat_started = bool(state.get("qat_started", False))
        _truncate_log(log_path, step)
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(log_path, "")
    atomic_write_text(out / CONFIG_NAME, json.dumps(asdict(cfg), indent=1) + "\n")

    def log(record: dict) -> None:
        with open(log_path, "a") as handle:
            handle.write(json.dumps({**record, "time": time.time()}) + "\n")

    call_start = time.perf_counter()
    val_seconds = 0.0
    if val_start is None:  # the start's own accuracy, before any step
        t0 = time.perf_counter()
        val_start = deployed_accuracy(model, data.calibration, data.val, cfg.scheme, cfg.bits)
        val_seconds = time.perf_counter() - t0
        log({"event": "val", "step": 0, "val_top1": val_start, "train_seconds": 0.0, "seconds": val_seconds})
    if total is None:  # a --minutes run: the cycle starts after the timed probe
        probe = PROBE_STEPS
    end_call = None if stop_after is None else step + stop_after
    last_val = None
    while total is None or step < total:
        if end_call is not None and step >= end_call:
            break
        if total is None and step == probe:
            total = _fit_minutes(cfg, step, wall_before + time.perf_counter() - call_start, clock, val_seconds,
                                 has_float)
            if step >= total:
                break
        schedule = OneCycle(cfg.lr, total if total is not None else probe + 1, start=probe)
        freeze_at = None if total is None or cfg.freeze_bn == 0 else total - round(cfg.freeze_bn * total)
        if freeze_at is not None and not trainer.frozen and step >= freeze_at:
            trainer.freeze()
            log({"event": "freeze", "step": step, "ranges": trainer.ranges is not None})
        if total is None:  # the probe times both kinds of step, alternately
            float_phase = has_float and step % 2 == 0
        else:
            float_phase = has_float and not trainer.frozen and step < _qat_start(cfg, total)
            if has_float and not float_phase and not trainer.frozen and not qat_started:  # also after a refit
                log({"event": "qat", "step": step})
                qat_started = True
        t0 = time.perf_counter()
        x, y = batches(step)
        lr = schedule.lr(step)
        loss, acc = trainer.step(x, y, lr, float_phase)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        clock.add("float" if float_phase else "sim", seconds)
        ema = (loss if ema[0] is None else 0.95 * ema[0] + 0.05 * loss,
               acc if ema[1] is None else 0.95 * ema[1] + 0.05 * acc)
        step += 1
        val = None
        done = total is not None and step >= total
        if step % cfg.log_every == 0 or done:
            log({"event": "train", "step": step, "total": total, "loss": loss, "acc": acc, "ema_loss": ema[0],
                 "ema_acc": ema[1], "lr": lr, "train_seconds": train_seconds,
                 "phase": "float" if float_phase else ("frozen" if trainer.frozen else "qat"),
                 **({"precision": trainer.precision} if float_phase or trainer.deploy.is_float else {})})
        if step % cfg.val_every == 0 or done:
            t0 = time.perf_counter()
            val = last_val = deployed_accuracy(model, data.calibration, data.val, cfg.scheme, cfg.bits)
            val_seconds = time.perf_counter() - t0
            log({"event": "val", "step": step, "val_top1": val, "train_seconds": train_seconds, "seconds": val_seconds})
            if cfg.minutes is not None and not done and total is not None:
                # a shared machine slows down: shorten the cycle so the run still ends within --minutes
                refit = _fit_minutes(cfg, step, wall_before + time.perf_counter() - call_start, clock, val_seconds,
                                     has_float)
                if refit < total:
                    total = max(step + 1, refit)
                    log({"event": "refit", "step": step, "total": total})
        if step % cfg.checkpoint_every == 0 or done or (end_call is not None and step >= end_call):
            if total is not None:
                atomic_torch_save(state_path, {
                    "format": STATE_FORMAT, "step": step, "total": total, "probe": probe, "model": model.state_dict(),
                    "optimizer": trainer.optimizer.state_dict(), "frozen": trainer.frozen, "ranges": trainer.ranges,
                    "train_seconds": train_seconds, "val_top1_start": val_start, "ema": list(ema),
                    "phase_clock": clock.record, "qat_started": qat_started,
                    "wall_seconds": wall_before + time.perf_counter() - call_start,
                    "config": asdict(cfg), "model_sha256": model_sha,
                })
        if on_step:
            on_step(StepInfo(step, total or probe, ema[0], ema[1], lr, val))
    finished = total is not None and step >= total
    model_file = None
    if finished:
        if last_val is None:  # resumed at the very end: the final validation is in the log already
            last_val = _last_val(log_path)
        model_file = out / MODEL_NAME
        saved = calibrate_bn(model, data.calibration)  # running statistics as export calibrates them
        finetune_info = {
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("model", "out_dir", "checkpoint_every",
                                                                         "log_every")},
            "bits": cfg.bits, "scheme": cfg.scheme, "init": cfg.init, "changed_by_init": len(start.changed),
            "steps": total, "train_images": len(data.train), "train_set": data.train.description,
            "validation_set": data.val.description, "val_top1_start": val_start, "val_top1_final": last_val,
            "val_protocol": f"{cfg.scheme} {cfg.bits}: BN and activation ranges calibrated on the calibration images",
            "train_seconds": train_seconds, "state_sha256": sha256_file(state_path) if state_path.exists() else None,
            "float_steps": _qat_start(cfg, total) if has_float else 0,
            "float_precision": trainer.precision if has_float or trainer.deploy.is_float else None,
        }
        meta = finetuned_meta(parent, source, start.from_ghn, finetune_info)
        state_dict = {k: v.detach().clone().contiguous() for k, v in saved.state_dict().items()}
        save_predicted(model_file, PredictedModel(spec, state_dict, meta))
    return FinetuneResult(out, model_file, log_path, step, total or probe, val_start, last_val, train_seconds,
                          data.val.description, len(data.train))


def _last_val(log_path: Path) -> float | None:
    value = None
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "val":
            value = record["val_top1"]
    return value


def read_log(path: str | Path) -> list[dict]:
    """The records of a fine-tune log (for reports and benchmarks)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
