"""The ``ghnq-deploy`` command line: a thin Typer layer over the library.

Each module in this package registers its commands on :data:`app` when imported;
:func:`main` imports them all, runs the app, and turns every :class:`UserError` into one
red line on stderr with exit code 2 (never a traceback).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer
from rich.console import Console
from rich.markup import escape

from ghnq_deploy import __version__
from ghnq_deploy.errors import UserError

app = typer.Typer(
    name="ghnq-deploy",
    help="Predict CNN parameters with GHN-Q, quantize them, export to ONNX / TFLite and verify on devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"ghnq-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """ghnq-deploy: predicted-parameter CNNs, from arch.json to an integer model on a device."""


def one_line(message: str) -> str:
    """The message as one printable line: newlines folded, lone surrogates escaped.

    Paths from the file system and names from a JSON file may hold surrogates, which no
    terminal encoding can print; an error must never fail while being reported.
    """
    text = " ".join(str(message).split())
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _usage_line(exc: Exception) -> str:
    """A click-style usage error as one line, with the help command as the hint."""
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return exc.format_message() + hint


def _load_commands() -> None:
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{module.name}")


def main() -> None:
    _load_commands()
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            raise SystemExit(code)
    except UserError as exc:
        raise SystemExit(fail(str(exc)).exit_code) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise SystemExit(130) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except SystemExit:
        raise
    except typer.Abort:
        raise SystemExit(1) from None
    except Exception as exc:  # usage errors arrive here in non-standalone mode
        # click's ClickException before typer 0.29, typer's own vendored copy since: both
        # carry show() and exit_code, and typer no longer depends on click
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and callable(show):
            show()  # the help page itself, asked for by giving no arguments
            raise SystemExit(code) from None
        if callable(getattr(exc, "format_message", None)) and isinstance(code, int):
            raise SystemExit(fail(_usage_line(exc), code).exit_code) from None
        raise
