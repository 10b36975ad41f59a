"""Where a model came from: the git commit and the DVC hash of the raw data."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

SOURCE_PATHS = ("signflow", "tasks", "flows", "pyproject.toml", "dvc.yaml")
"""What `-dirty` looks at: the code and the pipeline's definition. The pipeline's own outputs that git
tracks (dvc.lock, reports) change on every run, and params are recorded with every model anyway."""


def git_commit(repo_root: str | Path = ".") -> str:
    """HEAD's commit, with `-dirty` when tracked source files have uncommitted changes; `none` outside git."""

    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = run("rev-parse", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PATHS)
    except (OSError, subprocess.CalledProcessError):
        return "none"
    return f"{commit}-dirty" if dirty else commit


def data_version(lock_path: str | Path = "dvc.lock", stage: str = "download", out: str = "data/raw") -> str:
    """The DVC hash (md5 of the directory listing) recorded for the raw data, or `unrecorded`."""
    path = Path(lock_path)
    if not path.is_file():
        return "unrecorded"
    lock = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for entry in lock.get("stages", {}).get(stage, {}).get("outs", []):
        if entry.get("path") == out:
            return str(entry.get("md5", "unrecorded"))
    return "unrecorded"
