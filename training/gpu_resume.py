"""Continue a CPU training campaign on a GPU for a few minutes, and bring its state back.

    python training/gpu_resume.py training/ghnq-v3 -o OUT [--minutes 10] [--ratio 16]

Reads ``RUN/last.pt`` (the campaign's atomic training state) and trains on CUDA (bf16 autocast
for the sampled nets where the GPU has it; the GHN and Adam stay float32) with a meta-batch
``ratio`` times the campaign's: one update consumes ``ratio`` consecutive campaign steps, each
step's nets on that step's own images, exactly the (nets, images, augmentation) the CPU run
would have drawn for those steps, and averages their gradients. The learning-rate schedule
advances ``ratio`` campaign steps per update, so the run's decay point stays where it was.
An update never passes the run's last step: fewer than ``ratio`` steps left are left to the
CPU run. The budget is checked before each update after the first (so a window lasts at most
``minutes`` plus one update); the state is also saved every 10 updates.

It writes into OUT (never into RUN): ``last.pt`` in train.py's format and with the campaign's
own train_config (so ``ghnq-deploy train -o <folder holding it> --resume`` with the campaign's
command continues on CPU from the step it reached), ``train_log.jsonl`` (the campaign's log up to
the resumed step, then one line per update, with ``device`` and ``meta_batch``), and
``gpu_window.json`` (what ran, for the card). Merging it into the campaign is a decision made
after measuring it: copy OUT's last.pt and train_log.jsonl over RUN's.

Without CUDA it runs the same loop on the CPU (that is how it is tested); ``--device cuda``
refuses to start without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ghnq_deploy.data import load_cifar10  # noqa: E402
from ghnq_deploy.errors import UserError  # noqa: E402
from ghnq_deploy.ghn.checkpoint import CheckpointError, torch_load_file  # noqa: E402
from ghnq_deploy.ghn.precision import PRECISIONS, resolve_precision  # noqa: E402
from ghnq_deploy.ghn.prefetch import Prefetcher  # noqa: E402
from ghnq_deploy.ghn.train import (MetaBatchSource, TrainConfig, _cpu_checkpoint, _truncate_log,  # noqa: E402
                                   make_ghn, prepare_step, step_loss)
from ghnq_deploy.io import atomic_torch_save, atomic_write_text  # noqa: E402
from ghnq_deploy.quant.scheme import qat_scheme  # noqa: E402

DEFAULT_RATIO = {"cuda": 16, "cpu": 2}


def campaign_config(saved: dict, out_dir: str) -> TrainConfig:
    """The campaign's TrainConfig from its last.pt (fields this code does not know are dropped)."""
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    cfg.betas = tuple(cfg.betas)
    cfg.qat_bits = tuple(cfg.qat_bits)
    cfg.out_dir = out_dir
    return cfg


def _cpu_state(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu_state(v) for v in obj]
    return obj


def gpu_resume(run: Path, out: Path, minutes: float, ratio: int | None = None, device: str = "auto",
               precision: str = "auto", group: int = 4, max_updates: int | None = None) -> dict:
    """Train RUN's state for at most ``minutes`` on ``device``; write OUT; return the summary."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to torch on this machine")
    ratio = ratio or DEFAULT_RATIO[device]
    if ratio < 1 or group < 1 or minutes <= 0:
        raise UserError("--ratio and --group must be at least 1 and --minutes above 0")
    state = torch_load_file(run / "last.pt", CheckpointError, "training state")
    if not (isinstance(state, dict) and {"ghn", "optimizer", "scheduler", "step", "train_config"} <= set(state)):
        raise CheckpointError(f"{run / 'last.pt'}: not a ghnq-deploy training state (last.pt)")
    saved = state["train_config"]
    cfg = campaign_config(saved, str(out))
    ran = resolve_precision(precision, device)
    scheme = qat_scheme(cfg.qat_scheme) if cfg.qat_bits else cfg.qat_scheme

    t_start = time.perf_counter()
    images = load_cifar10("train", cfg.data)
    if cfg.train_images:
        images = images.subset(cfg.train_images)
    source = MetaBatchSource(cfg, images)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * source.steps_per_epoch))  # as train.py
    ghn = make_ghn(cfg).to(device)
    ghn.load_state_dict(state["ghn"]["state_dict"])
    ghn.train()
    optimizer = torch.optim.Adam(ghn.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    optimizer.load_state_dict(state["optimizer"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(cfg.lr_decay_at * total)], gamma=0.1)
    scheduler.load_state_dict(state["scheduler"])
    scheduler.milestones = Counter([int(cfg.lr_decay_at * total)])
    cfg.device = device

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    if (run / "train_log.jsonl").exists():
        atomic_write_text(log_path, (run / "train_log.jsonl").read_text())
        _truncate_log(log_path, state["step"])
    else:
        atomic_write_text(log_path, "")

    start = step = state["step"]
    logged = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    # the log's loss / accuracy are train.py's moving averages (0.98 per step): continued here
    ema_loss, ema_acc = (logged[-1]["loss"], logged[-1]["accuracy"]) if logged else (None, None)
    budget = minutes * 60
    updates, per_update, losses = 0, None, []

    def save() -> None:
        atomic_torch_save(out / "last.pt", {
            "ghn": _cpu_checkpoint(ghn), "optimizer": _cpu_state(optimizer.state_dict()),
            "scheduler": scheduler.state_dict(), "step": step, "train_config": saved,
        })

    with Prefetcher(lambda s: prepare_step(source, s, ghn.config.s_max), start, total, depth=2 * ratio) as ahead:
        while step + ratio <= total and (max_updates is None or updates < max_updates):
            elapsed = time.perf_counter() - t_start
            if per_update is not None and elapsed + per_update > budget:
                break
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, correct, images_seen = 0.0, 0, 0
            for g0 in range(0, ratio, group):
                chunk = [ahead.get(step + j) for j in range(g0, min(ratio, g0 + group))]
                graphs = [g for inp in chunk for g in inp.graphs]
                bits = [inp.bits[k] for inp in chunk for k in inp.mine]
                params = ghn.predict_params(graphs, [_bit_index(b) for b in bits])
                loss = 0.0
                offset = 0
                for inp in chunk:
                    mine = params[offset:offset + len(inp.graphs)]
                    offset += len(inp.graphs)
                    l, c, _ = step_loss(lambda _g, _b, mine=mine: mine, inp, cfg, scheme, ran)
                    loss = loss + l / ratio
                    correct += int(c)
                    images_seen += len(inp.mine) * len(inp.y)
                loss.backward()
                loss_sum += float(loss.detach())
            nn.utils.clip_grad_norm_(ghn.parameters(), cfg.grad_clip)
            optimizer.step()
            for _ in range(ratio):
                scheduler.step()
            if device == "cuda":
                torch.cuda.synchronize()
            step += ratio
            updates += 1
            per_update = time.perf_counter() - t0
            losses.append(loss_sum)
            acc = correct / images_seen
            for _ in range(ratio):  # as if each consumed step had the update's mean loss
                ema_loss = loss_sum if ema_loss is None else 0.98 * ema_loss + 0.02 * loss_sum
                ema_acc = acc if ema_acc is None else 0.98 * ema_acc + 0.02 * acc
            with open(log_path, "a") as handle:
                handle.write(json.dumps({
                    "step": step, "total_steps": total, "loss": ema_loss, "accuracy": ema_acc,
                    "lr": scheduler.get_last_lr()[0], "seconds": per_update, "raw_loss": loss_sum,
                    "raw_acc": acc, "precision": ran, "device": device,
                    "meta_batch": ratio * cfg.meta_batch, "time": time.time()}) + "\n")
            if updates % 10 == 0:
                save()  # a window cut short still brings something back
    save()
    summary = {
        "run": str(run), "from_step": start, "to_step": step, "updates": updates, "ratio": ratio,
        "meta_batch": ratio * cfg.meta_batch, "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "precision": ran, "minutes_budget": minutes, "wall_s": round(time.perf_counter() - t_start, 1),
        "seconds_per_update": per_update, "campaign_steps_per_hour": (3600 * ratio / per_update) if per_update else None,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "torch": torch.__version__, "train_config": asdict(cfg),
    }
    atomic_write_text(out / "gpu_window.json", json.dumps(summary, indent=1))
    return summary


def _bit_index(bits: str) -> int:
    from ghnq_deploy.ghn.model import BIT_OPTIONS

    return BIT_OPTIONS.index(bits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="campaign folder holding last.pt (e.g. training/ghnq-v3)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for last.pt, log, gpu_window.json")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget, data loading included")
    parser.add_argument("--ratio", type=int, default=None,
                        help=f"campaign steps per update (meta-batch = ratio x the run's); default {DEFAULT_RATIO}")
    parser.add_argument("--group", type=int, default=4, help="campaign steps per GHN forward (memory vs speed)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--max-updates", type=int, default=None, help="stop after this many updates too")
    args = parser.parse_args(argv)
    try:
        summary = gpu_resume(args.run, args.output, args.minutes, args.ratio, args.device, args.precision,
                             args.group, args.max_updates)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "train_config"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
