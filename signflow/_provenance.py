"""Where a model came from: the git commit, the DVC hash of the raw data, and the test set it was scored on."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml

from signflow._redact import redact_url
from signflow.split_files import read_manifest

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


def _data_record(data_dvc: str | Path) -> dict:
    path = Path(data_dvc)
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def data_version(data_dvc: str | Path = "data.dvc") -> str:
    """The DVC hash of the raw dataset as data.dvc records it (md5 of the fetched archive or folder
    listing), or `unrecorded`."""
    outs = _data_record(data_dvc).get("outs") or [{}]
    return str(outs[0].get("md5") or "unrecorded")


def data_source(data_dvc: str | Path = "data.dvc") -> str:
    """The source data.dvc names (URL or path, relative when inside the project, as `signflow source
    set` writes it), credentials redacted, or `unrecorded`."""
    deps = _data_record(data_dvc).get("deps") or [{}]
    return redact_url(str(deps[0].get("path") or "unrecorded"))


def fingerprint_test_set(split_dir: str | Path) -> str:
    """sha256 of the test split's rows (path, label and content hash of every image, sorted): two
    models' test accuracies are comparable exactly when their fingerprints are equal."""
    manifest = read_manifest(split_dir, "test")[["path", "label", "sha256"]]
    rows = sorted(manifest.itertuples(index=False, name=None))
    return hashlib.sha256("\n".join("\t".join(row) for row in rows).encode()).hexdigest()
