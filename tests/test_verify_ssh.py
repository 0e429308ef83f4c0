"""The SSH transport against a real sshd on 127.0.0.1: an ssh_config alias, host-key and key refusals,
an unreachable port, a runner killed mid-run; the remote temp folder is gone in every case."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ghnq_deploy.errors import UserError
from ghnq_deploy.verify.connection import DeviceError, LocalConnection, RunRequest, SSHConnection

from sshd import ALIAS, SSHD, SSHServer
from verify_fixtures import TINY_INT8, TINY_ONNX, litert_raw, normalized_images, tflite_inputs

pytestmark = pytest.mark.skipif(SSHD is None, reason="no OpenSSH server (apt-get install -y openssh-server)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = SSHServer(tmp_path_factory.mktemp("sshd")).start()
    yield srv
    srv.stop()


@pytest.fixture
def clean_remote(server):
    yield server.remote_tmp
    # only our folders: the machine's login scripts may drop their own files into TMPDIR
    assert list(server.remote_tmp.glob("ghnq-verify.*")) == [], "the remote temp folder was left behind"


def request(model=TINY_INT8, inputs=None, **kw) -> RunRequest:
    fields = dict(runtime="auto", kernels="xnnpack", threads=1, timing_runs=5, warmup=1, batch=16)
    fields.update(kw)
    return RunRequest(model_file=model, inputs=tflite_inputs(model, 24) if inputs is None else inputs, **fields)


def alias(server, **kw) -> SSHConnection:
    # the remote python is this venv's: the sshd runs on this machine
    kw.setdefault("python", sys.executable)
    return SSHConnection(ALIAS, ssh_config=server.ssh_config, **kw)


def test_run_through_an_ssh_config_alias(server, clean_remote):
    conn = alias(server)
    assert conn.describe() == f"ssh {server.user}@127.0.0.1:{server.port} (alias {ALIAS})"
    req = request(kernels="reference")
    result = conn.run(req)
    np.testing.assert_array_equal(result.raw, litert_raw(TINY_INT8, req.inputs, "reference"))
    assert result.raw.dtype == np.int8 and result.latency_ms.shape == (5,)
    assert result.meta["where"] == "ssh" and result.meta["connection"] == conn.describe()
    assert result.meta["runtime"] == "ai-edge-litert" and result.meta["remote_temp_removed"] is True
    # same bytes as the local transport
    np.testing.assert_array_equal(result.raw, LocalConnection().run(req).raw)


def test_explicit_fields_without_a_config_file(server, clean_remote):
    conn = SSHConnection(f"{server.user}@127.0.0.1", port=server.port, identity_file=server.client_key,
                         known_hosts_file=server.known_hosts, python=sys.executable, ssh_config=os.devnull)
    x = normalized_images(8)
    result = conn.run(request(TINY_ONNX, x, kernels="builtin"))
    assert result.meta["runtime"] == "onnxruntime" and result.raw.shape == (8, 10)


def test_unknown_host_key_is_refused_with_how_to_trust_it(server, clean_remote):
    conn = SSHConnection("127.0.0.1", port=server.port, identity_file=server.client_key,
                         known_hosts_file=server.empty_known_hosts, python=sys.executable, ssh_config=os.devnull)
    with pytest.raises(DeviceError) as info:
        conn.run(request())
    message = str(info.value)
    assert "host key is not trusted" in message and "verify its fingerprint" in message
    assert f"ssh-keyscan -p {server.port} 127.0.0.1 >> {server.empty_known_hosts}" in message
    assert "\n" not in message
    assert server.empty_known_hosts.read_text() == ""  # never auto-accepted


def test_wrong_key_is_refused_naming_the_key(server, clean_remote):
    conn = SSHConnection("127.0.0.1", port=server.port, identity_file=server.other_key,
                         known_hosts_file=server.known_hosts, python=sys.executable, ssh_config=os.devnull)
    with pytest.raises(DeviceError, match=f"authentication refused for key {server.other_key}"):
        conn.run(request())


def test_unreachable_port(server, clean_remote):
    from sshd import _free_port

    conn = SSHConnection("127.0.0.1", port=_free_port(), identity_file=server.client_key,
                         known_hosts_file=server.known_hosts, ssh_config=os.devnull, connect_timeout_s=3)
    with pytest.raises(DeviceError, match="cannot connect: connection refused"):
        conn.run(request())


def test_bad_host_and_identity_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="invalid SSH host"):
        SSHConnection("-oProxyCommand=evil")
    with pytest.raises(UserError, match="identity file .* not found"):
        SSHConnection("pi@raspberrypi.local", identity_file=tmp_path / "nope")


def _runner_pids(remote_tmp: Path) -> list[int]:
    """Device runner processes (python, not the ssh client) working in the server's temp folder."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"python" in Path(argv[0].decode(errors="replace")).name.encode() and \
                any(str(remote_tmp).encode() in a and a.endswith(b"device_runner.py") for a in argv):
            pids.append(int(entry.name))
    return pids


def _kill_runner_when_it_starts(remote_tmp: Path, found: list) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = _runner_pids(remote_tmp)
        if pids:
            time.sleep(0.3)  # let it load the model and start timing
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            found.extend(pids)
            return
        time.sleep(0.05)


def test_a_runner_killed_mid_run_is_one_device_error(server, clean_remote):
    found: list = []
    killer = threading.Thread(target=_kill_runner_when_it_starts, args=(server.remote_tmp, found))
    killer.start()
    try:
        with pytest.raises(DeviceError, match="killed|dropped") as info:
            alias(server).run(request(timing_runs=10**7))  # minutes of timing unless killed
    finally:
        killer.join()
    assert found, "never saw the runner"
    assert "\n" not in str(info.value)


def test_run_timeout_stops_the_remote_runner(server, clean_remote):
    with pytest.raises(DeviceError, match="did not finish within 2 s"):
        alias(server, run_timeout_s=2).run(request(timing_runs=10**7))
    # the runner saw its stdin close and exited: nothing left running on the "device"
    deadline = time.monotonic() + 10
    while _runner_pids(server.remote_tmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _runner_pids(server.remote_tmp) == []


def test_missing_remote_python_and_missing_interpreter(server, clean_remote, tmp_path):
    with pytest.raises(DeviceError, match="no Python `python3.0-missing` on the device"):
        alias(server, python="python3.0-missing").run(request())
    # a device python without LiteRT / tflite-runtime: the runner's exit 3 names the package
    shadow = tmp_path / "shadow"
    for name in ("ai_edge_litert", "tflite_runtime"):
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text("raise ImportError('absent')\n")
    wrapper = tmp_path / "device-python"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={shadow} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    with pytest.raises(DeviceError, match="no TFLite interpreter on this device .*pip install ai-edge-litert"):
        alias(server, python=str(wrapper)).run(request())


def test_ctrl_c_removes_the_remote_folder_and_stops_the_runner(server, clean_remote):
    def interrupt_when_running():
        deadline = time.monotonic() + 30
        while not _runner_pids(server.remote_tmp) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt_when_running)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            alias(server).run(request(timing_runs=10**7))
    finally:
        thread.join()
    deadline = time.monotonic() + 10
    while _runner_pids(server.remote_tmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _runner_pids(server.remote_tmp) == []
