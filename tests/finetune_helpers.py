"""Shared by the fine-tune tests: a tiny BN net predicted by the shipped GHN into a workspace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TINY = {"name": "tiny", "input_shape": [3, 32, 32], "num_classes": 10, "nodes": [
    {"id": "c1", "op": "conv", "inputs": ["input"], "attributes": {"out_channels": 16, "kernel": 3, "stride": 2}},
    {"id": "b1", "op": "bn", "inputs": ["c1"], "attributes": {}},
    {"id": "r1", "op": "relu", "inputs": ["b1"], "attributes": {}},
    {"id": "c2", "op": "conv", "inputs": ["r1"], "attributes": {"out_channels": 32, "kernel": 3, "stride": 2}},
    {"id": "b2", "op": "bn", "inputs": ["c2"], "attributes": {}},
    {"id": "r2", "op": "relu", "inputs": ["b2"], "attributes": {}},
    {"id": "gap", "op": "global_avgpool", "inputs": ["r2"], "attributes": {}},
    {"id": "fc", "op": "linear", "inputs": ["gap"], "attributes": {"out_features": 10}},
    {"id": "out", "op": "output", "inputs": ["fc"], "attributes": {}}]}
# small, real subsets: 2,000 CIFAR-10 training images, 200 of the held-out validation images
QUICK = ["--train-images", "2000", "--val-count", "200", "--batch-size", "64", "--threads", "1"]


def env() -> dict:
    """The test process's environment (PYTHONPATH, GHNQ_CIFAR10) with one torch thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def cli_args(*args: str) -> list[str]:
    return [sys.executable, "-c", "from ghnq_deploy.cli import main; main()", *args]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(*args), cwd=cwd, capture_output=True, text=True, env=env())


def run_main(args: list[str], cwd: Path, capsys, monkeypatch) -> tuple[int, str, str]:
    """The CLI in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from ghnq_deploy.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["ghnq-deploy", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def copy_workspace(template: Path, tmp: Path) -> Path:
    """A private copy of a predicted workspace (``template`` from :func:`predicted_workspace`)."""
    import shutil

    shutil.copytree(template / "ws", tmp / "ws")
    shutil.copy(template / "tiny.json", tmp / "tiny.json")
    return tmp / "ws" / "tiny"


def predicted_workspace(tmp: Path) -> Path:
    """``tmp/ws`` with the tiny net predicted as its current run; returns the run folder."""
    spec = tmp / "tiny.json"
    spec.write_text(json.dumps(TINY))
    done = cli("predict", str(spec), "--workspace", "ws", cwd=tmp)
    assert done.returncode == 0, done.stderr
    return tmp / "ws" / "tiny"
