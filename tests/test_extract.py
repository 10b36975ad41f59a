"""The extract step: the fetched source (an archive or a folder) becomes the class
folders, safely; the fetching itself is DVC's (tests/test_source.py)."""

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from signflow.extract import DatasetInfo, ExtractError, extract_dataset
from signflow.fileio import sha256_file
from tests.helpers import CLASS_COLOURS, PER_CLASS, build_class_folders, build_split_folders, section, zip_folder


def extract(source, dest, **extract_params) -> DatasetInfo:
    return extract_dataset(source, dest, section("extract", **extract_params))


def test_upstream_layout_zip_finds_classes_and_leaves_examples_out(tiny_zip, tmp_path):
    info = extract(tiny_zip, tmp_path / "raw")
    assert info.class_root == "Sign-Language-Digits-Dataset-master/Dataset"
    assert info.class_names == sorted(CLASS_COLOURS)
    assert info.counts == {name: PER_CLASS for name in CLASS_COLOURS}
    raw = tmp_path / "raw"
    assert sorted(p.name for p in raw.iterdir() if p.is_dir()) == sorted(CLASS_COLOURS)
    assert not list(raw.rglob("example_0.JPG"))
    assert json.loads((raw / "SOURCE.json").read_text())["source_sha256"] == sha256_file(tiny_zip)


def test_folder_source_and_archive_without_an_extension(class_folders, tiny_zip, tmp_path):
    assert extract(class_folders, tmp_path / "a").num_images == 3 * PER_CLASS
    fetched = tmp_path / "source"  # DVC's copy has no extension: the archive is recognised by content
    fetched.write_bytes(tiny_zip.read_bytes())
    assert extract(fetched, tmp_path / "b").num_images == 3 * PER_CLASS
    with pytest.raises(ExtractError, match="sha256 applies to archives"):
        extract(class_folders, tmp_path / "c", sha256="0" * 64)


def test_tar_gz_source(class_folders, tmp_path):
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        bundle.add(class_folders, arcname="mydata")
    assert extract(archive, tmp_path / "raw").class_root == "mydata"


def test_checksum_mismatch_keeps_the_previous_dataset(tiny_zip, tmp_path):
    raw = tmp_path / "raw"
    extract(tiny_zip, raw)
    before = sorted(p.relative_to(raw) for p in raw.rglob("*"))
    with pytest.raises(ExtractError, match="sha256 is .* but extract.sha256 expects"):
        extract(tiny_zip, raw, sha256="0" * 64)
    assert sorted(p.relative_to(raw) for p in raw.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raw")], "no staging folder left behind"
    extract(tiny_zip, raw, sha256=sha256_file(tiny_zip))


def test_zip_entry_escaping_the_target_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("data/a/x.jpg", b"1")
        bundle.writestr("../../escaped.jpg", b"1")
    with pytest.raises(ExtractError, match="outside the target"):
        extract(archive, tmp_path / "raw")
    assert not (tmp_path / "escaped.jpg").exists() and not (tmp_path / "raw").exists()


def _file(name: str) -> tuple[tarfile.TarInfo, io.BytesIO]:
    member = tarfile.TarInfo(name)
    member.size = 1
    return member, io.BytesIO(b"1")


def _link(name: str, kind: bytes, target: str) -> tuple[tarfile.TarInfo, None]:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, target
    return member, None


def _tar(archive, *entries: tuple[tarfile.TarInfo, io.BytesIO | None]):
    """A tar archive of `entries` ((member, data) pairs from _file/_link)."""
    with tarfile.open(archive, "w") as bundle:
        for member, data in entries:
            bundle.addfile(member, data)
    return archive


def test_absolute_and_link_entries_in_tar_are_refused(tmp_path):
    archive = _tar(tmp_path / "evil.tar", _link("data/a/link.jpg", tarfile.SYMTYPE, "/etc/passwd"))
    with pytest.raises(ExtractError, match="links and special files"):
        extract(archive, tmp_path / "raw")
    with pytest.raises(ExtractError, match="outside the target"):
        extract(_tar(tmp_path / "abs.tar", _file("/tmp/abs.jpg")), tmp_path / "raw")


def test_not_an_archive_and_truncated_archive(tiny_zip, tmp_path):
    text = tmp_path / "notes.zip"
    text.write_text("hello")
    with pytest.raises(ExtractError, match="not a zip or tar archive"):
        extract(text, tmp_path / "raw")
    truncated = tmp_path / "cut.zip"
    truncated.write_bytes(tiny_zip.read_bytes()[: tiny_zip.stat().st_size // 2])
    with pytest.raises(ExtractError):
        extract(truncated, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_missing_source_and_single_class(tmp_path, class_folders):
    with pytest.raises(ExtractError, match="does not exist: `dvc repro` fetches"):
        extract(tmp_path / "nope.zip", tmp_path / "raw")
    single = tmp_path / "single"
    single.mkdir()
    (class_folders / "alpha").rename(single / "alpha")
    with pytest.raises(ExtractError, match="only one class folder"):
        extract(single, tmp_path / "raw")


def test_ambiguous_class_roots_ask_for_class_root(class_folders, tmp_path):
    archive = tmp_path / "two.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for part in ("photos", "more"):
            for file in class_folders.rglob("*.JPG"):
                bundle.write(file, f"{part}/{file.relative_to(class_folders).as_posix()}")
    with pytest.raises(ExtractError, match="set extract.class_root"):
        extract(archive, tmp_path / "raw")
    assert extract(archive, tmp_path / "raw", class_root="photos").num_images == 3 * PER_CLASS


@pytest.mark.parametrize(
    "names",
    [
        {"train": "train", "valid": "valid", "test": "test"},
        {"train": "Training", "valid": "Validation", "test": "Testing"},
        {"train": "TRAIN", "valid": "val", "test": "eval"},
        {"train": "train", "valid": "dev", "test": "test"},
        {"train": "training", "test": "testing"},
    ],
)
def test_split_folders_are_kept_under_their_split_names(tmp_path, names):
    """Split folders in any common spelling, nested under a top folder next to junk, land in
    raw/<split>/<class>/ with canonical split names; SOURCE.json says where each came from."""
    source = build_split_folders(tmp_path / "src", names, per_class=4)
    archive = zip_folder(source, tmp_path / "data.zip", prefix="MyData-v2/images")
    info = extract(archive, tmp_path / "raw")
    assert info.split_folders == {split: f"MyData-v2/images/{folder}" for split, folder in names.items()}
    assert info.class_root == "MyData-v2/images"
    assert info.counts == {name: 4 * len(names) for name in CLASS_COLOURS}
    raw = tmp_path / "raw"
    assert sorted(p.name for p in raw.iterdir() if p.is_dir()) == sorted(names)
    for split in names:
        assert sorted(p.name for p in (raw / split).iterdir()) == sorted(CLASS_COLOURS)
    assert not list(raw.rglob(".DS_Store")) and not list(raw.rglob("README.md"))
    assert json.loads((raw / "SOURCE.json").read_text())["split_folders"] == info.split_folders


def test_class_root_may_name_the_folder_holding_the_split_folders(tmp_path):
    source = build_split_folders(tmp_path / "src" / "kept", {"train": "train", "test": "test"}, per_class=3)
    build_class_folders(tmp_path / "src" / "other", per_class=3)
    with pytest.raises(ExtractError, match="set extract.class_root"):
        extract(tmp_path / "src", tmp_path / "raw")
    info = extract(tmp_path / "src", tmp_path / "raw", class_root="kept")
    assert info.split_folders == {"train": "kept/train", "test": "kept/test"}
    assert source.is_dir() and (tmp_path / "raw" / "test" / "alpha").is_dir()


def test_split_folders_of_loose_images_are_refused_with_the_layout_expected(tmp_path, class_folders):
    loose = tmp_path / "loose" / "Dataset"
    loose.mkdir(parents=True)
    (class_folders / "alpha").rename(loose / "train")
    (class_folders / "beta").rename(loose / "test")
    with pytest.raises(ExtractError, match=r"<split>/<class name>/<images>"):
        extract(loose, tmp_path / "raw")


def test_junk_files_are_not_copied(class_folders, tmp_path):
    (class_folders / "alpha" / ".DS_Store").write_text("junk")
    (class_folders / "alpha" / "Thumbs.db").write_text("junk")
    info = extract(class_folders, tmp_path / "raw")
    assert info.counts["alpha"] == PER_CLASS
    assert not Path(tmp_path / "raw" / "alpha" / ".DS_Store").exists()


def test_hard_links_in_tar_and_symbolic_links_in_zip_are_refused(tmp_path):
    archive = _tar(tmp_path / "hard.tar", _file("data/a/x.jpg"), _link("data/b/y.jpg", tarfile.LNKTYPE, "data/a/x.jpg"))
    with pytest.raises(ExtractError, match="links and special files"):
        extract(archive, tmp_path / "raw")
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        info = zipfile.ZipInfo("data/a/link.jpg")
        info.external_attr = 0o120777 << 16  # a symbolic link entry
        bundle.writestr(info, "/etc/passwd")
    with pytest.raises(ExtractError, match="symbolic link"):
        extract(archive, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
