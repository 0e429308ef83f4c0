"""Loading GHN checkpoints: the shipped ones by name, or a file, refusing anything foreign."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from ghnq_deploy.errors import UserError

from ghnq_deploy.ghn.model import CHECKPOINT_FORMAT, GHNQ, GHNConfig, checkpoint_sha256

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


def read_checkpoint(path: Path) -> dict:
    """The raw dict, loaded with weights_only=True; the training state's GHN if given last.pt."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason[:160]})") from None
    if isinstance(data, dict) and "ghn" in data and "optimizer" in data:
        data = data["ghn"]  # a training state (last.pt)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a GHN-Q checkpoint (expected format '{CHECKPOINT_FORMAT}')")
    return data


def load_ghn_checkpoint(name_or_path: str | Path | None = None) -> tuple[GHNQ, dict]:
    """(GHN in eval mode, checkpoint dict without the weights, plus its path and sha256)."""
    path = resolve_checkpoint(name_or_path)
    data = read_checkpoint(path)
    try:
        ghn = GHNQ(GHNConfig.from_checkpoint(data["config"]))
        ghn.load_state_dict(data["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: checkpoint does not match the GHN-Q model ({str(exc).splitlines()[0][:160]})") from None
    ghn.eval()
    info = {k: v for k, v in data.items() if k != "state_dict"}
    info["path"] = str(path)
    info["sha256"] = checkpoint_sha256(data)
    return ghn, info
