"""Atomic file output: a reader never sees a half-written file, even after kill -9."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ghnq_deploy.errors import UserError


class OutputError(UserError):
    """An output that cannot be written (no such folder, no permission, disk full); one line."""


_UMASK = os.umask(0)
os.umask(_UMASK)


PARTIAL_SUFFIX = ".partial"
_UNOWNED_PARTIAL_AGE_S = 3600.0  # a partial without a process id (older releases) is stale after this


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 probes without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_partials(path: Path) -> list[Path]:
    """Delete ``.<name>.<pid>.*.partial`` files beside ``path`` whose writer process is gone.

    A kill -9 skips every ``finally``; the next write of the same file sweeps what it left.
    """
    path = Path(path)
    removed = []
    try:
        candidates = list(path.parent.glob(f".{glob_escape(path.name)}.*{PARTIAL_SUFFIX}"))
    except OSError:
        return removed
    for tmp in candidates:
        middle = tmp.name[len(path.name) + 2:-len(PARTIAL_SUFFIX)]
        pid = middle.split(".", 1)[0]
        try:
            stale = (not pid_alive(int(pid))) if pid.isdigit() else \
                time.time() - tmp.stat().st_mtime > _UNOWNED_PARTIAL_AGE_S
            if stale and tmp.is_file():
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            continue
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters made literal."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def temporary_files_in(folder: Path) -> Iterator[None]:
    """Route Python's ``tempfile`` defaults (and $TMPDIR for child tools) into ``folder`` for a while.

    Libraries such as TensorFlow's converter write saved models and generated code under the
    system temp folder and leave them there when killed; inside an export's own temporary
    folder they go with it.
    """
    before_dir, before_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(folder)
    os.environ["TMPDIR"] = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = before_dir
        if before_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before_env


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    The temporary file is named ``.<name>.<pid>.<random>.partial`` so that a later write can
    tell the leftovers of a killed process from those of one still running.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write here ({exc.strerror or exc})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except OSError as exc:  # disk full, replaced by a folder meanwhile, ...: the user can fix it
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write here ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(path: Path, obj: object) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))
