"""A real OpenSSH server for tests: 127.0.0.1, a free high port, throwaway keys, key-only auth.

Everything lives in one temp folder (host key, client keys, authorized_keys, known_hosts, an
ssh_config with a ``Host`` alias, the server log), and the server's sessions get ``TMPDIR``
set to a folder of their own, so a test can check that remote temp folders were removed.
``force_command`` wraps every session (``$SSH_ORIGINAL_COMMAND``), e.g. to run it inside an
emulated Raspberry Pi.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
ALIAS = "testpi"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True,
                   stdin=subprocess.DEVNULL)


@dataclass
class SSHServer:
    root: Path
    port: int = 0
    force_command: str | None = None
    set_tmpdir: bool = True  # off when sessions run inside another root filesystem
    user: str = field(default_factory=getpass.getuser)
    process: subprocess.Popen | None = None

    @property
    def client_key(self) -> Path:
        return self.root / "client_ed25519"

    @property
    def other_key(self) -> Path:  # a key the server does not know
        return self.root / "other_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def empty_known_hosts(self) -> Path:
        return self.root / "known_hosts_empty"

    @property
    def ssh_config(self) -> Path:
        return self.root / "ssh_config"

    @property
    def remote_tmp(self) -> Path:
        return self.root / "remote-tmp"

    @property
    def log(self) -> Path:
        return self.root / "sshd.log"

    def start(self) -> SSHServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.remote_tmp.mkdir(exist_ok=True)
        host_key = self.root / "host_ed25519"
        for key in (host_key, self.client_key, self.other_key):
            if not key.exists():
                _keygen(key)
        (self.root / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        self.empty_known_hosts.write_text("")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
        last_error = ""
        for _ in range(5):
            self.port = self.port or _free_port()
            self._write_config(host_key)
            check = subprocess.run([SSHD, "-t", "-f", str(self.root / "sshd_config")], capture_output=True, text=True)
            if check.returncode != 0:
                raise RuntimeError(f"sshd config invalid: {check.stderr.strip()}")
            self.process = subprocess.Popen([SSHD, "-D", "-f", str(self.root / "sshd_config"), "-E", str(self.log)],
                                            stdin=subprocess.DEVNULL)
            if self._wait_listening():
                break
            last_error = self.log.read_text() if self.log.exists() else ""
            self.stop()
            self.port = 0
        else:
            raise RuntimeError(f"sshd did not start: {last_error[-500:]}")
        host_pub = (host_key.with_suffix(".pub") if host_key.suffix else Path(f"{host_key}.pub")).read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.ssh_config.write_text(
            f"Host {ALIAS}\n  HostName 127.0.0.1\n  Port {self.port}\n  User {self.user}\n"
            f"  IdentityFile {self.client_key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {self.known_hosts}\n")
        return self

    def _write_config(self, host_key: Path) -> None:
        lines = [
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
            f"PidFile {self.root / 'sshd.pid'}", f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "PermitRootLogin prohibit-password", "StrictModes no", f"AllowUsers {self.user}",
            "Subsystem sftp internal-sftp", "LogLevel VERBOSE",
        ]
        if self.set_tmpdir:
            lines.append(f"SetEnv TMPDIR={self.remote_tmp}")
        if self.force_command:
            lines.append(f"ForceCommand {self.force_command}")
        (self.root / "sshd_config").write_text("\n".join(lines) + "\n")

    def _wait_listening(self, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
