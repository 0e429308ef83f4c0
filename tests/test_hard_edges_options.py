"""Every numeric / choice option is range-checked: out-of-range values are one ``error:`` line, exit 2.

The bad values are generated (hypothesis): zero, negatives, 30-digit integers, NaN, infinities,
and values just past each bound. Nothing may be written, and no work may start. Usage errors
(missing options, text for a number) are one line too, and the help pages show the limits.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hard_edges_helpers import assert_one_error_line, invoke

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SPEC = str(EXAMPLES / "bnfree_cnn.json")
OPTS = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

huge = st.integers(10**12, 10**30)
not_positive_int = st.integers(-10**30, 0) | st.just(0)
not_finite = st.sampled_from([math.nan, math.inf, -math.inf])
not_positive_float = st.floats(max_value=0.0, allow_nan=False) | not_finite
negative_float = st.floats(max_value=-1e-12, allow_nan=False) | not_finite
seed_out = st.integers(max_value=-1) | st.integers(2**32, 10**30)

# (command words, option, strategy of bad values); O is replaced by an output path in tmp
CASES = [
    (["predict", SPEC, "--workspace", "O"], "--meta-batch", not_positive_int | huge),
    (["predict", SPEC, "--workspace", "O"], "--threads", not_positive_int | huge),
    (["train", "--output", "O"], "--batch-size", not_positive_int | huge),
    (["train", "--output", "O"], "--checkpoint-every", not_positive_int | huge),
    (["train", "--output", "O"], "--meta-batch", not_positive_int | huge),
    (["train", "--output", "O"], "--steps", not_positive_int | huge),
    (["train", "--output", "O"], "--train-images", not_positive_int),
    (["train", "--output", "O"], "--seed", seed_out),
    (["train", "--output", "O"], "--lr", not_positive_float | st.floats(10.01, 1e300)),
    (["train", "--output", "O"], "--weight-decay", negative_float),
    (["train", "--output", "O"], "--epochs", not_positive_float),
    (["train", "--output", "O"], "--lr-decay-at", st.floats(max_value=0.0, allow_nan=False) |
     st.floats(1.0001, 1e9) | not_finite),
    (["train", "--output", "O"], "--max-minutes", not_positive_float),
    (["train", "--output", "O"], "--loss-cap", not_positive_float),
    (["train", "--output", "O"], "--device", st.sampled_from(["tpu", "CUDA ", "", "gpu", "cpu0"])),
    (["calibration", "build", "-o", "O"], "--seed", seed_out),
    (["calibration", "build", "-o", "O"], "-n", st.integers(max_value=9) | st.integers(60_001, 10**30)),
    (["export", "--target", "onnx", "-o", "O"], "--parity-tolerance", negative_float),
    (["export", "--target", "onnx", "-o", "O"], "--eval-count", not_positive_int),
    (["arch", "sample", "--split", "id-test", "-o", "O"], "-n", not_positive_int | st.integers(100_001, 10**30)),
    (["arch", "sample", "--split", "id-test", "-o", "O"], "--seed", seed_out),
    (["evaluate", SPEC, "--output", "O"], "--count", not_positive_int | huge),
    (["evaluate", SPEC, "--output", "O"], "--batch-size", not_positive_int | huge),
    (["evaluate", SPEC, "--output", "O"], "--meta-batch", not_positive_int),
    (["evaluate", SPEC, "--output", "O"], "--limit-images", not_positive_int),
    (["evaluate", SPEC, "--output", "O"], "--threads", not_positive_int),
]


def _text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


@pytest.mark.parametrize(("words", "option", "values"), CASES, ids=[f"{c[0][0]} {c[1]}" for c in CASES])
def test_out_of_range_options_are_one_error_line(tmp_path_factory, words, option, values):
    @OPTS
    @given(value=values)
    def check(value):
        tmp = tmp_path_factory.mktemp("opt")
        out = tmp / "out"
        args = [str(out) if w == "O" else w for w in words] + [f"{option}={_text(value)}"]
        result = invoke(*args)
        line = assert_one_error_line(result)
        assert option.lstrip("-") in line, line  # the line names the option
        assert not out.exists(), f"{args} wrote {out}"

    check()


@pytest.mark.parametrize(("args", "needle"), [
    (["export"], "Missing option '--target'"),
    (["arch", "sample", "--split", "id-test", "-o", "x", "-n", "abc"], "'abc' is not a valid integer"),
    (["predict", SPEC, "--no-such-option"], "No such option: --no-such-option"),
    (["arch", "show"], "Missing argument"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
])
def test_usage_errors_are_one_line(args, needle):
    line = assert_one_error_line(invoke(*args))
    assert "--help" in line  # the hint stays, on the same line
    assert "╭" not in line


def test_help_shows_limits_and_plain_flags():
    text = invoke("train", "--help").stdout
    assert "1<=x<=65536" in text and "[cpu|cuda]" in text
    assert "<int>" not in text and "INTEGER" in text
    # every page, the --help line included: flags show no value placeholder
    from ghnq_deploy.cli import _load_commands, app

    _load_commands()
    pages = [[]] + [[c.name or c.callback.__name__] for c in app.registered_commands if c.callback]
    pages += [[g.name, c.name or c.callback.__name__] for g in app.registered_groups if g.typer_instance
              for c in g.typer_instance.registered_commands if c.callback]
    for command in pages:
        page = invoke(*command, "--help").stdout
        assert "--help" in page and "<bool>" not in page, command
    for command in (["predict"], ["export"], ["arch", "sample"], ["evaluate"], ["calibration", "build"]):
        page = invoke(*command, "--help").stdout
        assert "--output" in page and "-o" in page, command
    assert "--count" in invoke("evaluate", "--help").stdout


def test_predict_has_no_seed_option():
    """Prediction is deterministic (no random draw anywhere), so a --seed would change nothing."""
    line = assert_one_error_line(invoke("predict", SPEC, "--seed", "3"))
    assert "No such option: --seed" in line


def test_arch_sample_checks_free_space(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    result = invoke("arch", "sample", "--split", "id-test", "-n", "100", "-o", str(tmp_path / "out"))
    assert_one_error_line(result, contains="MiB")
    assert not (tmp_path / "out").exists()


def _all_commands(group=None, path=()):
    """Every leaf command of the CLI, as argument lists."""
    import typer

    from ghnq_deploy.cli import _load_commands, app

    _load_commands()
    group = group or app
    for command in group.registered_commands:
        name = command.name or command.callback.__name__.replace("_", "-")
        yield [*path, name]
    for sub in group.registered_groups:
        if isinstance(sub.typer_instance, typer.Typer):
            yield from _all_commands(sub.typer_instance, (*path, sub.name))


def test_usage_lines_write_arguments_as_click_does():
    """``predict [OPTIONS] ARCH``, ``evaluate [OPTIONS] [PATHS]...``: no typer-0.29 braces anywhere."""
    commands = list(_all_commands())
    assert ["predict"] in commands and ["verify"] in commands and len(commands) > 10
    for command in commands:
        usage = next(line for line in invoke(*command, "--help").stdout.splitlines() if "Usage:" in line)
        assert "{" not in usage and "}" not in usage, (command, usage)
    assert "Usage: ghnq-deploy predict [OPTIONS] ARCH" in " ".join(invoke("predict", "--help").stdout.split())
    # argument types as words too: PATH, PATH..., TEXT (not typer's <path>, <list[Path]>, <str>)
    for command, word in ((["predict"], "ARCH PATH"), (["evaluate"], "PATHS PATH..."), (["targets", "show"], "NAME TEXT")):
        page = " ".join(invoke(*command, "--help").stdout.split())
        assert word in page and "<list[" not in page and "<path>" not in page and "<str>" not in page, (command, page)
