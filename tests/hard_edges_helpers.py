"""Run the real ``ghnq-deploy`` entry point in-process and classify how it ended.

In-process (not a subprocess) so hypothesis can try hundreds of inputs in seconds. Anything
but ``SystemExit`` escaping :func:`ghnq_deploy.cli.main` is a traceback a user would see.
"""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def invoke(*args: str) -> Outcome:
    """``ghnq-deploy ARGS...`` with stdout/stderr captured; re-raises any non-exit exception."""
    from ghnq_deploy.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["ghnq-deploy", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return Outcome(code, out.getvalue(), err.getvalue())


def assert_one_error_line(result: Outcome, *, contains: str | None = None) -> str:
    """Exit 2 and exactly one ``error:`` line on stderr (the CLI's promise for bad input)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.code == 2, (result.code, result.stderr[-2000:], result.stdout[-500:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    if contains is not None:
        assert contains in lines[0], lines[0]
    return lines[0]
