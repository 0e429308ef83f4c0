"""Deployment targets: TOML files loaded into validated dataclasses.

A target says where an exported file runs (this host, a device over SSH, an emulated device),
with which registered runtime and kernel set, which export formats it consumes, the integer
scheme its kernels implement (checked against the file by :mod:`ghnq_deploy.verify.scheme_check`),
and how its results are labelled. Targets ship in ``ghnq_deploy/targets/`` (so a wheel has
them); users add files with ``--target-file`` or in the folders of ``$GHNQ_TARGETS``
(``os.pathsep``-separated). Every problem in a file is one line naming the file and the field.
"""

from __future__ import annotations

import os
import platform
import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ghnq_deploy.errors import UserError
from ghnq_deploy.export.formats import FORMATS
from ghnq_deploy.runtime.registry import RUNTIMES, get_runtime

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "targets"
ENV_VAR = "GHNQ_TARGETS"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
WEIGHT_SCHEMES = ("per-channel-symmetric", "per-tensor-symmetric", "per-tensor-asymmetric")
ACTIVATION_SCHEMES = ("per-tensor-asymmetric", "per-tensor-symmetric")
BIAS_TYPES = ("int32",)
ROUNDINGS = ("double", "single", "fp32")  # TFLite reference (default), TFLite Micro / CMSIS-NN, fp32 requantization
SHARED_SCALE_OPS = ("concat", "maxpool", "avgpool", "reshape")
EMULATORS = ("qemu",)
MAX_THREADS = 256


class TargetError(UserError):
    """A target that cannot be found or a target file that is malformed; one line."""


@dataclass(frozen=True)
class Scheme:
    """The integer arithmetic the target's kernels run."""

    weights: str = "per-channel-symmetric"
    weight_range: tuple[int, int] = (-127, 127)
    activations: str = "per-tensor-asymmetric"
    activation_bits: int = 8
    bias: str = "int32"  # bias integer type, at scale s_in * s_w
    rounding: str = "double"  # requantization rounding the kernels use
    shared_scales: tuple[str, ...] = ("concat", "maxpool", "reshape")  # ops whose output keeps the input scale


@dataclass(frozen=True)
class ConnectionSpec:
    """Where a device is reached over SSH; empty host = not configured. Never a secret: keys by path."""

    host: str = ""
    user: str = ""
    port: int = 0  # 0: ssh's default (or the ~/.ssh/config alias's)
    identity_file: str = ""
    python: str = "python3"


@dataclass(frozen=True)
class Emulation:
    """How to stand in for the device on this host."""

    kind: str = "qemu"
    arch: str = "aarch64"
    cpu: str = "cortex-a72"


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    label: str
    runtime: str
    kernels: str
    arch: str  # "host" or the device's machine name (aarch64, x86_64, ...)
    cpu: str  # the CPU the target expects ("host" for this machine); compared with what the device reports
    threads: int
    consumes: tuple[str, ...]
    float_reference: str  # float format run beside the int8 file for the size / speed ratio ("" = none)
    bits: tuple[str, ...]  # bit-widths run for real (others are simulation-only rows)
    timing_runs: int
    warmup: int
    scheme: Scheme
    connection: ConnectionSpec = field(default_factory=ConnectionSpec)
    emulation: Emulation | None = None
    source: str = ""  # the file it was loaded from

    @property
    def is_host(self) -> bool:
        return self.arch == "host"

    def runs_natively_here(self) -> bool:
        """True when this host can run the target's kernels as the device would (same architecture)."""
        return self.is_host or self.arch == platform.machine()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- parsing


class _Table:
    """One TOML table being read: every key must be taken exactly once, with the right type."""

    def __init__(self, data: dict, file: Path, section: str = "") -> None:
        self.data, self.file, self.section, self.taken = data, file, section, set()

    def where(self, key: str) -> str:
        return f"{self.file}: field {self.section + '.' if self.section else ''}{key}"

    def fail(self, key: str, message: str) -> TargetError:
        return TargetError(f"{self.where(key)}: {message}")

    def take(self, key: str, kind: type | tuple[type, ...], default: Any = ..., choices: tuple | None = None) -> Any:
        self.taken.add(key)
        if key not in self.data:
            if default is ...:
                raise self.fail(key, "required but missing")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.fail(key, f"must be {names}, got {type(value).__name__} {_short(value)}")
        if choices is not None and value not in choices:
            raise self.fail(key, f"{_short(value)} is not one of {', '.join(map(str, choices))}")
        return value

    def take_list(self, key: str, default: Any = ..., choices: tuple | None = None, item: type = str) -> tuple:
        value = self.take(key, list, default)
        for v in value:
            if isinstance(v, bool) or not isinstance(v, item):
                raise self.fail(key, f"items must be {item.__name__}, got {_short(v)}")
            if choices is not None and v not in choices:
                raise self.fail(key, f"{_short(v)} is not one of {', '.join(map(str, choices))}")
        if len(set(value)) != len(value):
            raise self.fail(key, "has repeated items")
        return tuple(value)

    def int_in(self, key: str, lo: int, hi: int, default: Any = ...) -> int:
        value = self.take(key, int, default)
        if not lo <= value <= hi:
            raise self.fail(key, f"must be in [{lo}, {hi}], got {value}")
        return value

    def text(self, key: str, default: Any = ..., allow_empty: bool = False) -> str:
        value = self.take(key, str, default)
        if not allow_empty and not value.strip():
            raise self.fail(key, "must not be empty")
        if len(value) > 500 or any(ord(c) < 32 for c in value):
            raise self.fail(key, "must be one line of at most 500 characters")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.taken)
        if unknown:
            raise self.fail(unknown[0], f"unknown field (known: {', '.join(sorted(self.taken))})")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sub(table: _Table, key: str) -> _Table | None:
    value = table.take(key, dict, None)
    return None if value is None else _Table(value, table.file, key)


def _scheme(t: _Table) -> Scheme:
    lo_hi = t.take_list("weight_range", item=int)
    if len(lo_hi) != 2 or not -128 <= lo_hi[0] < lo_hi[1] <= 127:
        raise t.fail("weight_range", f"must be [min, max] within [-128, 127], got {list(lo_hi)}")
    scheme = Scheme(
        weights=t.take("weights", str, choices=WEIGHT_SCHEMES),
        weight_range=(int(lo_hi[0]), int(lo_hi[1])),
        activations=t.take("activations", str, choices=ACTIVATION_SCHEMES),
        activation_bits=t.take("activation_bits", int, choices=(8,)),
        bias=t.take("bias", str, choices=BIAS_TYPES),
        rounding=t.take("rounding", str, choices=ROUNDINGS),
        shared_scales=t.take_list("shared_scales", choices=SHARED_SCALE_OPS),
    )
    t.finish()
    return scheme


def parse_target(data: dict, file: Path) -> Target:
    """Validate one parsed TOML document into a :class:`Target` (errors name the file and field)."""
    t = _Table(data, file)
    name = t.text("name")
    if not NAME_RE.match(name):
        raise t.fail("name", f"{_short(name)} must be 1-64 of a-z 0-9 . _ - starting with a letter or digit")
    runtime_name = t.take("runtime", str, choices=tuple(RUNTIMES))
    runtime = get_runtime(runtime_name)
    kernels = t.take("kernels", str, choices=runtime.kernels)
    consumes = t.take_list("consumes", choices=tuple(n for n, f in FORMATS.items() if f.integer))
    if not consumes:
        raise t.fail("consumes", "must name at least one int8 export format")
    for fmt in consumes:
        if FORMATS[fmt].family != runtime.family:
            raise t.fail("consumes", f"{fmt} is a {FORMATS[fmt].family} file; runtime {runtime_name} loads {runtime.family}")
    float_ref = t.text("float_reference", "", allow_empty=True)
    if float_ref and (float_ref not in FORMATS or FORMATS[float_ref].integer
                      or FORMATS[float_ref].family != runtime.family):
        floats = [n for n, f in FORMATS.items() if not f.integer and f.family == runtime.family]
        raise t.fail("float_reference", f"{_short(float_ref)} is not a float {runtime.family} format "
                                        f"({', '.join(floats)}, or \"\" for none)")
    carried = set.intersection(*(set(FORMATS[f].bits) for f in consumes))
    bits = t.take_list("bits", ("w8a8",), choices=tuple(sorted(carried)))
    if "w8a8" not in bits:
        raise t.fail("bits", "must include w8a8")
    scheme_table = _sub(t, "scheme")
    if scheme_table is None:
        raise t.fail("scheme", "required table [scheme] is missing")
    scheme = _scheme(scheme_table)
    target = Target(
        name=name, description=t.text("description"), label=t.text("label", name),
        runtime=runtime_name, kernels=kernels, arch=t.text("arch"), cpu=t.text("cpu", "host"),
        threads=t.int_in("threads", 1, MAX_THREADS), consumes=consumes, float_reference=float_ref, bits=bits,
        timing_runs=t.int_in("timing_runs", 1, 100_000, 50), warmup=t.int_in("warmup", 0, 10_000, 5),
        scheme=scheme, source=str(file))
    conn = _sub(t, "connection")
    connection = ConnectionSpec()
    if conn is not None:
        connection = ConnectionSpec(host=conn.text("host", "", allow_empty=True), user=conn.text("user", "", allow_empty=True),
                                    port=conn.int_in("port", 0, 65535, 0),
                                    identity_file=conn.text("identity_file", "", allow_empty=True),
                                    python=conn.text("python", "python3"))
        conn.finish()
        if target.is_host and connection.host:
            raise conn.fail("host", "a target with arch = \"host\" runs on this machine; it takes no SSH host")
    emu = _sub(t, "emulation")
    emulation = None
    if emu is not None:
        emulation = Emulation(kind=emu.take("kind", str, "qemu", choices=EMULATORS), arch=emu.text("arch", target.arch),
                              cpu=emu.text("cpu"))
        emu.finish()
        if emulation.arch != target.arch:
            raise emu.fail("arch", f"{emulation.arch!r} differs from the target's arch {target.arch!r}")
    t.finish()
    return replace(target, connection=connection, emulation=emulation)


def load_target_file(path: str | os.PathLike) -> Target:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise TargetError(f"{path}: is a folder, not a target .toml file") from None
    except OSError as exc:
        raise TargetError(f"{path}: cannot read target file ({exc.strerror or exc})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise TargetError(f"{path}: not UTF-8 text (a target file is TOML)") from None
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise TargetError(f"{path}: nested too deeply to be a target file") from None
    return parse_target(data, path)


def search_dirs() -> list[Path]:
    """Where targets are found, later ones overriding earlier ones: shipped, then $GHNQ_TARGETS."""
    dirs = [SHIPPED_DIR]
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry.strip():
            dirs.append(Path(entry))
    return dirs


def load_targets(extra_files: list[str | os.PathLike] | tuple = ()) -> dict[str, Target]:
    """All known targets by name: shipped, then $GHNQ_TARGETS folders, then ``extra_files``."""
    found: dict[str, Target] = {}
    for folder in search_dirs():
        if folder != SHIPPED_DIR and not folder.is_dir():
            raise TargetError(f"${ENV_VAR} entry {folder}: no such folder")
        for path in sorted(folder.glob("*.toml")):
            target = load_target_file(path)
            found[target.name] = target
    for path in extra_files:
        target = load_target_file(path)
        found[target.name] = target
    return found


def get_target(name: str, extra_files: list[str | os.PathLike] | tuple = ()) -> Target:
    targets = load_targets(extra_files)
    try:
        return targets[name]
    except KeyError:
        raise TargetError(f"unknown target {name!r}; known: {', '.join(sorted(targets))} "
                          f"(add one with --target-file FILE.toml or a file in ${ENV_VAR})") from None

