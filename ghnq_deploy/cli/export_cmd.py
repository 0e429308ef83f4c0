"""``ghnq-deploy export`` and ``ghnq-deploy calibration``: deployable files and the data behind them.

A thin layer over :mod:`ghnq_deploy.export.pipeline` and :mod:`ghnq_deploy.calibration`:
parse options, call the library, print rich tables (or ``--json`` for scripts).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ghnq_deploy.cli import app, console
from ghnq_deploy.cli.ghn_cmd import SEED_MAX
from ghnq_deploy.errors import UserError
from ghnq_deploy.workspace import check_export_folder, check_output_dir, check_output_file, check_workspace

calibration_app = typer.Typer(help="Build, check and describe calibration / evaluation image sets (uint8 .npz).",
                              no_args_is_help=True)
app.add_typer(calibration_app, name="calibration")

_TARGET_HELP = ("onnx (float32), onnx-int8 (QDQ, per-channel int8 weights), tflite (float32) or "
                "tflite-int8 (full-integer: int8 input/output, int8 builtin ops only).")


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "" if value is None else format(value, spec)


def _fold_table(manifest: dict) -> Table:
    folding = manifest["folding"]
    table = Table(title=f"BatchNorm folding: {folding['folded']} folded, {len(folding['kept'])} kept "
                        f"(folded vs unfolded max |logit diff| {_fmt(folding['max_abs_logit_diff_folded_vs_unfolded'])})")
    for col, justify in (("bn", "left"), ("into conv", "left"), ("dw", "center"), ("max|W| before", "right"),
                         ("after", "right"), ("growth", "right"), ("ch. spread before", "right"), ("after", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in folding["layers"]:
        if r["folded"]:
            table.add_row(r["bn"], r["conv"], "dw" if r["depthwise"] else "", _fmt(r["max_abs_before"]),
                          _fmt(r["max_abs_after"]), f"{r['growth']:.2f}x",
                          _fmt(r["spread_before"], ".1f"), _fmt(r["spread_after"], ".1f"))
        else:
            table.add_row(r["bn"], f"[yellow]{r['reason']}[/]", "", "", "", "", "", "")
    return table


def _io_text(io: dict) -> str:
    parts = []
    for key in ("input", "output"):
        t = io[key]
        q = f", scale {t['scale']:.6g}, zero point {t['zero_point']}" if t.get("scale") is not None else ""
        parts.append(f"{key} {t['dtype']} {t['shape']}{q}")
    return "; ".join(parts)


def _print_export(result, model_path: Path) -> None:
    m = result.manifest
    if m["folding"]["batchnorms"]:
        console.print(_fold_table(m))
    else:
        console.print("BatchNorm: none in this net (BN-free): nothing calibrated or folded")
    files = Table(title=f"{m['arch']['name']} -> {m['target']}: {m['file']['description']}")
    files.add_column("written", overflow="fold")
    files.add_column("bytes", justify="right")
    files.add_column("sha256")
    files.add_row(str(result.model_file), f"{m['file']['bytes']:,}", m["file"]["sha256"][:16])
    files.add_row(str(result.manifest_file), f"{result.manifest_file.stat().st_size:,}", "")
    console.print(files)
    console.print(f"I/O (read back from the file): {_io_text(m['io'])}", highlight=False)
    if m.get("weights"):
        w = m["weights"]
        console.print(f"weights: {w.get('per_channel')} per-channel int8 tensors, zero points all 0: "
                      f"{w.get('all_zero_points_zero')}, integer range {w.get('weight_int_range')}, "
                      f"biases {', '.join(w.get('bias_dtypes') or [])}", highlight=False)
    ev = m.get("evaluation")
    if ev:
        table = Table(title=f"accuracy on {ev['dataset']} ({ev['count']} images)")
        for col in ("runtime", "top-1", "torch float top-1", "top-1 agreement", "max |logit diff|", "mean |logit diff|"):
            table.add_column(col, justify="left" if col == "runtime" else "right")
        table.add_row(ev["runtime"], f"{ev['top1']:.2%}", f"{ev['torch_float_top1']:.2%}",
                      f"{ev['top1_agreement_with_torch']:.2%}", _fmt(ev["max_abs_logit_diff_vs_torch"]),
                      _fmt(ev["mean_abs_logit_diff_vs_torch"]))
        console.print(table)
    t = m["timings_s"]
    console.print(f"times: BN calibration {t['bn_calibration']:.1f} s, folding {t['fold']:.1f} s, "
                  f"conversion {t['convert']:.1f} s, evaluation {_fmt(t['evaluate'], '.1f') or '-'} s, "
                  f"total {t['total']:.1f} s; model {model_path}", highlight=False)


@app.command("export")
def export_command(
    target: str = typer.Option(..., "--target", "-t", help=_TARGET_HELP),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Predicted model file or run folder (default: the current run)."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="Calibration .npz (uint8 NHWC x, y); default: the shipped 1,000 CIFAR-10 train images."),
    calibration_method: Optional[str] = typer.Option(None, "--calibration-method", help="onnx-int8 activation ranges: minmax (default), entropy or percentile."),
    eval_set: Optional[str] = typer.Option(None, "--eval-set", help="Evaluation .npz; default: the shipped 2,000 CIFAR-10 test (JPEG copy) images."),
    eval_count: Optional[int] = typer.Option(None, "--eval-count", min=1, help="Evaluate on the first N images of the evaluation set only."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the accuracy measurement after export."),
    resolver: Optional[str] = typer.Option(None, "--resolver", help="LiteRT kernels for the TFLite evaluation: xnnpack (default), builtin or reference."),
    bits: Optional[str] = typer.Option(None, "--bits", help="int8 targets: w8a8 (default) or w4a8 (an int8 file whose weights use only the 4-bit per-channel levels; folder export/<target>-w4a8)."),
    parity_tolerance: float = typer.Option(1e-4, "--parity-tolerance", min=0.0, help="onnx / tflite: refuse the file if its max |logit difference| from torch exceeds this x (1 + max |logit| / 10) (the mean: a tenth of that)."),
    param_cap: Optional[int] = typer.Option(None, "--param-cap", min=1, help="Refuse nets above this many parameters (default: no cap)."),
    out_dir: Optional[Path] = typer.Option(None, "--output", "-o", "--out-dir", help="Output folder (default: <run>/export/<target>); --out-dir is the old spelling."),
    workspace: Optional[Path] = typer.Option(None, "--workspace", help="Workspace folder (default ./ghnq-runs or $GHNQ_WORKSPACE)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON instead of tables."),
) -> None:
    """Calibrate BatchNorm, fold it, convert to TARGET and measure accuracy; writes the file and manifest.json."""
    from ghnq_deploy.export.pipeline import TARGETS, export
    from ghnq_deploy.runtime.litert_runner import RESOLVERS
    from ghnq_deploy.workspace import resolve_model

    if target not in TARGETS:
        raise UserError(f"--target {target!r} is not one of {', '.join(TARGETS)}")
    if resolver is not None and resolver not in RESOLVERS:
        raise UserError(f"--resolver {resolver!r} is not one of {', '.join(RESOLVERS)}")
    if eval_count is not None and eval_count < 1:
        raise UserError(f"--eval-count must be at least 1, got {eval_count}")
    if not math.isfinite(parity_tolerance):
        raise UserError(f"--parity-tolerance must be a finite number >= 0, got {parity_tolerance}")
    if workspace is not None:
        check_workspace(workspace)
    model_path = resolve_model(model, workspace)
    check_output_dir(out_dir if out_dir is not None else model_path.parent / "export" / target)
    check_export_folder(out_dir, target)
    if as_json:
        result = export(model_path, target, calibration=calibration, out_dir=out_dir,
                        calibration_method=calibration_method, eval_set=eval_set, eval_count=eval_count,
                        evaluate_file=not no_eval, resolver=resolver, parity_tolerance=parity_tolerance,
                        bits=bits, param_cap=param_cap)
        typer.echo(json.dumps({"model_file": str(result.model_file), "manifest_file": str(result.manifest_file),
                               "manifest": result.manifest}, indent=1))
        return
    with console.status(f"exporting {model_path} to {target} (calibrate BN, fold, convert, evaluate)"):
        result = export(model_path, target, calibration=calibration, out_dir=out_dir,
                        calibration_method=calibration_method, eval_set=eval_set, eval_count=eval_count,
                        evaluate_file=not no_eval, resolver=resolver, parity_tolerance=parity_tolerance,
                        bits=bits, param_cap=param_cap)
    _print_export(result, model_path)


@calibration_app.command("build")
def calibration_build(
    data: Optional[str] = typer.Option(None, "--data", help="CIFAR-10 folder (npz copy or cifar-10-batches-py); default: $GHNQ_CIFAR10 or a known place."),
    n: int = typer.Option(1000, "-n", "--count", min=10, max=60_000, help="Images to draw (class-balanced: n/10 per class)."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seed of the draw: the same seed and data give a byte-identical file."),
    out: Path = typer.Option(..., "-o", "--output", "--out", help="Output .npz file (--out is the old spelling)."),
    split: str = typer.Option("train", "--split", help="train (calibration) or test (evaluation); also val, train-all."),
    as_json: bool = typer.Option(False, "--json", help="Print the file's description as JSON."),
) -> None:
    """Draw a seeded, class-balanced image set from CIFAR-10 and save it as a compressed uint8 .npz."""
    from ghnq_deploy.calibration import build_and_save, describe_file

    check_output_file(out)
    build_and_save(data, n, seed, split, out)
    info = describe_file(out)
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    console.print(f"[green]wrote[/] {out}: {info['description']}; class counts {info['class_counts']}; "
                  f"{info['bytes']:,} bytes; sha256 {info['sha256']}", highlight=False, soft_wrap=True)


@calibration_app.command("check")
def calibration_check(
    files: list[str] = typer.Argument(..., help="Image-set .npz files (or the shipped names 'calibration', 'eval')."),
    as_json: bool = typer.Option(False, "--json", help="Print descriptions as JSON."),
) -> None:
    """Validate image sets (uint8 NHWC RGB, 3x32x32, labels) and show where they came from."""
    from ghnq_deploy.calibration import describe_file, resolve_image_set

    infos = [describe_file(resolve_image_set(f)) for f in files]
    if as_json:
        typer.echo(json.dumps(infos if len(infos) > 1 else infos[0], indent=1))
        return
    for info in infos:
        console.print(f"[green]ok[/] {info['file']}: {info['description']}; shape {info['shape']}; "
                      f"sha256 {info['sha256']}", highlight=False, soft_wrap=True)


@calibration_app.command("manifest")
def calibration_manifest(
    files: list[Path] = typer.Argument(..., help="The image-set .npz files to list."),
    out: Path = typer.Option(..., "-o", "--output", "--out", help="manifest.json to write (e.g. calibration/manifest.json; --out is the old spelling)."),
) -> None:
    """Write a manifest (source, count, seed, preprocessing, SHA-256 per file) for shipped image sets."""
    from ghnq_deploy.calibration import describe_file
    from ghnq_deploy.io import atomic_write_text

    entries = [{"path": str(f), **describe_file(f)} for f in files]
    manifest = {"format": "ghnq-deploy/calibration-manifest", "version": 1, "files": entries}
    atomic_write_text(out, json.dumps(manifest, indent=1) + "\n")
    console.print(f"[green]wrote[/] {out} ({len(entries)} files)")
