"""What the Prefect flow tells DVC: which stages are up to date, and what a stage just produced.

The flow runs the same functions as `dvc repro`; committing each stage afterwards writes the
same `dvc.lock` entry `dvc repro` would have written, so a `dvc repro` after a flow run is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _repo(project_dir: str | Path) -> Iterator:
    """DVC's Python API resolves stage paths against the current folder: run it from the project root."""
    from dvc.repo import Repo

    previous = Path.cwd()
    os.chdir(project_dir)
    try:
        with Repo(".") as repo:
            yield repo
    finally:
        os.chdir(previous)


def is_dvc_project(project_dir: str | Path) -> bool:
    return (Path(project_dir) / ".dvc").is_dir() and (Path(project_dir) / "dvc.yaml").is_file()


def stage_is_up_to_date(stage: str, project_dir: str | Path) -> bool:
    """True when the stage's deps, params and outs all match its dvc.lock entry."""
    if not is_dvc_project(project_dir):
        return False
    with _repo(project_dir) as repo:
        return not repo.status(targets=[stage])


def record_stage(stage: str, project_dir: str | Path) -> None:
    """Record the stage's current deps, params and outs in dvc.lock and the DVC cache."""
    with _repo(project_dir) as repo:
        repo.commit(stage, force=True)
