"""The preamble of every run that writes a project's workspace, written once.

A Prefect flow run, a sweep and each `signflow` step command all start the same way: the project is
checked, the params file must lie inside it, bad params fail before any wait, the project's run lock
is taken (so two runs never write the same files), and params.yaml is read again once the lock is
held, since the previous holder may have changed it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from signflow.config import Params, load_params, params_file_in
from signflow.dvc_state import is_dvc_project
from signflow.errors import SignflowError
from signflow.fileio import held_lock
from signflow.layout import Workspace

__all__ = ["LOCK_WAIT_S", "hold_run_lock", "project_run"]

LOCK_WAIT_S = 6 * 3600
"""How long a run waits for another signflow run in the same project to finish."""


@contextmanager
def hold_run_lock(project_dir: Path, timeout_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold the project's run lock. Under `dvc repro` (which sets DVC_STAGE) a busy lock stops the
    step at once: `dvc repro` holds DVC's repo lock, which the run holding ours may be waiting for."""
    lock = Workspace(project_dir).run_lock
    under_dvc = "DVC_STAGE" in os.environ
    busy = (
        f"another signflow run (a Prefect flow run, `signflow sweep`, ...) holds {lock}; `dvc repro` stops at "
        "this stage: run it again when that run has finished"
    )
    waiting = f"another signflow run holds {lock}; waiting for it to finish (up to {timeout_s:.0f} s)"
    with held_lock(lock, 0 if under_dvc else timeout_s, waiting, busy if under_dvc else None):
        yield


@contextmanager
def project_run(
    project_dir: str | Path,
    params_path: str | Path = "params.yaml",
    overrides: dict[str, Any] | None = None,
    lock_timeout_s: float = LOCK_WAIT_S,
) -> Iterator[tuple[Workspace, Params]]:
    """Yield the project's workspace and its params, read while holding the run lock. Refuses a folder
    that is not a DVC project and a params file outside it; bad params or overrides fail before the wait."""
    workspace = Workspace(Path(project_dir).resolve())
    if not is_dvc_project(workspace.root):
        raise SignflowError(f"{workspace.root}: not a DVC project (no .dvc/ or dvc.yaml); run it from the project root")
    params_file = params_file_in(workspace.root, params_path)
    load_params(params_file, overrides)
    with hold_run_lock(workspace.root, lock_timeout_s):
        yield workspace, load_params(params_file, overrides)
