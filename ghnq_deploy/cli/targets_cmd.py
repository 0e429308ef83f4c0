"""``ghnq-deploy targets``: the deployment targets verify knows (shipped, $GHNQ_TARGETS, --target-file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import typer
from rich.table import Table

from ghnq_deploy.cli import app, console

targets_app = typer.Typer(help="List and describe deployment targets (targets/*.toml).", no_args_is_help=True)
app.add_typer(targets_app, name="targets")


def _connection(t) -> str:
    if t.is_host:
        return "this host"
    parts = [f"ssh {t.connection.host}" if t.connection.host else "ssh: not configured (--host)"]
    if t.emulation:
        parts.append(f"emulated: {t.emulation.kind} {t.emulation.cpu}")
    return "; ".join(parts)


@targets_app.command("list")
def targets_list(
    target_file: List[Path] = typer.Option([], "--target-file", help="Extra target .toml file (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the targets as JSON."),
) -> None:
    """One row per target: runtime, kernels, arch, export consumed, connection."""
    from ghnq_deploy.verify.target import load_targets

    targets = load_targets(target_file)
    if as_json:
        typer.echo(json.dumps([t.to_dict() for t in targets.values()], indent=1))
        return
    table = Table(title="deployment targets")
    for col in ("name", "runtime", "kernels", "arch", "threads", "consumes", "bits", "connection", "description"):
        table.add_column(col, overflow="fold")
    for t in targets.values():
        table.add_row(t.name, t.runtime, t.kernels, t.arch, str(t.threads), ", ".join(t.consumes), ", ".join(t.bits),
                      _connection(t), t.description)
    console.print(table)


@targets_app.command("show")
def targets_show(
    name: str = typer.Argument(..., help="Target name."),
    target_file: List[Path] = typer.Option([], "--target-file", help="Extra target .toml file (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the target as JSON."),
) -> None:
    """Every field of one target, and the file it came from."""
    from ghnq_deploy.verify.target import get_target

    t = get_target(name, target_file)
    data = t.to_dict()
    if as_json:
        typer.echo(json.dumps(data, indent=1))
        return
    table = Table(title=f"target {t.name} (from {t.source})")
    table.add_column("field")
    table.add_column("value", overflow="fold")

    def add(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}.{k}" if prefix else k, v)
        else:
            table.add_row(prefix, json.dumps(value) if not isinstance(value, str) else value)

    add("", data)
    console.print(table)
