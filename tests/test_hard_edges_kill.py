"""kill -9 of ``predict`` and ``export`` at random moments: the next run leaves nothing behind.

A SIGKILL skips every ``finally``, so a killed run may leave its temporary file (``.model.pt.
<pid>.<random>.partial``) or folder (``.export-<pid>-*.partial/``); the next run of the same
command removes whatever a dead process left. TensorFlow's converter files go inside the
export's own temporary folder, so $TMPDIR stays clean too. Kill moments are drawn by hypothesis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ghnq_deploy.export.pipeline import FILE_NAMES
from ghnq_deploy.ghn.predict import load_predicted
from ghnq_deploy.io import atomic_write_text

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SPEC = EXAMPLES / "bnfree_cnn.json"
# no shrinking: each example is two subprocess runs, and a failure is reported with its delay anyway
KILLS = settings(max_examples=3, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _env(tmpdir: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir), "TF_CPP_MIN_LOG_LEVEL": "3"}


def _cli(args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    code = "from ghnq_deploy.cli import main; main()"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_after(proc: subprocess.Popen, seconds: float) -> None:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _finish(args: list[str], env: dict, cwd: Path) -> None:
    proc = _cli(args, env, cwd)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]


def _leftovers(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.rglob("*") if p.name.endswith(".partial") or
            p.name.startswith("tmp") or p.name.startswith("__autograph")]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_writers_partial_is_swept_and_a_live_ones_kept(tmp_path):
    dead = tmp_path / f".model.pt.{_dead_pid()}.abcd1234.partial"
    live = tmp_path / f".model.pt.{os.getpid()}.efgh5678.partial"
    other = tmp_path / f".predict.json.{_dead_pid()}.x.partial"
    for p in (dead, live, other):
        p.write_bytes(b"half")
    atomic_write_text(tmp_path / "model.pt", "new")
    assert not dead.exists() and live.exists() and other.exists()  # only this file's, only dead writers'
    assert (tmp_path / "model.pt").read_text() == "new"


@KILLS
@given(delay=st.floats(0.5, 12.0))
def test_predict_killed_at_any_moment_leaves_nothing_after_the_next_run(tmp_path_factory, delay: float):
    tmp = tmp_path_factory.mktemp("kill-predict")
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir()
    env = _env(tmpdir)
    args = ["predict", str(SPEC), "--workspace", "ws"]
    _kill_after(_cli(args, env, tmp), delay)
    _finish(args, env, tmp)
    assert _leftovers(tmp / "ws", tmpdir) == []
    model = load_predicted(tmp / "ws" / "bnfree_cnn" / "model.pt")
    assert model.build(bn_mode="batch")(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.fixture(scope="module")
def predicted_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    _finish(["predict", str(SPEC), "--workspace", "ws"], _env(tmp), tmp)
    return tmp / "ws" / "bnfree_cnn"


def _export_after_kill(tmp: Path, run: Path, target: str, delay: float) -> None:
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir()
    env = _env(tmpdir)
    out = tmp / "out"
    args = ["export", "--target", target, "--model", str(run), "--no-eval", "--output", str(out)]
    _kill_after(_cli(args, env, tmp), delay)
    _finish(args, env, tmp)
    assert _leftovers(out, tmpdir) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", FILE_NAMES[target]])


@KILLS
@given(delay=st.floats(0.5, 15.0))
def test_onnx_export_killed_at_any_moment_leaves_nothing_after_the_next_run(tmp_path_factory, predicted_run, delay):
    _export_after_kill(tmp_path_factory.mktemp("kill-onnx"), predicted_run, "onnx", delay)


@pytest.mark.slow
@settings(max_examples=3, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(delay=st.floats(3.0, 40.0))
def test_tflite_export_killed_leaves_no_converter_files(tmp_path_factory, predicted_run, delay):
    """TensorFlow's saved models and autograph files live in the export's temp folder, swept with it."""
    _export_after_kill(tmp_path_factory.mktemp("kill-tflite"), predicted_run, "tflite", delay)


def test_two_specs_with_one_name_are_refused_before_any_work(tmp_path):
    from hard_edges_helpers import assert_one_error_line, invoke

    folder = tmp_path / "specs"
    folder.mkdir()
    for name in ("a.json", "b.json"):
        (folder / name).write_text(SPEC.read_text())
    line = assert_one_error_line(invoke("predict", str(folder), "--workspace", str(tmp_path / "ws")))
    assert "both have the name 'bnfree_cnn'" in line
    assert not (tmp_path / "ws").exists()


def test_a_second_target_into_one_export_folder_is_refused(tmp_path, predicted_run):
    from hard_edges_helpers import assert_one_error_line, invoke

    out = tmp_path / "out"
    first = invoke("export", "--target", "onnx", "--model", str(predicted_run), "--no-eval", "-o", str(out))
    assert first.code == 0, first.stderr
    before = (out / "manifest.json").read_bytes()
    line = assert_one_error_line(invoke("export", "--target", "onnx-int8", "--model", str(predicted_run),
                                        "--no-eval", "-o", str(out)))
    assert "already holds the onnx export" in line
    assert (out / "manifest.json").read_bytes() == before


def test_library_export_checks_its_output_and_sweeps_partials_before_any_work(tmp_path):
    """pipeline.export() itself (not only the CLI) fails on an unwritable output before loading anything,
    and a dead export's partial folder is removed even when this export then fails."""
    from ghnq_deploy.errors import UserError
    from ghnq_deploy.export.pipeline import export

    missing_model = tmp_path / "no-such-run" / "model.pt"  # would fail later, at load time
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        export(missing_model, "onnx", out_dir=blocker)
    out = tmp_path / "out"
    stale = out / f".export-{_dead_pid()}-abc.partial"
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half")
    with pytest.raises(UserError):
        export(missing_model, "onnx", out_dir=out)
    assert not stale.exists()
