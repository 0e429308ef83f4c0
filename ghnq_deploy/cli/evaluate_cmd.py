"""``ghnq-deploy evaluate``: the GHN-Q paper's Table 1 on CIFAR-10 (float and fake-quantized nets)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ghnq_deploy.cli import app, console

_BITS_DEFAULT = "fp32,w8a8,w4a8,w4a4,w2a2"
_GLIBC_M_TRIM_THRESHOLD, _GLIBC_M_MMAP_THRESHOLD = -1, -3


def tune_malloc(threshold: int = 1 << 30) -> bool:
    """Keep freed activation buffers in the heap instead of returning them to the OS (glibc).

    By default glibc serves every allocation above a few MiB with a fresh mmap, so each
    batch's activations page-fault in again: measured on the 2-core dev box, 280 of 460 ms
    of a float forward were kernel time. Raising the mmap and trim thresholds removes that
    (a process-wide setting, so only the CLI and benchmarks call it). Returns whether it applied.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_GLIBC_M_MMAP_THRESHOLD, threshold)) and bool(
            libc.mallopt(_GLIBC_M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def _arch_files(path: Path) -> list[Path]:
    """A file, or a folder's *.json files and its run folders' arch.json files."""
    from ghnq_deploy.arch.spec import ArchError

    if not path.exists():
        raise ArchError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(path.glob("*.json")) + sorted(path.glob("*/arch.json"))
        if not files:
            raise ArchError(f"{path}: folder holds no *.json arch specs")
        return files
    return [path]


@app.command()
def evaluate(
    paths: Optional[list[Path]] = typer.Argument(None, help="arch.json files or folders of them (split 'files')."),
    split: Optional[list[str]] = typer.Option(None, "--split", help="Sample nets from this split (repeatable)."),
    n: int = typer.Option(100, "-n", "--count", min=1, max=100_000, help="Nets per split."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Sampler seed for --split / --table1."),
    table1: bool = typer.Option(False, "--table1", help="All paper splits: id-test, ood-deep, ood-wide, ood-bnfree."),
    bits: str = typer.Option(_BITS_DEFAULT, help="Comma-separated bit-widths: fp32 or wNaM (N, M in 2..8)."),
    scheme: str = typer.Option("paper", help="Quantization scheme preset: paper, tflite-int8, tflite-int8-qat or "
                               "paper-per-channel (docs/quantization.md)."),
    bn: str = typer.Option("batch", help="BatchNorm: 'batch' (paper: statistics of each test batch) or 'running' "
                                         "(calibrated on CIFAR-10 train images, folded once)."),
    checkpoint: str = typer.Option("default", help="GHN checkpoint: 'default', 'qat' or a file."),
    limit_images: Optional[int] = typer.Option(None, min=1, help="Evaluate only the first N test images of the fixed order."),
    batch_size: int = typer.Option(64, min=1, max=65_536, help="Test batch size (the paper uses 64; it sets the BN statistics)."),
    order_seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the fixed test-order permutation (the test file is class-sorted)."),
    meta_batch: int = typer.Option(8, min=1, max=4096, help="Nets per GHN forward pass."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="Calibration .npz for calibrated ranges / --bn running (the same set and BN routine as export); default: the shipped 1,000 CIFAR-10 train images."),
    data: Optional[str] = typer.Option(None, help="CIFAR-10 folder (npz copy or cifar-10-batches-py)."),
    out: Optional[Path] = typer.Option(None, "--output", "-o", "--out", help="Folder for evaluation.json, per_network.csv, table1.md, PNG (--out is the old spelling)."),
    threads: Optional[int] = typer.Option(None, min=1, max=1024, help="torch intra-op threads (use 1 on a machine shared with a job)."),
    param_cap: Optional[int] = typer.Option(None, "--param-cap", min=1, help="Refuse arch files above this many parameters (default: no cap)."),
    as_json: bool = typer.Option(False, "--json", help="Print the aggregates as JSON instead of the table."),
) -> None:
    """Predict parameters with GHN-Q and report float vs quantized CIFAR-10 accuracy (paper Table 1)."""
    import torch

    from ghnq_deploy.arch.sampler import sample_split
    from ghnq_deploy.arch.spec import ArchError, load_spec
    from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
    from ghnq_deploy.report.evaluate import PAPER_SPLITS, EvalConfig, EvalError, NetInput, evaluate as run_eval, load_test_images
    from ghnq_deploy.report.table1 import render_rich, table1_from_report, write_outputs

    cfg = EvalConfig(
        bits=tuple(b.strip().lower() for b in bits.split(",") if b.strip()), scheme=scheme, bn=bn,
        batch_size=batch_size, limit_images=limit_images, order_seed=order_seed,
        meta_batch=meta_batch, calibration=calibration, data=data,
    )
    cfg.validate()
    if out is not None:
        from ghnq_deploy.workspace import check_output_dir

        check_output_dir(out)
    if threads is not None and threads < 1:
        raise EvalError(f"--threads must be at least 1, got {threads}")
    splits = list(split or [])
    if table1:
        splits += [s for s in PAPER_SPLITS if s not in splits]
    if not splits and not paths:
        raise EvalError("nothing to evaluate: give arch.json paths, --split SPLIT or --table1")
    if splits and n < 1:
        raise EvalError(f"-n must be at least 1, got {n}")
    nets: list[NetInput] = []
    if splits:  # the architecture space the checkpoint was trained on (space 1: the shipped ones)
        from ghnq_deploy.arch.sampler import space_for
        from ghnq_deploy.ghn.checkpoint import read_checkpoint, resolve_checkpoint
        from ghnq_deploy.ghn.model import GHNConfig

        config = read_checkpoint(resolve_checkpoint(checkpoint)).get("config", {})
        space = space_for(GHNConfig.from_checkpoint(config if isinstance(config, dict) else {}).num_primitives)
    for s in splits:
        nets += [NetInput(spec, s) for spec in sample_split(s, n, seed, space=space)]
    for p in paths or []:
        nets += [NetInput(load_spec(f, param_cap=sys.maxsize if param_cap is None else param_cap), "files")
                 for f in _arch_files(p)]
    names = [x.spec.name for x in nets if x.split == "files"]
    if len(set(names)) != len(names):
        raise ArchError("two arch files share a name; names identify nets in the report")

    ghn, info = load_ghn_checkpoint(checkpoint)  # a bad checkpoint is refused before the data loads
    images = load_test_images(cfg)  # data problems surface before any GHN work
    # process-wide speed settings, once every input is known to be good
    tune_malloc()
    torch.set_flush_denormal(True)  # denormal floats cost ~100x per op on x86; flushing them moves no accuracy
    if threads is not None:
        torch.set_num_threads(threads)
    columns = [TextColumn("[bold]evaluate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[last]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, disable=as_json) as progress:
        task = progress.add_task("nets", total=len(nets), last="")

        def on_result(r) -> None:
            quant = [b for b in cfg.bits if b != "fp32"]
            tail = f", {quant[0]} {r.bits[quant[0]].top1:.1f}%" if quant else ""
            progress.update(task, advance=1, last=f"{r.name}: float {r.float_top1:.1f}%{tail}")

        report = run_eval(ghn, info, nets, cfg, on_result=on_result, images=images)

    paths_written = write_outputs(report, out) if out is not None else {}
    if as_json:
        summary = {"aggregates": [vars(a) for a in report.aggregates()], "checkpoint": report.checkpoint,
                   "data": report.data, "files": {k: str(v) for k, v in paths_written.items()}}
        console.print_json(json.dumps(summary, default=str))
        return
    title = (f"GHN-Q Table 1 - scheme '{cfg.scheme}', BN {cfg.bn}, {report.data['images']} test images "
             f"(mean ± SEM; max, %)")
    console.print(render_rich(table1_from_report(report), title=title))
    console.print(f"checkpoint {Path(str(report.checkpoint['path'])).name} sha256 {str(report.checkpoint['sha256'])[:12]}; "
                  f"test order {report.data['order']}; {report.seconds:.0f} s", highlight=False)
    for kind, p in paths_written.items():
        console.print(f"{kind}: [bold]{p}[/]")
