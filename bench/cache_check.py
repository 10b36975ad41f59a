"""What the training cache's safety costs at the reference run's sizes: the CRC-32 check of every
entry a run reuses, and the fsync of every entry it writes.

    python bench/cache_check.py [--folder DIR] [--train 1443] [--valid 309] [--views 6] [--repeats 3]

Builds, with the project's own cache code, the four entries the default params make for the Sign
Language Digits split (its train and valid images decoded at 160 px; frozen MobileNetV2 features
of 6 train views and 1 valid view, cut before blocks.3.2 at 9 trainable blocks: 10 x 10 x 64
float16, 12.8 KB per image and view), filled with random bytes, in a temporary folder under
`--folder` (default: the system's temp folder). It then times (median of `--repeats`):

- building them (rows written, CRC-32 kept, synced to the disk, renamed), and building them with
  the syncs turned off: the difference is what the fsyncs cost a first run (noisy: it depends on
  how much the kernel had already written back);
- reopening them as a rerun does (record read, every row's CRC-32 checked), with the files in the
  page cache, and evicted from it first (posix_fadvise DONTNEED: the check then reads the disk,
  warming the page cache the epochs read from anyway).

Prints seconds per entry and in all, and as a % of the 105 s train step of docs/benchmark.md;
first, the speed of the hashes that could do the check, on 64 MB in memory (why CRC-32).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

import signflow.fileio
from signflow._disk_cache import ArraySpec, CacheEntry, RowWriter, gigabytes

REFERENCE_TRAIN_S = 105.0


def reference_entries(folder: Path, train: int, valid: int, views: int) -> list[CacheEntry]:
    image, features = (3, 160, 160), (10, 10, 64)
    specs = {
        "images-train": ArraySpec(train, image, "uint8"),
        "images-valid": ArraySpec(valid, image, "uint8"),
        "features-train": ArraySpec(views * train, features, "float16"),
        "features-valid": ArraySpec(valid, features, "float16"),
    }
    return [CacheEntry(folder, name, f"{name}-bench".ljust(40, "0"), spec, name) for name, spec in specs.items()]


def random_rows(spec: ArraySpec, seed: int) -> Callable[[RowWriter], dict]:
    def fill(writer: RowWriter) -> dict:
        rng = np.random.default_rng(seed)
        for start in range(0, spec.rows, 256):
            count = min(256, spec.rows - start)
            block = rng.integers(0, 256, (count, spec.row_bytes), dtype=np.uint8)
            writer.write(block.view(spec.dtype).reshape(count, *spec.row_shape))
        return {}

    return fill


def never(writer: RowWriter) -> dict:
    raise AssertionError("an intact entry was built again")


def evict(entry: CacheEntry) -> None:
    fd = os.open(entry.data_path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def time_builds(entries: list[CacheEntry], repeats: int, synced: bool) -> float:
    """Median seconds to build every entry (each removed first); with the fsyncs off unless `synced`."""
    saved = signflow.fileio.fsync_file, signflow.fileio.fsync_dir
    if not synced:
        signflow.fileio.fsync_file = signflow.fileio.fsync_dir = lambda path: None
    try:
        runs = []
        for repeat in range(repeats):
            for entry in entries:
                entry.record_path.unlink(missing_ok=True)
                entry.data_path.unlink(missing_ok=True)
            runs.append(sum(timed(lambda e=e, r=repeat: e.build(random_rows(e.spec, r))[0].close()) for e in entries))
        return statistics.median(runs)
    finally:
        signflow.fileio.fsync_file, signflow.fileio.fsync_dir = saved


def time_checks(entries: list[CacheEntry], repeats: int, cold: bool) -> dict[str, float]:
    """Median seconds to reopen each entry with its CRC-32 checked."""
    runs: dict[str, list[float]] = {entry.kind: [] for entry in entries}
    for _ in range(repeats):
        for entry in entries:
            if cold:
                evict(entry)
            else:
                entry.data_path.read_bytes()  # in the page cache
            runs[entry.kind].append(timed(lambda e=entry: e.build(never)[0].close()))
    return {kind: statistics.median(times) for kind, times in runs.items()}


def report(title: str, seconds: dict[str, float], entries: list[CacheEntry]) -> None:
    print(title)
    for entry in entries:
        size = entry.spec.nbytes
        rate = size / seconds[entry.kind] / 1e9
        print(f"  {entry.kind:15s} {gigabytes(size):>8s}  {seconds[entry.kind]:.3f} s  ({rate:.2f} GB/s)")
    features = sum(s for kind, s in seconds.items() if kind.startswith("features"))
    total = sum(seconds.values())
    print(f"  features only (a rerun that reuses them): {features:.3f} s, {features / REFERENCE_TRAIN_S:.2%}")
    print(f"  all four entries:                          {total:.3f} s, {total / REFERENCE_TRAIN_S:.2%}")


def hash_speeds(repeats: int) -> None:
    payload = memoryview(np.random.default_rng(0).integers(0, 256, 64 * 2**20, dtype=np.uint8))
    hashes = {
        "zlib.crc32": lambda: zlib.crc32(payload),
        "hashlib.blake2b": lambda: hashlib.blake2b(payload).digest(),
        "hashlib.sha1": lambda: hashlib.sha1(payload).digest(),
        "hashlib.sha256": lambda: hashlib.sha256(payload).digest(),
    }
    speeds = {name: len(payload) / min(timed(run) for _ in range(repeats)) / 1e9 for name, run in hashes.items()}
    print("hash speed in memory: " + ", ".join(f"{name} {speed:.2f} GB/s" for name, speed in speeds.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--train", type=int, default=1443)
    parser.add_argument("--valid", type=int, default=309)
    parser.add_argument("--views", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cache-check-", dir=args.folder) as folder:
        entries = reference_entries(Path(folder), args.train, args.valid, args.views)
        total = sum(entry.spec.nbytes for entry in entries)
        print(f"{len(entries)} entries, {gigabytes(total)} in {folder}; median of {args.repeats} runs")
        hash_speeds(args.repeats)
        unsynced = time_builds(entries, args.repeats, synced=False)
        synced = time_builds(entries, args.repeats, synced=True)
        print(f"build, fsyncs off: {unsynced:.3f} s; fsyncs on: {synced:.3f} s")
        print(f"  fsyncs cost a first run {synced - unsynced:.3f} s, {(synced - unsynced) / REFERENCE_TRAIN_S:.2%}")
        report("reuse, CRC-32 checked, files in the page cache:", time_checks(entries, args.repeats, False), entries)
        report("reuse, CRC-32 checked, files read from the disk:", time_checks(entries, args.repeats, True), entries)


if __name__ == "__main__":
    main()
