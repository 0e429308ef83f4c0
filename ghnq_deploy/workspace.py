"""Run folders: where predict writes and where export / verify find the current model.

Layout of a workspace (default ``./ghnq-runs``, or $GHNQ_WORKSPACE, or --workspace)::

    ghnq-runs/
      CURRENT                 name of the run the last ``predict`` wrote
      <arch name>/
        arch.json             the spec that was predicted
        model.pt              predicted model (spec + state_dict), weights_only-loadable
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


def set_current(run: Path) -> None:
    atomic_write_text(run.parent / "CURRENT", run.name + "\n")


def current_run(workspace: str | os.PathLike | None = None) -> Path:
    """The run folder of the last ``predict`` in this workspace."""
    ws = workspace_dir(workspace)
    marker = ws / "CURRENT"
    if not marker.exists():
        raise WorkspaceError(f"no current run in {ws} (run `ghnq-deploy predict ARCH.json` first)")
    run = ws / marker.read_text().strip()
    if not (run / "model.pt").exists():
        raise WorkspaceError(f"{run}: the current run has no model.pt (run `ghnq-deploy predict` again)")
    return run


def resolve_model(model: str | os.PathLike | None, workspace: str | os.PathLike | None = None) -> Path:
    """A model file given directly, a run folder, or the current run's model.pt."""
    if model is None:
        return current_run(workspace) / "model.pt"
    path = Path(model)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise WorkspaceError(f"{path}: no such model")
    return path
