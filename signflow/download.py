"""Download step, local half: turn the fetched source into the class-folder dataset, safely.

DVC fetches the source that `data.dvc` names into `data/source` (signflow/source.py): an archive
(zip, tar, tar.gz/bz2/xz, recognised by its content since the file has no extension) or a folder of
class folders. This module extracts it safely, finds the class folders, leaves junk out and writes
`dest/<class name>/<image files>` plus `dest/SOURCE.json`; `dest` is replaced in one step only
after everything succeeded, so an interrupted run leaves the previous dataset (or none). It never
touches the network and never modifies the source.
"""

from __future__ import annotations

import logging
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from signflow._fileio import replace_dir_atomic, sha256_file, staging_dir, write_json_atomic
from signflow._images import is_image_name, is_junk
from signflow._redact import redact_url
from signflow.config import DownloadConfig
from signflow.errors import SignflowError

__all__ = ["DatasetInfo", "DownloadError", "extract_archive", "extract_dataset", "find_class_root"]

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


def find_class_root(tree: Path) -> Path:
    """Find the folder whose subfolders are the classes: the one folder with ≥ 2 image subfolders.

    The upstream Sign Language Digits archive nests classes under `<repo>-master/Dataset/` next to
    an `Examples/` folder of loose photos; that folder has one image subfolder and is not chosen.
    """
    candidates: list[tuple[Path, int, int]] = []
    for folder in [tree, *sorted(p for p in tree.rglob("*") if p.is_dir())]:
        if is_junk(folder.relative_to(tree)):
            continue
        counts = [_image_count(sub) for sub in folder.iterdir() if sub.is_dir() and not is_junk(sub.name)]
        image_dirs = [c for c in counts if c > 0]
        if image_dirs:
            candidates.append((folder, len(image_dirs), sum(image_dirs)))
    multi = [c for c in candidates if c[1] >= 2]
    if not multi:
        if candidates:
            only = max(candidates, key=lambda c: c[2])[0]
            raise DownloadError(
                f"found only one class folder under {only.relative_to(tree) or '.'}: a classifier needs at least "
                "two class folders (one folder of images per class)"
            )
        raise DownloadError("no class folders found: expected <class name>/<image files> somewhere in the source")
    if len(multi) > 1:
        names = ", ".join(str(c[0].relative_to(tree)) or "." for c in multi)
        raise DownloadError(
            f"several folders look like class roots ({names}); set download.class_root to the one to use"
        )
    return multi[0][0]


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
    extract_archive(source, tree)
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
            class_root = tree / cfg.class_root
            if not class_root.is_dir():
                raise DownloadError(f"download.class_root: {cfg.class_root!r} is not a folder in the source")
        else:
            class_root = find_class_root(tree)
        staged = scratch / "dataset"
        counts, skipped = _copy_classes(class_root, staged)
        info = DatasetInfo(
            source=_recorded_source(source, Path(project_dir)),
            source_sha256=digest,
            class_root=class_root.relative_to(tree).as_posix(),
            class_names=sorted(counts),
            counts=counts,
            skipped=skipped,
        )
        write_json_atomic(staged / SOURCE_INFO_NAME, asdict(info))
        replace_dir_atomic(staged, dest)
    log.info("extracted %d files in %d classes from %s", info.num_images, len(info.class_names), info.source)
    for line in skipped:
        log.warning("skipped %s", line)
    return info
