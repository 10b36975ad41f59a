"""Atomic writes and hashing: every file that matters is written beside its target, then renamed."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from signflow.errors import SignflowError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_scratch(target: str | Path) -> list[Path]:
    """Remove scratch files and folders of `target` left by a process that was killed.

    Scratch names carry the writer's process id (`.<name>.<pid>.<random>.tmp|.partial`); only
    those whose process no longer exists are removed, so a concurrent writer is never disturbed.
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for candidate in target.parent.glob(f".{glob.escape(target.name)}.*"):
        parts = candidate.name[len(target.name) + 2 :].split(".")
        if len(parts) < 3 or parts[-1] not in ("tmp", "partial") or not parts[0].isdigit():
            continue
        if _pid_alive(int(parts[0])):
            continue
        if candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename.

    On any error the temporary file is removed and `target` keeps its previous content. A crash
    (SIGKILL, power loss) can leave the temporary file; the next write of `target` removes it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(target: str | Path, writer: Callable[[Path], None]) -> Path:
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def write_text_atomic(target: str | Path, text: str) -> Path:
    return write_atomic(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(target: str | Path, payload: Any) -> Path:
    return write_text_atomic(target, json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def replace_dir_atomic(staged: Path, target: Path) -> None:
    """Swap a fully written `staged` directory into `target`, removing the old one afterwards.

    A directory cannot be replaced by one rename, so the old one is first moved aside; a crash
    between the two renames leaves `target` missing (never half-written) and the old copy beside it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def staging_dir(target: str | Path) -> Iterator[Path]:
    """A scratch directory beside `target` (same filesystem, so renames are atomic); always removed.

    Scratch left by a killed run is removed first, and a `target` lost between the two renames of
    `replace_dir_atomic` is restored from the copy kept beside it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(target)
    old = target.with_name(f".{target.name}.old")
    if old.is_dir() and not target.exists():
        os.replace(old, target)
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial", dir=target.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class LockBusyError(SignflowError, RuntimeError):
    """Another run holds the project's lock."""


@contextmanager
def held_lock(
    path: str | Path, timeout_s: float, waiting_message: str, busy_message: str | None = None
) -> Iterator[None]:
    """Hold the file lock at `path`, logging `waiting_message` once if another process holds it;
    raise LockBusyError (`busy_message`) after `timeout_s` seconds of waiting (0: do not wait)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path), timeout=timeout_s)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if timeout_s <= 0:
            raise LockBusyError(busy_message or f"{path} is held by another run") from None
        log.info(waiting_message)
        try:
            lock.acquire()
        except Timeout:
            raise LockBusyError(busy_message or f"{path} was held by another run for {timeout_s:.0f} s") from None
    try:
        yield
    finally:
        lock.release()
