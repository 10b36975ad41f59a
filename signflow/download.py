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

import logging
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from signflow._fileio import replace_dir_atomic, sha256_file, staging_dir, write_json_atomic
from signflow._images import is_image_name, is_junk, split_folder_name
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


def _check_member_name(name: str, archive: Path) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise DownloadError(f"{archive}: refusing entry {name!r}: it would be written outside the target folder")
    return path


def _extract_zip(archive: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            for member in members:
                _check_member_name(member.filename, archive)
                if stat.S_ISLNK(member.external_attr >> 16):
                    raise DownloadError(f"{archive}: refusing symbolic link entry {member.filename!r}")
            for member in members:
                bundle.extract(member, dest)
    except (zipfile.BadZipFile, EOFError) as error:
        raise DownloadError(f"{archive}: damaged or truncated zip archive ({error}); download it again") from None


def _extract_tar(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive) as bundle:
            members = bundle.getmembers()
            for member in members:
                _check_member_name(member.name, archive)
                if not (member.isfile() or member.isdir()):
                    raise DownloadError(f"{archive}: refusing {member.name!r}: links and special files are not allowed")
            for member in members:
                member.mode = (member.mode | 0o600) & 0o755
                bundle.extract(member, dest, set_attrs=False)
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise DownloadError(f"{archive}: damaged or truncated tar archive ({error}); download it again") from None


def extract_archive(archive: Path, dest: Path) -> None:
    """Extract a zip or tar archive into `dest`, refusing entries that escape it or are links."""
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, dest)
    elif _is_tar(archive):
        _extract_tar(archive, dest)
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
    for folder in [tree, *sorted(p for p in tree.rglob("*") if p.is_dir())]:
        if is_junk(folder.relative_to(tree)):
            continue
        counts = [_image_count(sub) for sub in folder.iterdir() if sub.is_dir() and not is_junk(sub.name)]
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


def _copy_classes(class_root: Path, dest: Path) -> tuple[dict[str, int], list[str]]:
    counts: dict[str, int] = {}
    skipped: list[str] = []
    for folder in sorted(p for p in class_root.iterdir() if p.is_dir() and not is_junk(p.name)):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not is_junk(p.relative_to(folder)))
        others = [p for p in files if not is_image_name(p)]
        skipped += [f"{p.relative_to(class_root).as_posix()}: not an image file name, left out" for p in others]
        files = [p for p in files if is_image_name(p)]
        if not files:
            skipped.append(f"{folder.name}/: class folder without images, left out")
            continue
        for file in files:
            target = dest / folder.name / file.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
        counts[folder.name] = len(files)
    if len(counts) < 2:
        raise DownloadError(f"{class_root}: {len(counts)} non-empty class folder(s); at least two are needed")
    return counts, skipped


def _copy_dataset(roots: dict[str, Path], dest: Path) -> tuple[dict[str, int], list[str]]:
    """Copy the class folders of each root to `dest/<class>/` or, for split folders, `dest/<split>/<class>/`
    (canonical split names: train, valid, test); image counts per class over all splits, and what was left out."""
    counts: dict[str, int] = {}
    skipped: list[str] = []
    for split, root in sorted(roots.items()):
        split_counts, split_skipped = _copy_classes(root, dest / split if split else dest)
        for name, count in split_counts.items():
            counts[name] = counts.get(name, 0) + count
        skipped += [f"{split}/{line}" if split else line for line in split_skipped]
    return counts, skipped


def _materialise_source(source: Path, cfg: DownloadConfig, scratch: Path) -> tuple[Path, str | None]:
    """Return a local folder tree holding the source's files, and the archive's sha256 (if archive)."""
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
    extract_archive(source, tree)
    return tree, digest


def extract_dataset(source: str | Path, dest: str | Path, cfg: DownloadConfig) -> DatasetInfo:
    """Turn `source` (an archive or a folder) into `dest` as `<class>/<files>`; `dest` changes only if
    every step succeeds."""
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
        counts, skipped = _copy_dataset(roots, staged)
        common = Path(os.path.commonpath(list(roots.values())))
        info = DatasetInfo(
            source=str(source),
            source_sha256=digest,
            class_root=common.relative_to(tree).as_posix(),
            class_names=sorted(counts),
            counts=counts,
            skipped=skipped,
            split_folders={split: root.relative_to(tree).as_posix() for split, root in roots.items() if split},
        )
        write_json_atomic(staged / SOURCE_INFO_NAME, asdict(info))
        replace_dir_atomic(staged, dest)
    log.info("extracted %d files in %d classes from %s", info.num_images, len(info.class_names), source)
    if info.split_folders:
        log.info("kept the source's split folders: %s", info.split_folders)
    for line in skipped:
        log.warning("skipped %s", line)
    return info
