"""Run folders: where predict writes and where export / verify find the current model.

Layout of a workspace (default ``./ghnq-runs``, or $GHNQ_WORKSPACE, or --workspace)::

    ghnq-runs/
      CURRENT                 name of the run the last ``predict`` wrote
      <arch name>/
        arch.json             the spec that was predicted
        model.pt              predicted model (spec + state_dict), weights_only-loadable
        MODEL                 (after ``finetune``) the run's model file, relative: finetune/model.pt
        finetune/model.pt     the fine-tuned model, with its own export/ and verify/ folders
        predict.json          summary of the prediction (GHN hash, seed, timing)
        export/<target>/      files written by ``export`` with their manifest.json
        verify/<device>/      reports written by ``verify``
"""

from __future__ import annotations

import os
from pathlib import Path

from ghnq_deploy.errors import UserError
from ghnq_deploy.io import atomic_write_text

DEFAULT_WORKSPACE = "ghnq-runs"


class WorkspaceError(UserError):
    """No run to work on; one line."""


def workspace_dir(workspace: str | os.PathLike | None = None) -> Path:
    return Path(workspace or os.environ.get("GHNQ_WORKSPACE") or DEFAULT_WORKSPACE)


def run_dir(name: str, workspace: str | os.PathLike | None = None) -> Path:
    return workspace_dir(workspace) / name


def _writable_folder(folder: Path, what: str) -> None:
    """``folder`` is (or can be created as) a folder this process may write into."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise WorkspaceError(f"{existing}: is a file, so {what} {folder} cannot be created there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WorkspaceError(f"{existing}: no permission to write {what} {folder}")


def check_workspace(workspace: str | os.PathLike | None = None) -> Path:
    """Fail before any work when the workspace is a file or cannot be written."""
    ws = workspace_dir(workspace)
    if ws.exists() and not ws.is_dir():
        raise WorkspaceError(f"{ws}: the workspace must be a folder, and this is a file")
    _writable_folder(ws, "the workspace")
    return ws


def check_output_file(path: str | os.PathLike) -> Path:
    """Fail before any work when ``path`` cannot become a file: a folder, or an unwritable place."""
    path = Path(path)
    if path.is_dir():
        raise WorkspaceError(f"{path}: is a folder; the output must be a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise WorkspaceError(f"{path}: no permission to replace this file")
    _writable_folder(path.parent, "the folder of")
    return path


def check_output_dir(path: str | os.PathLike) -> Path:
    """Fail before any work when ``path`` cannot be (or become) a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WorkspaceError(f"{path}: exists and is not a folder; the output must be a folder")
    _writable_folder(path, "the output folder")
    return path


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(folder: str | os.PathLike, need_bytes: int, what: str) -> None:
    """Refuse up front a write that cannot fit on the file system (rather than a full disk midway)."""
    import shutil

    try:
        free = shutil.disk_usage(_existing_ancestor(Path(folder).absolute())).free
    except OSError:
        return
    if need_bytes > free:
        raise WorkspaceError(f"{folder}: {what} need up to {need_bytes / 2**20:,.0f} MiB and the file system has "
                             f"{free / 2**20:,.0f} MiB free")


def check_export_folder(out_dir: str | os.PathLike | None, target: str) -> None:
    """One export folder holds one target: its manifest.json would be replaced by another's."""
    import json

    if out_dir is None:
        return
    manifest = Path(out_dir) / "manifest.json"
    if not manifest.is_file():
        return
    try:
        other = json.loads(manifest.read_text(encoding="utf-8")).get("target")
    except (OSError, ValueError, AttributeError):
        other = None
    if other is not None and other != target:
        raise WorkspaceError(f"{out_dir}: already holds the {other} export (manifest.json); give each target its "
                             f"own --output folder instead of replacing it with {target}")


def check_unique_names(specs) -> None:
    """Two specs with one name would share a run folder and the first would be lost: refuse."""
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise WorkspaceError(f"{seen[spec.name]} and {spec.source} both have the name '{spec.name}'; "
                                 "run folders are named after it, so names must be unique")
        seen[spec.name] = spec.source


def set_current(run: Path) -> None:
    atomic_write_text(run.parent / "CURRENT", run.name + "\n")


def current_run(workspace: str | os.PathLike | None = None) -> Path:
    """The run folder of the last ``predict`` in this workspace."""
    ws = workspace_dir(workspace)
    marker = ws / "CURRENT"
    if not marker.exists():
        raise WorkspaceError(f"no current run in {ws} (run `ghnq-deploy predict ARCH.json` first)")
    try:
        name = marker.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkspaceError(f"{marker}: cannot read the current-run marker ({exc})") from None
    run = ws / name
    if not name or Path(name).name != name:
        raise WorkspaceError(f"{marker}: does not name a run folder (run `ghnq-deploy predict ARCH.json` again)")
    if not (run / "model.pt").exists():
        raise WorkspaceError(f"{run}: the current run has no model.pt (run `ghnq-deploy predict` again)")
    return run


ACTIVE_MODEL = "MODEL"  # in a run folder: which model file export / verify use (the prediction if absent)


def set_active_model(run: Path, model: Path | None) -> None:
    """Make ``model`` (a file inside ``run``) the run's model from now on; None: back to the prediction."""
    marker = run / ACTIVE_MODEL
    if model is None:
        marker.unlink(missing_ok=True)
        return
    atomic_write_text(marker, Path(model).resolve().relative_to(run.resolve()).as_posix() + "\n")


def active_model(run: Path) -> Path:
    """The run folder's model: the one its MODEL marker names (a fine-tune), else model.pt."""
    marker = run / ACTIVE_MODEL
    if not marker.is_file():
        return run / "model.pt"
    try:
        name = marker.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkspaceError(f"{marker}: cannot read the run's model marker ({exc})") from None
    path = run / name
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file():
        raise WorkspaceError(f"{marker}: names {name!r}, which is not a model file in {run} (pick one with --model, "
                             f"or delete {marker} to use the prediction)")
    return path


def resolve_model(model: str | os.PathLike | None, workspace: str | os.PathLike | None = None) -> Path:
    """A model file given directly, a run folder (its active model), or the current run's active model."""
    if model is None:
        return active_model(current_run(workspace))
    path = Path(model)
    if path.is_dir():
        path = active_model(path)
    if not path.exists():
        raise WorkspaceError(f"{path}: no such model")
    return path
