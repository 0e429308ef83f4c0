"""GHN-Q meta-training: sample nets, predict their parameters, backprop the nets' loss into the GHN.

Every random choice of a step (which nets, which images, which augmentation, which
bit-widths) is a pure function of (seed, step), so a run resumed from a checkpoint
continues exactly as if it had not stopped. Under torchrun the nets of a meta-batch are
split across processes and DistributedDataParallel averages the GHN's gradients, which
gives the same update as one process on the whole meta-batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ghnq_deploy.arch.builder import ArchNet
from ghnq_deploy.arch.functional import ForwardOptions, run_with_params
from ghnq_deploy.arch.sampler import SPACE_VERSION, sample_arch
from ghnq_deploy.data import ImageSet, augment, load_cifar10, normalize
from ghnq_deploy.ghn.graph import PRIMITIVES, ArchGraph, build_graph
from ghnq_deploy.ghn.model import BIT_OPTIONS, GHNQ, GHNConfig
from ghnq_deploy.ghn.precision import net_autocast, resolve_precision
from ghnq_deploy.ghn.prefetch import Prefetcher
from ghnq_deploy.ghn.checkpoint import (CheckpointError, check_finite, load_ghn_checkpoint, read_checkpoint,
                                        resolve_checkpoint, torch_load_file)
from ghnq_deploy.io import atomic_torch_save, atomic_write_text
from ghnq_deploy.quant.range_balance import range_balance_penalty
from ghnq_deploy.quant.scheme import QuantScheme, qat_scheme


@dataclass
class TrainConfig:
    out_dir: str = "ghnq-train"
    data: str | None = None
    epochs: float = 1.0
    steps: int | None = None  # overrides epochs
    batch_size: int = 32
    meta_batch: int = 4
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-5
    lr_decay_at: float = 0.75  # fraction of the run after which lr *= 0.1
    grad_clip: float = 5.0
    loss_cap: float | None = None  # per-net loss above this has its gradient scaled down to the cap's (see robust_loss)
    range_penalty: float = 0.0  # QAT: weight of quant.range_balance's per-tensor-grid penalty on quantized nets
    seed: int = 0
    space: int = SPACE_VERSION  # architecture space of the id-train nets (1: the shipped checkpoints')
    checkpoint_every: int = 200
    log_every: int = 10
    train_images: int | None = None  # use only the first N training images (tests, quick runs)
    init_from: str | None = None  # start from a GHN checkpoint (fine-tuning, e.g. QAT)
    qat_bits: tuple[str, ...] = ()  # e.g. ("fp32", "w8a8", "w4a8", "w4a4"): QAT when non-empty
    qat_scheme: str = "paper"
    bit_conditioning: bool = False
    ghn: dict = field(default_factory=dict)  # GHNConfig overrides for a fresh GHN
    device: str = "cpu"
    max_minutes: float | None = None  # wall-clock budget: the run is shortened to fit it
    # the sampled nets' precision: "auto" (bf16 where the hardware has it natively), "bf16" or "fp32".
    # None: "auto" for a new run; on resume, the precision the run recorded, and "fp32" for runs
    # from before this option (they ran float32)
    precision: str | None = None


@dataclass
class StepResult:
    step: int
    total_steps: int
    loss: float
    accuracy: float
    lr: float
    seconds: float


def _rng(seed: int, *keys: int) -> np.random.Generator:
    digest = hashlib.sha256(("|".join(map(str, (seed, *keys)))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


class MetaBatchSource:
    """Deterministic (nets, images, labels, bits) for any step."""

    def __init__(self, cfg: TrainConfig, images: ImageSet):
        self.cfg = cfg
        self.x = normalize(images.images)
        self.y = torch.from_numpy(images.labels)
        self.steps_per_epoch = max(1, len(self.y) // cfg.batch_size)

    def __call__(self, step: int):
        cfg = self.cfg
        epoch, within = divmod(step, self.steps_per_epoch)
        order = _rng(cfg.seed, 1, epoch).permutation(len(self.y))
        idx = torch.from_numpy(order[within * cfg.batch_size:(within + 1) * cfg.batch_size])
        gen = torch.Generator().manual_seed(int(_rng(cfg.seed, 2, step).integers(2**62)))
        x = augment(self.x[idx], gen)
        specs = [sample_arch("id-train", cfg.seed, step * cfg.meta_batch + k, space=cfg.space)
                 for k in range(cfg.meta_batch)]
        if cfg.qat_bits:
            bits = list(_rng(cfg.seed, 3, step).choice(list(cfg.qat_bits), size=cfg.meta_batch))
        else:
            bits = ["fp32"] * cfg.meta_batch
        return specs, x, self.y[idx], bits


def meta_net(spec) -> ArchNet:
    """The net's module tree on the meta device: structure only, no parameter storage."""
    with torch.device("meta"):
        return ArchNet(spec, bn_running_stats=False)


def net_loss(ghn_params: dict[str, torch.Tensor], spec, x: torch.Tensor, y: torch.Tensor,
             bits: str = "fp32", scheme: str | QuantScheme = "paper",
             folded: list[torch.Tensor] | None = None, precision: str = "fp32",
             net: ArchNet | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and correct count of one net running on predicted (non-leaf) parameters.

    ``scheme`` names the deployment scheme; the net runs under its QAT form,
    :func:`~ghnq_deploy.quant.scheme.qat_scheme` (``tflite-int8`` trains as
    ``tflite-int8-qat``: activation ranges from this batch instead of a calibration).
    ``folded`` collects a quantized net's float folded weights (for the range penalty).
    ``precision`` (resolved: "bf16" or "fp32") is that of a float net; quantized nets always
    run float32 (their fake-quant grids must not be rounded again). ``net``: the spec's
    :func:`meta_net`, when already built. Float nets run channels-last, quantized ones NCHW.
    """
    net = net if net is not None else meta_net(spec)
    if bits == "fp32":
        options = ForwardOptions(channels_last=True, fp32_depthwise=x.device.type == "cpu")
        with net_autocast(precision, x.device.type):
            logits = run_with_params(net, ghn_params, x, options)
        logits = logits.float()
    else:
        from ghnq_deploy.quant.simulate import simulated_forward

        # NCHW, as the simulator has always run: under 4-bit grids the float rounding of another
        # conv algorithm flips quantization steps (measured: a w4a8 net's loss 10.19 vs 10.46)
        logits = simulated_forward(net, ghn_params, x.contiguous(), scheme=qat_scheme(scheme), bits=bits,
                                   folded=folded)
    return F.cross_entropy(logits, y), (logits.argmax(1) == y).sum()


def robust_loss(loss: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``loss`` with its gradient scaled by ``cap / loss`` where it exceeds ``cap``.

    Under 4-bit per-tensor quantization a few nets collapse (logits of 10^3..10^5, see
    docs/quantization.md); their cross-entropy would dominate the meta-batch mean and,
    through the gradient clip, shrink every other net's update. Scaling keeps each such
    net's gradient direction at the weight of a net with loss ``cap``. The value is
    unchanged above and below ``cap`` so logged losses stay comparable.
    """
    if cap is None:
        return loss
    value = loss.detach()
    if not torch.isfinite(value):  # no usable gradient: the net counts as a capped loss, with no gradient
        return loss.new_tensor(cap)
    if value <= cap:
        return loss
    scale = cap / value
    return loss * scale + (value - value * scale)


@dataclass
class StepInputs:
    """Everything a step needs before the GHN runs, for the nets this process trains."""

    step: int
    specs: list
    x: torch.Tensor
    y: torch.Tensor
    bits: list[str]
    mine: list[int]  # indices of this process's nets in the meta-batch
    graphs: list[ArchGraph]
    nets: list[ArchNet]


def prepare_step(source: MetaBatchSource, step: int, s_max: int, rank: int = 0, world: int = 1) -> StepInputs:
    """A step's nets, images, graphs and meta-device nets: a pure function of (config, step)."""
    specs, x, y, bits = source(step)
    mine = [k for k in range(len(specs)) if k % world == rank]
    return StepInputs(step, specs, x.contiguous(memory_format=torch.channels_last), y, bits, mine,
                      [build_graph(specs[k], s_max=s_max) for k in mine], [meta_net(specs[k]) for k in mine])


class _Forward(nn.Module):
    """Wraps the GHN so DistributedDataParallel sees a forward() producing all parameters."""

    def __init__(self, ghn: GHNQ):
        super().__init__()
        self.ghn = ghn

    def forward(self, graphs, bits):
        return self.ghn.predict_params(graphs, bits)


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def make_ghn(cfg: TrainConfig) -> GHNQ:
    if cfg.init_from:
        ghn, _ = load_ghn_checkpoint(cfg.init_from)
        known = ghn.config.num_primitives
        if (cfg.bit_conditioning and not ghn.config.bit_conditioning) or known < len(PRIMITIVES):
            torch.manual_seed(cfg.seed)
            new = GHNQ(GHNConfig.from_dict({**asdict(ghn.config), "num_primitives": len(PRIMITIVES),
                                            "bit_conditioning": cfg.bit_conditioning or ghn.config.bit_conditioning}))
            state = ghn.state_dict()
            # an older vocabulary grows: its op types keep their embeddings, the new ones start at random
            grown = new.op_embedding.weight.detach().clone()
            grown[:known] = state["op_embedding.weight"]
            state["op_embedding.weight"] = grown
            new.load_state_dict(state, strict=False)  # a new bit embedding starts at zero
            ghn = new
        return ghn
    torch.manual_seed(cfg.seed)
    # a fresh GHN embeds today's whole op vocabulary and standardises its predicted weights per
    # channel (docs/results/bnfree-ablation); from_dict's defaults are for old checkpoints
    return GHNQ(GHNConfig.from_dict({"num_primitives": len(PRIMITIVES), "weight_standardization": True, **cfg.ghn,
                                     "bit_conditioning": cfg.bit_conditioning}))


def train(cfg: TrainConfig, resume: bool = False, on_step: Callable[[StepResult], None] | None = None,
          stop_after: int | None = None) -> Path:
    """Run (or resume) meta-training; returns the path of the final GHN checkpoint.

    ``stop_after`` ends this call after that many steps (the run stays resumable).
    """
    rank, world = _dist_info()
    # the scheme QAT trains with (tflite-int8 -> tflite-int8-qat); an unknown name is one clear
    # error here, before any data or GHN work
    scheme = qat_scheme(cfg.qat_scheme) if cfg.qat_bits else cfg.qat_scheme
    out = Path(cfg.out_dir)
    resume_state = _resume_state(out / "last.pt", cfg) if resume else None  # refused before any work
    cfg = replace(cfg, precision=_requested_precision(cfg, resume_state))
    if resume_state is not None and not cfg.ghn:
        cfg = replace(cfg, ghn=resume_state["train_config"].get("ghn") or {})
    precision = resolve_precision(cfg.precision, cfg.device)  # an unknown name is refused here, too
    if cfg.init_from and not resume:
        read_checkpoint(resolve_checkpoint(cfg.init_from))  # likewise a bad --init-from
    images = load_cifar10("train", cfg.data)
    if cfg.train_images:
        images = images.subset(cfg.train_images)
    source = MetaBatchSource(cfg, images)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * source.steps_per_epoch))

    saved = (resume_state or {}).get("ghn", {}).get("config")
    if isinstance(saved, dict):  # a resumed run keeps its own GHN (vocabulary, weight standardisation, ...)
        torch.manual_seed(cfg.seed)
        ghn = GHNQ(GHNConfig.from_checkpoint(saved)).to(cfg.device)
    else:
        ghn = make_ghn(cfg).to(cfg.device)
    ghn.train()
    model: nn.Module = _Forward(ghn)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.Adam(ghn.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(cfg.lr_decay_at * total)], gamma=0.1)
    state_path, log_path = out / "last.pt", out / "train_log.jsonl"
    start = 0
    if resume_state is not None:
        state = resume_state
        try:
            ghn.load_state_dict(state["ghn"]["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise CheckpointError(f"{state_path}: training state does not match this GHN ({reason})") from None
        # the run may be resumed with another length: the decay point follows this config
        scheduler.milestones = Counter([int(cfg.lr_decay_at * total)])
        start = state["step"]
        if rank == 0:
            _truncate_log(log_path, start)
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(log_path, "")
    if rank == 0:
        atomic_write_text(out / "train_config.json", json.dumps({**asdict(cfg), "precision_ran": precision}, indent=1))

    ema_loss = ema_acc = None
    end = total if stop_after is None else min(total, start + stop_after)
    call_start = time.perf_counter()
    step = start
    # the next steps' nets, images and graphs are prepared in a thread while this one trains
    with Prefetcher(lambda s: prepare_step(source, s, ghn.config.s_max, rank, world), start, end) as ahead:
        while step < end:
            if cfg.max_minutes and step == start + _BUDGET_PROBE_STEPS:
                total, end = _fit_to_budget(cfg, total, end, step, step - start, time.perf_counter() - call_start)
                scheduler.milestones = Counter([int(cfg.lr_decay_at * total)])
                if step >= end:
                    break
            t0 = time.perf_counter()
            inputs = ahead.get(step)
            loss, correct, penalties = step_loss(model, inputs, cfg, scheme, precision, world)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(ghn.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            mine, y = inputs.mine, inputs.y
            value = loss.item() * cfg.meta_batch / (world * len(mine))  # this process's mean loss (penalty included)
            acc = int(correct) / (len(mine) * len(y))
            ema_loss = value if ema_loss is None else 0.98 * ema_loss + 0.02 * value
            ema_acc = acc if ema_acc is None else 0.98 * ema_acc + 0.02 * acc
            result = StepResult(step + 1, total, ema_loss, ema_acc, scheduler.get_last_lr()[0],
                                time.perf_counter() - t0)
            if rank == 0:
                if (step + 1) % cfg.log_every == 0 or step + 1 == end:
                    extra = {"range_penalty": float(np.mean(penalties))} if penalties else {}
                    with open(log_path, "a") as handle:
                        handle.write(json.dumps({**asdict(result), "raw_loss": value, "raw_acc": acc, **extra,
                                                 "precision": precision, "time": time.time()}) + "\n")
                if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
                    atomic_torch_save(state_path, {
                        "ghn": _cpu_checkpoint(ghn), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step + 1, "train_config": asdict(cfg),
                    })
            if on_step:
                on_step(result)
            step += 1
    final = out / "ghn.pt"
    if rank == 0 and end >= total:
        meta = {"train_config": asdict(cfg), "steps": total, "dataset": "cifar10",
                "images": images.description, "world_size": world, "precision_ran": precision}
        atomic_torch_save(final, ghn.to("cpu").checkpoint(**meta))
    return final


_BUDGET_PROBE_STEPS = 20


def step_loss(model: nn.Module, inputs: StepInputs, cfg: TrainConfig, scheme: str | QuantScheme, precision: str,
              world: int = 1) -> tuple[torch.Tensor, torch.Tensor | int, list[float]]:
    """(loss to back-propagate, correct count, range penalties) of this process's nets of a step."""
    x = inputs.x.to(cfg.device, non_blocking=True)
    y = inputs.y.to(cfg.device, non_blocking=True)
    mine, bits = inputs.mine, inputs.bits
    params = model(inputs.graphs, [BIT_OPTIONS.index(bits[k]) for k in mine])
    loss = x.new_zeros(())
    correct, penalties = 0, []
    for k, p, net in zip(mine, params, inputs.nets):
        folded = [] if cfg.range_penalty and bits[k] != "fp32" else None
        net_l, net_c = net_loss(p, inputs.specs[k], x, y, bits[k], scheme, folded, precision, net)
        loss = loss + robust_loss(net_l, cfg.loss_cap) * world / cfg.meta_batch
        if folded:  # a quantized net with the penalty on (and at least one quantized layer)
            pen = range_balance_penalty(folded)
            loss = loss + cfg.range_penalty * pen * world / cfg.meta_batch
            penalties.append(pen.item())
        correct = correct + net_c
    return loss, correct, penalties


def _requested_precision(cfg: TrainConfig, resume_state: dict | None) -> str:
    """cfg.precision, or its default: "auto" for a new run, the resumed run's own otherwise
    (runs from before the option recorded none: they ran, and go on running, float32)."""
    if cfg.precision is not None:
        return cfg.precision
    if resume_state is None:
        return "auto"
    return resume_state["train_config"].get("precision") or "fp32"


def _fit_to_budget(cfg: TrainConfig, total: int, end: int, step: int, done: int, seconds: float) -> tuple[int, int]:
    """(total, end) shortened so the run ends within cfg.max_minutes; all ranks take rank 0's."""
    remaining = cfg.max_minutes * 60 - seconds
    reachable = int(max(0.0, remaining) / (seconds / done) * 0.95)
    new_end = torch.tensor([min(end, step + reachable)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(new_end, src=0)
    new_end = int(new_end)
    return min(total, new_end), new_end


# what a resumed run must share with the run it continues: the (nets, images) of a step are a
# function of these, and the optimiser's restored state carries lr / weight decay / betas
RESUME_MUST_MATCH = ("batch_size", "meta_batch", "seed", "train_images", "qat_bits", "qat_scheme",
                     "bit_conditioning", "ghn", "lr", "weight_decay", "betas", "loss_cap", "range_penalty")


def _resume_state(state_path: Path, cfg: TrainConfig) -> dict:
    """The training state to resume from, refused when missing, unreadable or from another setup."""
    if not state_path.exists():
        raise CheckpointError(f"{state_path}: no training state to resume from (drop --resume to start a new run, "
                              "or point --out-dir at the run to continue)")
    state = torch_load_file(state_path, CheckpointError, "training state")
    if not (isinstance(state, dict) and isinstance(state.get("ghn"), dict) and isinstance(state.get("step"), int)
            and isinstance(state.get("train_config"), dict) and "optimizer" in state and "scheduler" in state):
        raise CheckpointError(f"{state_path}: not a ghnq-deploy training state (last.pt)")
    check_finite(state_path, state["ghn"].get("state_dict") or {}, CheckpointError, "training state")
    before = state["train_config"]
    now = asdict(cfg)
    if not now.get("ghn"):  # no GHN overrides given: the run keeps its own (train() adopts them)
        now["ghn"] = before.get("ghn", {})
    changed = [f"{k} {_plain(before.get(k))} -> {_plain(now[k])}" for k in RESUME_MUST_MATCH
               if k in before and _plain(before.get(k)) != _plain(now[k])]
    if changed:
        raise CheckpointError(f"{state_path}: --resume with changed settings ({'; '.join(changed)}); a resumed run "
                              "must repeat them (pass the same options, or start a new --out-dir)")
    return state


def _plain(value):
    """JSON-comparable form (tuples and lists compare equal)."""
    return json.loads(json.dumps(value))


def _cpu_checkpoint(ghn: GHNQ) -> dict:
    ckpt = ghn.checkpoint()
    ckpt["state_dict"] = {k: v.detach().cpu() for k, v in ckpt["state_dict"].items()}
    return ckpt


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from."""
    if not log_path.exists():
        return
    kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text(log_path, "".join(line + "\n" for line in kept))


def init_distributed(device: str = "cpu") -> bool:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
    return True
