"""``ghnq-deploy emulator``: prepare and inspect the emulated devices `verify --emulator qemu` runs on.

A thin layer over :mod:`ghnq_deploy.verify.emulator`: parse options, call it, print.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ghnq_deploy.cli import app, console
from ghnq_deploy.verify import emulator

emulator_app = typer.Typer(help="Emulated devices (QEMU user-mode + proot): set up once, cached.",
                           no_args_is_help=True)
app.add_typer(emulator_app, name="emulator")

_CACHE_HELP = "Cache folder (default: $GHNQ_EMULATOR_DIR or ~/.cache/ghnq-deploy/emulator)."


def _mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB"


def _print_setup(result: emulator.EmulatorSetup) -> None:
    verb = (f"reused (built {result.built_at} in {result.seconds:.0f} s)" if result.reused
            else f"built in {result.seconds:.0f} s")
    console.print(f"[bold]{result.device}[/]: {verb}, {_mb(result.size_bytes)} at {result.path}", highlight=False)
    console.print(f"Python {result.python_version} (aarch64, QEMU_CPU={result.qemu_cpu}); "
                  + ", ".join(f"{k} {v}" for k, v in sorted(result.packages.items())), highlight=False)
    console.print("Emulated latency is QEMU's, not the device's: use it for output checks only.", style="dim")


@emulator_app.command("setup")
def setup_cmd(
    device: str = typer.Argument("rpi4", help=f"Device to emulate: {', '.join(sorted(emulator.DEVICES))}."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when a complete one is cached."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=_CACHE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Prepare a Debian root filesystem with Python and the device's aarch64 runtime wheels."""
    if not as_json and (force or emulator.status(device, cache_dir) is None):
        console.print(f"Preparing the emulated {device} (about a minute on a fast link)...", style="dim")
    result = emulator.setup(device, cache_dir=cache_dir, force=force)
    if as_json:
        console.print_json(json.dumps(result.to_dict()))
    else:
        _print_setup(result)


@emulator_app.command("status")
def status_cmd(
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=_CACHE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """What is prepared, and which system packages are missing."""
    missing = emulator.check_system_packages()
    rows = []
    for name in sorted(emulator.DEVICES):
        found = emulator.status(name, cache_dir)
        rows.append({"device": name, "prepared": found is not None,
                     "path": str(emulator.device_dir(name, cache_dir)),
                     **({} if found is None else {"size_bytes": found.size_bytes, "python": found.python_version,
                                                  "packages": found.packages, "built_at": found.built_at})})
    if as_json:
        console.print_json(json.dumps({"missing_system_packages": missing, "devices": rows}))
        return
    table = Table(title="Emulated devices")
    for col in ("device", "prepared", "size", "python", "packages", "path"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["device"], "yes" if r["prepared"] else "[yellow]no[/]",
                      _mb(r["size_bytes"]) if r["prepared"] else "", r.get("python", ""),
                      ", ".join(f"{k} {v}" for k, v in sorted(r.get("packages", {}).items())
                                if k in ("numpy", "ai-edge-litert", "tflite-runtime")), r["path"])
    console.print(table)
    if missing:
        console.print(f"[yellow]missing system packages:[/] {', '.join(missing)} "
                      "(apt-get install -y qemu-user-static proot debootstrap)", highlight=False)
