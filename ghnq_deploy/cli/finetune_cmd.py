"""``ghnq-deploy finetune``: QAT from the prediction (thin layer over :mod:`ghnq_deploy.finetune.loop`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ghnq_deploy.cli import app, console
from ghnq_deploy.cli.ghn_cmd import SEED_MAX, _MAX_THREADS, _THREADS_HELP, _set_threads
from ghnq_deploy.finetune.init import DEFAULT_NOISE, INITS
from ghnq_deploy.quant.scheme import PRESETS


@app.command("finetune")
def finetune_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model file or run folder to start from (default: the current run's model)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Fine-tune folder (default: <run>/finetune); it becomes the run's model unless it lies outside the run."),
    data: Optional[str] = typer.Option(None, "--data", help="CIFAR-10 folder (as `train`), or an image folder (one sub-folder per class) at the net's input size."),
    bits: str = typer.Option("w8a8", "--bits", help="fp32 or any simulator width wNaM (w8a8, w4a8, w4a4, ...)."),
    scheme: str = typer.Option("tflite-int8", "--scheme", help=f"Deployment scheme to train for ({', '.join(PRESETS)})."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, max=10**9, help="Budget: training steps."),
    epochs: Optional[float] = typer.Option(None, "--epochs", min=0.0, help="Budget: epochs over the training images (default 1 when no budget is given)."),
    minutes: Optional[float] = typer.Option(None, "--minutes", min=0.0, help="Budget: wall-clock minutes (the schedule is fitted after 10 timed steps)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, max=65_536, help="Images per step."),
    lr: float = typer.Option(0.05, "--lr", min=0.0, max=10.0, help="Peak learning rate of the one-cycle schedule (SGD, Nesterov momentum 0.9)."),
    weight_decay: float = typer.Option(5e-4, "--weight-decay", min=0.0, max=1.0, help="Weight decay of conv / linear weights."),
    init: str = typer.Option("ghn", "--init", help=f"Start: {', '.join(INITS)} (random: the builder's seeded default init)."),
    noise: float = typer.Option(DEFAULT_NOISE, "--noise", min=0.0, max=10.0, help="--init ghn-noise: noise std as a fraction of each weight's std."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seed of every random choice (images, augmentation, random init)."),
    val_count: Optional[int] = typer.Option(1000, "--val-count", min=1, help="Held-out validation images to report on (CIFAR-10: from the 5,000 held out of train)."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", min=0.0, max=1.0, help="Image folder: fraction of each class held out for validation."),
    val_every: int = typer.Option(100, "--val-every", min=1, help="Steps between validations."),
    freeze_bn: float = typer.Option(0.1, "--freeze-bn", min=0.0, max=1.0, help="Last fraction of the steps on frozen, export-calibrated BN statistics and activation ranges."),
    float_fraction: float = typer.Option(0.7, "--float-fraction", min=0.0, max=1.0, help="First fraction of the steps trained in float, without the simulator (several times cheaper per step); QAT follows."),
    precision: str = typer.Option("auto", "--precision", help="Float-phase arithmetic: auto (bf16 autocast where the CPU computes bf16 natively, else fp32), bf16, fp32."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", min=0.0, help="Clip the global gradient norm to this (default: no clipping)."),
    train_images: Optional[int] = typer.Option(None, "--train-images", min=1, help="Use only the first N training images."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", min=1, help="Steps between atomic checkpoints (state.pt)."),
    log_every: int = typer.Option(10, "--log-every", min=1, help="Steps between training-loss lines in the JSONL log."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the --output folder from its state.pt."),
    workspace: Optional[Path] = typer.Option(None, "--workspace", help="Workspace folder (default ./ghnq-runs or $GHNQ_WORKSPACE)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=_MAX_THREADS, help=_THREADS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Fine-tune the current run's net from its GHN-Q prediction, with the fake-quant simulator in the loop."""
    from ghnq_deploy.finetune.loop import FinetuneConfig, check_config, finetune
    from ghnq_deploy.workspace import check_output_dir, resolve_model, set_active_model

    source = resolve_model(model, workspace)
    out = output if output is not None else source.parent / "finetune"
    check_output_dir(out)
    cfg = FinetuneConfig(model=str(source), out_dir=str(out), data=data, bits=bits, scheme=scheme, steps=steps,
                         epochs=epochs, minutes=minutes, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         init=init, noise=noise, seed=seed, val_count=val_count, val_fraction=val_fraction,
                         val_every=val_every, freeze_bn=freeze_bn, float_fraction=float_fraction,
                         precision=precision, grad_clip=grad_clip, train_images=train_images,
                         checkpoint_every=checkpoint_every, log_every=log_every)
    check_config(cfg)
    _set_threads(threads)
    columns = [TextColumn("[bold]finetune"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f} train {task.fields[acc]:.1%} val {task.fields[val]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=as_json) as progress:
        task = progress.add_task("finetune", total=None, loss=float("nan"), acc=0.0, val="-")

        def on_step(info) -> None:
            fields = {"loss": info.loss, "acc": info.accuracy}
            if info.val_top1 is not None:
                fields["val"] = f"{info.val_top1:.1%}"
            progress.update(task, total=info.total, completed=info.step, **fields)

        result = finetune(cfg, resume=resume, on_step=on_step)
    run = source.parent
    active = (run / "model.pt").is_file() and Path(result.model_file).resolve().is_relative_to(run.resolve())
    if active:  # a folder inside the run: export and verify use the fine-tune from now on
        set_active_model(run, result.model_file)
    summary = {"model_file": str(result.model_file), "log": str(result.log_file), "steps": result.steps,
               "val_top1_start": result.val_top1_start, "val_top1_final": result.val_top1_final,
               "validation": result.validation, "train_images": result.train_images,
               "train_seconds": result.train_seconds, "run_model": active, "config": asdict(cfg)}
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    start, final = result.val_top1_start, result.val_top1_final
    console.print(f"{cfg.bits} {cfg.scheme} validation top-1 on {result.validation}: {start:.2%} at the start -> "
                  f"[bold]{final:.2%}[/] after {result.steps} steps ({result.train_seconds:.0f} s of training)",
                  highlight=False, soft_wrap=True)
    console.print(f"fine-tuned model: [bold]{result.model_file}[/]; log: {result.log_file}", highlight=False,
                  soft_wrap=True)
    if active:
        console.print(f"export and verify now use it for {run} (--model {run / 'model.pt'} picks the prediction)",
                      highlight=False, soft_wrap=True)
