"""Disk-backed arrays in a content-keyed cache folder: what training keeps of a dataset that would
not fit in memory (decoded images, frozen features).

Each entry is one file of fixed-size rows (`<kind>-<key>.bin`) and a JSON record of its shape,
what made it and the rows' CRC-32 (`<kind>-<key>.json`, written last: an entry without it is
incomplete). The key is a hash of everything the content depends on, so a rerun with the same
inputs reuses an entry and any change makes a new one. Entries are built under a file lock (two
sweep trials never build the same entry twice), synced to the disk and renamed into place whole.
An entry is reused only if its record reads back whole and its rows match the CRC-32; anything
else (a record emptied by a power loss, a file zero-filled on disk) is built again, with a warning.

Rows are read with explicit positional reads (`os.preadv`) into a buffer the caller owns, never
through `np.memmap`: pages of a mapped file count in the process's resident set (RSS) once
touched, and an epoch touches all of them, so a memory map grows RSS to the file's size. Read
this way the file lives in the kernel's page cache (shared, reclaimable) and the process holds
one batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from signflow.errors import SignflowError
from signflow.fileio import atomic_path, held_lock, remove_stale_scratch, write_json_atomic

log = logging.getLogger(__name__)

FORMAT = 2
"""Bumped when the file layout changes: older entries are then rebuilt, never misread (2: the
record holds the rows' CRC-32)."""
RESERVE_BYTES = 512 * 2**20
"""Left free on the cache's disk after the entries are written."""
LOCK_TIMEOUT_S = 6 * 3600.0
CHECK_CHUNK_BYTES = 8 * 2**20
"""Read at a time when an entry's CRC-32 is checked."""


class CacheSpaceError(SignflowError, OSError):
    """The cache folder's disk cannot hold what training needs; the message says what shrinks it."""


class _Unusable(Exception):
    """Why an entry on disk cannot be reused; it is then built again. `level` is how loudly to say
    so: None for an entry that simply is not there yet."""

    def __init__(self, reason: str, level: int | None = logging.WARNING):
        super().__init__(reason)
        self.level = level


def content_key(fields: dict) -> str:
    """A hash of `fields` (JSON-serialisable), the identity of an entry's content."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def gigabytes(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.0f} MB"


@dataclass(frozen=True)
class ArraySpec:
    """`rows` rows of `row_shape` elements of `dtype`, stored row after row."""

    rows: int
    row_shape: tuple[int, ...]
    dtype: str

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


class DiskArray:
    """Rows of a cache file, read by position into numpy buffers (see the module docstring).

    The file is opened once, here: a reader keeps working if another run removes the entry. A
    forked DataLoader worker shares the descriptor (positional reads need no shared offset); a
    pickled copy (spawned worker) opens the file again.
    """

    def __init__(self, path: Path, spec: ArraySpec):
        self.path, self.spec = Path(path), spec
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.spec.rows

    def __getstate__(self) -> dict:
        return {"path": self.path, "spec": self.spec}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["spec"])

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def empty(self, rows: int) -> np.ndarray:
        return np.empty((rows, *self.spec.row_shape), dtype=self.spec.dtype)

    def _read_into(self, buffer: memoryview, offset: int) -> None:
        done = 0
        while done < len(buffer):
            count = os.preadv(self._fd, [buffer[done:]], offset + done)
            if count == 0:
                raise OSError(f"{self.path}: file ends early; delete it and rerun to rebuild the cache entry")
            done += count

    def read_rows(self, index: Iterable[int]) -> np.ndarray:
        """The rows at `index`, in that order (one read per row: a random batch of a page-cached
        file costs microseconds per row)."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= self.spec.rows):
            raise IndexError(f"row index out of range for {self.spec.rows} rows of {self.path}")
        out = self.empty(len(index))
        buffer, size = memoryview(out.reshape(-1).view(np.uint8)), self.spec.row_bytes
        for position, row in enumerate(index.tolist()):
            self._read_into(buffer[position * size : (position + 1) * size], row * size)
        return out

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows `start` to `stop` (exclusive) in one read."""
        stop = min(stop, self.spec.rows)
        out = self.empty(max(stop - start, 0))
        if len(out):
            self._read_into(memoryview(out.reshape(-1).view(np.uint8)), start * self.spec.row_bytes)
        return out

    def crc32(self) -> int:
        """The CRC-32 of every row, read a chunk at a time. zlib's CRC-32 is the fastest check at hand
        (4-6 GB/s, blake2b 1 GB/s): the reference run's four entries, 0.25 GB, are checked in under
        0.1 s from the page cache and under 0.2 s from the disk (bench/cache_check.py)."""
        total = self.spec.nbytes
        buffer = memoryview(bytearray(max(1, min(CHECK_CHUNK_BYTES, total))))
        checksum = 0
        for offset in range(0, total, len(buffer)):
            chunk = buffer[: min(len(buffer), total - offset)]
            self._read_into(chunk, offset)
            checksum = zlib.crc32(chunk, checksum)
        return checksum


class RowWriter:
    """Appends rows, in order, to an entry's file being built; checks each block's shape and type
    and keeps the CRC-32 of what it wrote."""

    def __init__(self, handle: BinaryIO, spec: ArraySpec):
        self.handle, self.spec, self.rows, self.crc32 = handle, spec, 0, 0

    def write(self, block: np.ndarray) -> None:
        if block.shape[1:] != self.spec.row_shape or block.dtype != np.dtype(self.spec.dtype):
            raise ValueError(f"rows of {block.shape[1:]} {block.dtype} written to an entry of {self.spec}")
        block = np.ascontiguousarray(block)
        self.handle.write(block.data)
        self.crc32 = zlib.crc32(block, self.crc32)
        self.rows += len(block)


@dataclass(frozen=True)
class CacheEntry:
    folder: Path
    kind: str
    key: str
    spec: ArraySpec
    description: str
    """What it holds, for people: shown when disk space runs short."""

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.key[:40]}"

    @property
    def data_path(self) -> Path:
        return self.folder / f"{self.name}.bin"

    @property
    def record_path(self) -> Path:
        return self.folder / f"{self.name}.json"

    def is_complete(self) -> bool:
        """Whether the entry is there whole: a record that reads back and describes it, a file of the
        right size. Cheap: the rows are checked against the record's CRC-32 when the entry is built."""
        try:
            self._record()
        except _Unusable:
            return False
        return True

    def _read_record(self) -> dict:
        """The entry's record as it is on disk; else raise _Unusable (missing, unreadable, garbled)."""
        try:
            text = self.record_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise _Unusable("not cached yet", level=None) from None
        except (OSError, UnicodeDecodeError) as error:
            raise _Unusable(f"its record {self.record_path} cannot be read ({error})") from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            state = "empty" if not text.strip() else f"garbled ({error})"
            raise _Unusable(f"its record {self.record_path} is {state}") from None
        if not isinstance(record, dict):
            raise _Unusable(f"its record {self.record_path} is garbled (not a JSON object)")
        return record

    def _record(self) -> dict:
        """The entry's record, checked against the entry and its file's size; else raise _Unusable."""
        record = self._read_record()
        if record.get("format") != FORMAT:
            raise _Unusable(f"another signflow cached it (format {record.get('format')}, not {FORMAT})", logging.INFO)
        expected = {
            "key": self.key,
            "rows": self.spec.rows,
            "row_shape": [*self.spec.row_shape],
            "dtype": self.spec.dtype,
        }
        wrong = [name for name, value in expected.items() if record.get(name) != value]
        if wrong or not isinstance(record.get("crc32"), int):
            raise _Unusable(f"its record {self.record_path} does not describe it ({', '.join(wrong) or 'no crc32'})")
        if not self.data_path.is_file():
            raise _Unusable(f"its file {self.data_path} is missing")
        if self.data_path.stat().st_size != self.spec.nbytes:
            raise _Unusable(
                f"its file {self.data_path} is {self.data_path.stat().st_size} bytes, not {self.spec.nbytes}"
            )
        return record

    def _open_checked(self) -> tuple[DiskArray, dict]:
        """The entry's rows and its record, once the rows match the record's CRC-32 (else raise
        _Unusable); marks it used (entries are pruned least recently used first)."""
        record = self._record()
        array = DiskArray(self.data_path, self.spec)
        if array.crc32() != record["crc32"]:
            array.close()
            raise _Unusable(f"its file {self.data_path} does not match the CRC-32 in its record (damaged on disk)")
        os.utime(self.record_path)
        return array, record

    def build(self, fill: Callable[[RowWriter], dict]) -> tuple[DiskArray, dict]:
        """Open the entry, first building it with `fill` (which writes every row and returns extra
        fields for the record) unless it exists and its rows match its record's CRC-32; under a lock,
        so concurrent runs build it once. A damaged entry is built again, with a warning saying why."""
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = self.folder / f"{self.name}.lock"
        with held_lock(lock, LOCK_TIMEOUT_S, f"waiting for another run to finish building {self.data_path}"):
            try:
                opened = self._open_checked()
            except _Unusable as problem:
                if problem.level is not None:
                    log.log(problem.level, "not reusing the cached %s: %s", self.description, problem)
                return self._write(fill)
            log.info("reusing the cached %s (%s)", self.description, self.data_path)
            return opened

    def _write(self, fill: Callable[[RowWriter], dict]) -> tuple[DiskArray, dict]:
        """Write the entry's rows with `fill`, then its record (the entry's lock held)."""
        log.info("caching %s (%s) in %s", self.description, gigabytes(self.spec.nbytes), self.data_path)
        self.record_path.unlink(missing_ok=True)
        self.data_path.unlink(missing_ok=True)  # a damaged file's disk space goes to the new one
        with atomic_path(self.data_path) as tmp, open(tmp, "wb") as handle:
            writer = RowWriter(handle, self.spec)
            extra = fill(writer)
            if writer.rows != self.spec.rows:
                raise RuntimeError(f"{self.name}: {writer.rows} rows written, {self.spec.rows} expected")
        record = {
            "format": FORMAT,
            "kind": self.kind,
            "key": self.key,
            "rows": self.spec.rows,
            "row_shape": list(self.spec.row_shape),
            "dtype": self.spec.dtype,
            "description": self.description,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "crc32": writer.crc32,
            **extra,
        }
        write_json_atomic(self.record_path, record)
        return DiskArray(self.data_path, self.spec), record


def _remove_entry(record_path: Path) -> int:
    """Delete an entry that no run is building; return the bytes freed."""
    from filelock import FileLock, Timeout

    name = record_path.stem
    data_path = record_path.with_suffix(".bin")
    try:
        with FileLock(str(record_path.with_suffix(".lock")), timeout=0):
            size = data_path.stat().st_size if data_path.exists() else 0
            record_path.unlink(missing_ok=True)
            data_path.unlink(missing_ok=True)
    except Timeout:
        return 0
    log.info("removed cache entry %s (%s, least recently used) to make room", name, gigabytes(size))
    return size


def ensure_space(folder: Path, entries: list[CacheEntry], advice: str) -> None:
    """Check, before anything is written, that `folder`'s disk holds the entries that do not exist
    yet. When it does not, other entries are removed, least recently used first; if that is not
    enough, raise CacheSpaceError naming what is needed and `advice` (the params that shrink it)."""
    missing = [entry for entry in entries if not entry.is_complete()]
    needed = sum(entry.spec.nbytes for entry in missing)
    if not missing:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for scratch in folder.glob(".*.bin.*.tmp"):  # left by a killed build; removed if its process is gone
        remove_stale_scratch(folder / scratch.name[1 : scratch.name.index(".bin.") + 4])
    keep = {entry.record_path for entry in entries}
    others = sorted((p for p in folder.glob("*.json") if p not in keep), key=lambda p: p.stat().st_mtime)
    while shutil.disk_usage(folder).free < needed + RESERVE_BYTES and others:
        _remove_entry(others.pop(0))
    free = shutil.disk_usage(folder).free
    if free < needed + RESERVE_BYTES:
        parts = "; ".join(f"{entry.description}: {gigabytes(entry.spec.nbytes)}" for entry in missing)
        raise CacheSpaceError(
            f"the training cache needs {gigabytes(needed)} in {folder} ({parts}), plus "
            f"{gigabytes(RESERVE_BYTES)} to spare, but its disk has {gigabytes(free)} free. Free disk space, "
            f"move the cache to a larger disk (SIGNFLOW_CACHE_DIR or --cache-dir), or {advice}"
        )
    log.info("cache %s: writing %s (%s free)", folder, gigabytes(needed), gigabytes(free))
