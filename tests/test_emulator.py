"""The emulated Raspberry Pi 4: system-package check, the proot + QEMU command line, an atomic cache,
and (slow) the ARM kernels' int8 outputs against x86's, locally and through an sshd into the Pi."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ghnq_deploy.errors import UserError
from ghnq_deploy.verify import device_runner, emulator
from ghnq_deploy.verify.connection import DeviceError, EmulatorConnection, LocalConnection, RunRequest, SSHConnection

from sshd import ALIAS, SSHD, SSHServer
from verify_fixtures import TINY_INT8, tflite_inputs

HAVE_SYSTEM_PACKAGES = not emulator.check_system_packages()


def test_missing_system_packages_are_named_with_the_apt_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(emulator, "SBIN_DIRS", ())
    assert emulator.check_system_packages() == ["qemu-user-static", "proot", "debootstrap", "dpkg"]
    for name in ("qemu-aarch64-static", "proot", "dpkg-deb"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    assert emulator.check_system_packages() == ["debootstrap"]
    with pytest.raises(UserError) as info:
        emulator.setup("rpi4", cache_dir=tmp_path / "cache", force=True)
    assert str(info.value) == ("the emulator needs debootstrap: "
                               "apt-get install -y qemu-user-static proot debootstrap")
    assert not (tmp_path / "cache" / "rpi4").exists()


def test_unknown_device_and_absent_emulator(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no emulator for device 'rpi5'; known: rpi4"):
        emulator.setup("rpi5", cache_dir=tmp_path)
    monkeypatch.setenv("GHNQ_EMULATOR_DIR", str(tmp_path / "empty"))
    assert emulator.rootfs_path("rpi4") is None and emulator.status("rpi4") is None
    with pytest.raises(DeviceError) as info:
        EmulatorConnection("rpi4")
    assert str(info.value) == "emulator for rpi4 not set up: run `ghnq-deploy emulator setup rpi4`"


def test_cache_folder_follows_env_then_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("GHNQ_EMULATOR_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert emulator.device_dir("rpi4") == tmp_path / "xdg" / "ghnq-deploy" / "emulator" / "rpi4"
    monkeypatch.setenv("GHNQ_EMULATOR_DIR", str(tmp_path / "mine"))
    assert emulator.device_dir("rpi4") == tmp_path / "mine" / "rpi4"
    assert emulator.device_dir("rpi4", tmp_path / "x") == tmp_path / "x" / "rpi4"


def test_command_line_runs_qemu_cortex_a72_with_a_pi4_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/host/only")
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    cmd, env = emulator.command(rootfs, ["/usr/bin/python3", "-V"], cwd="/tmp")
    assert Path(cmd[0]).name == "proot" and cmd[1:4] == ["-0", "-q", cmd[3]]
    assert Path(cmd[3]).name == "qemu-aarch64-static"
    assert cmd[cmd.index("-r") + 1] == str(rootfs) and cmd[cmd.index("-w") + 1] == "/tmp"
    assert f"{tmp_path / 'cpuinfo'}:/proc/cpuinfo" in cmd and cmd[-2:] == ["/usr/bin/python3", "-V"]
    for bind in ("/dev", "/proc", "/sys"):
        assert ["-b", bind] in [cmd[i:i + 2] for i in range(len(cmd) - 1)]
    assert env["QEMU_CPU"] == "cortex-a72" and env["PYTHONPATH"] == emulator.SITE_PACKAGES  # no host leak
    cpuinfo = (tmp_path / "cpuinfo").read_text()
    assert cpuinfo.count("processor\t:") == os.cpu_count()
    # the runner on the "Pi" reads exactly this file: it must name the Pi's core
    assert device_runner.cpu_model(str(tmp_path / "cpuinfo")) == "ARM Cortex-A72"
    _, env = emulator.command(rootfs, ["true"], cpu="cortex-a53")
    assert env["QEMU_CPU"] == "cortex-a53"


def test_debian_mirror_override_and_detection(monkeypatch):
    monkeypatch.setenv("GHNQ_DEBIAN_MIRROR", "http://mirror.example/debian")
    assert emulator.debian_mirror() == "http://mirror.example/debian"
    monkeypatch.delenv("GHNQ_DEBIAN_MIRROR")
    assert emulator.debian_mirror().startswith("http")


def test_an_interrupted_setup_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def fake_debootstrap(spec, rootfs):
        (rootfs / "usr" / "bin").mkdir(parents=True)
        (rootfs / "usr" / "bin" / "python3").write_text("")

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(emulator, "check_system_packages", lambda: [])
    monkeypatch.setattr(emulator, "_debootstrap", fake_debootstrap)
    monkeypatch.setattr(emulator, "_unpack_debs", lambda rootfs: 1)
    monkeypatch.setattr(emulator, "_install_wheels", interrupted)
    with pytest.raises(KeyboardInterrupt):
        emulator.setup("rpi4", cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".rpi4.lock"]  # no rpi4/, no partial folder
    assert emulator.rootfs_path("rpi4", tmp_path) is None
    # a folder without the marker (or with another format's) is not complete either
    (tmp_path / "rpi4" / "rootfs" / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "rpi4" / "rootfs" / "usr" / "bin" / "python3").write_text("")
    assert emulator.rootfs_path("rpi4", tmp_path) is None
    (tmp_path / "rpi4" / emulator.MARKER).write_text(json.dumps({"format": emulator.FORMAT - 1}))
    assert emulator.rootfs_path("rpi4", tmp_path) is None

    # the next setup sweeps what a killed one left, builds aside and swaps it in with the marker
    (tmp_path / ".rpi4.partial-killed" / "rootfs").mkdir(parents=True)
    monkeypatch.setattr(emulator, "_install_wheels", lambda spec, rootfs, wheels: {"numpy": "1.26.4"})
    monkeypatch.setattr(emulator, "run_inside", lambda *a, **k: subprocess.CompletedProcess(a, 0, "3.11.2 aarch64\n", ""))
    done = emulator.setup("rpi4", cache_dir=tmp_path)
    assert not done.reused and done.python_version == "3.11.2" and done.packages == {"numpy": "1.26.4"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".rpi4.lock", "rpi4"]
    assert emulator.rootfs_path("rpi4", tmp_path) == tmp_path / "rpi4" / "rootfs"
    again = emulator.setup("rpi4", cache_dir=tmp_path)
    assert again.reused and again.seconds == done.seconds and again.size_bytes == done.size_bytes


# ---------------------------------------------------------------- end to end (slow)


@pytest.fixture(scope="module")
def prepared():
    """The cached emulated Pi (outside the clone: CI pays the ~30 s setup once)."""
    if not HAVE_SYSTEM_PACKAGES:
        pytest.skip(f"missing {emulator.check_system_packages()}: apt-get install -y qemu-user-static proot debootstrap")
    return emulator.setup("rpi4")


def _req(x, runtime="litert", kernels="xnnpack", **kw):
    fields = dict(threads=1, timing_runs=10, warmup=2, batch=128)
    fields.update(kw)
    return RunRequest(TINY_INT8, x, runtime, kernels, **fields)


@pytest.mark.slow
def test_emulated_pi_int8_outputs_equal_x86(prepared):
    assert prepared.python_version.startswith("3.11") and "ai-edge-litert" in prepared.packages
    assert emulator.rootfs_path("rpi4") == prepared.rootfs
    x = tflite_inputs(TINY_INT8, 256)
    conn = EmulatorConnection("rpi4")
    for kernels in ("xnnpack", "reference"):
        emulated = conn.run(_req(x, kernels=kernels))
        native = LocalConnection().run(_req(x, kernels=kernels))
        assert emulated.raw.dtype == np.int8
        # measured: bit-identical for XNNPACK and for the reference kernels (ARM vs x86)
        np.testing.assert_array_equal(emulated.raw, native.raw)
        meta = emulated.meta
        assert meta["machine"] == "aarch64" and meta["cpu"] == "ARM Cortex-A72"
        assert meta["where"] == "emulated" and meta["emulated"] is True and meta["qemu_cpu"] == "cortex-a72"
        assert meta["runtime"] == "ai-edge-litert" and meta["python"].startswith("3.11")
        assert "not a device's latency" in meta["latency_note"]
    if "tflite-runtime" in prepared.packages:  # the Pi's other interpreter, under numpy 1
        other = conn.run(_req(x, runtime="tflite-runtime", kernels="reference"))
        assert other.meta["runtime"] == "tflite-runtime" and other.meta["numpy"].startswith("1.")
        diff = np.abs(other.raw.astype(int) - native.raw.astype(int))
        assert diff.max() <= 1  # an older release's reference kernels: within one LSB
    assert list((prepared.rootfs / "tmp").glob("ghnq-verify.*")) == []


@pytest.mark.slow
def test_emulator_cli_reuses_the_cache(prepared):
    code = "from ghnq_deploy.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "emulator", "setup", "rpi4", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["reused"] is True and data["path"] == str(prepared.path) and data["size_bytes"] > 100e6
    proc = subprocess.run([sys.executable, "-c", code, "emulator", "status", "--json"], capture_output=True,
                          text=True, timeout=120)
    assert json.loads(proc.stdout)["devices"][0]["prepared"] is True


@pytest.mark.slow
@pytest.mark.skipif(SSHD is None, reason="no OpenSSH server (apt-get install -y openssh-server)")
def test_ssh_into_an_emulated_pi(prepared, tmp_path):
    """An sshd whose ForceCommand runs every remote command inside the emulated Pi: a realistic,
    offline aarch64 device for the SSH transport."""
    cmd, env = emulator.command(prepared.rootfs, ["/bin/sh", "-c"], cwd="/root")
    wrapper = tmp_path / "into-the-pi"
    wrapper.write_text("#!/bin/sh\nexec env -i " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
                       + " " + shlex.join(cmd) + ' "$SSH_ORIGINAL_COMMAND"\n')
    wrapper.chmod(0o755)
    server = SSHServer(tmp_path / "sshd", force_command=str(wrapper), set_tmpdir=False).start()
    try:
        uname = subprocess.run(["ssh", "-F", str(server.ssh_config), "-o", "BatchMode=yes", ALIAS, "uname -m"],
                               capture_output=True, text=True, timeout=60)
        assert uname.stdout.strip() == "aarch64", uname.stderr
        x = tflite_inputs(TINY_INT8, 128)
        conn = SSHConnection(ALIAS, ssh_config=server.ssh_config, python="python3")
        result = conn.run(_req(x))
        np.testing.assert_array_equal(result.raw, LocalConnection().run(_req(x)).raw)
        assert result.meta["where"] == "ssh" and result.meta["machine"] == "aarch64"
        assert result.meta["cpu"] == "ARM Cortex-A72" and result.meta["remote_temp_removed"] is True
        assert list((prepared.rootfs / "tmp").glob("ghnq-verify.*")) == []
    finally:
        server.stop()


def test_ci_installs_the_system_packages_only_when_a_binary_is_missing():
    script = Path(__file__).resolve().parent.parent / ".ci" / "run"
    env = {**os.environ, "GHNQ_CI_DRY_RUN": "1", "GHNQ_CI_VENV": "/nonexistent/ghnq-ci-venv"}

    def commands(**extra):
        proc = subprocess.run([str(script)], capture_output=True, text=True, env={**env, **extra}, timeout=60)
        return [line[2:] for line in proc.stderr.splitlines() if line.startswith("+ ")]

    missing = commands(GHNQ_CI_SYSTEM_BINARIES="sshd no-such-binary-ghnq")
    if os.geteuid() == 0 and Path("/usr/bin/apt-get").exists():
        apt = [c for c in missing if "apt-get" in c]
        assert apt[0] == "apt-get update"
        assert apt[1].endswith("apt-get install -y --no-install-recommends openssh-server openssh-client "
                               "qemu-user-static proot debootstrap")
        assert missing.index(apt[1]) < next(i for i, c in enumerate(missing) if "pip install" in c)
    present = commands(GHNQ_CI_SYSTEM_BINARIES="sh")
    assert not [c for c in present if "apt-get" in c]


@pytest.mark.slow
def test_emulated_timeout_kills_the_runner_and_cleans_up(prepared):
    x = tflite_inputs(TINY_INT8, 8)
    with pytest.raises(DeviceError, match="did not finish within 8 s"):
        EmulatorConnection("rpi4", timeout_s=8).run(_req(x, timing_runs=10**7))
    assert list((prepared.rootfs / "tmp").glob("ghnq-verify.*")) == []
    # proot -> qemu -> python: the whole group is gone, nothing keeps running emulated
    leftovers = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ghnq-verify." in argv and b"device_runner.py" in argv:
            leftovers.append(entry.name)
    assert leftovers == []
