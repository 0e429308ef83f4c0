"""``ghnq-deploy arch``: inspect, validate, sample and import arch.json files.

A thin layer: every check lives in :mod:`ghnq_deploy.arch`; this module only parses
options and prints (rich tables for people, ``--json`` for scripts).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ghnq_deploy.arch.spec import DEFAULT_PARAM_CAP, ArchInfo, ArchSpec, analyze, load_info, save_spec
from ghnq_deploy.cli import app, console, fail
from ghnq_deploy.cli.ghn_cmd import SEED_MAX
from ghnq_deploy.errors import UserError
from ghnq_deploy.workspace import check_free_space, check_output_dir, check_output_file

arch_app = typer.Typer(
    help="Inspect, validate, sample and import architectures (arch.json, see docs/arch-spec.md).",
    no_args_is_help=True,
)
app.add_typer(arch_app, name="arch")

SAMPLE_MAX = 100_000  # one call; the splits are seeded, so more come from further --seed values
SAMPLE_BYTES_PER_SPEC = 64 * 1024  # a generous upper bound of one sampled spec's JSON
_CAP_HELP = "Largest allowed parameter count (the GHN-Q architecture space caps nets at 10^7)."


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """'3x32x32' -> (3, 32, 32)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*[xX,]\s*(\d+)\s*", text)
    if not match or min(int(v) for v in match.groups()) < 1:
        raise UserError(f"--input must look like 3x32x32 (channels x height x width, all >= 1), got {text!r}")
    c, h, w = (int(v) for v in match.groups())
    return c, h, w


def _millions(value: int) -> str:
    return f"{value:,} ({value / 1e6:.2f} M)"


def summary(info: ArchInfo) -> dict:
    """Machine-readable description of an analyzed spec (what ``arch show --json`` prints)."""
    spec = info.spec
    by_id = {n.id: n for n in spec.nodes}
    return {
        "name": spec.name,
        "input_shape": list(spec.input_shape),
        "num_classes": spec.num_classes,
        "params": info.params,
        "macs": info.macs,
        "sha256": spec.sha256(),
        "nodes": [
            {
                "id": node_id,
                "op": by_id[node_id].op,
                "inputs": list(by_id[node_id].inputs),
                "shape": list(info.nodes[node_id].shape),
                "params": info.nodes[node_id].params,
                "macs": info.nodes[node_id].macs,
            }
            for node_id in info.order
        ],
    }


def _table(info: ArchInfo) -> Table:
    spec = info.spec
    by_id = {n.id: n for n in spec.nodes}
    table = Table(
        title=f"{spec.name}: input {'x'.join(map(str, spec.input_shape))}, {spec.num_classes} classes",
        caption=f"{len(spec.nodes)} nodes, {_millions(info.params)} parameters, {_millions(info.macs)} MACs per image",
    )
    table.add_column("node", overflow="fold")
    table.add_column("op")
    table.add_column("inputs", overflow="fold")
    table.add_column("output shape", justify="right")
    table.add_column("params", justify="right")
    for node_id in info.order:
        node, node_info = by_id[node_id], info.nodes[node_id]
        table.add_row(node_id, node.op, ", ".join(node.inputs), "x".join(map(str, node_info.shape)),
                      f"{node_info.params:,}" if node_info.params else "")
    table.add_section()
    table.add_row("total", "", "", "", f"{info.params:,}")
    return table


@arch_app.command("show")
def show(
    path: Path = typer.Argument(..., help="arch.json file to describe."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary (per-node shapes, params, MACs) instead of a table."),
    param_cap: int = typer.Option(DEFAULT_PARAM_CAP, "--param-cap", help=_CAP_HELP),
) -> None:
    """Show every node with its output shape and parameters, and the totals (params, MACs)."""
    info = load_info(path, param_cap=param_cap)
    if as_json:
        typer.echo(json.dumps(summary(info), indent=1))
    else:
        console.print(_table(info))


@arch_app.command("validate")
def validate(
    paths: list[Path] = typer.Argument(..., help="arch.json files to check."),
    param_cap: int = typer.Option(DEFAULT_PARAM_CAP, "--param-cap", help=_CAP_HELP),
) -> None:
    """Check arch.json files; one line per file, exit code 2 if any is invalid."""
    bad = 0
    for path in paths:
        try:
            info = load_info(path, param_cap=param_cap)
        except UserError as exc:
            fail(str(exc))
            bad += 1
            continue
        console.print(f"[green]ok[/] {path}: {info.spec.name}, {len(info.spec.nodes)} nodes, "
                      f"{info.params:,} params, {info.macs:,} MACs", highlight=False, soft_wrap=True)
    if bad:
        raise typer.Exit(2)


@arch_app.command("sample")
def sample(
    split: str = typer.Option(..., "--split", help="id-train, id-test, ood-deep, ood-wide, ood-bnfree or ood-mobilenet."),
    n: int = typer.Option(10, "-n", "--count", min=1, max=SAMPLE_MAX, help="How many architectures to write."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Sampling seed: the same seed gives byte-identical files."),
    out: Path = typer.Option(..., "-o", "--output", "--out", help="Folder to write <name>.json files into (created if missing; --out is the old spelling)."),
    space: int = typer.Option(2, "--space", min=1, max=2, help="Architecture space: 2 (with MobileNetV3 / EfficientNet / ShuffleNet "
                                                 "blocks) or 1 (the shipped checkpoints' space)."),
) -> None:
    """Sample architectures of one split of the architecture space (docs/architecture-space.md)."""
    from ghnq_deploy.arch.sampler import SPLITS, sample_arch

    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if n < 1:
        raise UserError(f"-n must be at least 1, got {n}")
    check_output_dir(out)
    check_free_space(out, n * SAMPLE_BYTES_PER_SPEC, f"{n:,} specs")
    for index in range(n):
        spec = sample_arch(split, seed, index, space=space)
        save_spec(spec, out / f"{spec.name}.json")
    console.print(f"wrote {n} {split} architectures (seed {seed}) to {out}", highlight=False)


@arch_app.command("import")
def import_(
    source: str = typer.Argument(..., help="torchvision:<model> (random weights, nothing downloaded), "
                                           "<package.module>:<factory> or <file.py>:<factory>."),
    num_classes: int = typer.Option(10, "--num-classes", min=2, max=100_000, help="Classes passed to the factory and required of the output."),
    input_shape: str = typer.Option("3x32x32", "--input", help="Input size CxHxW used to trace the model."),
    out: Optional[Path] = typer.Option(None, "-o", "--output", "--out", help="Where to write the arch.json (default: print it; --out is the old spelling)."),
    name: Optional[str] = typer.Option(None, "--name", help="Spec name (default: the factory name)."),
    param_cap: Optional[int] = typer.Option(None, "--param-cap", help="Refuse models above this many parameters (default: no cap)."),
) -> None:
    """Trace a PyTorch model with torch.fx and write it as an arch.json."""
    from ghnq_deploy.arch.importer import import_model, resolve_source, source_name

    shape = parse_input_shape(input_shape)
    if out is not None:
        check_output_file(out)
    if num_classes < 2:
        raise UserError(f"--num-classes must be at least 2, got {num_classes}")
    module = resolve_source(source, num_classes)
    spec: ArchSpec = import_model(module, name or source_name(source), shape, num_classes, param_cap=param_cap)
    if out is None:
        typer.echo(spec.dumps(), nl=False)
        return
    info = analyze(spec, param_cap=sys.maxsize)  # the import already applied --param-cap
    save_spec(spec, out)
    console.print(f"wrote {out}: {spec.name}, {len(spec.nodes)} nodes, {info.params:,} params, "
                  f"{info.macs:,} MACs", highlight=False, soft_wrap=True)
    if info.params > DEFAULT_PARAM_CAP:
        console.print(f"note: {info.params:,} parameters exceed the architecture space's cap of "
                      f"{DEFAULT_PARAM_CAP:,} (the GHN's training space): predict, evaluate and export accept it "
                      "(their --param-cap is off by default); `arch show` and `arch validate` need --param-cap", highlight=False,
                      soft_wrap=True)
