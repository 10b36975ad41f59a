"""Atomic writes and hashing: every file that matters is written beside its target, then renamed."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from signflow.errors import SignflowError

__all__ = [
    "FOREIGN_SCRATCH_AGE_S",
    "LockBusyError",
    "atomic_path",
    "atomic_paths",
    "held_lock",
    "json_text",
    "remove_stale_scratch",
    "remove_stale_scratch_in",
    "replace_dir_atomic",
    "sha256_file",
    "staging_dir",
    "write_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

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


def _host_tag() -> str:
    """This machine's name as it appears in scratch names (letters, digits and -)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


FOREIGN_SCRATCH_AGE_S = 24 * 3600
"""Scratch of another host is removed only after a day untouched: its writer's liveness is unknowable."""


def _scratch_prefix(target: Path) -> str:
    return f".{target.name}.{_host_tag()}-{os.getpid()}."


def _is_stale(candidate: Path, writer: str) -> bool:
    """`writer` is `<host>-<pid>` (or a bare pid, as scratch was named before hosts were recorded)."""
    host, _, pid = writer.rpartition("-")
    if not pid.isdigit():
        return False
    if host in ("", _host_tag()):
        return not _pid_alive(int(pid))
    try:
        return time.time() - candidate.stat().st_mtime > FOREIGN_SCRATCH_AGE_S
    except OSError:
        return False


def remove_stale_scratch(target: str | Path) -> list[Path]:
    """Remove scratch files and folders of `target` left by a process that was killed.

    Scratch names carry the writer's host and process id (`.<name>.<host>-<pid>.<random>.tmp|.partial`).
    On this host, only those whose process no longer exists are removed, so a concurrent writer is
    never disturbed; scratch of another host sharing the folder (a container, a network mount) is
    removed only once it has been untouched for a day.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for candidate in target.parent.glob(f".{glob.escape(target.name)}.*"):
        parts = candidate.name[len(target.name) + 2 :].split(".")
        if len(parts) >= 3 and _remove_if_stale(candidate, writer=parts[0], suffix=parts[-1]):
            removed.append(candidate)
    return removed


def remove_stale_scratch_in(folder: str | Path) -> list[Path]:
    """Remove the scratch of every target in `folder` left by a killed process, by the rules of
    `remove_stale_scratch`: for a folder whose targets change name from run to run (`runs/<run id>`),
    where a killed run's scratch would never be looked for under its own name again."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for candidate in folder.glob(".*"):
        # `.<target>.<host>-<pid>.<random>.<tmp|partial>`: the target's name may hold dots, the rest cannot
        parts = candidate.name[1:].rsplit(".", 3)
        if len(parts) == 4 and parts[0] and _remove_if_stale(candidate, writer=parts[1], suffix=parts[3]):
            removed.append(candidate)
    return removed


def _remove_if_stale(candidate: Path, writer: str, suffix: str) -> bool:
    if suffix not in ("tmp", "partial") or not _is_stale(candidate, writer):
        return False
    if candidate.is_dir():
        shutil.rmtree(candidate, ignore_errors=True)
    else:
        candidate.unlink(missing_ok=True)
    return True


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _plain_mode(path: Path, directory: bool) -> int:
    """The mode a plain write would give `path`: an existing target keeps its own, a new one gets
    the umask's (mkstemp/mkdtemp make 0600/0700, which other users, e.g. an MLflow server, cannot read)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return (0o777 if directory else 0o666) & ~_umask()


def fsync_file(path: str | Path) -> None:
    """Wait until `path`'s content is on the disk (written through any descriptor, closed or not)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | Path) -> None:
    """Wait until the renames and deletions in `folder` are on the disk. Best effort: some
    filesystems (network mounts, Windows) cannot sync a folder, and the rename has happened anyway."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename.

    On any error the temporary file is removed and `target` keeps its previous content. The
    temporary file is synced to the disk before the rename and the folder after it: without that
    a power loss can leave the renamed `target` empty or zero-filled (a filesystem may commit the
    rename before the data). A crash (SIGKILL, power loss) can leave the temporary file; the next write of
    `target` removes it. The file gets `target`'s mode if it exists, else the umask's, as a plain
    write would.
    """
    with atomic_paths(target) as (tmp,):
        yield tmp


@contextmanager
def atomic_paths(*targets: str | Path) -> Iterator[list[Path]]:
    """Yield a temporary path beside each of `targets` (in their order); on success each replaces its
    target, all at the end: a step whose outputs must change together writes them all here first.

    Everything that can fail for want of space (the writes, the syncs to the disk) happens before the
    first rename, so an error leaves every target as it was and removes the temporary files; the renames
    need no space. Only a crash between the renames (a few system calls) can leave some targets
    replaced and the others not. Otherwise as `atomic_path`, target by target.
    """
    paths = [Path(target) for target in targets]
    staged: list[Path] = []
    try:
        for target in paths:
            staged.append(_scratch_file(target))
        yield list(staged)
        for tmp in staged:
            fsync_file(tmp)
        for tmp, target in zip(staged, paths, strict=True):
            os.replace(tmp, target)
        for folder in dict.fromkeys(target.parent for target in paths):
            fsync_dir(folder)
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)


def _scratch_file(target: Path) -> Path:
    """An empty scratch file beside `target`, with the mode a plain write would give `target`; the
    scratch a killed writer left for `target` is removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(target)
    fd, tmp_name = tempfile.mkstemp(prefix=_scratch_prefix(target), suffix=".tmp", dir=target.parent)
    os.fchmod(fd, _plain_mode(target, directory=False))
    os.close(fd)
    return Path(tmp_name)


def write_atomic(target: str | Path, writer: Callable[[Path], None]) -> Path:
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def write_text_atomic(target: str | Path, text: str) -> Path:
    return write_atomic(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_text(payload: Any) -> str:
    """`payload` as the JSON files signflow writes: indented, keys sorted, UTF-8 left readable."""
    return json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json_atomic(target: str | Path, payload: Any) -> Path:
    return write_text_atomic(target, json_text(payload))


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
    path = Path(tempfile.mkdtemp(prefix=_scratch_prefix(target), suffix=".partial", dir=target.parent))
    path.chmod(_plain_mode(target, directory=True))
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
