"""``predict`` and ``train``: the GHN-Q commands."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ghnq_deploy.arch.spec import DEFAULT_PARAM_CAP, ArchError, load_info
from ghnq_deploy.cli import app, console, err_console
from ghnq_deploy.errors import UserError
from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
from ghnq_deploy.ghn.model import BIT_OPTIONS
from ghnq_deploy.io import atomic_write_text
from ghnq_deploy.quant.scheme import PRESETS, QuantSchemeError
from ghnq_deploy.workspace import (check_output_file, check_unique_names, check_workspace, run_dir, set_active_model,
                                  set_current)

_THREADS_HELP = "torch intra-op threads (use 1 on a machine shared with a job)."
_MAX_THREADS = 1024
SEED_MAX = 2**32 - 1  # numpy's legacy seeding and most tools take 32-bit seeds


class Device(str, Enum):
    """Where ``train`` runs (torchrun picks the CUDA device of each rank)."""

    cpu = "cpu"
    cuda = "cuda"


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")


def _set_threads(threads: int | None) -> None:
    """As ``evaluate --threads``: torch's intra-op threads, once every input is known to be good."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _spec_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise ArchError(f"{path}: folder holds no *.json arch specs")
        return files
    return [path]


@app.command()
def predict(
    arch: Path = typer.Argument(..., help="An arch.json file, or a folder of them (predicted in meta-batches)."),
    checkpoint: str = typer.Option("default", help="GHN checkpoint: 'default', 'qat' or a file."),
    bits: str = typer.Option("fp32", help=f"Target bit-width for bit-conditioned GHNs ({', '.join(BIT_OPTIONS)})."),
    workspace: Optional[Path] = typer.Option(None, help="Workspace folder (default ./ghnq-runs or $GHNQ_WORKSPACE)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write one model file here instead of a run folder."),
    meta_batch: int = typer.Option(16, min=1, max=4096, help="Nets per GHN forward pass when predicting a folder."),
    threads: Optional[int] = typer.Option(None, min=1, max=_MAX_THREADS, help=_THREADS_HELP),
    param_cap: Optional[int] = typer.Option(None, "--param-cap", min=1, help="Refuse nets above this many parameters (default: no cap)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of a table."),
) -> None:
    """Predict all parameters of the net(s) in ARCH with GHN-Q, in one forward pass per meta-batch.

    Prediction is deterministic: the same spec and checkpoint always give bit-identical parameters.
    """
    from ghnq_deploy.ghn.predict import predict as run_predict, save_predicted

    if bits not in BIT_OPTIONS:
        raise ArchError(f"--bits {bits!r} is not one of {', '.join(BIT_OPTIONS)}")
    _check_threads(threads)
    files = _spec_files(arch)
    if output is not None and len(files) > 1:
        raise ArchError("--output takes a single arch file; use --workspace for a folder")
    cap = sys.maxsize if param_cap is None else param_cap
    infos = [load_info(f, param_cap=cap) for f in files]
    specs = [i.spec for i in infos]
    for i in infos:
        if i.params > DEFAULT_PARAM_CAP:  # outside the GHN's training space: said, not refused
            err_console.print(f"note: {i.spec.name}: {i.params:,} parameters, above the {DEFAULT_PARAM_CAP:,} of the "
                              "GHN's training architectures; predictions may be less accurate", highlight=False,
                              soft_wrap=True)
    check_unique_names(specs)
    if output is not None:
        check_output_file(output)
    else:
        check_workspace(workspace)
    _set_threads(threads)
    ghn, info = load_ghn_checkpoint(checkpoint)
    rows = []
    for start in range(0, len(specs), max(1, meta_batch)):
        chunk = specs[start:start + meta_batch]
        for model in run_predict(ghn, chunk, bits=bits, ghn_info=info, param_cap=cap):
            if output is not None:
                target = output
            else:
                folder = run_dir(model.spec.name, workspace)
                target = folder / "model.pt"
                atomic_write_text(folder / "arch.json", model.spec.dumps())
            save_predicted(target, model)
            params = sum(v.numel() for k, v in model.state_dict.items() if "running" not in k and "num_batches" not in k)
            row = {"name": model.spec.name, "params": params, "graph_nodes": model.meta["graph_nodes"],
                   "ms": round(1000 * model.meta["seconds_total"], 2), "model": str(target),
                   "checkpoint": info["path"], "checkpoint_sha256": info["sha256"], "bits": model.meta["bits"]}
            if output is None:
                atomic_write_text(target.parent / "predict.json", json.dumps(row, indent=1) + "\n")
                set_active_model(target.parent, None)  # a new prediction: an earlier fine-tune no longer applies
                set_current(target.parent)
            rows.append(row)
    if as_json:
        console.print_json(json.dumps(rows if len(rows) > 1 else rows[0]))
        return
    table = Table(title=f"GHN-Q predictions ({Path(info['path']).name})")
    for col in ("net", "params", "graph nodes", "ms / net", "written to"):
        table.add_column(col, justify="right" if col in ("params", "graph nodes", "ms / net") else "left")
    for r in rows:
        table.add_row(r["name"], f"{r['params']:,}", str(r["graph_nodes"]), f"{r['ms']:.1f}", r["model"])
    console.print(table)
    if output is None:
        console.print(f"current run: [bold]{Path(rows[-1]['model']).parent}[/] (export and verify use it by default)")


@app.command()
def train(
    out_dir: Path = typer.Option(Path("ghnq-train"), "--output", "-o", "--out-dir", help="Run folder: checkpoints, JSONL log, config (--out-dir is the old spelling)."),
    data: Optional[str] = typer.Option(None, help="CIFAR-10 folder (npz copy or cifar-10-batches-py) or an x/y .npz."),
    epochs: float = typer.Option(1.0, min=0.0, max=10_000.0, help="Epochs over the 45k training images (> 0)."),
    steps: Optional[int] = typer.Option(None, min=1, max=10**9, help="Total steps (overrides --epochs)."),
    batch_size: int = typer.Option(32, min=1, max=65_536, help="Images per step (shared by every net of the meta-batch)."),
    meta_batch: int = typer.Option(4, min=1, max=4096, help="Architectures per step."),
    lr: float = typer.Option(1e-3, min=0.0, max=10.0, help="Adam learning rate (> 0; x0.1 at --lr-decay-at of the run)."),
    weight_decay: float = typer.Option(1e-5, min=0.0, max=10.0, help="Adam weight decay."),
    lr_decay_at: float = typer.Option(0.75, min=0.0, max=1.0, help="Fraction of the run after which lr is multiplied by 0.1."),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="Seed of every random choice (nets, images, augmentation)."),
    checkpoint_every: int = typer.Option(200, min=1, max=10**9, help="Steps between atomic checkpoints (last.pt)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT_DIR/last.pt."),
    init_from: Optional[str] = typer.Option(None, help="Start from a GHN checkpoint ('default', 'qat' or a file)."),
    qat: bool = typer.Option(False, "--qat", help="Quantization-aware: fake-quant nets in the loop."),
    qat_bits: str = typer.Option("fp32,w8a8,w4a8,w4a4", help="Bit-widths drawn per net in --qat."),
    qat_scheme: str = typer.Option("paper", help="Quantization scheme preset for --qat: the deployment scheme "
                                   f"({', '.join(PRESETS)}); calibrated ranges train as per-batch ranges "
                                   "(tflite-int8 trains as tflite-int8-qat, see docs/quantization.md)."),
    bit_conditioning: bool = typer.Option(False, help="Condition the GHN on the target bit-width."),
    loss_cap: Optional[float] = typer.Option(None, min=0.0, help="Scale down the gradient of any net whose loss exceeds this "
                                             "(robust QAT: 4-bit nets that collapse do not dominate the step)."),
    range_penalty: float = typer.Option(0.0, min=0.0, help="--qat: weight of the range-balance penalty on quantized "
                                        "nets (rounding-noise share of each channel on its layer's per-tensor grid, "
                                        "BN folded; see docs/quantization.md)."),
    train_images: Optional[int] = typer.Option(None, min=1, help="Use only the first N training images."),
    device: Device = typer.Option(Device.cpu, help="Where to train."),
    max_minutes: Optional[float] = typer.Option(None, min=0.0, help="Wall-clock budget: shorten the run (and its lr decay) to fit."),
    threads: Optional[int] = typer.Option(None, min=1, max=_MAX_THREADS, help=_THREADS_HELP),
    weight_standardization: Optional[bool] = typer.Option(
        None, "--weight-standardization/--no-weight-standardization",
        help="A fresh GHN normalises each predicted weight channel to zero mean and He scale (default: on; "
             "BN-free nets collapse without it, docs/ghn.md). Not with --resume / --init-from: the GHN's own "
             "setting is kept."),
    precision: Optional[str] = typer.Option(None, help="Precision of the sampled nets: auto (bf16 where the CPU or "
                                            "GPU computes it natively, else fp32), bf16 or fp32; the GHN and Adam "
                                            "stay fp32. Default: auto for a new run; --resume keeps the run's own "
                                            "(fp32 for runs started before this option)."),
) -> None:
    """Meta-train GHN-Q on CIFAR-10 (runs under torchrun with DistributedDataParallel too)."""
    from ghnq_deploy.ghn.allocator import keep_freed_memory
    from ghnq_deploy.ghn.precision import PRECISIONS, PrecisionError
    from ghnq_deploy.ghn.train import TrainConfig, init_distributed, train as run_train

    if qat_scheme not in PRESETS:
        raise QuantSchemeError(f"--qat-scheme {qat_scheme!r} is not one of {', '.join(PRESETS)}")
    if range_penalty and not qat:
        raise QuantSchemeError("--range-penalty needs --qat (it acts on the quantized nets of a QAT meta-batch)")
    _check_threads(threads)
    if precision is not None and precision not in PRECISIONS:
        raise PrecisionError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if weight_standardization is not None and (resume or init_from):
        raise UserError("--weight-standardization applies to a fresh GHN; --resume and --init-from keep the "
                        "GHN's own setting")
    for flag, value in (("--epochs", epochs), ("--lr", lr), ("--loss-cap", loss_cap), ("--max-minutes", max_minutes)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} must be a finite number above 0, got {value}")
    for flag, value in (("--weight-decay", weight_decay), ("--range-penalty", range_penalty)):
        if not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
    if not 0.0 < lr_decay_at <= 1.0:
        raise UserError(f"--lr-decay-at is a fraction of the run: above 0 and at most 1, got {lr_decay_at}")
    if device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available to torch on this machine")
    device = device.value
    distributed = init_distributed(device)
    bits = tuple(b.strip() for b in qat_bits.split(",") if b.strip()) if qat else ()
    if qat and not bits:
        raise UserError("--qat-bits names no bit-width; give e.g. fp32,w8a8,w4a8,w4a4")
    unknown = [b for b in bits if b not in BIT_OPTIONS]
    if unknown:
        raise ArchError(f"--qat-bits: unknown bit-width(s) {unknown}; choose from {', '.join(BIT_OPTIONS)}")
    cfg = TrainConfig(
        out_dir=str(out_dir), data=data, epochs=epochs, steps=steps, batch_size=batch_size, meta_batch=meta_batch,
        lr=lr, weight_decay=weight_decay, lr_decay_at=lr_decay_at, seed=seed, checkpoint_every=checkpoint_every,
        train_images=train_images, init_from=init_from, qat_bits=bits, qat_scheme=qat_scheme,
        bit_conditioning=bit_conditioning, device=device, max_minutes=max_minutes, loss_cap=loss_cap,
        range_penalty=range_penalty, precision=precision,
        ghn={} if weight_standardization is None else {"weight_standardization": weight_standardization},
    )
    import torch.distributed as dist

    _set_threads(threads)
    # while it trains, the process keeps freed memory (see ghn/allocator.py); glibc's defaults
    # come back when train returns, for callers that go on in the same process
    tuned = device == "cpu" and keep_freed_memory()
    rank = dist.get_rank() if distributed else 0
    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.1%}"), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=rank != 0) as progress:
        task = progress.add_task("train", total=None, loss=float("nan"), acc=0.0)

        def on_step(result) -> None:
            progress.update(task, total=result.total_steps, completed=result.step, loss=result.loss, acc=result.accuracy)

        try:
            final = run_train(cfg, resume=resume, on_step=on_step)
        finally:
            if tuned:
                keep_freed_memory(False)
    if rank == 0:
        console.print(f"GHN checkpoint: [bold]{final}[/]; log: {out_dir / 'train_log.jsonl'}")
        console.print_json(json.dumps(asdict(cfg)))
    if distributed:
        dist.destroy_process_group()
