"""The ``ghnq-deploy`` command line: a thin Typer layer over the library.

Each module in this package registers its commands on :data:`app` when imported;
:func:`main` imports them all, runs the app, and turns every :class:`UserError` into one
red line on stderr with exit code 2 (never a traceback).
"""

from __future__ import annotations

import enum
import importlib
import inspect
import pkgutil
import sys
import types
import typing
from pathlib import Path

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


_WORDS = {bool: "", int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH"}


def _metavar(annotation: object) -> str | None:
    """The click-style word for a parameter type (``INTEGER``, ``PATH``, ``PATH...``); '' for a flag."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _metavar(rest[0]) if len(rest) == 1 else None
    if origin is list and args:
        word = _metavar(args[0])
        return f"{word}..." if word else None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "[" + "|".join(str(m.value) for m in annotation) + "]"
    return _WORDS.get(annotation)


def _plain_help(typer_app: typer.Typer) -> None:
    """Help pages as a well-made click app shows them: flags without a value placeholder, types as
    words, argument names in capitals (typer 0.29's default shows ``<bool>``, ``<list[Path]>``, ``{arch}``).
    """
    for command in typer_app.registered_commands:
        if command.callback is None:
            continue
        hints = typing.get_type_hints(command.callback)
        for name, param in inspect.signature(command.callback).parameters.items():
            info = param.default
            if not isinstance(info, (typer.models.OptionInfo, typer.models.ArgumentInfo)) or info.metavar is not None:
                continue
            if isinstance(info, typer.models.ArgumentInfo):
                info.metavar = name.upper()  # typer adds "..." for lists itself
                continue
            word = _metavar(hints.get(name))
            if word is not None:
                info.metavar = word
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _plain_help(group.typer_instance)


def _click_usage_name(self) -> str:
    """An argument in the usage line as click writes it: ``ARCH`` required, ``[ARCH]`` optional, ``...`` repeated."""
    name = self.display_name_raw
    name = name if self.required else f"[{name}]"
    return name + ("..." if self.nargs != 1 else "")


def _plain_usage() -> None:
    """typer 0.29 wraps required arguments in braces in usage lines (``{ARCH}``) and types them as
    ``<list[Path]>``; click and every other CLI a user knows write ``ARCH`` and ``PATH...``. The hooks
    are private, so each is replaced only if it exists."""
    from typer import core

    if hasattr(core.TyperArgument, "_usage_display_name"):
        core.TyperArgument._usage_display_name = _click_usage_name
    original = getattr(core.TyperArgument, "display_type_rich", None)
    if original is not None and not getattr(original, "_plain", False):
        def display_type_rich(self, ctx):  # an argument's type as a word (PATH, PATH...), not <list[Path]>
            word = _metavar(getattr(self.type_descriptor, "annotation", None))
            return word if word else original(self, ctx)

        display_type_rich._plain = True
        core.TyperArgument.display_type_rich = display_type_rich
    option_original = getattr(core.TyperOption, "display_type_rich", None)
    if option_original is not None and not getattr(option_original, "_plain", False):
        def option_type_rich(self, ctx):  # a flag click adds itself (--help) has no value placeholder either
            if self.metavar is None and getattr(self, "is_flag", False):
                return ""
            return option_original(self, ctx)

        option_type_rich._plain = True
        core.TyperOption.display_type_rich = option_type_rich


def _load_commands() -> None:
    _plain_usage()
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{module.name}")
    _plain_help(app)


def main() -> None:
    _load_commands()
    try:
        code = app(prog_name="ghnq-deploy", standalone_mode=False)
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
