"""Loading GHN checkpoints: the shipped ones by name, or a file, refusing anything foreign."""

from __future__ import annotations

import dataclasses
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ghnq_deploy.errors import UserError

from ghnq_deploy.ghn.model import CHECKPOINT_FORMAT, GHNQ, GHNConfig, checkpoint_sha256

CHECKPOINT_VERSIONS = (1,)  # format versions this release reads

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
SHIPPED = {"default": "ghnq-cifar10.pt", "float": "ghnq-cifar10.pt", "qat": "ghnq-cifar10-qat.pt"}


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or not a GHN-Q checkpoint; one line."""


def resolve_checkpoint(name_or_path: str | Path | None) -> Path:
    """``None``/"default" -> the shipped float GHN; "qat" -> the shipped QAT GHN; else a path."""
    key = str(name_or_path or "default")
    if key in SHIPPED:
        path = SHIPPED_DIR / SHIPPED[key]
        if not path.exists():
            raise CheckpointError(f"shipped checkpoint '{key}' is not in this installation ({path})")
        return path
    path = Path(key)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found (names: {', '.join(SHIPPED)})")
    return path


def _reason(exc: BaseException) -> str:
    """One line for why torch.load failed; a weights-only refusal is said in full, in plain words."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "Weights only load failed" in text:
        found = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported class \S+)", text)
        if found is None:  # an opcode the safe unpickler does not know: corrupt or foreign bytes
            operand = re.search(r"Unsupported operand \S+", text)
            return f"a damaged or foreign pickle ({operand.group(0) if operand else 'unreadable'})"
        what = f" ({found.group(1)})"
        return (f"refused: it holds Python objects that loading would execute{what}; ghnq-deploy loads "
                "checkpoints with torch.load(weights_only=True) only (tensors, numbers, strings, lists, dicts)")
    first = " ".join(text.split())
    if not first:
        return f"{type(exc).__name__}: the file is empty or truncated"
    return f"{type(exc).__name__}: {first[:200]}"


def torch_load_file(path: Path, error: type[UserError], what: str) -> Any:
    """``torch.load(path, weights_only=True)``; any way the file is unreadable is one ``error`` line.

    torch raises whatever its readers hit on foreign bytes (IndexError, KeyError, struct.error,
    UnicodeDecodeError, ...), so every exception counts as "not a readable file".
    """
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder, not a {what} file")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols of foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except MemoryError:
        raise error(f"{path}: not a readable {what} file (it claims more memory than there is)") from None
    except Exception as exc:  # noqa: BLE001 - see the docstring
        reason = _reason(exc)
        if not reason.startswith("refused") and not _is_zip(path):
            size = path.stat().st_size if path.exists() else 0
            reason = (f"{size:,} bytes that are not a PyTorch file: torch.save writes a zip archive"
                      if size else "the file is empty")
        raise error(f"{path}: not a readable {what} file ({reason})") from None


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def check_finite(path: Path, state: Mapping, error: type[UserError], what: str) -> None:
    """Refuse NaN / infinite tensors up front: they would only surface stages later ("nan > nan")."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise error(f"{path}: {what} tensor '{name}' holds {bad:,} NaN or infinite value(s)")


def read_checkpoint(path: Path) -> dict:
    """The raw dict, loaded with weights_only=True; the training state's GHN if given last.pt."""
    data = torch_load_file(path, CheckpointError, "checkpoint")
    if isinstance(data, dict) and "ghn" in data and "optimizer" in data:
        data = data["ghn"]  # a training state (last.pt)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a GHN-Q checkpoint (expected format '{CHECKPOINT_FORMAT}')")
    version = data.get("version")
    if version not in CHECKPOINT_VERSIONS:
        raise CheckpointError(f"{path}: GHN-Q checkpoint format version {version!r} is not one this release "
                              f"reads ({', '.join(map(str, CHECKPOINT_VERSIONS))}); upgrade ghnq-deploy")
    if not isinstance(data.get("config"), dict):
        raise CheckpointError(f"{path}: GHN-Q checkpoint without a 'config' dict")
    state = data.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: GHN-Q checkpoint without a 'state_dict' of named tensors")
    check_finite(path, state, CheckpointError, "checkpoint")
    return data


def _check_config(config: GHNConfig) -> None:
    """Every field of the right type and positive where it is a size (a checkpoint is untrusted input)."""
    for f in dataclasses.fields(config):
        value, default = getattr(config, f.name), f.default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 20
        elif isinstance(default, tuple):
            ok = len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ValueError(f"config field '{f.name}' is {value!r}")


def load_ghn_checkpoint(name_or_path: str | Path | None = None) -> tuple[GHNQ, dict]:
    """(GHN in eval mode, checkpoint dict without the weights, plus its path and sha256)."""
    path = resolve_checkpoint(name_or_path)
    data = read_checkpoint(path)
    try:
        config = GHNConfig.from_checkpoint(data["config"])
        _check_config(config)
        with warnings.catch_warnings():  # a bad config's zero-size layers warn before load_state_dict refuses
            warnings.simplefilter("ignore")
            ghn = GHNQ(config)
        ghn.load_state_dict(data["state_dict"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError, MemoryError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"{path}: checkpoint does not match the GHN-Q model ({reason})") from None
    ghn.eval()
    info = {k: v for k, v in data.items() if k != "state_dict"}
    info["path"] = str(path)
    info["sha256"] = checkpoint_sha256(data)
    return ghn, info
