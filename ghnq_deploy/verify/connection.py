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
import os
import re
import shlex
import shutil
import signal
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


def run_process(cmd: list[str], *, timeout: float | None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group and kill the whole group on timeout or Ctrl-C: under
    proot the runner is a grandchild (proot -> qemu -> python) that must not outlive us."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.communicate(timeout=5)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        pass


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
                proc = run_process(cmd, timeout=self.timeout_s)
            except FileNotFoundError:
                raise DeviceError(f"{self.describe()}: Python {self.python} not found") from None
            except subprocess.TimeoutExpired:
                raise DeviceError(f"{self.describe()}: the runner did not finish within "
                                  f"{self.timeout_s:g} s") from None
            if proc.returncode != 0:
                raise runner_failure(self.describe(), proc.returncode, proc.stderr)
            return parse_output(folder / OUTPUT_NAME, self.where, self.describe())


# ---------------------------------------------------------------- a device over SSH

# forced on every ssh call, ahead of the user's config (ssh takes an option's first value):
# never prompt, never trust an unknown host key, keys only
SSH_SAFETY = ("BatchMode=yes", "StrictHostKeyChecking=yes", "PasswordAuthentication=no",
              "KbdInteractiveAuthentication=no", "ServerAliveInterval=5", "ServerAliveCountMax=3")
REMOTE_TMP = re.compile(r"^/[A-Za-z0-9._/+-]*/ghnq-verify\.[A-Za-z0-9]+$")
_MKTEMP = 'mktemp -d "${TMPDIR:-/tmp}/ghnq-verify.XXXXXXXX"'


class SSHConnection:
    """A device reached with the system ``ssh``: its own Python runs the runner in ``mktemp -d``.

    ``host`` may be ``user@addr`` or an alias from the user's (or ``ssh_config``'s) config file.
    """

    where = "ssh"

    def __init__(self, host: str, *, user: str | None = None, port: int | None = None,
                 identity_file: str | Path | None = None, python: str = "python3",
                 ssh_config: str | Path | None = None, known_hosts_file: str | Path | None = None,
                 connect_timeout_s: float = 10, run_timeout_s: float = 1800, extra_options: Sequence[str] = (),
                 ssh: str = "ssh"):
        if not host or host.startswith("-") or any(c.isspace() for c in host):
            raise UserError(f"invalid SSH host {host!r}")
        self.host, self.user, self.port = host, user, port
        self.identity_file = Path(identity_file).expanduser() if identity_file else None
        self.python = python
        self.ssh_config = Path(ssh_config).expanduser() if ssh_config else None
        self.known_hosts_file = Path(known_hosts_file).expanduser() if known_hosts_file else None
        self.connect_timeout_s, self.run_timeout_s = connect_timeout_s, run_timeout_s
        self.extra_options = tuple(extra_options)
        self.ssh = ssh
        self._resolved: dict[str, str] | None = None
        if self.identity_file is not None and not self.identity_file.is_file():
            raise UserError(f"SSH identity file {self.identity_file} not found")
        if self.ssh_config is not None and not self.ssh_config.exists():
            raise UserError(f"SSH config file {self.ssh_config} not found")

    # -- the ssh command line
    def options(self) -> list[str]:
        opts = []
        if self.ssh_config is not None:
            opts += ["-F", str(self.ssh_config)]
        for option in SSH_SAFETY:
            opts += ["-o", option]
        opts += ["-o", f"ConnectTimeout={max(1, round(self.connect_timeout_s))}"]
        if self.identity_file is not None:
            opts += ["-i", str(self.identity_file), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts_file is not None:
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts_file}"]
        if self.port is not None:
            opts += ["-p", str(int(self.port))]
        if self.user is not None:
            opts += ["-l", self.user]
        for option in self.extra_options:
            opts += ["-o", option]
        return opts

    def command(self, remote: str) -> list[str]:
        return [self.ssh, *self.options(), "--", self.host, remote]

    def resolved(self) -> dict[str, str]:
        """``ssh -G``: the user, host name and port the config resolves the alias to (no network)."""
        if self._resolved is None:
            values = {}
            try:
                proc = subprocess.run([self.ssh, *self.options(), "-G", "--", self.host], capture_output=True,
                                      text=True, timeout=10, stdin=subprocess.DEVNULL)
                for line in proc.stdout.splitlines():
                    key, _, value = line.partition(" ")
                    values.setdefault(key, value)
            except FileNotFoundError:
                raise DeviceError(f"no `{self.ssh}` client here: install OpenSSH "
                                  "(`apt-get install -y openssh-client`)") from None
            except subprocess.TimeoutExpired:
                pass
            host = self.host.rpartition("@")[2]
            self._resolved = {"user": values.get("user", self.user or ""),
                              "hostname": values.get("hostname", host), "port": values.get("port", "22")}
        return self._resolved

    def describe(self) -> str:
        r = self.resolved()
        user = f"{r['user']}@" if r["user"] else ""
        text = f"ssh {user}{r['hostname']}:{r['port']}"
        alias = self.host.rpartition("@")[2]
        return text if alias == r["hostname"] else f"{text} (alias {alias})"

    # -- one remote command
    def _ssh(self, remote: str, *, stdin_data: bytes | None = None, timeout: float, what: str,
             keep_stdin_open: bool = False) -> subprocess.CompletedProcess:
        """Run ``remote`` (one shell string, already quoted); transport failures become DeviceErrors.

        ``keep_stdin_open``: the remote side sees end-of-file only when ssh ends, which the runner
        watches so that it stops when we stop (interrupt, timeout, dropped link).
        """
        cmd = self.command(remote)
        read_end = write_end = None
        if keep_stdin_open:
            read_end, write_end = os.pipe()
        try:
            proc = subprocess.Popen(cmd, stdin=read_end if keep_stdin_open else subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError:
            if write_end is not None:
                _close(write_end)
            raise DeviceError(f"no `{self.ssh}` client here: install OpenSSH "
                              "(`apt-get install -y openssh-client`)") from None
        finally:
            if read_end is not None:
                _close(read_end)
        try:
            out, err = proc.communicate(input=None if keep_stdin_open else (stdin_data or b""), timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise DeviceError(f"{self.describe()}: {what} did not finish within {timeout:g} s") from None
        except BaseException:  # Ctrl-C: stop ssh; the runner on the device sees end-of-file
            _stop(proc)
            raise
        finally:
            if write_end is not None:
                _close(write_end)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out, err.decode("utf-8", "replace"))
        if result.returncode == 255:
            raise self._transport_error(result.stderr, what)
        return result

    def _transport_error(self, stderr: str, what: str) -> DeviceError:
        r = self.resolved()
        host, port, where = r["hostname"], r["port"], self.describe()
        known = self.known_hosts_file or "~/.ssh/known_hosts"
        text = " ".join(stderr.split())
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
            return DeviceError(f"{where}: the host key changed since it was trusted (another machine, or a "
                               f"reinstalled one): check it, then `ssh-keygen -f {known} -R '[{host}]:{port}'`")
        if "Host key verification failed" in text or "host key is known" in text or "No matching host key" in text:
            return DeviceError(f"{where}: the host key is not trusted yet (not in {known}): verify its fingerprint "
                               f"with the device, then `ssh-keyscan -p {port} {host} >> {known}`")
        if "Permission denied" in text:
            key = f"key {self.identity_file}" if self.identity_file else "your SSH keys / agent"
            return DeviceError(f"{where}: authentication refused for {key} (key authentication only): add the "
                               f"public key to the device's ~/.ssh/authorized_keys")
        for needle, reason in (("Could not resolve hostname", "unknown host name"),
                               ("Connection refused", "connection refused (no SSH server on that port?)"),
                               ("timed out", "connection timed out"), ("No route to host", "no route to host"),
                               ("Network is unreachable", "network unreachable")):
            if needle in text:
                return DeviceError(f"{where}: cannot connect: {reason}")
        if any(s in text for s in ("closed by remote host", "Connection reset", "Broken pipe", "Timeout, server",
                                   "Connection to", "Connection closed", "not responding")):
            return DeviceError(f"{where}: the connection dropped during {what}")
        if what == "the run":  # ssh also exits 255 when the remote process dies of a signal
            return DeviceError(f"{where}: the runner stopped before it finished (killed on the device, "
                               "or the connection dropped)")
        tail = text[-300:] if text else "no message"
        return DeviceError(f"{where}: ssh failed during {what} ({tail})")

    # -- the run
    def run(self, request: RunRequest) -> RunResult:
        request.check()
        t = self.connect_timeout_s + 30
        made = self._ssh(_MKTEMP, timeout=t, what="mktemp")
        folder = made.stdout.decode("utf-8", "replace").strip()
        if made.returncode != 0 or not REMOTE_TMP.match(folder):
            raise DeviceError(f"{self.describe()}: cannot make a remote temp folder "
                              f"({(made.stderr.strip() or folder)[:200]})")
        removed = False
        try:
            self._upload(folder, request, t)
            self._run_runner(folder, request)
            fetched = self._ssh(f"cat {shlex.quote(folder + '/' + OUTPUT_NAME)}", timeout=t + 600, what="fetch")
            if fetched.returncode != 0:
                raise DeviceError(f"{self.describe()}: cannot fetch the runner's output "
                                  f"({fetched.stderr.strip()[:200]})")
            parsed = parse_output(fetched.stdout, self.where, self.describe())
            removed = self._remove(folder)
            parsed.meta["remote_temp_removed"] = removed
            return parsed
        finally:
            if not removed:
                self._remove(folder)

    def _upload(self, folder: str, request: RunRequest, timeout: float) -> None:
        """One tar stream through ``ssh ... tar -x``: one connection for all three files."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            def add(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))

            add(RUNNER_NAME, RUNNER.read_bytes())
            add(request.model_name, Path(request.model_file).read_bytes())
            npy = io.BytesIO()
            np.save(npy, np.ascontiguousarray(request.inputs), allow_pickle=False)
            add(INPUTS_NAME, npy.getvalue())
        sent = self._ssh(f"tar -x -f - -C {shlex.quote(folder)}", stdin_data=buffer.getvalue(),
                         timeout=timeout + 600, what="upload")
        if sent.returncode != 0:
            raise DeviceError(f"{self.describe()}: cannot copy the files to the device "
                              f"({' '.join(sent.stderr.split())[:200]})")

    def _run_runner(self, folder: str, request: RunRequest) -> None:
        args = " ".join(shlex.quote(a) for a in [*request.runner_args(folder), "--exit-on-stdin-eof"])
        remote = (f"cd {shlex.quote(folder)} && exec {shlex.quote(self.python)} "
                  f"{shlex.quote(folder + '/' + RUNNER_NAME)} {args}")
        proc = self._ssh(remote, timeout=self.run_timeout_s, what="the run", keep_stdin_open=True)
        if proc.returncode == 127 or (proc.returncode != 0 and "not found" in proc.stderr
                                      and ERROR_PREFIX not in proc.stderr):
            raise DeviceError(f"{self.describe()}: no Python `{self.python}` on the device: install python3 "
                              "there or set the target's python")
        if proc.returncode != 0:
            raise runner_failure(self.describe(), proc.returncode, proc.stderr)

    def _remove(self, folder: str) -> bool:
        """Best effort (the link may be gone): True when the remote folder is removed."""
        if not REMOTE_TMP.match(folder):
            return False
        try:
            proc = self._ssh(f"rm -rf -- {shlex.quote(folder)}", timeout=self.connect_timeout_s + 20, what="cleanup")
        except DeviceError:
            return False
        return proc.returncode == 0


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    try:
        proc.communicate(timeout=5)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        pass


# ---------------------------------------------------------------- an emulated device


class EmulatorConnection:
    """The runner inside the emulated device's root filesystem (QEMU user-mode under proot).

    Outputs are the ARM kernels' own; latency is QEMU's (tens of times slower than the device),
    so results carry ``meta["emulated"] = True`` and must never be shown as a device figure.
    """

    where = "emulated"

    def __init__(self, device: str = "rpi4", *, cpu: str = "cortex-a72", rootfs: str | Path | None = None,
                 timeout_s: float | None = None, python: str = "/usr/bin/python3"):
        from ghnq_deploy.verify import emulator

        self.device, self.cpu, self.timeout_s, self.python = device, cpu, timeout_s, python
        emulator.get_device(device)
        found = Path(rootfs) if rootfs else emulator.rootfs_path(device)
        if found is None or not (found / "usr" / "bin").is_dir():
            raise DeviceError(f"emulator for {device} not set up: run `ghnq-deploy emulator setup {device}`")
        self.rootfs = found

    def describe(self) -> str:
        return f"emulated {self.device} (qemu-aarch64 {self.cpu}, proot)"

    def run(self, request: RunRequest) -> RunResult:
        from ghnq_deploy.verify import emulator

        request.check()
        guest_tmp = self.rootfs / "tmp"
        guest_tmp.mkdir(exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="ghnq-verify.", dir=guest_tmp))
        try:
            stage(folder, request)
            guest = f"/tmp/{folder.name}"
            cmd, env = emulator.command(self.rootfs, [self.python, f"{guest}/{RUNNER_NAME}",
                                                      *request.runner_args(guest)],
                                        device=self.device, cwd=guest, cpu=self.cpu)
            try:
                proc = run_process(cmd, env=env, timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                raise DeviceError(f"{self.describe()}: the runner did not finish within "
                                  f"{self.timeout_s:g} s") from None
            if proc.returncode != 0:
                raise runner_failure(self.describe(), proc.returncode, proc.stderr)
            result = parse_output(folder / OUTPUT_NAME, self.where, self.describe())
            result.meta.update(emulated=True, qemu_cpu=self.cpu,
                               latency_note="emulated (QEMU user-mode), not a device's latency")
            return result
        finally:
            shutil.rmtree(folder, ignore_errors=True)
