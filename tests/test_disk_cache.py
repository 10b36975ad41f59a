"""The cache folder: rows read without growing memory, disk space checked before anything is written,
old entries given up for new ones, a half-written or damaged entry never used."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from signflow._disk_cache import RESERVE_BYTES, ArraySpec, CacheEntry, CacheSpaceError, DiskArray
from signflow._model import apply_freeze_policy, create_model, preprocessing_for
from signflow._runners import create_runner
from signflow._training_data import TrainingData
from tests.helpers import build_class_folders, image_split, tiny_params, train_config


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _entry(folder: Path, name: str, rows: int, row_shape=(4,)) -> CacheEntry:
    return CacheEntry(folder, "test", name * 8, ArraySpec(rows, row_shape, "float32"), f"test rows {name}")


def _fill_with(values: np.ndarray):
    def fill(writer) -> dict:
        for start in range(0, len(values), 100):
            writer.write(values[start : start + 100])
        return {"note": "made by a test"}

    return fill


def test_rows_come_back_in_the_asked_order_and_the_record_says_what_they_are(tmp_path):
    values = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4)
    array, record = _entry(tmp_path, "a", 1000).build(_fill_with(values))
    assert np.array_equal(array.read_rows([7, 3, 999, 3]), values[[7, 3, 999, 3]])
    assert np.array_equal(array.read_range(990, 2000), values[990:])
    assert record["rows"] == 1000 and record["note"] == "made by a test"
    with pytest.raises(IndexError):
        array.read_rows([1000])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set size from /proc")
def test_reading_every_row_of_a_large_entry_does_not_grow_the_resident_set(tmp_path):
    """A memory-mapped file would add every page it touched to RSS (128 MB here); positional reads
    leave the file in the page cache and keep one batch in the process."""
    rows, row_shape = 1024, (32768,)  # 128 KB rows, 128 MB
    rng = np.random.default_rng(0)
    block = rng.standard_normal((64, *row_shape), dtype=np.float32)

    def fill(writer) -> dict:
        for _ in range(rows // 64):
            writer.write(block)
        return {}

    array, _ = CacheEntry(tmp_path, "big", "k" * 40, ArraySpec(rows, row_shape, "float32"), "big").build(fill)
    before = _rss_bytes()
    order = rng.permutation(rows)
    for start in range(0, rows, 32):
        batch = array.read_rows(order[start : start + 32])
        assert batch.shape == (32, *row_shape)
    grown = _rss_bytes() - before
    assert grown < 32 * 2**20, f"RSS grew by {grown / 2**20:.0f} MB reading a 128 MB entry"


def test_a_half_written_entry_is_built_again(tmp_path):
    values = np.ones((200, 4), dtype=np.float32)
    entry = _entry(tmp_path, "b", 200)
    entry.build(_fill_with(values))
    with open(entry.data_path, "r+b") as handle:  # as if the disk filled up after the record was written
        handle.truncate(100)
    assert not entry.is_complete()
    array, _ = entry.build(_fill_with(values * 2))
    assert np.array_equal(array.read_range(0, 200), values * 2)

    def fail(writer):
        writer.write(values[:50])
        raise OSError(28, "No space left on device")

    broken = _entry(tmp_path, "c", 200)
    with pytest.raises(OSError, match="No space left"):
        broken.build(fail)
    assert not broken.is_complete() and not broken.data_path.exists()
    assert not list(tmp_path.glob(".*.tmp")), "the partial file is removed"


@pytest.fixture
def cached_setup(tmp_path):
    config = train_config(
        model="mobilenetv2_100", image_size=32, trainable_blocks=2, cached_views=3, epochs=3, loader_workers=0
    )
    model = create_model(config, num_classes=3)
    apply_freeze_policy(model, config.trainable_blocks)
    prep = preprocessing_for(model, 32)
    splits = image_split(tmp_path / "images", "train", 24, seed=1), image_split(tmp_path / "images", "valid", 8, seed=2)
    return config, model, prep, splits


def _disk_of(capacity: int, folder: Path):
    """shutil.disk_usage for a disk of `capacity` bytes that holds only the cache folder."""

    def usage(path):
        used = folder_size(folder)
        return shutil._ntuple_diskusage(capacity, used, capacity - used)

    return usage


def test_too_little_disk_stops_before_writing_and_names_the_params_that_shrink_the_cache(
    cached_setup, tmp_path, monkeypatch
):
    config, model, prep, splits = cached_setup
    cache = tmp_path / "cache"
    monkeypatch.setattr("signflow._disk_cache.shutil.disk_usage", _disk_of(RESERVE_BYTES + 1000, cache))
    with pytest.raises(CacheSpaceError) as error:
        create_runner(model, TrainingData(cache, prep, *splits), prep, config, torch.device("cpu"), torch.Generator())
    message = str(error.value)
    assert str(cache) in message
    assert "train.cached_views" in message and "train.image_size" in message
    assert "3 views of 24 train images" in message and "24 train images decoded at 32 px" in message
    assert not list(cache.glob("*.bin")), "nothing was written"


def test_least_recently_used_entries_make_room_for_a_new_run(cached_setup, tmp_path, monkeypatch, caplog):
    config, model, prep, splits = cached_setup
    cache = tmp_path / "cache"
    old, recent = _entry(cache, "o", 50_000), _entry(cache, "r", 50_000)  # 800 kB each
    old.build(_fill_with(np.zeros((50_000, 4), dtype=np.float32)))
    recent.build(_fill_with(np.zeros((50_000, 4), dtype=np.float32)))
    os.utime(old.record_path, (1, 1))  # used long ago
    data = TrainingData(cache, prep, *splits)
    monkeypatch.setattr("signflow._disk_cache.shutil.disk_usage", _disk_of(RESERVE_BYTES + 1_500_000, cache))
    with caplog.at_level("INFO"):
        runner = create_runner(model, data, prep, config, torch.device("cpu"), torch.Generator())
    assert not old.is_complete() and recent.is_complete(), "only the least recently used entry was removed"
    assert "to make room" in caplog.text
    assert len(runner.train_features.array) == 3 * 24
    assert json.loads(recent.record_path.read_text())["note"] == "made by a test"


def test_a_reader_keeps_its_rows_when_another_run_removes_the_entry(tmp_path):
    values = np.arange(400, dtype=np.float32).reshape(100, 4)
    array, _ = _entry(tmp_path, "d", 100).build(_fill_with(values))
    _entry(tmp_path, "d", 100).data_path.unlink()
    assert np.array_equal(array.read_rows([5, 50]), values[[5, 50]])
    assert isinstance(array, DiskArray)


def _counting(fill):
    """`fill`, counting its calls in `.calls`."""

    def counted(writer) -> dict:
        counted.calls += 1
        return fill(writer)

    counted.calls = 0
    return counted


@pytest.mark.parametrize(
    "damage",
    [
        b"",  # emptied: a power loss after the rename, before the data reached the disk
        b"\0" * 300,  # zero-filled, the same way
        b'{"format": 2, "kind": "test", "ke',  # cut short
        b"\xff\xfe\x00garbage",  # not UTF-8
        b"[1, 2, 3]\n",  # JSON, but no record
        b'{"format": 2, "rows": 7}\n',  # a record, but not of this entry
    ],
    ids=["empty", "zero-filled", "truncated", "not-utf8", "not-an-object", "another-entry"],
)
def test_an_unreadable_record_counts_as_a_missing_entry_and_is_built_again(tmp_path, damage, caplog):
    values = np.arange(800, dtype=np.float32).reshape(200, 4)
    entry = _entry(tmp_path, "g", 200)
    entry.build(_fill_with(values))
    entry.record_path.write_bytes(damage)
    assert not entry.is_complete()
    with caplog.at_level("WARNING"):
        array, record = entry.build(_fill_with(values + 1))
    assert np.array_equal(array.read_range(0, 200), values + 1), "the entry was built again"
    assert record["note"] == "made by a test" and entry.is_complete()
    assert json.loads(entry.record_path.read_text())["rows"] == 200
    assert str(entry.record_path) in caplog.text, "the warning names the damaged record"


@pytest.mark.parametrize("damage", ["zero-filled", "one bit flipped"])
def test_a_damaged_file_of_the_right_size_is_built_again_not_reused(tmp_path, damage, caplog):
    values = np.arange(800, dtype=np.float32).reshape(200, 4) + 1
    entry = _entry(tmp_path, "z", 200)
    fill = _counting(_fill_with(values))
    entry.build(fill)
    entry.build(fill)
    assert fill.calls == 1, "an intact entry is reused"
    content = bytearray(entry.data_path.read_bytes())
    if damage == "zero-filled":
        content = bytearray(len(content))
    else:
        content[len(content) // 2] ^= 0x10
    entry.data_path.write_bytes(content)
    assert entry.is_complete(), "the right size: only the checksum tells"
    with caplog.at_level("WARNING"):
        array, _ = entry.build(fill)
    assert fill.calls == 2, "the damaged entry was built again"
    assert np.array_equal(array.read_range(0, 200), values)
    assert str(entry.data_path) in caplog.text and "CRC-32" in caplog.text


def test_an_entry_cached_before_records_held_a_checksum_is_built_again(tmp_path):
    values = np.ones((50, 4), dtype=np.float32)
    entry = _entry(tmp_path, "f", 50)
    fill = _counting(_fill_with(values))
    entry.build(fill)
    record = json.loads(entry.record_path.read_text())
    del record["crc32"]
    entry.record_path.write_text(json.dumps({**record, "format": 1}))
    assert not entry.is_complete()
    entry.build(fill)
    assert fill.calls == 2 and entry.is_complete()


def test_an_entry_is_on_the_disk_before_its_name_is(tmp_path, monkeypatch):
    """Each file of an entry is synced before it is renamed into place, and its folder after: a
    power loss then leaves the entry whole or missing, never renamed with its data lost."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def recorded_replace(source, target):
        events.append(("replace", os.stat(source).st_ino, Path(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    entry = _entry(tmp_path, "s", 100)
    entry.build(_fill_with(np.ones((100, 4), dtype=np.float32)))
    renames = [(i, event) for i, event in enumerate(events) if event[0] == "replace"]
    assert [event[2] for _, event in renames] == [entry.data_path, entry.record_path], "rows first, record last"
    folder = os.stat(tmp_path).st_ino
    for position, (_, inode, target) in renames:
        assert ("fsync", inode) in events[:position], f"{target.name} synced before its rename"
        assert ("fsync", folder) in events[position + 1 :], f"the folder synced after {target.name}'s rename"


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """A tiny run that caches decoded images and frozen features (one trainable block), its model
    fingerprint and its cache folder."""
    from signflow._model_file import load_bundle
    from signflow.config import parse_params
    from signflow.extract import extract_dataset
    from signflow.split import split_dataset
    from signflow.train import train_model

    root = tmp_path_factory.mktemp("cached-run")
    params = parse_params(tiny_params(epochs=2, trainable_blocks=1))
    extract_dataset(build_class_folders(root / "dataset", per_class=8), root / "raw", params.extract)
    split_dataset(root / "raw", root / "split", params.split)
    train_model(params.train, root / "raw", root / "split", root / "model.pt", root / "log.csv", root / "cache")
    kinds = {path.name.split("-")[0] for path in (root / "cache").glob("*.bin")}
    assert kinds == {"images", "features"}, "the run caches both kinds of entry"
    return params, root, load_bundle(root / "model.pt").fingerprint()


@pytest.mark.parametrize("damage", ["empty records", "garbled records", "zero-filled files"])
def test_training_on_a_damaged_cache_rebuilds_it_and_trains_the_same_model(trained_once, tmp_path, damage, caplog):
    from signflow._model_file import load_bundle
    from signflow.train import train_model

    params, root, fingerprint = trained_once
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache)
    clean = {path.name: path.read_bytes() for path in cache.glob("*.bin")}
    for name in clean:
        record, rows = cache / name.replace(".bin", ".json"), cache / name
        if damage == "empty records":
            record.write_bytes(b"")
        elif damage == "garbled records":
            record.write_bytes(record.read_bytes()[:40])
        else:
            rows.write_bytes(bytes(rows.stat().st_size))
    with caplog.at_level("WARNING"):
        train_model(params.train, root / "raw", root / "split", tmp_path / "model.pt", tmp_path / "log.csv", cache)
    assert load_bundle(tmp_path / "model.pt").fingerprint() == fingerprint, "the model a clean cache gives"
    for name, content in clean.items():
        assert (cache / name).read_bytes() == content, f"{name} was rebuilt as it was"
        damaged = cache / (name.replace(".bin", ".json") if "records" in damage else name)
        assert str(damaged) in caplog.text, f"a warning names {damaged.name}"
