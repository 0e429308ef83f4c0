"""The manifest.json written next to every exported file: what it is, how it was made, how well it did.

A deployed file must be traceable to the exact arch, GHN checkpoint and calibration data,
and its I/O quantization must be what a device will use: so scales and zero points are
read back from the produced file (never from the converter settings), and the accuracy is
measured right after export with the runtime that matches the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ghnq_deploy.errors import UserError

MANIFEST_FORMAT = "ghnq-deploy/export-manifest"
MANIFEST_NAME = "manifest.json"
_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxscript", "tensorflow", "keras", "ai-edge-litert", "numpy",
             "ghnq-deploy")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tool_versions(packages: tuple[str, ...] = _PACKAGES) -> dict[str, str | None]:
    """Installed versions of the tools that produce or run exports (None if absent)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def build_manifest(*, target: str, model_file: Path, description: str, spec_name: str, arch_sha256: str,
                   predicted_file: Path, predicted_meta: dict, calibration: dict, bn: dict, folding: dict,
                   io: dict, weights: dict | None, evaluation: dict | None, timings: dict,
                   options: dict[str, Any]) -> dict:
    """Assemble the manifest dict (pure: every number is measured by the caller)."""
    ghn = predicted_meta.get("ghn") or {}
    return {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "target": target,
        "file": {"name": model_file.name, "sha256": sha256_file(model_file), "bytes": model_file.stat().st_size,
                 "description": description},
        "arch": {"name": spec_name, "sha256": arch_sha256},
        "predicted_model": {"file": str(predicted_file), "sha256": sha256_file(predicted_file),
                            "seed": predicted_meta.get("seed"), "bits": predicted_meta.get("bits")},
        "ghn_checkpoint": {"sha256": ghn.get("sha256"), "path": ghn.get("path")},
        "ancestry": predicted_meta.get("ancestry") or _prediction_ancestry(predicted_meta, predicted_file),
        "calibration": calibration,
        "batchnorm": bn,
        "folding": folding,
        "io": io,
        "weights": weights,
        "evaluation": evaluation,
        "timings_s": timings,
        "options": options,
        "tools": tool_versions(),
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()},
    }


def _prediction_ancestry(meta: dict, predicted_file: Path) -> dict:
    """A plain prediction's ancestry: the GHN checkpoint and seed, nothing fine-tuned."""
    ghn = meta.get("ghn") or {}
    return {"ghn_checkpoint": {"path": ghn.get("path"), "sha256": ghn.get("sha256")} if ghn else None,
            "prediction": {"seed": meta.get("seed"), "bits": meta.get("bits"), "file": str(predicted_file)},
            "finetune": None}


def write_manifest(path: str | os.PathLike, manifest: dict) -> None:
    from ghnq_deploy.io import atomic_write_text

    atomic_write_text(Path(path), json.dumps(manifest, indent=1, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_manifest(path: str | os.PathLike) -> dict:
    """Load a manifest (or the one in an export folder); one-line errors."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no export manifest") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable export manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: not a ghnq-deploy export manifest")
    return data
