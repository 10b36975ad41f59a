"""Safe extraction of a zip or tar archive: the security-critical half of the extract step.

Every entry is checked before anything is written: its name (no escape from the target, UTF-8, NFC),
its kind (no links, devices, sparse or encrypted entries), and the archive's declared sizes against the
`extract.max_*` caps; the bytes are counted again as they are written, since headers can lie. Readable
on its own: it knows nothing of class folders (signflow/extract.py) or of where the archive came from.
"""

from __future__ import annotations

import errno
import lzma
import stat
import tarfile
import time
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from signflow.config import ExtractConfig
from signflow.errors import ExtractError

__all__ = ["DATA_FILTER", "NO_DEADLINE", "Deadline", "extract_archive", "write_error"]

DATA_FILTER = getattr(tarfile, "data_filter", None)
"""tarfile's own safety filter (Python 3.11.4+, 3.12+), applied on top of the checks here."""


@dataclass(frozen=True)
class Deadline:
    """When a flow run's extract must be done (`extract.timeout_s`), checked between files. A timer
    that injects an exception is not enough: its TimeoutError is an OSError, and landing inside an
    `except OSError` (pathlib's `is_file`, `os.walk`) it would be swallowed and a file silently left out."""

    at: float | None
    timeout_s: float = 0

    @classmethod
    def after(cls, timeout_s: float) -> Deadline:
        return cls(time.monotonic() + timeout_s, timeout_s)

    def check(self) -> None:
        if self.at is not None and time.monotonic() > self.at:
            raise ExtractError(
                f"the extract step did not finish within extract.timeout_s ({self.timeout_s:.0f} s); nothing "
                "was changed. Raise extract.timeout_s in params.yaml for a source this large"
            )


NO_DEADLINE = Deadline(None)

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
        raise ExtractError(
            f"{archive}: entry {raw!r} has a name that is not UTF-8 text; rename it and pack the archive again"
        ) from None
    path = PurePosixPath(unicodedata.normalize("NFC", name.replace("\\", "/")))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise ExtractError(f"{archive}: refusing entry {name!r}: it would be written outside the target folder")
    return path


def _cap_error(archive: Path, found: str, key: str, cap: int | float) -> ExtractError:
    return ExtractError(
        f"{archive}: {found}, above extract.{key} ({cap:,}); nothing was extracted. If you trust this "
        f"source, raise extract.{key} in params.yaml"
    )


def _check_declared(archive: Path, sizes: list[tuple[str, int, int | None]], cfg: ExtractConfig) -> None:
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


def _check_member_count(archive: Path, count: int, cfg: ExtractConfig) -> None:
    if count > cfg.max_members:
        raise _cap_error(archive, f"more than {cfg.max_members:,} entries", "max_members", cfg.max_members)


def write_error(archive: Path, name: str, error: OSError) -> ExtractError:
    """One clear message for a file-system failure while writing entry `name`."""
    if error.errno == errno.ENOSPC:
        return ExtractError(f"{archive}: no space left on the device while extracting {name!r}; free some space")
    if error.errno == errno.ENAMETOOLONG:
        return ExtractError(f"{archive}: entry {name!r} has a name too long for this file system; rename it")
    if isinstance(error, FileExistsError):
        return ExtractError(f"{archive}: two entries are named {name!r} (after Unicode normalisation); rename one")
    return ExtractError(f"{archive}: cannot extract {name!r} ({error.strerror or error})")


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
        raise write_error(archive, name, error) from None
    if written > declared:
        raise ExtractError(
            f"{archive}: entry {name!r} holds more than the {declared:,} bytes its header declares; the archive "
            "is damaged or crafted to hide its size"
        )


def _make_dir(target: Path, name: str, archive: Path) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(archive, name, error) from None


def _check_zip_member(member: zipfile.ZipInfo, archive: Path) -> PurePosixPath:
    path = _check_member_name(member.filename, archive)
    if stat.S_ISLNK(member.external_attr >> 16):
        raise ExtractError(f"{archive}: refusing symbolic link entry {member.filename!r}")
    if member.flag_bits & 0x1:
        raise ExtractError(
            f"{archive}: entry {member.filename!r} is encrypted; signflow cannot read password-protected "
            "archives: pack it again without a password"
        )
    if member.compress_type not in ZIP_METHODS:
        method = ZIP_METHOD_NAMES.get(member.compress_type, f"method {member.compress_type}")
        raise ExtractError(
            f"{archive}: entry {member.filename!r} uses {method} compression, which Python's zipfile cannot "
            "read; pack it again with Deflate (the default of zip tools)"
        )
    return path


def _extract_zip(archive: Path, dest: Path, cfg: ExtractConfig, deadline: Deadline) -> None:
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            _check_member_count(archive, len(members), cfg)
            paths = [_check_zip_member(member, archive) for member in members]
            _check_declared(archive, [(m.filename, m.file_size, m.compress_size) for m in members], cfg)
            for member, path in zip(members, paths, strict=True):
                deadline.check()
                _extract_zip_member(bundle, member, dest / path, archive)
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise ExtractError(f"{archive}: damaged or truncated zip archive ({error}); download it again") from None


def _extract_zip_member(bundle: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, archive: Path) -> None:
    if member.is_dir():
        _make_dir(target, member.filename, archive)
        return
    try:
        with bundle.open(member) as source:
            _write_member(source, target, member.file_size, member.filename, archive)
    except NotImplementedError as error:
        raise ExtractError(f"{archive}: cannot decompress entry {member.filename!r} ({error})") from None
    except zipfile.BadZipFile as error:
        raise ExtractError(
            f"{archive}: entry {member.filename!r} does not match its header ({error}): the archive is damaged, "
            "or crafted to hide its size; download it again"
        ) from None


def _check_tar_member(member: tarfile.TarInfo, archive: Path, dest: Path) -> PurePosixPath:
    path = _check_member_name(member.name, archive)
    if member.issparse():
        raise ExtractError(f"{archive}: refusing sparse entry {member.name!r}: its holes would be written as zeros")
    if not (member.isfile() or member.isdir()):
        raise ExtractError(f"{archive}: refusing {member.name!r}: links and special files are not allowed")
    if DATA_FILTER is not None:
        try:
            DATA_FILTER(member, str(dest))
        except tarfile.FilterError as error:
            raise ExtractError(f"{archive}: refusing {member.name!r} ({error})") from None
    return path


def _tar_members(bundle: tarfile.TarFile, archive: Path, dest: Path, cfg: ExtractConfig) -> list:
    """(member, path) of every entry, checked, reading no further than `extract.max_members` entries."""
    members = []
    for member in bundle:
        _check_member_count(archive, len(members) + 1, cfg)
        members.append((member, _check_tar_member(member, archive, dest)))
    return members


def _extract_tar(archive: Path, dest: Path, cfg: ExtractConfig, deadline: Deadline) -> None:
    try:
        with tarfile.open(archive) as bundle:
            members = _tar_members(bundle, archive, dest, cfg)
            _check_declared(archive, [(m.name, m.size, None) for m, _ in members if m.isfile()], cfg)
            for member, path in members:
                deadline.check()
                if member.isdir():
                    _make_dir(dest / path, member.name, archive)
                    continue
                with bundle.extractfile(member) as source:
                    _write_member(source, dest / path, member.size, member.name, archive)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as error:
        raise ExtractError(f"{archive}: damaged or truncated tar archive ({error}); download it again") from None


def extract_archive(archive: Path, dest: Path, cfg: ExtractConfig, deadline: Deadline = NO_DEADLINE) -> None:
    """Extract a zip or tar archive into `dest`, refusing entries that escape it or are links, and
    archives over the extract.max_* caps (checked on the declared sizes before anything is written,
    and again on the bytes as they are written)."""
    size = archive.stat().st_size
    if size > cfg.max_source_bytes:
        raise _cap_error(archive, f"the source file is {size:,} bytes", "max_source_bytes", cfg.max_source_bytes)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, dest, cfg, deadline)
    elif _is_tar(archive):
        _extract_tar(archive, dest, cfg, deadline)
    else:
        raise ExtractError(
            f"{archive}: not a zip or tar archive (or truncated); the source in data.dvc must be an archive "
            "or a folder of class folders (`signflow source set URL_OR_PATH`)"
        )


def _is_tar(archive: Path) -> bool:
    try:
        return tarfile.is_tarfile(archive)
    except (OSError, EOFError):
        return False
