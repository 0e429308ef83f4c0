"""Transports for ``verify``: run the self-contained device runner here, over SSH, or emulated.

All three do the same thing so their results compare: stage the model, the (already quantized)
inputs and ``device_runner.py`` in a fresh temp folder on the target, run the runner with the
target's own Python, fetch ``out.npz``, and always remove the temp folder (after a failure, a
timeout or Ctrl-C too). Failures become one-line :class:`DeviceError` s the CLI prints as is.

SSH goes through the system OpenSSH client in subprocesses, so the user's ``~/.ssh/config``
aliases, keys, agent and jump hosts work unchanged; we only force what makes it safe to run
unattended: BatchMode, strict host-key checking and key authentication.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ghnq_deploy.errors import UserError

RUNNER = Path(__file__).with_name("device_runner.py")
RUNNER_NAME = "device_runner.py"
INPUTS_NAME = "inputs.npy"
OUTPUT_NAME = "out.npz"
# device_runner.py's exit codes and error prefix (kept in sync by tests, since it cannot import us)
EXIT_BAD_INPUT, EXIT_NO_RUNTIME = 2, 3
ERROR_PREFIX = "device_runner: error: "


class DeviceError(UserError):
    """The device failed, dropped the connection or lacks a package: one line."""


@dataclass(frozen=True)
class RunRequest:
    """One model on one target: the inputs go to the runner as they are (host-quantized)."""

    model_file: Path
    inputs: np.ndarray
    runtime: str
    kernels: str
    threads: int
    timing_runs: int = 50
    warmup: int = 5
    batch: int = 256

    def runner_args(self, folder: str) -> list[str]:
        """The runner's command-line arguments, with files inside the target's ``folder``."""
        return ["--model", f"{folder}/{self.model_name}", "--inputs", f"{folder}/{INPUTS_NAME}",
                "--output", f"{folder}/{OUTPUT_NAME}", "--runtime", self.runtime, "--kernels", self.kernels,
                "--threads", str(self.threads), "--timing-runs", str(self.timing_runs),
                "--warmup", str(self.warmup), "--batch", str(self.batch)]

    @property
    def model_name(self) -> str:
        # keep the suffix: the runner tells .onnx from .tflite by it
        return "model" + Path(self.model_file).suffix.lower()

    def check(self) -> None:
        if not Path(self.model_file).is_file():
            raise UserError(f"model file {self.model_file} not found")
        if not isinstance(self.inputs, np.ndarray) or self.inputs.ndim < 2 or not len(self.inputs):
            raise UserError("verify inputs must be a non-empty batch array")


@dataclass
class RunResult:
    raw: np.ndarray  # the output tensor as the runtime produced it (int8 stays int8)
    latency_ms: np.ndarray  # (timing_runs,) batch-1 latencies
    meta: dict = field(default_factory=dict)  # the runner's meta + "where" + "connection"


class Connection(Protocol):
    where: str

    def describe(self) -> str: ...

    def run(self, request: RunRequest) -> RunResult: ...


def stage(folder: Path, request: RunRequest) -> None:
    """Write the runner, the model and the inputs into a local ``folder``."""
    shutil.copyfile(RUNNER, folder / RUNNER_NAME)
    shutil.copyfile(request.model_file, folder / request.model_name)
    np.save(folder / INPUTS_NAME, np.ascontiguousarray(request.inputs), allow_pickle=False)


def parse_output(data: bytes | Path, where: str, connection: str) -> RunResult:
    """out.npz (bytes or a path) -> RunResult; a truncated or foreign file is a DeviceError."""
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        with np.load(source, allow_pickle=False) as npz:
            raw, latency, meta = npz["raw"], npz["latency_ms"], json.loads(str(npz["meta"]))
    except Exception as exc:  # noqa: BLE001 - zip, key and JSON errors all mean a bad file
        raise DeviceError(f"{connection}: the runner's output is unreadable ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    meta.update(where=where, connection=connection)
    return RunResult(raw=raw, latency_ms=latency, meta=meta)


def runner_failure(connection: str, code: int, stderr: str) -> DeviceError:
    """The runner's own error line (exit 2 / 3), or a signal / unexpected exit, as one line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    mine = [line[len(ERROR_PREFIX):] for line in lines if line.startswith(ERROR_PREFIX)]
    if mine:
        return DeviceError(f"{connection}: {mine[-1]}")
    if code < 0 or code in (128 + 9, 128 + 15, 128 + 6, 128 + 11):
        signal = -code if code < 0 else code - 128
        return DeviceError(f"{connection}: the runner was killed (signal {signal}) before it finished")
    tail = lines[-1][:300] if lines else "no message"
    return DeviceError(f"{connection}: the runner failed with exit code {code} ({tail})")


# ---------------------------------------------------------------- this host


class LocalConnection:
    """This host, with a given Python (the current one by default) in a fresh temp folder."""

    where = "host"

    def __init__(self, python: str = sys.executable, timeout_s: float | None = None):
        self.python = python
        self.timeout_s = timeout_s

    def describe(self) -> str:
        return f"this host ({self.python})"

    def run(self, request: RunRequest) -> RunResult:
        request.check()
        with tempfile.TemporaryDirectory(prefix="ghnq-verify-") as tmp:
            folder = Path(tmp)
            stage(folder, request)
            cmd = [self.python, str(folder / RUNNER_NAME), *request.runner_args(str(folder))]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s,
                                      stdin=subprocess.DEVNULL)
            except FileNotFoundError:
                raise DeviceError(f"{self.describe()}: Python {self.python} not found") from None
            except subprocess.TimeoutExpired:
                raise DeviceError(f"{self.describe()}: the runner did not finish within "
                                  f"{self.timeout_s:g} s") from None
            if proc.returncode != 0:
                raise runner_failure(self.describe(), proc.returncode, proc.stderr)
            return parse_output(folder / OUTPUT_NAME, self.where, self.describe())
