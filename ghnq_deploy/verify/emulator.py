"""An emulated Raspberry Pi 4: a Debian arm64 root filesystem run with QEMU user-mode under proot.

Why this way: there is no binfmt and no root-only chroot on a CI machine, but Debian's
``qemu-user-static`` and ``proot`` run an aarch64 userland unprivileged, and the ARM kernels of
LiteRT then compute on the same bytes as on a Pi. Latency measured here is QEMU's, not a Pi's.

Setup is fast because it skips debootstrap's second stage (~9 minutes of emulated dpkg
configuring): ``debootstrap --foreign`` only downloads the packages, we unpack every .deb with
the host's ``dpkg-deb -x`` (nothing needs configuring for Python to run), and the aarch64
wheels (numpy, ai-edge-litert, tflite-runtime) are downloaded with the host's pip for the
target platform and unzipped into a site-packages folder on the guest's PYTHONPATH. The result
is cached in the user cache folder, built in a temp folder and renamed into place, so an
interrupted setup never leaves something that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ghnq_deploy.errors import UserError

FORMAT = 1  # bump when the layout changes: older caches are then rebuilt, not reused
MARKER = "ghnq-emulator.json"
SITE_PACKAGES = "/opt/ghnq/site-packages"  # guest path, on the guest's PYTHONPATH
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEM_PACKAGES = {"qemu-user-static": "qemu-aarch64-static", "proot": "proot", "debootstrap": "debootstrap",
                   "dpkg": "dpkg-deb"}
DEFAULT_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class EmulatedDevice:
    """What to emulate: the Debian release and arch of the device's OS, QEMU's CPU model, the
    wheels its runner needs, and the /proc/cpuinfo lines its CPU reports."""

    name: str
    description: str
    debian_arch: str
    qemu: str  # the qemu-user binary
    cpu: str  # QEMU_CPU
    suite: str
    python_version: str  # of that Debian release: the wheels are picked for it
    wheel_platforms: tuple[str, ...]
    wheels: tuple[str, ...]  # requirements, all needed
    optional_wheels: tuple[str, ...]  # installed when they resolve
    cpuinfo_block: str  # one processor's lines, without the "processor" line


DEVICES: dict[str, EmulatedDevice] = {}


def register(device: EmulatedDevice) -> EmulatedDevice:
    DEVICES[device.name] = device
    return device


register(EmulatedDevice(
    name="rpi4",
    description="Raspberry Pi 4 (Cortex-A72, Debian 12 arm64 as Raspberry Pi OS bookworm 64-bit)",
    debian_arch="arm64", qemu="qemu-aarch64-static",
    # the Pi 4's core; with QEMU's default `max` CPU XNNPACK gave garbage int8 outputs (platform notes)
    cpu="cortex-a72", suite="bookworm", python_version="3.11",
    wheel_platforms=("manylinux_2_34_aarch64", "manylinux_2_28_aarch64", "manylinux_2_27_aarch64",
                     "manylinux_2_17_aarch64", "manylinux2014_aarch64"),
    # numpy 1 as on Raspberry Pi OS bookworm, and because tflite-runtime 2.14 needs it
    wheels=("numpy<2", "ai-edge-litert"), optional_wheels=("tflite-runtime",),
    cpuinfo_block="BogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
                  "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n",
))


@dataclass
class EmulatorSetup:
    device: str
    path: Path  # the cache folder (rootfs/ inside)
    size_bytes: int
    seconds: float  # of the setup that built it (the reuse itself is instant)
    python_version: str
    packages: dict[str, str] = field(default_factory=dict)  # wheel name -> version
    reused: bool = False
    qemu_cpu: str = ""
    built_at: str = ""

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def get_device(name: str) -> EmulatedDevice:
    if name not in DEVICES:
        raise UserError(f"no emulator for device {name!r}; known: {', '.join(sorted(DEVICES))}")
    return DEVICES[name]


def cache_root() -> Path:
    """``$GHNQ_EMULATOR_DIR`` or the user cache folder, outside any clone (CI pays setup once)."""
    if os.environ.get("GHNQ_EMULATOR_DIR"):
        return Path(os.environ["GHNQ_EMULATOR_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ghnq-deploy" / "emulator"


def device_dir(device: str, cache_dir: str | os.PathLike | None = None) -> Path:
    get_device(device)
    return (Path(cache_dir).expanduser() if cache_dir else cache_root()) / device


SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")  # debootstrap lives here, off a user's PATH


def binary(name: str) -> str | None:
    """Full path of a system binary, looking in the sbin folders too."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS]))


def check_system_packages() -> list[str]:
    """The Debian packages (of qemu-user-static, proot, debootstrap) whose binaries are missing."""
    return [pkg for pkg, name in SYSTEM_PACKAGES.items() if binary(name) is None]


def _require_system_packages() -> None:
    missing = check_system_packages()
    if missing:
        raise UserError(f"the emulator needs {', '.join(missing)}: "
                        f"apt-get install -y {' '.join(p for p in SYSTEM_PACKAGES if p != 'dpkg')}")


def read_setup(folder: Path) -> EmulatorSetup | None:
    """The marker a finished setup wrote last; None when absent, foreign or of an older format."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if data.get("format") != FORMAT or not (folder / "rootfs" / "usr" / "bin" / "python3").exists():
        return None
    data.pop("format")
    data["path"] = folder
    try:
        return EmulatorSetup(**data)
    except TypeError:
        return None


def rootfs_path(device: str = "rpi4", cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The prepared, complete root filesystem of ``device``, or None."""
    folder = device_dir(device, cache_dir)
    return folder / "rootfs" if read_setup(folder) else None


def status(device: str = "rpi4", cache_dir: str | os.PathLike | None = None) -> EmulatorSetup | None:
    found = read_setup(device_dir(device, cache_dir))
    if found is not None:
        found.reused = True
    return found


# ---------------------------------------------------------------- running inside


def cpuinfo_text(device: EmulatedDevice, cores: int | None = None) -> str:
    """A fake /proc/cpuinfo: LiteRT crashed (signal 11) reading the host's x86 one under QEMU, and
    with this one XNNPACK picks its ARM kernels as on the device. One block per host core."""
    cores = cores or os.cpu_count() or 1
    return "\n".join(f"processor\t: {i}\n{device.cpuinfo_block}" for i in range(cores)) + "\n"


def command(rootfs: str | os.PathLike, argv: list[str], *, device: str = "rpi4", cwd: str = "/root",
            cpu: str | None = None, cpuinfo: str | os.PathLike | None = None) -> tuple[list[str], dict[str, str]]:
    """The proot + qemu command line running ``argv`` (guest paths) in ``rootfs``, and its env.

    The env is a clean one (a host PYTHONPATH or LD_LIBRARY_PATH must not leak into the guest).
    """
    spec = get_device(device)
    rootfs = Path(rootfs)
    cpuinfo = Path(cpuinfo) if cpuinfo else rootfs.parent / "cpuinfo"
    if not cpuinfo.exists():
        cpuinfo.write_text(cpuinfo_text(spec))
    qemu = binary(spec.qemu) or spec.qemu
    cmd = [binary("proot") or "proot", "-0", "-q", qemu, "-r", str(rootfs),
           "-b", "/dev", "-b", "/proc", "-b", "/sys", "-b", f"{cpuinfo}:/proc/cpuinfo", "-w", cwd, *argv]
    env = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8",
           "QEMU_CPU": cpu or spec.cpu, "PYTHONPATH": SITE_PACKAGES, "PYTHONDONTWRITEBYTECODE": "1",
           "TMPDIR": "/tmp"}
    return cmd, env


def run_inside(rootfs: Path, argv: list[str], *, device: str = "rpi4", timeout: float | None = 600,
               cwd: str = "/root") -> subprocess.CompletedProcess:
    cmd, env = command(rootfs, argv, device=device, cwd=cwd)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------- setup


def debian_mirror() -> str:
    """``$GHNQ_DEBIAN_MIRROR``, else the Debian mirror apt already uses here, else deb.debian.org."""
    if os.environ.get("GHNQ_DEBIAN_MIRROR"):
        return os.environ["GHNQ_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        try:
            text = source.read_text()
        except OSError:
            continue
        for url in re.findall(r"(?:^URIs:|^deb)\s+(?:\[[^\]]*\]\s+)?(\S+)", text, flags=re.M):
            if re.search(r"/debian/?$", url) and "security" not in url:
                return url.rstrip("/")
    return DEFAULT_MIRROR


def _run(cmd: list[str], what: str, timeout: float = 900, env: dict | None = None) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"emulator setup: {what} took more than {timeout:g} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        tail = lines[-1].strip()[:300] if lines else f"exit code {proc.returncode}"
        raise UserError(f"emulator setup: {what} failed ({tail})")
    return proc.stdout


def _debootstrap(spec: EmulatedDevice, rootfs: Path) -> None:
    """Download the minimal Debian with python3 (the first stage only: no emulated configuring)."""
    cmd = [binary("debootstrap") or "debootstrap", f"--arch={spec.debian_arch}", "--foreign", "--variant=minbase", "--include=python3",
           spec.suite, str(rootfs), debian_mirror()]
    if os.geteuid() != 0:
        if shutil.which("fakeroot") is None:
            raise UserError("emulator setup: debootstrap needs root or fakeroot (apt-get install -y fakeroot)")
        cmd = ["fakeroot", *cmd]
    _run(cmd, "debootstrap (downloading the Debian packages)")


def _unpack_debs(rootfs: Path) -> int:
    """Unpack every downloaded .deb into the rootfs with the host's dpkg-deb, then drop the .debs."""
    archives = rootfs / "var" / "cache" / "apt" / "archives"
    debs = sorted(archives.glob("*.deb"))
    if not debs:
        raise UserError("emulator setup: debootstrap downloaded no packages")
    for deb in debs:
        _run([binary("dpkg-deb") or "dpkg-deb", "-x", str(deb), str(rootfs)], f"unpacking {deb.name}", timeout=120)
        deb.unlink()
    shutil.rmtree(rootfs / "debootstrap", ignore_errors=True)
    proc = rootfs / "proc"
    if proc.is_symlink():  # proot binds over it: it must be a folder
        proc.unlink()
    proc.mkdir(exist_ok=True)
    return len(debs)


_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)-")


def _install_wheels(spec: EmulatedDevice, rootfs: Path, wheel_dir: Path) -> dict[str, str]:
    """pip-download the device's wheels for its platform and unzip them into SITE_PACKAGES."""
    base = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d", str(wheel_dir),
            "--only-binary=:all:", "--python-version", spec.python_version, "--implementation", "cp"]
    for platform_tag in spec.wheel_platforms:
        base += ["--platform", platform_tag]
    _run(base + list(spec.wheels), f"pip download {' '.join(spec.wheels)} for {spec.debian_arch}")
    for optional in spec.optional_wheels:
        try:
            _run(base + [optional, *spec.wheels], f"pip download {optional}")
        except UserError:
            pass  # e.g. no wheel for this Python: the device runner then uses ai-edge-litert
    site = rootfs / SITE_PACKAGES.lstrip("/")
    site.mkdir(parents=True, exist_ok=True)
    versions = {}
    for wheel in sorted(wheel_dir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
        m = _WHEEL.match(wheel.name)
        if m:
            versions[m["name"].replace("_", "-").lower()] = m["version"]
    return versions


def _tree_size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def setup(device: str = "rpi4", cache_dir: str | os.PathLike | None = None, force: bool = False) -> EmulatorSetup:
    """Prepare (or reuse) the emulated ``device``: rootfs + wheels, checked by importing them inside."""
    spec = get_device(device)
    final = device_dir(device, cache_dir)
    if not force:
        found = read_setup(final)
        if found is not None:
            found.reused = True
            return found
    _require_system_packages()
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{device}.lock"):
        if not force:  # another process may have finished it while we waited for the lock
            found = read_setup(final)
            if found is not None:
                found.reused = True
                return found
        # leftovers of a setup that was killed outright (SIGKILL / SIGTERM skip our cleanup)
        for stale in [*final.parent.glob(f".{device}.partial-*"), *final.parent.glob(f".{device}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        return _build(spec, final)


@contextlib.contextmanager
def _lock(path: Path):
    """One setup per device at a time (CI jobs sharing a cache folder)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(spec: EmulatedDevice, final: Path) -> EmulatorSetup:
    device = spec.name
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{device}.partial-", dir=final.parent))
    try:
        rootfs = work / "rootfs"
        _debootstrap(spec, rootfs)
        _unpack_debs(rootfs)
        packages = _install_wheels(spec, rootfs, work / "wheels")
        shutil.rmtree(work / "wheels", ignore_errors=True)
        (work / "cpuinfo").write_text(cpuinfo_text(spec))
        probe = run_inside(rootfs, ["/usr/bin/python3", "-c",
                                    "import platform, numpy, ai_edge_litert.interpreter; "
                                    "print(platform.python_version(), platform.machine())"], device=device)
        if probe.returncode != 0:
            raise UserError(f"emulator setup: the emulated Python cannot import numpy and ai-edge-litert "
                            f"({(probe.stderr.strip().splitlines() or ['no message'])[-1][:300]})")
        python_version, machine = probe.stdout.split()[:2]
        if machine != "aarch64":
            raise UserError(f"emulator setup: the emulated Python reports {machine}, not aarch64")
        result = EmulatorSetup(device=device, path=final, size_bytes=_tree_size(work),
                               seconds=round(time.perf_counter() - start, 1), python_version=python_version,
                               packages=packages, reused=False, qemu_cpu=spec.cpu,
                               built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        marker = {**result.to_dict(), "format": FORMAT}
        marker.pop("path")
        (work / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # written last: complete
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{device}.old-", dir=final.parent))
            os.replace(final, trash / device)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(work, final)
        return result
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
