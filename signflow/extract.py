"""Extract step: turn the fetched source into the class-folder dataset, safely.

DVC fetches the source that `data.dvc` names into `data/source` (signflow/source.py): an archive
(zip, tar, tar.gz/bz2/xz, recognised by its content since the file has no extension) or a folder of
class folders. This module has the archive extracted safely (signflow/_archive.py), finds the class
folders, leaves junk out and writes `dest/<class name>/<image files>`, or
`dest/<split>/<class name>/<image files>` (split: train, valid, test) when the source ships its own
split folders, plus `dest/SOURCE.json`; `dest` is replaced in one step only after everything
succeeded, so an interrupted run leaves the previous dataset (or none). It never touches the network
and never modifies the source.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import unicodedata
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath

from signflow._archive import NO_DEADLINE, Deadline, extract_archive, write_error
from signflow._images import is_image_name, is_junk, split_folder_name
from signflow._redact import redact_url
from signflow.config import ExtractConfig
from signflow.errors import ExtractError
from signflow.fileio import replace_dir_atomic, sha256_file, staging_dir, write_json_atomic

__all__ = [
    "Deadline",
    "DatasetInfo",
    "ExtractError",
    "extract_dataset",
    "find_class_root",
    "find_class_roots",
]

log = logging.getLogger(__name__)

SOURCE_INFO_NAME = "SOURCE.json"


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


def _image_count(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and is_image_name(p) and not is_junk(p))


def _class_root_candidates(tree: Path) -> list[tuple[Path, int, int]]:
    """(folder, image subfolders, images in them) for every folder with at least one image subfolder."""
    candidates: list[tuple[Path, int, int]] = []
    bounds = _SourceBounds(tree)  # DVC's cache holds files, never folders: no cache lookup needed here
    for folder in [tree, *sorted(p for p in tree.rglob("*") if p.is_dir() and not bounds.outside(p))]:
        if is_junk(folder.relative_to(tree)):
            continue
        subs = [sub for sub in folder.iterdir() if sub.is_dir() and not is_junk(sub.name) and not bounds.outside(sub)]
        counts = [_image_count(sub) for sub in subs]
        image_dirs = [c for c in counts if c > 0]
        if image_dirs:
            candidates.append((folder, len(image_dirs), sum(image_dirs)))
    return candidates


def find_class_root(tree: Path, candidates: list[tuple[Path, int, int]] | None = None) -> Path:
    """Find the folder whose subfolders are the classes: the one folder with ≥ 2 image subfolders
    (among `candidates`, `_class_root_candidates(tree)` when not given).

    The upstream Sign Language Digits archive nests classes under `<repo>-master/Dataset/` next to
    an `Examples/` folder of loose photos; that folder has one image subfolder and is not chosen.
    """
    candidates = _class_root_candidates(tree) if candidates is None else candidates
    multi = [c[0] for c in candidates if c[1] >= 2]
    if not multi:
        if candidates:
            only = max(candidates, key=lambda c: c[2])[0]
            raise ExtractError(
                f"found only one class folder under {only.relative_to(tree) or '.'}: a classifier needs at least "
                "two class folders (one folder of images per class)"
            )
        raise ExtractError("no class folders found: expected <class name>/<image files> somewhere in the source")
    if len(multi) > 1:
        names = ", ".join(str(folder.relative_to(tree)) or "." for folder in multi)
        raise ExtractError(f"several folders look like class roots ({names}); set extract.class_root to the one to use")
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
    found = _class_root_candidates(tree)
    candidates = [c[0] for c in found if c[1] >= 2]
    splits = {folder: _split_of(folder, tree) for folder in candidates}
    for folder in candidates:
        subfolders = [sub.name for sub in folder.iterdir() if sub.is_dir() and _image_count(sub)]
        if all(split_folder_name(name) for name in subfolders):
            raise ExtractError(
                f"{folder.relative_to(tree) or '.'}: the folders {', '.join(sorted(subfolders))} hold images "
                "directly; expected one folder per class inside each split folder (<split>/<class name>/<images>)"
            )
    if len(candidates) < 2 or None in splits.values():
        return {"": find_class_root(tree, found)}
    roots: dict[str, Path] = {}
    for folder, split in splits.items():
        if split in roots:
            raise ExtractError(
                f"{roots[split].relative_to(tree)} and {folder.relative_to(tree)} both look like the {split} "
                "split; set extract.class_root to the folder holding the split folders to use"
            )
        roots[split] = folder
    return roots


def _roots_in(class_root: Path) -> dict[str, Path]:
    """extract.class_root names the folder holding the class folders, or the split folders."""
    folders = [p for p in class_root.iterdir() if p.is_dir() and not is_junk(p.name)]
    if not folders or not all(split_folder_name(p.name) for p in folders):
        return {"": class_root}
    roots: dict[str, Path] = {}
    for folder in sorted(folders):
        split = split_folder_name(folder.name)
        if split in roots:
            raise ExtractError(
                f"{roots[split].name}/ and {folder.name}/ in {class_root.name} both hold the {split} split"
            )
        roots[split] = folder
    return roots


class _SourceBounds:
    """Where a folder source's links may lead once followed: inside the source, or to a file object
    in this project's DVC cache (`cache.type: symlink` makes every file of data/source such a link).
    Anything else is left out: a link to /etc/passwd, or into another project's cache, must not
    become training data."""

    def __init__(self, root: Path, project_dir: Path | None = None, deadline: Deadline = NO_DEADLINE):
        self.root, self.project_dir, self.deadline = root.resolve(), project_dir, deadline

    def outside(self, path: Path) -> bool:
        target = path.resolve()
        if target.is_relative_to(self.root):
            return False
        if not _is_dvc_cache_object(target) or self.cache_dir is None:
            return True
        return target.parents[3] != self.cache_dir  # <cache>/files/md5/ab/<30 hex>

    @cached_property
    def cache_dir(self) -> Path | None:
        """Looked up once, and only when a link shaped like a cache object is met."""
        return None if self.project_dir is None else _dvc_cache_dir(self.project_dir)


def _dvc_cache_dir(project_dir: Path) -> Path | None:
    """The DVC cache of the project at `project_dir` (None if it is not a DVC project), as `dvc cache
    dir` gives it: `[cache] dir` of its .dvc/config, config.local or the user's or system's config,
    else `.dvc/cache`. Read with DVC's own config loader (about 0.15 s with its import; opening a
    `dvc.repo.Repo` costs twice that and writes DVC's state files)."""
    dvc_dir = Path(project_dir) / ".dvc"
    if not dvc_dir.is_dir():
        return None
    from dvc.config import Config, ConfigError

    try:
        config = Config(dvc_dir=str(dvc_dir))
    except ConfigError as error:
        raise ExtractError(
            f"{dvc_dir}: {error}. The extract step reads DVC's config to find this project's cache (the only "
            "place outside the source that data/source's links may lead to); fix the config"
        ) from None
    cache = config["cache"]
    if cache.get("local"):  # `cache.local`: the name of a local remote used as the cache
        return Path(config["remote"][cache["local"]]["url"]).resolve()
    return Path(cache.get("dir") or dvc_dir / "cache").resolve()


def _is_dvc_cache_object(target: Path) -> bool:
    """`<cache>/files/md5/ab/cdef...`: where DVC 3 keeps a file under its content's md5."""
    parent = target.parent
    return (
        parent.parent.parts[-2:] == ("files", "md5")
        and re.fullmatch("[0-9a-f]{2}", parent.name) is not None
        and re.fullmatch("[0-9a-f]{30}", target.name) is not None
    )


def _class_folders(class_root: Path, bounds: _SourceBounds, skipped: list[str]) -> dict[str, list[Path]]:
    """Class name (NFC) -> its folders (two when the names differ only in Unicode form). Links leading
    outside the source are left out and listed; two names that differ only in case are refused (they
    would be one folder on macOS and Windows)."""
    folders: dict[str, list[Path]] = {}
    for entry in sorted(class_root.iterdir()):
        if is_junk(entry.name) or not entry.is_dir() and not entry.is_symlink():
            continue
        if bounds.outside(entry):
            skipped.append(f"{entry.name}: link outside the source, left out")
        elif entry.is_dir():
            folders.setdefault(unicodedata.normalize("NFC", entry.name), []).append(entry)
    by_case: dict[str, str] = {}
    for name in folders:
        if (other := by_case.setdefault(name.casefold(), name)) != name:
            raise ExtractError(
                f"{class_root}: class folders {other!r} and {name!r} differ only in case; rename or merge one"
            )
    return folders


def _class_files(folder: Path, bounds: _SourceBounds, skipped: list[str]) -> list[Path]:
    """Files under a class folder, junk left out. Links to files inside the source are followed;
    links leading outside it are left out and listed; links to folders are not walked."""
    files = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_junk(d)]
        for entry in (Path(parent) / name for name in [*names, *dirs]):
            if is_junk(entry.relative_to(folder)):
                continue
            if bounds.outside(entry):
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
        raise write_error(source, file.relative_to(source).as_posix(), error) from None


def _copy_classes(class_root: Path, dest: Path, bounds: _SourceBounds) -> tuple[dict[str, int], list[str]]:
    """Copy each class folder's image files to `dest/<class>/` (names in NFC); return the counts and
    what was left out. Links leading out of `bounds` are left out."""
    counts: dict[str, int] = {}
    skipped: list[str] = []
    for name, folders in _class_folders(class_root, bounds, skipped).items():
        files = [file for folder in folders for file in _class_files(folder, bounds, skipped)]
        others = [p for p in files if not is_image_name(p)]
        skipped += [f"{p.relative_to(class_root).as_posix()}: not an image file name, left out" for p in others]
        files = [p for p in files if is_image_name(p)]
        if not files:
            skipped.append(f"{name}/: class folder without images, left out")
            continue
        for file in files:
            bounds.deadline.check()
            relative = PurePosixPath(*file.relative_to(class_root).parts[1:]).as_posix()
            _copy_file(file, dest / name / unicodedata.normalize("NFC", relative), class_root)
        counts[name] = counts.get(name, 0) + len(files)
    if len(counts) < 2:
        raise ExtractError(f"{class_root}: {len(counts)} non-empty class folder(s); at least two are needed")
    return counts, skipped


def _copy_dataset(roots: dict[str, Path], dest: Path, bounds: _SourceBounds) -> tuple[dict[str, int], list[str]]:
    """Copy the class folders of each root to `dest/<class>/` or, for split folders, `dest/<split>/<class>/`
    (canonical split names: train, valid, test); image counts per class over all splits, and what was left
    out. Links leading out of `bounds` (the whole source, the project's DVC cache) are left out."""
    counts: dict[str, int] = {}
    skipped: list[str] = []
    for split, root in sorted(roots.items()):
        split_counts, split_skipped = _copy_classes(root, dest / split if split else dest, bounds)
        for name, count in split_counts.items():
            counts[name] = counts.get(name, 0) + count
        skipped += [f"{split}/{line}" if split else line for line in split_skipped]
    return counts, skipped


def _materialise_source(source: Path, cfg: ExtractConfig, scratch: Path, deadline: Deadline) -> tuple[Path, str | None]:
    """Return a local folder tree holding the source's files, and the archive's sha256 (if archive)."""
    if source.exists() and not (source.is_dir() or source.is_file()):
        raise ExtractError(f"{source}: not a regular file or folder (a FIFO, socket or device); refusing to read it")
    if source.is_dir():
        if cfg.sha256:
            raise ExtractError(
                f"extract.sha256 applies to archives; the source {source} is a folder (set sha256: null)"
            )
        return source, None
    if not source.is_file():
        raise ExtractError(
            f"{source} does not exist: `dvc repro` fetches the source data.dvc names (or `dvc pull` gets it from "
            "the DVC remote)"
        )
    digest = sha256_file(source)
    if cfg.sha256 and digest != cfg.sha256:
        raise ExtractError(
            f"{source}: sha256 is {digest}, but extract.sha256 expects {cfg.sha256}; the file is corrupt or "
            "changed upstream (set extract.sha256 to null to accept any content)"
        )
    tree = scratch / "tree"
    tree.mkdir()
    extract_archive(source, tree, cfg, deadline)
    return tree, digest


def _recorded_source(source: Path, project_dir: Path) -> str:
    resolved, project = source.resolve(), project_dir.resolve()
    if resolved.is_relative_to(project):
        return resolved.relative_to(project).as_posix()
    return redact_url(str(source))


def extract_dataset(
    source: str | Path,
    dest: str | Path,
    cfg: ExtractConfig,
    project_dir: str | Path = ".",
    deadline: Deadline = NO_DEADLINE,
) -> DatasetInfo:
    """Turn `source` (an archive or a folder) into `dest` as `<class>/<files>`; `dest` changes only if
    every step succeeds, before `deadline` (a flow run's `extract.timeout_s`). SOURCE.json names
    `source` relative to `project_dir` when inside it, so data/raw's DVC hash does not depend on where
    the project is cloned."""
    source, dest = Path(source), Path(dest)
    with staging_dir(dest) as scratch:
        tree, digest = _materialise_source(source, cfg, scratch, deadline)
        if cfg.class_root:
            if not (tree / cfg.class_root).is_dir():
                raise ExtractError(f"extract.class_root: {cfg.class_root!r} is not a folder in the source")
            roots = _roots_in(tree / cfg.class_root)
        else:
            roots = find_class_roots(tree)
        staged = scratch / "dataset"
        counts, skipped = _copy_dataset(roots, staged, _SourceBounds(tree, Path(project_dir), deadline))
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
