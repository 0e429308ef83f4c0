"""``ghnq-deploy verify``: simulated vs real fixed-point accuracy per target (thin layer over verify.pipeline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ghnq_deploy.cli import app, console, err_console


def _f(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{format(value, spec)}{suffix}"


def _table(report: dict) -> Table:
    table = Table(title=f"verify {report['model']['arch']} on {report['images']['description']} "
                        f"({report['images']['count']} images)")
    for col in ("target", "where", "kernels", "bits", "float", "paper sim", "target sim", "real", "Δ pt",
                "agree %", "clear-margin agree %", "ties %", "max LSB", "p50 ms", "size KB", "speed-up"):
        table.add_column(col, justify="left" if col in ("target", "where", "kernels") else "right", overflow="fold")
    for r in report["rows"]:
        s = r.get("sim_vs_real") or {}
        lat = (r.get("latency") or {}).get("p50_ms")
        where = r["where"] + (" [emulated: not a device latency]" if (r.get("device") or {}).get("emulated") else "")
        if r.get("error"):
            where += f" [red]failed: {r['error'][:80]}[/]"
        elif not r.get("real"):
            where = r.get("note", "simulation only")
        table.add_row(r["target"], where, r["kernels"], r["bits"], _f(r.get("float_top1")),
                      _f(r.get("paper_sim_top1")), _f(r.get("target_sim_top1")), _f(r.get("real_top1")),
                      _f(r.get("delta_top1_pt"), "+.2f"), _f(s.get("agreement"), ".1f"),
                      _f(s.get("clear_margin_agreement"), ".1f"), _f(s.get("exact_ties"), ".1f"),
                      _f(s.get("max_step_diff"), ".0f"), _f(lat, ".3f"),
                      _f((r.get("file") or {}).get("bytes", 0) / 1024 if r.get("file") else None, ".1f"),
                      _f(r.get("speedup"), ".2f", "x"))
    return table


def _gap_table(report: dict) -> Table:
    """The waterfall: each stage's top-1, its change from the stage before (the part it measures)
    and label agreement with it; one column block per (target, bit-width)."""
    rows = [r for r in report["rows"] if r.get("gap")]
    table = Table(title="gap chain: paper fake-quant -> runtime, split into its causes (Δ pt; agreement % with the "
                        "stage before)")
    table.add_column("stage")
    table.add_column("part")
    for r in rows:
        table.add_column(f"{r['target']} {r['bits']}", justify="right")
    keys = []
    for r in rows:
        for st in r["gap"]["steps"]:
            if (st["stage"], st["part"]) not in keys:
                keys.append((st["stage"], st["part"]))
    for stage, part in keys:
        cells = []
        for r in rows:
            st = next((x for x in r["gap"]["steps"] if x["stage"] == stage and x["part"] == part), None)
            cells.append("-" if st is None else f"{st['top1']:.2f}" + (
                "" if st["delta_pt"] is None else f" ({st['delta_pt']:+.2f}; {st['agreement']:.1f} %)"))
        label = next(x["label"] for r in rows for x in r["gap"]["steps"] if x["stage"] == stage)
        table.add_row(label, part or "", *cells)
    table.add_row("[bold]total (runtime - paper)[/]", "sum of the parts",
                  *[f"[bold]{r['gap']['total_pt']:+.2f}[/]" for r in rows])
    return table


def _localise_table(row: dict) -> Table:
    loc = row["localise"]
    table = Table(title=f"{row['target']} {row['bits']}: worst layers ({loc['samples']} images; error in each "
                        f"layer's output steps)")
    for col in ("op", "layer (output tensor)", "vs float mean", "vs float max", "vs int sim mean", "vs int sim max"):
        table.add_column(col, justify="left" if col.startswith(("op", "layer")) else "right", overflow="fold")
    for r in loc["layers"][:5]:
        table.add_row(f"{r['op_index']} {r['op']}", r["tensor"][:70], _f(r["vs_float_mean_steps"], ".3f"),
                      _f(r["vs_float_max_steps"], ".1f"), _f(r["vs_sim_mean_steps"], ".3f"),
                      _f(r["vs_sim_max_steps"], ".0f"))
    for f in loc["findings"]:
        table.add_row(f"{f['op_index']} {f['op']}", f"[bold]{f['cause']}[/] (explains op {f['explains']}): "
                      f"{f['detail']}; {f['tensor'][:60]}", "", "", "", "")
    if not loc["findings"]:
        table.add_row("", "no single cause found among the checks", "", "", "", "")
    return table


def _verdict(report: dict, max_gap: float | None) -> str:
    real = [r for r in report["rows"] if r.get("delta_top1_pt") is not None]
    if not real:
        return "no real run finished"
    worst = max(real, key=lambda r: abs(r["delta_top1_pt"]))
    clear = [r["sim_vs_real"]["clear_margin_agreement"] for r in real
             if r["sim_vs_real"]["clear_margin_agreement"] is not None]
    text = (f"largest |Δ top-1| sim vs real: {abs(worst['delta_top1_pt']):.2f} pt ({worst['target']} {worst['bits']}); "
            f"clear-margin agreement ≥ {min(clear):.1f} %" if clear else "")
    if max_gap is not None:
        text += f"; --max-gap {max_gap:g}: " + ("exceeded" if abs(worst["delta_top1_pt"]) > max_gap else "within")
    return text


@app.command("verify")
def verify_command(
    device: List[str] = typer.Option(["x86-litert"], "--device", "-d", help="Target name (repeatable): see `ghnq-deploy targets list`."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Predicted model file or run folder (default: the current run)."),
    bits: str = typer.Option("w8a8", "--bits", help="Comma-separated bit-widths, e.g. w8a8,w4a8 (w4a4/w2a2 are simulation-only rows)."),
    data: Optional[str] = typer.Option(None, "--data", help="A CIFAR-10 copy: verify on its whole test set instead of the shipped 2,000 images."),
    eval_set: Optional[str] = typer.Option(None, "--eval-set", help="An image-set .npz (uint8 NHWC x, y) instead of the shipped evaluation set."),
    limit_images: Optional[int] = typer.Option(None, "--limit-images", min=1, help="Use the first N images only (quick runs)."),
    host: Optional[str] = typer.Option(None, "--host", help="Device over SSH: user@addr or an ~/.ssh/config alias (overrides the target file)."),
    ssh_config: Optional[Path] = typer.Option(None, "--ssh-config", help="ssh client config file (ssh -F); default: ~/.ssh/config."),
    emulator: Optional[str] = typer.Option(None, "--emulator", help="Run under the target's emulator (qemu); prepare it with `ghnq-deploy emulator setup`."),
    target_file: List[Path] = typer.Option([], "--target-file", help="Extra target .toml file (repeatable)."),
    timing_runs: Optional[int] = typer.Option(None, "--timing-runs", min=1, max=100000, help="Timed batch-1 runs (default: the target's)."),
    max_gap: Optional[float] = typer.Option(None, "--max-gap", min=0.0, help="Exit 1 when any |Δ top-1| (target sim vs real) exceeds X points."),
    integer_sim: bool = typer.Option(True, "--integer-sim/--no-integer-sim", help="Run the integer simulator on TFLite files (the gap chain's integer-arithmetic stage)."),
    rounding: Optional[str] = typer.Option(None, "--rounding", help="Integer simulator rounding: double (TFLite reference), single (TFLite Micro / CMSIS-NN), xnnpack (fp32, ties to even); default: the target's scheme."),
    localise: bool = typer.Option(False, "--localise", help="Compare every layer on a few images (float file, runtime, integer simulator) and name the worst with a cause; automatic when a gap exceeds --max-gap."),
    no_export: bool = typer.Option(False, "--no-export", help="Refuse instead of running a missing export first."),
    workspace: Optional[Path] = typer.Option(None, "--workspace", help="Workspace folder (default ./ghnq-runs or $GHNQ_WORKSPACE)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON."),
) -> None:
    """Run the exported int8 files on each target and compare with the simulation; writes verify/<device>/report.json + .png."""
    import math

    from ghnq_deploy.errors import UserError
    from ghnq_deploy.verify import report as rp
    from ghnq_deploy.verify.pipeline import VerifyConfig, max_gap_exceeded, verify
    from ghnq_deploy.verify.target import get_target
    from ghnq_deploy.workspace import resolve_model

    if max_gap is not None and not math.isfinite(max_gap):
        raise UserError(f"--max-gap must be a finite number of points, got {max_gap}")
    bit_list = [b.strip() for b in bits.split(",") if b.strip()]
    if not bit_list or len(set(bit_list)) != len(bit_list):
        raise UserError(f"--bits {bits!r}: give distinct bit-widths, e.g. w8a8,w4a8")
    targets = [get_target(name, target_file) for name in dict.fromkeys(device)]
    model_path = resolve_model(model, workspace)
    cfg = VerifyConfig(devices=[t.name for t in targets], bits=bit_list, data=data, eval_set=eval_set,
                       limit_images=limit_images, host=host, emulator=emulator,
                       ssh_config=str(ssh_config) if ssh_config else None, timing_runs=timing_runs,
                       export_missing=not no_export, integer_sim=integer_sim, rounding=rounding,
                       localise=localise, max_gap=max_gap)
    if as_json:
        report, error = verify(model_path, targets, cfg)
    else:
        with console.status(f"verifying {model_path} on {', '.join(cfg.devices)}"):
            report, error = verify(model_path, targets, cfg)
    written = []
    for t in targets:
        rows = [r for r in report["rows"] if r["target"] == t.name]
        if rows or error is not None:
            folder = rp.report_dir(model_path, t.name)
            sub = {**report, "rows": rows, "target": t.to_dict()}
            written.append(rp.write_json(sub, folder))
            if rows:
                written.append(rp.plot(sub, folder))
                gap_png = rp.plot_gap(sub, folder)
                if gap_png is not None:
                    written.append(gap_png)
    if as_json:
        typer.echo(json.dumps({**report, "written": [str(p) for p in written]}, indent=1, default=str))
    else:
        console.print(_table(report))
        if any(r.get("gap") for r in report["rows"]):
            console.print(_gap_table(report))
        for r in report["rows"]:
            if r.get("localise"):
                console.print(_localise_table(r))
        for note in report["notes"]:
            console.print(f"note: {note}", highlight=False)
        console.print(f"verdict: {_verdict(report, max_gap)}", highlight=False)
        console.print("written: " + ", ".join(str(p) for p in written), highlight=False)
    if error is not None:
        raise UserError(f"{error} (partial report, marked incomplete, written to {written[0]})" if written else str(error))
    if max_gap is not None and max_gap_exceeded(report, max_gap):
        if not as_json:
            err_console.print(f"[bold red]gap:[/] |Δ top-1| above {max_gap:g} pt", highlight=False)
        raise typer.Exit(1)
