"""Download step, local half: turn the fetched source into the class-folder dataset, safely.

DVC fetches the source that `data.dvc` names into `data/source` (signflow/source.py): an archive
(zip, tar, tar.gz/bz2/xz, recognised by its content since the file has no extension) or a folder of
class folders. This module extracts it safely, finds the class folders, leaves junk out and writes
`dest/<class name>/<image files>`, or `dest/<split>/<class name>/<image files>` (split: train, valid,
test) when the source ships its own split folders, plus `dest/SOURCE.json`; `dest` is replaced in one
step only after everything succeeded, so an interrupted run leaves the previous dataset (or none). It
never touches the network and never modifies the source.
"""

from __future__ import annotations

import errno
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import unicodedata
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from signflow._fileio import replace_dir_atomic, sha256_file, staging_dir, write_json_atomic
from signflow._images import is_image_name, is_junk, split_folder_name
from signflow._redact import redact_url
from signflow.config import DownloadConfig
from signflow.errors import SignflowError

__all__ = [
    "DatasetInfo",
    "DownloadError",
    "extract_archive",
    "extract_dataset",
    "find_class_root",
    "find_class_roots",
]

log = logging.getLogger(__name__)

SOURCE_INFO_NAME = "SOURCE.json"
DATA_FILTER = getattr(tarfile, "data_filter", None)
"""tarfile's own safety filter (Python 3.11.4+, 3.12+), applied on top of the checks here."""


class DownloadError(SignflowError, RuntimeError):
    """The source could not be verified or understood; the message says what to do."""


@dataclass(frozen=True)
class DatasetInfo:
    source: str
    source_sha256: str | None
    class_root: str
    class_names: list[str]
    counts: dict[str, int]
    skipped: list[str] = field(default_factory=list)
    split_folders: dict[str, str] = field(default_factory=dict)
    """Split (train/valid/test) -> the folder in the source that holds it, when the source ships a split."""

    @property
    def num_images(self) -> int:
        return sum(self.counts.values())

    def summary_line(self) -> str:
        return f"{self.num_images} images, {len(self.class_names)} classes"


MIB = 2**20
COPY_CHUNK = MIB
RATIO_MIN_MEMBER_BYTES = MIB
"""The per-member compression-ratio cap applies above this size: a smaller member cannot be a bomb,
and a tiny blank BMP or text file may well compress 300-fold."""
ZIP_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "Deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "LZMA",
}
ZIP_METHOD_NAMES = {9: "Deflate64", 93: "Zstandard", 95: "xz", 96: "JPEG", 97: "WavPack", 98: "PPMd", 99: "AES"}


def _check_member_name(name: str, archive: Path) -> PurePosixPath:
    """The entry's path inside the target, in Unicode NFC (so an `é` written composed and one written
    decomposed name the same class); refuses names that escape the target or are not UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape")
        raise DownloadError(
            f"{archive}: entry {raw!r} has a name that is not UTF-8 text; rename it and pack the archive again"
        ) from None
    path = PurePosixPath(unicodedata.normalize("NFC", name.replace("\\", "/")))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise DownloadError(f"{archive}: refusing entry {name!r}: it would be written outside the target folder")
    return path


def _cap_error(archive: Path, found: str, key: str, cap: int | float) -> DownloadError:
    return DownloadError(
        f"{archive}: {found}, above download.{key} ({cap:,}); nothing was extracted. If you trust this "
        f"source, raise download.{key} in params.yaml"
    )


def _check_declared(archive: Path, sizes: list[tuple[str, int, int | None]], cfg: DownloadConfig) -> None:
    """Refuse, before anything is written, an archive whose entries (name, declared size, compressed
    size or None) exceed the caps: total size, overall compression ratio, one member's ratio."""
    total = sum(size for _, size, _ in sizes)
    if total > cfg.max_extracted_bytes:
        found = f"its entries declare {total:,} bytes"
        raise _cap_error(archive, found, "max_extracted_bytes", cfg.max_extracted_bytes)
    packed_total = max(archive.stat().st_size, 1)
    if total > cfg.max_compression_ratio * packed_total:
        found = f"{total:,} bytes from {packed_total:,} is a compression ratio of {total / packed_total:,.0f}"
        raise _cap_error(archive, found, "max_compression_ratio", cfg.max_compression_ratio)
    for name, size, packed in sizes:
        if packed is not None and size > RATIO_MIN_MEMBER_BYTES and size > cfg.max_compression_ratio * max(packed, 1):
            found = f"entry {name!r} expands {packed:,} bytes to {size:,} (ratio {size / max(packed, 1):,.0f})"
            raise _cap_error(archive, found, "max_compression_ratio", cfg.max_compression_ratio)


def _check_member_count(archive: Path, count: int, cfg: DownloadConfig) -> None:
    if count > cfg.max_members:
        raise _cap_error(archive, f"more than {cfg.max_members:,} entries", "max_members", cfg.max_members)


def _os_error(archive: Path, name: str, error: OSError) -> DownloadError:
    """One clear message for a file-system failure while writing entry `name`."""
    if error.errno == errno.ENOSPC:
        return DownloadError(f"{archive}: no space left on the device while extracting {name!r}; free some space")
    if error.errno == errno.ENAMETOOLONG:
        return DownloadError(f"{archive}: entry {name!r} has a name too long for this file system; rename it")
    if isinstance(error, FileExistsError):
        return DownloadError(f"{archive}: two entries are named {name!r} (after Unicode normalisation); rename one")
    return DownloadError(f"{archive}: cannot extract {name!r} ({error.strerror or error})")


def _copy_counted(source: IO[bytes], out: IO[bytes], declared: int) -> int:
    """Copy, counting bytes, and stop at one byte more than `declared`: headers can lie."""
    written = 0
    while chunk := source.read(min(COPY_CHUNK, declared + 1 - written)):
        written += len(chunk)
        out.write(chunk)
        if written > declared:
            break
    return written


def _write_member(source: IO[bytes], target: Path, declared: int, name: str, archive: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as out:
            written = _copy_counted(source, out, declared)
    except OSError as error:
        raise _os_error(archive, name, error) from None
    if written > declared:
        raise DownloadError(
            f"{archive}: entry {name!r} holds more than the {declared:,} bytes its header declares; the archive "
            "is damaged or crafted to hide its size"
        )


def _make_dir(target: Path, name: str, archive: Path) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _os_error(archive, name, error) from None


def _check_zip_member(member: zipfile.ZipInfo, archive: Path) -> PurePosixPath:
    path = _check_member_name(member.filename, archive)
    if stat.S_ISLNK(member.external_attr >> 16):
        raise DownloadError(f"{archive}: refusing symbolic link entry {member.filename!r}")
    if member.flag_bits & 0x1:
        raise DownloadError(
            f"{archive}: entry {member.filename!r} is encrypted; signflow cannot read password-protected "
            "archives: pack it again without a password"
        )
    if member.compress_type not in ZIP_METHODS:
        method = ZIP_METHOD_NAMES.get(member.compress_type, f"method {member.compress_type}")
        raise DownloadError(
            f"{archive}: entry {member.filename!r} uses {method} compression, which Python's zipfile cannot "
            "read; pack it again with Deflate (the default of zip tools)"
        )
    return path


def _extract_zip(archive: Path, dest: Path, cfg: DownloadConfig) -> None:
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            _check_member_count(archive, len(members), cfg)
            paths = [_check_zip_member(member, archive) for member in members]
            _check_declared(archive, [(m.filename, m.file_size, m.compress_size) for m in members], cfg)
            for member, path in zip(members, paths, strict=True):
                _extract_zip_member(bundle, member, dest / path, archive)
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise DownloadError(f"{archive}: damaged or truncated zip archive ({error}); download it again") from None


def _extract_zip_member(bundle: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, archive: Path) -> None:
    if member.is_dir():
        _make_dir(target, member.filename, archive)
        return
    try:
        with bundle.open(member) as source:
            _write_member(source, target, member.file_size, member.filename, archive)
    except NotImplementedError as error:
        raise DownloadError(f"{archive}: cannot decompress entry {member.filename!r} ({error})") from None
    except zipfile.BadZipFile as error:
        raise DownloadError(
            f"{archive}: entry {member.filename!r} does not match its header ({error}): the archive is damaged, "
            "or crafted to hide its size; download it again"
        ) from None


def _check_tar_member(member: tarfile.TarInfo, archive: Path, dest: Path) -> PurePosixPath:
    path = _check_member_name(member.name, archive)
    if member.issparse():
        raise DownloadError(f"{archive}: refusing sparse entry {member.name!r}: its holes would be written as zeros")
    if not (member.isfile() or member.isdir()):
        raise DownloadError(f"{archive}: refusing {member.name!r}: links and special files are not allowed")
    if DATA_FILTER is not None:
        try:
            DATA_FILTER(member, str(dest))
        except tarfile.FilterError as error:
            raise DownloadError(f"{archive}: refusing {member.name!r} ({error})") from None
    return path


def _tar_members(bundle: tarfile.TarFile, archive: Path, dest: Path, cfg: DownloadConfig) -> list:
    """(member, path) of every entry, checked, reading no further than `download.max_members` entries."""
    members = []
    for member in bundle:
        _check_member_count(archive, len(members) + 1, cfg)
        members.append((member, _check_tar_member(member, archive, dest)))
    return members


def _extract_tar(archive: Path, dest: Path, cfg: DownloadConfig) -> None:
    try:
        with tarfile.open(archive) as bundle:
            members = _tar_members(bundle, archive, dest, cfg)
            _check_declared(archive, [(m.name, m.size, None) for m, _ in members if m.isfile()], cfg)
            for member, path in members:
                if member.isdir():
                    _make_dir(dest / path, member.name, archive)
                    continue
                with bundle.extractfile(member) as source:
                    _write_member(source, dest / path, member.size, member.name, archive)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as error:
        raise DownloadError(f"{archive}: damaged or truncated tar archive ({error}); download it again") from None


def extract_archive(archive: Path, dest: Path, cfg: DownloadConfig) -> None:
    """Extract a zip or tar archive into `dest`, refusing entries that escape it or are links, and
    archives over the download.max_* caps (checked on the declared sizes before anything is written,
    and again on the bytes as they are written)."""
    size = archive.stat().st_size
    if size > cfg.max_source_bytes:
        raise _cap_error(archive, f"the source file is {size:,} bytes", "max_source_bytes", cfg.max_source_bytes)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, dest, cfg)
    elif _is_tar(archive):
        _extract_tar(archive, dest, cfg)
    else:
        raise DownloadError(
            f"{archive}: not a zip or tar archive (or truncated); the source in data.dvc must be an archive "
            "or a folder of class folders (`signflow source set URL_OR_PATH`)"
        )


def _is_tar(archive: Path) -> bool:
    try:
        return tarfile.is_tarfile(archive)
    except (OSError, EOFError):
        return False


def _image_count(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and is_image_name(p) and not is_junk(p))


def _class_root_candidates(tree: Path) -> list[tuple[Path, int, int]]:
    """(folder, image subfolders, images in them) for every folder with at least one image subfolder."""
    candidates: list[tuple[Path, int, int]] = []
    for folder in [tree, *sorted(p for p in tree.rglob("*") if p.is_dir() and not _outside(p, tree))]:
        if is_junk(folder.relative_to(tree)):
            continue
        subs = [sub for sub in folder.iterdir() if sub.is_dir() and not is_junk(sub.name) and not _outside(sub, tree)]
        counts = [_image_count(sub) for sub in subs]
        image_dirs = [c for c in counts if c > 0]
        if image_dirs:
            candidates.append((folder, len(image_dirs), sum(image_dirs)))
    return candidates


def find_class_root(tree: Path) -> Path:
    """Find the folder whose subfolders are the classes: the one folder with ≥ 2 image subfolders.

    The upstream Sign Language Digits archive nests classes under `<repo>-master/Dataset/` next to
    an `Examples/` folder of loose photos; that folder has one image subfolder and is not chosen.
    """
    candidates = _class_root_candidates(tree)
    multi = [c[0] for c in candidates if c[1] >= 2]
    if not multi:
        if candidates:
            only = max(candidates, key=lambda c: c[2])[0]
            raise DownloadError(
                f"found only one class folder under {only.relative_to(tree) or '.'}: a classifier needs at least "
                "two class folders (one folder of images per class)"
            )
        raise DownloadError("no class folders found: expected <class name>/<image files> somewhere in the source")
    if len(multi) > 1:
        names = ", ".join(str(folder.relative_to(tree)) or "." for folder in multi)
        raise DownloadError(
            f"several folders look like class roots ({names}); set download.class_root to the one to use"
        )
    return multi[0]


def _split_of(folder: Path, tree: Path) -> str | None:
    """The split named by `folder` or its nearest ancestor below `tree` (e.g. train/images -> train)."""
    for name in reversed(folder.relative_to(tree).parts):
        if split_folder_name(name):
            return split_folder_name(name)
    return None


def find_class_roots(tree: Path) -> dict[str, Path]:
    """The class folders' root(s): {"": root} for one set of class folders, or {split: root} when the
    source ships split folders (train/, valid/, test/ and their common spellings, at any depth, each
    holding the class folders). Otherwise as `find_class_root`: exactly one root, or an error."""
    candidates = [c[0] for c in _class_root_candidates(tree) if c[1] >= 2]
    splits = {folder: _split_of(folder, tree) for folder in candidates}
    for folder in candidates:
        subfolders = [sub.name for sub in folder.iterdir() if sub.is_dir() and _image_count(sub)]
        if all(split_folder_name(name) for name in subfolders):
            raise DownloadError(
                f"{folder.relative_to(tree) or '.'}: the folders {', '.join(sorted(subfolders))} hold images "
                "directly; expected one folder per class inside each split folder (<split>/<class name>/<images>)"
            )
    if len(candidates) < 2 or None in splits.values():
        return {"": find_class_root(tree)}
    roots: dict[str, Path] = {}
    for folder, split in splits.items():
        if split in roots:
            raise DownloadError(
                f"{roots[split].relative_to(tree)} and {folder.relative_to(tree)} both look like the {split} "
                "split; set download.class_root to the folder holding the split folders to use"
            )
        roots[split] = folder
    return roots


def _roots_in(class_root: Path) -> dict[str, Path]:
    """download.class_root names the folder holding the class folders, or the split folders."""
    folders = [p for p in class_root.iterdir() if p.is_dir() and not is_junk(p.name)]
    if not folders or not all(split_folder_name(p.name) for p in folders):
        return {"": class_root}
    roots: dict[str, Path] = {}
    for folder in sorted(folders):
        split = split_folder_name(folder.name)
        if split in roots:
            raise DownloadError(
                f"{roots[split].name}/ and {folder.name}/ in {class_root.name} both hold the {split} split"
            )
        roots[split] = folder
    return roots


def _outside(path: Path, root: Path) -> bool:
    """Whether `path` leads outside `root` once links are followed: a folder source's links can point
    anywhere on the machine (a link to /etc/passwd must not become training data). A link into a DVC
    cache is DVC's own (`cache.type: symlink` makes every file of data/source one) and stays in."""
    target = path.resolve()
    return not target.is_relative_to(root.resolve()) and not _is_dvc_cache_object(target)


def _is_dvc_cache_object(target: Path) -> bool:
    """`<cache>/files/md5/ab/cdef...`: where DVC 3 keeps a file under its content's md5."""
    parent = target.parent
    return (
        parent.parent.parts[-2:] == ("files", "md5")
        and re.fullmatch("[0-9a-f]{2}", parent.name) is not None
        and re.fullmatch("[0-9a-f]{30}", target.name) is not None
    )


def _class_folders(class_root: Path, source_root: Path, skipped: list[str]) -> dict[str, list[Path]]:
    """Class name (NFC) -> its folders (two when the names differ only in Unicode form). Links leading
    outside the source are left out and listed; two names that differ only in case are refused (they
    would be one folder on macOS and Windows)."""
    folders: dict[str, list[Path]] = {}
    for entry in sorted(class_root.iterdir()):
        if is_junk(entry.name) or not entry.is_dir() and not entry.is_symlink():
            continue
        if _outside(entry, source_root):
            skipped.append(f"{entry.name}: link outside the source, left out")
        elif entry.is_dir():
            folders.setdefault(unicodedata.normalize("NFC", entry.name), []).append(entry)
    by_case: dict[str, str] = {}
    for name in folders:
        if (other := by_case.setdefault(name.casefold(), name)) != name:
            raise DownloadError(
                f"{class_root}: class folders {other!r} and {name!r} differ only in case; rename or merge one"
            )
    return folders


def _class_files(folder: Path, source_root: Path, skipped: list[str]) -> list[Path]:
    """Files under a class folder, junk left out. Links to files inside the source are followed;
    links leading outside it are left out and listed; links to folders are not walked."""
    files = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_junk(d)]
        for entry in (Path(parent) / name for name in [*names, *dirs]):
            if is_junk(entry.relative_to(folder)):
                continue
            if _outside(entry, source_root):
                skipped.append(f"{entry.relative_to(folder.parent).as_posix()}: link outside the source, left out")
            elif entry.is_file():
                files.append(entry)
    return sorted(files)


def _copy_file(file: Path, target: Path, source: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(target))
        shutil.copyfile(file, target)
    except OSError as error:
        raise _os_error(source, file.relative_to(source).as_posix(), error) from None


def _copy_classes(class_root: Path, dest: Path, source_root: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """Copy each class folder's image files to `dest/<class>/` (names in NFC); return the counts and
    what was left out. `source_root` is the whole source: links leading outside it are left out."""
    counts: dict[str, int] = {}
    skipped: list[str] = []
    for name, folders in _class_folders(class_root, source_root or class_root, skipped).items():
        files = [file for folder in folders for file in _class_files(folder, source_root or class_root, skipped)]
        others = [p for p in files if not is_image_name(p)]
        skipped += [f"{p.relative_to(class_root).as_posix()}: not an image file name, left out" for p in others]
        files = [p for p in files if is_image_name(p)]
        if not files:
            skipped.append(f"{name}/: class folder without images, left out")
            continue
        for file in files:
            relative = PurePosixPath(*file.relative_to(class_root).parts[1:]).as_posix()
            _copy_file(file, dest / name / unicodedata.normalize("NFC", relative), class_root)
        counts[name] = counts.get(name, 0) + len(files)
    if len(counts) < 2:
        raise DownloadError(f"{class_root}: {len(counts)} non-empty class folder(s); at least two are needed")
    return counts, skipped


def _copy_dataset(roots: dict[str, Path], dest: Path, tree: Path) -> tuple[dict[str, int], list[str]]:
    """Copy the class folders of each root to `dest/<class>/` or, for split folders, `dest/<split>/<class>/`
    (canonical split names: train, valid, test); image counts per class over all splits, and what was left
    out. Links leading outside `tree` (the whole source) are left out."""
    counts: dict[str, int] = {}
    skipped: list[str] = []
    for split, root in sorted(roots.items()):
        split_counts, split_skipped = _copy_classes(root, dest / split if split else dest, tree)
        for name, count in split_counts.items():
            counts[name] = counts.get(name, 0) + count
        skipped += [f"{split}/{line}" if split else line for line in split_skipped]
    return counts, skipped


def _materialise_source(source: Path, cfg: DownloadConfig, scratch: Path) -> tuple[Path, str | None]:
    """Return a local folder tree holding the source's files, and the archive's sha256 (if archive)."""
    if source.exists() and not (source.is_dir() or source.is_file()):
        raise DownloadError(f"{source}: not a regular file or folder (a FIFO, socket or device); refusing to read it")
    if source.is_dir():
        if cfg.sha256:
            raise DownloadError(
                f"download.sha256 applies to archives; the source {source} is a folder (set sha256: null)"
            )
        return source, None
    if not source.is_file():
        raise DownloadError(
            f"{source} does not exist: `dvc repro` fetches the source data.dvc names (or `dvc pull` gets it from "
            "the DVC remote)"
        )
    digest = sha256_file(source)
    if cfg.sha256 and digest != cfg.sha256:
        raise DownloadError(
            f"{source}: sha256 is {digest}, but download.sha256 expects {cfg.sha256}; the file is corrupt or "
            "changed upstream (set download.sha256 to null to accept any content)"
        )
    tree = scratch / "tree"
    tree.mkdir()
    extract_archive(source, tree, cfg)
    return tree, digest


def _recorded_source(source: Path, project_dir: Path) -> str:
    resolved, project = source.resolve(), project_dir.resolve()
    if resolved.is_relative_to(project):
        return resolved.relative_to(project).as_posix()
    return redact_url(str(source))


def extract_dataset(
    source: str | Path, dest: str | Path, cfg: DownloadConfig, project_dir: str | Path = "."
) -> DatasetInfo:
    """Turn `source` (an archive or a folder) into `dest` as `<class>/<files>`; `dest` changes only if
    every step succeeds. SOURCE.json names `source` relative to `project_dir` when inside it, so
    data/raw's DVC hash does not depend on where the project is cloned."""
    source, dest = Path(source), Path(dest)
    with staging_dir(dest) as scratch:
        tree, digest = _materialise_source(source, cfg, scratch)
        if cfg.class_root:
            if not (tree / cfg.class_root).is_dir():
                raise DownloadError(f"download.class_root: {cfg.class_root!r} is not a folder in the source")
            roots = _roots_in(tree / cfg.class_root)
        else:
            roots = find_class_roots(tree)
        staged = scratch / "dataset"
        counts, skipped = _copy_dataset(roots, staged, tree)
        common = Path(os.path.commonpath(list(roots.values())))
        info = DatasetInfo(
            source=_recorded_source(source, Path(project_dir)),
            source_sha256=digest,
            class_root=common.relative_to(tree).as_posix(),
            class_names=sorted(counts),
            counts=counts,
            skipped=skipped,
            split_folders={split: root.relative_to(tree).as_posix() for split, root in roots.items() if split},
        )
        write_json_atomic(staged / SOURCE_INFO_NAME, asdict(info))
        replace_dir_atomic(staged, dest)
    log.info("extracted %d files in %d classes from %s", info.num_images, len(info.class_names), info.source)
    if info.split_folders:
        log.info("kept the source's split folders: %s", info.split_folders)
    for line in skipped:
        log.warning("skipped %s", line)
    return info
