"""What signflow asks DVC: is a stage up to date, what are its inputs now, record what a step made,
push to the remote. The Prefect flows run the same functions as `dvc repro`; recording a stage
afterwards writes the same `dvc.lock` entry `dvc repro` would have written, so a `dvc repro` after
a flow run is a no-op.

Every call takes an open repo (`open_repo`), which holds DVC's own repo lock for the whole block:
a `dvc repro` or `dvc update` cannot change `data/source` or `dvc.lock` in the middle of it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from signflow.errors import SignflowError

__all__ = [
    "DvcError",
    "StageInputs",
    "default_remote",
    "is_dvc_project",
    "open_repo",
    "push",
    "record_stage",
    "source_inputs",
    "stage_inputs",
    "stage_is_up_to_date",
    "stage_state",
]

log = logging.getLogger(__name__)

StageInputs = dict[str, Any]
"""DVC's view of a stage's deps: path (or params file) -> its hash (md5, ETag, or the params' values)."""


class DvcError(SignflowError, RuntimeError):
    """DVC could not do what the run needed; the message says what to do."""


def is_dvc_project(project_dir: str | Path) -> bool:
    return (Path(project_dir) / ".dvc").is_dir() and (Path(project_dir) / "dvc.yaml").is_file()


@contextmanager
def open_repo(project_dir: str | Path, wait_s: float = 3600) -> Iterator[Any]:
    """The project's DVC repo, with DVC's repo lock held until the block ends (DVC's API calls inside
    reuse it). Another DVC process holding the lock (`dvc repro`, `dvc status`) is waited for, up to
    `wait_s`. DVC resolves stage paths against the current folder, so the block runs from the root."""
    from dvc.lock import LockError
    from dvc.repo import Repo, lock_repo

    previous = Path.cwd()
    os.chdir(project_dir)
    try:
        with Repo(".") as repo:
            deadline, told = time.monotonic() + wait_s, False
            while True:
                held = lock_repo(repo)
                try:
                    held.__enter__()
                    break
                except LockError:
                    if time.monotonic() > deadline:
                        raise DvcError(
                            f"{project_dir}: another DVC process held the repo lock for {wait_s:.0f} s; "
                            "let it finish (or remove .dvc/tmp/lock if no DVC process is running)"
                        ) from None
                    if not told:
                        log.info("another DVC process (dvc repro? dvc status?) is using %s; waiting", project_dir)
                        told = True
            try:
                yield repo
            finally:
                held.__exit__(None, None, None)
    finally:
        os.chdir(previous)


def stage_is_up_to_date(repo, stage: str) -> bool:
    """True when the stage's deps, params and outs all match its dvc.lock entry."""
    return not repo.status(targets=[stage])


def stage_state(repo, stage: str) -> tuple[StageInputs, bool]:
    """(the stage's deps as `stage_inputs` gives them, whether it is up to date as `stage_is_up_to_date`
    says), hashing the deps once: when DVC finds deps, params and outs as dvc.lock records them, the
    deps are what dvc.lock says; only a stage that is not up to date has its deps hashed again."""
    stage_obj = _stage(repo, stage)
    if not stage_obj.status(check_updates=True):
        return {dep.def_path: dep.hash_info.to_dict() for dep in stage_obj.deps}, True
    return _inputs_of(stage_obj), False


def _stage(repo, stage: str):
    return repo.stage.collect(stage)[0]


def _inputs_of(stage_obj) -> StageInputs:
    stage_obj.save_deps(allow_missing=True)
    return {dep.def_path: dep.hash_info.to_dict() for dep in stage_obj.deps}


def stage_inputs(repo, stage: str) -> StageInputs:
    """DVC's view of the stage's deps right now: each file's or folder's hash, the params' values."""
    return _inputs_of(_stage(repo, stage))


def _produced_paths(repo) -> list[str]:
    return [out.def_path for stage in repo.index.stages for out in stage.outs]


def source_inputs(repo, stages: list[str]) -> dict[str, StageInputs]:
    """Per stage, the deps no stage produces (its code, its params, ...) as they are now: what a run
    that starts now runs with. A stage recorded later must still see exactly these."""
    produced = _produced_paths(repo)

    def made_by_a_stage(path: str) -> bool:
        return any(path == out or path.startswith(out.rstrip("/") + "/") for out in produced)

    return {
        name: {path: value for path, value in stage_inputs(repo, name).items() if not made_by_a_stage(path)}
        for name in stages
    }


def record_stage(repo, stage: str, expected: StageInputs) -> list[str]:
    """Record the stage's deps, params and outs in dvc.lock and the DVC cache, unless a dep differs
    from `expected` (what the step ran with); returns the deps that changed (nothing recorded then)."""
    stage_obj = _stage(repo, stage)
    now = _inputs_of(stage_obj)
    changed = sorted(path for path in set(expected) | set(now) if expected.get(path) != now.get(path))
    if changed:
        return changed
    stage_obj.save()
    stage_obj.commit()
    stage_obj.dump(update_pipeline=False)
    return []


def default_remote(repo) -> str | None:
    """The name of the default DVC remote (`dvc remote add -d`), or None."""
    return repo.config["core"].get("remote") or None


def push(repo) -> int:
    """Push every cached output of the workspace to the default remote; returns the files sent.
    A remote that refuses or cannot be reached is one line naming it (nothing local changes)."""
    try:
        return repo.push()
    except Exception as error:  # DVC and its filesystems raise anything from OSError to their own types
        raise DvcError(f"dvc push to {_remote_label(repo)} failed: {_remote_problem(error)}") from None


def _remote_label(repo) -> str:
    from signflow._redact import redact_url

    name = default_remote(repo)
    settings = repo.config.get("remote", {}).get(name, {}) if name else {}
    endpoint = settings.get("endpointurl")
    where = " ".join(filter(None, [settings.get("url"), endpoint and f"at {endpoint}"]))
    return redact_url(f"remote {name!r} ({where})" if where else f"remote {name!r}")


def _remote_problem(error: BaseException) -> str:
    chain, cause = [], error
    while cause is not None and len(chain) < 8:  # DVC wraps the filesystem's error
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(f"{type(e).__name__}: {e}" for e in chain)
    if any(isinstance(e, PermissionError) for e in chain) or "Forbidden" in text or "AccessDenied" in text:
        return "the store refused the keys (check access_key_id and secret_access_key: dvc remote modify --local)"
    if "SignatureDoesNotMatch" in text or "InvalidAccessKeyId" in text:
        return "the store refused the keys (check access_key_id and secret_access_key: dvc remote modify --local)"
    if "Could not connect" in text or "Connection refused" in text or "ConnectError" in text:
        return "it cannot be reached (is the S3 store running?)"
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return first[:300]
