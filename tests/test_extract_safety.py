"""The extract step against hostile or odd archives: size caps, bombs, lying headers, sparse and
encrypted entries, unsupported compression, file-system failures, odd names (issue 17)."""

import errno
import io
import os
import shutil
import struct
import subprocess
import tarfile
import unicodedata
import zipfile

import pytest

import signflow.extract as extract_module
from signflow import _archive
from signflow.extract import DatasetInfo, ExtractError, extract_dataset
from tests.helpers import CLASS_COLOURS, PER_CLASS, section, venv_path


def extract(source, dest, **extract_params) -> DatasetInfo:
    return extract_dataset(source, dest, section("extract", **extract_params))


def _zip(archive, entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(archive, "w", compression) as bundle:
        for name, data in entries.items():
            bundle.writestr(name, data)
    return archive


def _images(*names: str) -> dict[str, bytes]:
    """Entries whose names look like images (extraction does not decode them)."""
    return {name: os.urandom(64) for name in names}


TWO_CLASSES = ("data/a/1.jpg", "data/b/2.jpg")


def _patch_central_directory(archive, member_index: int, offset: int, fmt: str, value: int) -> None:
    """Overwrite one field of a member's central directory record (what zipfile reads)."""
    data = bytearray(archive.read_bytes())
    record = -1
    for _ in range(member_index + 1):
        record = data.index(b"PK\x01\x02", record + 1)
    struct.pack_into(fmt, data, record + offset, value)
    archive.write_bytes(bytes(data))


def test_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    archive = _zip(tmp_path / "bomb.zip", {**_images(*TWO_CLASSES), "data/a/zeros.jpg": bytes(8 * 2**20)})
    assert archive.stat().st_size < 100_000
    with pytest.raises(ExtractError, match=r"compression ratio of .*extract\.max_compression_ratio \(100"):
        extract(archive, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    padded = {**_images(*TWO_CLASSES), "data/a/zeros.jpg": bytes(8 * 2**20), "data/b/pad.jpg": os.urandom(200_000)}
    archive = _zip(tmp_path / "padded.zip", padded)  # overall ratio ~40: only the one entry gives it away
    with pytest.raises(ExtractError, match=r"'data/a/zeros.jpg' expands .*raise extract\.max_compression_ratio"):
        extract(archive, tmp_path / "raw")


def test_extracted_size_member_count_and_source_size_caps(tmp_path):
    archive = _zip(tmp_path / "big.zip", _images(*TWO_CLASSES, "data/a/3.jpg"), zipfile.ZIP_STORED)
    with pytest.raises(ExtractError, match=r"declare 192 bytes, above extract\.max_extracted_bytes \(100\)"):
        extract(archive, tmp_path / "raw", max_extracted_bytes=100)
    with pytest.raises(ExtractError, match=r"more than 2 entries, above extract\.max_members \(2\)"):
        extract(archive, tmp_path / "raw", max_members=2)
    tar = tmp_path / "big.tar"
    with tarfile.open(tar, "w") as bundle:
        for name in (*TWO_CLASSES, "data/a/3.jpg"):
            bundle.add(archive, name)
    with pytest.raises(ExtractError, match=r"extract\.max_members \(2\)"):
        extract(tar, tmp_path / "raw", max_members=2)
    with pytest.raises(ExtractError, match=r"source file is .* bytes, above extract\.max_source_bytes \(100\)"):
        extract(archive, tmp_path / "raw", max_source_bytes=100)
    assert not (tmp_path / "raw").exists()
    assert extract(archive, tmp_path / "raw", max_extracted_bytes=192, max_members=3).num_images == 3


def test_sparse_tar_entry_is_refused(tmp_path):
    member = tarfile.TarInfo("data/a/x.jpg")
    member.type, member.size = tarfile.GNUTYPE_SPARSE, 1
    archive = tmp_path / "sparse.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as bundle:
        for name in TWO_CLASSES:
            info = tarfile.TarInfo(name)
            info.size = 1
            bundle.addfile(info, io.BytesIO(b"1"))
        bundle.addfile(member, io.BytesIO(b"1"))
    with pytest.raises(ExtractError, match="refusing sparse entry 'data/a/x.jpg'"):
        extract(archive, tmp_path / "raw")


def test_zip_entry_larger_than_its_header_says_is_stopped(tmp_path):
    archive = _zip(tmp_path / "liar.zip", {**_images(*TWO_CLASSES), "data/a/big.jpg": os.urandom(50_000)})
    _patch_central_directory(archive, 2, 24, "<I", 1000)  # uncompressed size: 1,000 bytes
    with pytest.raises(ExtractError, match="'data/a/big.jpg' does not match its header"):
        extract(archive, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_written_bytes_are_counted_against_the_declared_size(tmp_path):
    with pytest.raises(ExtractError, match="'x.jpg' holds more than the 10 bytes its header declares"):
        _archive._write_member(io.BytesIO(bytes(100)), tmp_path / "x.jpg", 10, "x.jpg", tmp_path / "a.tar")
    assert (tmp_path / "x.jpg").stat().st_size == 11, "the copy stops one byte past the declared size"


def test_encrypted_and_unsupported_zip_entries_give_one_clear_error(tmp_path):
    archive = _zip(tmp_path / "secret.zip", _images(*TWO_CLASSES))
    _patch_central_directory(archive, 1, 8, "<H", 0x1)  # general purpose flag: encrypted
    with pytest.raises(ExtractError, match="'data/b/2.jpg' is encrypted"):
        extract(archive, tmp_path / "raw")
    archive = _zip(tmp_path / "deflate64.zip", _images(*TWO_CLASSES))
    _patch_central_directory(archive, 0, 10, "<H", 9)  # compression method 9: Deflate64
    with pytest.raises(ExtractError, match="'data/a/1.jpg' uses Deflate64 compression"):
        extract(archive, tmp_path / "raw")


def test_a_decompressor_zipfile_lacks_gives_one_clear_error(tmp_path, monkeypatch):
    archive = _zip(tmp_path / "lzma.zip", _images(*TWO_CLASSES))

    def unsupported(*args, **kwargs):
        raise NotImplementedError("That compression method is not supported")

    monkeypatch.setattr(zipfile.ZipFile, "open", unsupported)
    with pytest.raises(ExtractError, match="cannot decompress entry 'data/a/1.jpg'"):
        extract(archive, tmp_path / "raw")


def test_disk_full_and_too_long_names_give_one_clear_error(tmp_path, monkeypatch):
    long_name = "data/a/" + "x" * 300 + ".jpg"
    archive = _zip(tmp_path / "long.zip", _images(*TWO_CLASSES, long_name))
    with pytest.raises(ExtractError, match=f"entry '{long_name}' has a name too long for this file system"):
        extract(archive, tmp_path / "raw")
    archive = _zip(tmp_path / "ok.zip", _images(*TWO_CLASSES))

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_archive, "_copy_counted", disk_full)
    with pytest.raises(ExtractError, match="no space left on the device while extracting 'data/a/1.jpg'"):
        extract(archive, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_tar_names_that_are_not_utf8_are_refused(tmp_path):
    archive = tmp_path / "latin1.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as bundle:
        for name in (*TWO_CLASSES, "data/a/café.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 1
            bundle.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(ExtractError, match=r"entry b'data/a/caf\\xe9.jpg' has a name that is not UTF-8"):
        extract(archive, tmp_path / "raw")


@pytest.mark.skipif(
    not hasattr(tarfile, "data_filter"), reason="tarfile.data_filter is Python 3.11.4+ (signflow's own checks apply)"
)
def test_tarfile_data_filter_is_applied(tmp_path, monkeypatch):
    assert _archive.DATA_FILTER is tarfile.data_filter

    def refuse(member, dest):
        raise tarfile.AbsoluteLinkError(member)

    monkeypatch.setattr(_archive, "DATA_FILTER", refuse)
    archive = tmp_path / "plain.tar"
    with tarfile.open(archive, "w") as bundle:
        for name in TWO_CLASSES:
            info = tarfile.TarInfo(name)
            info.size = 1
            bundle.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(ExtractError, match="refusing 'data/a/1.jpg'"):
        extract(archive, tmp_path / "raw")


def test_names_are_nfc_and_case_collisions_are_refused(tmp_path):
    composed, decomposed = unicodedata.normalize("NFC", "é"), unicodedata.normalize("NFD", "é")
    names = (f"data/{composed}/1.jpg", f"data/{decomposed}/2.jpg", "data/b/3.jpg")
    archive = _zip(tmp_path / "accents.zip", _images(*names))
    info = extract(archive, tmp_path / "raw")
    assert info.class_names == ["b", composed] and info.counts[composed] == 2
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["SOURCE.json", "b", composed]
    archive = _zip(tmp_path / "case.zip", _images("data/A/1.jpg", "data/a/2.jpg", "data/b/3.jpg"))
    with pytest.raises(ExtractError, match="class folders 'A' and 'a' differ only in case"):
        extract(archive, tmp_path / "raw2")


def test_folder_source_links_outside_it_are_left_out_and_listed(class_folders, tmp_path):
    outside = tmp_path / "outside"
    (outside / "secret").mkdir(parents=True)
    (outside / "passwd.png").write_text("root:x:0:0")
    (outside / "secret" / "x.png").write_text("private")
    (class_folders / "alpha" / "passwd.png").symlink_to(outside / "passwd.png")
    (class_folders / "stolen").symlink_to(outside / "secret")
    (class_folders / "beta" / "nested").symlink_to(outside / "secret")
    inside = sorted((class_folders / "beta").iterdir())[0]
    (class_folders / "alpha" / "inside.jpg").symlink_to(inside)
    info = extract(class_folders, tmp_path / "raw")
    assert info.class_names == sorted(CLASS_COLOURS)
    assert {line for line in info.skipped if "link outside" in line} == {
        "alpha/passwd.png: link outside the source, left out",
        "stolen: link outside the source, left out",
        "beta/nested: link outside the source, left out",
    }
    raw = tmp_path / "raw"
    assert not (raw / "alpha" / "passwd.png").exists() and not (raw / "stolen").exists()
    assert (raw / "alpha" / "inside.jpg").read_bytes() == inside.read_bytes(), "a link inside the source is followed"
    assert not any(p.is_symlink() for p in raw.rglob("*"))


def test_folder_source_names_are_nfc_and_case_collisions_are_refused(tmp_path):
    source = tmp_path / "source"
    composed, decomposed = unicodedata.normalize("NFC", "é"), unicodedata.normalize("NFD", "é")
    for name in (f"{composed}/1.jpg", f"{decomposed}/2.jpg", f"b/{decomposed}3.jpg"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(b"1")
    info = extract(source, tmp_path / "raw")
    assert info.counts == {composed: 2, "b": 1}
    assert (tmp_path / "raw" / "b" / f"{composed}3.jpg").is_file()
    (source / "B").mkdir()
    (source / "B" / "4.jpg").write_bytes(b"1")
    with pytest.raises(ExtractError, match="class folders 'B' and 'b' differ only in case"):
        extract(source, tmp_path / "raw")


def test_disk_full_while_copying_a_folder_source(class_folders, tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(extract_module.shutil, "copyfile", disk_full)
    with pytest.raises(ExtractError, match="no space left on the device while extracting 'alpha/"):
        extract(class_folders, tmp_path / "raw")


def _dvc_project(folder, *commands: list[str]):
    """A DVC project (no git) at `folder`, then each of `commands` run in it by `dvc`."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": venv_path()}
    for command in (["init", "--no-scm", "-q"], *commands):
        subprocess.run(["dvc", *command], cwd=folder, env=env, check=True, capture_output=True)
    return folder


def test_links_into_the_projects_dvc_cache_are_dvc_s_own_and_are_followed(class_folders, tmp_path):
    """With `cache.type: symlink`, every file DVC puts in data/source links into the project's cache,
    wherever `dvc cache dir` put it (here in config.local, outside the project)."""
    cache = tmp_path / "team-cache"
    project = _dvc_project(
        tmp_path / "project", ["config", "cache.type", "symlink"], ["cache", "dir", "--local", str(cache)]
    )
    shutil.copytree(class_folders, project / "data" / "source")
    subprocess.run(
        ["dvc", "add", "-q", "data/source"], cwd=project, env={**os.environ, "PATH": venv_path()}, check=True
    )
    links = [p for p in (project / "data" / "source").rglob("*") if p.is_symlink()]
    assert links and all(p.resolve().is_relative_to(cache.resolve()) for p in links), "a symlink checkout"
    info = extract_dataset(project / "data" / "source", tmp_path / "raw", section("extract"), project)
    assert info.counts == dict.fromkeys(CLASS_COLOURS, PER_CLASS) and not info.skipped


def test_links_shaped_like_dvc_cache_objects_outside_the_projects_cache_are_left_out(class_folders, tmp_path):
    """Only this project's cache is DVC's own: a path `.../files/md5/ab/<30 hex>` anywhere else, in
    another project's cache or in no cache at all, is outside like any other."""
    project = _dvc_project(tmp_path / "project")
    theirs = tmp_path / "someone-else" / ".dvc" / "cache" / "files" / "md5" / "ab" / ("c" * 30)
    bare = tmp_path / "tmp" / "files" / "md5" / "00" / ("0" * 30)
    for target, link in ((theirs, "alpha/theirs.jpg"), (bare, "beta/any.jpg")):
        target.parent.mkdir(parents=True)
        target.write_bytes(b"PRIVATE DATA FROM ELSEWHERE")
        (class_folders / link).symlink_to(target)
    info = extract_dataset(class_folders, tmp_path / "raw", section("extract"), project)
    assert sorted(info.skipped) == [
        "alpha/theirs.jpg: link outside the source, left out",
        "beta/any.jpg: link outside the source, left out",
    ]
    assert not (tmp_path / "raw" / "alpha" / "theirs.jpg").exists()
    assert not (tmp_path / "raw" / "beta" / "any.jpg").exists()
    assert info.counts == dict.fromkeys(CLASS_COLOURS, PER_CLASS)
