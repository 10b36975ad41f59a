"""Where the raw dataset comes from: `data.dvc`, DVC's own record of the source and of what was fetched.

`data.dvc` is an unfrozen DVC import of one URL or path into `data/source` (an archive file, or a
folder of class folders). It is the one place the source is written. DVC stores the source's ETag
(https), or the md5 of a local file or folder, and the md5 of what it fetched, so:

- `dvc status` / `signflow source check` notice new data at the same URL with a HEAD request;
- `dvc repro` fetches again only when the source changed, then re-runs what depends on it;
- `dvc push` / `dvc pull` move `data/source` like any other output.

A file source is marked `persist: true`: DVC then leaves the old copy in place until the new one is
complete (its downloads are atomic), so an unreachable server never removes `data/source`.
Folders are not marked: DVC would copy a changed folder over the old one and keep deleted files.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

from signflow import dvc_state
from signflow._redact import redact_url, url_credentials
from signflow.errors import SignflowError
from signflow.fileio import write_text_atomic
from signflow.layout import Workspace

__all__ = [
    "NetworkError",
    "SourceError",
    "SourceRecord",
    "SourceSync",
    "check_source",
    "is_network_error",
    "read_source",
    "redact_url",
    "require_fetched",
    "set_source",
    "sync_source",
]

log = logging.getLogger(__name__)


class _RedactingFilter(logging.Filter):
    """DVC and fsspec log the source URL as data.dvc holds it (`Importing 'URL' -> 'data/source'`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact_url(record.getMessage()), None
        return True


for _name in ("dvc.stage.imports", "dvc.stage", "dvc.output", "dvc.dependency.base", "dvc.repo.update", "fsspec.http"):
    logging.getLogger(_name).addFilter(_RedactingFilter())

HEADER = """\
# The raw dataset: DVC's record of where it comes from and of what was fetched (`dvc status`,
# `dvc update data.dvc`, `dvc push` and `dvc pull` work on it). The one place the source is written:
# change it with `signflow source set URL_OR_PATH`, then `dvc repro`. DVC fills in the hashes.
# `persist: true` (a single-file source): DVC keeps data/source until a new copy is complete, so an
# unreachable source never removes it.
"""

UNCHANGED, CHANGED, UNREACHABLE, NOT_FETCHED = "unchanged", "new data", "unreachable", "not fetched yet"


class SourceError(SignflowError, RuntimeError):
    """The source cannot be used as asked; the message says what to do."""


class NetworkError(SourceError):
    """The source could not be fetched; worth retrying later, unlike bad content."""


@dataclass(frozen=True)
class SourceRecord:
    """What data.dvc says: the source, and the DVC hash of the fetched copy (None before the first fetch)."""

    url: str
    version: str | None
    persist: bool


@dataclass(frozen=True)
class SourceSync:
    """What a run did about the source: its state before, whether it fetched, the version it uses."""

    url: str
    state: str
    fetched: bool
    version: str | None
    note: str


def read_source(project_dir: str | Path) -> SourceRecord:
    path = Workspace(Path(project_dir)).data_dvc
    if not path.is_file():
        raise SourceError(f"{path} not found: run from the project root, or `signflow source set URL_OR_PATH`")
    record = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        dep, out = record["deps"][0], record["outs"][0]
        return SourceRecord(url=str(dep["path"]), version=out.get("md5"), persist=bool(out.get("persist")))
    except (KeyError, IndexError, TypeError):
        raise SourceError(f"{path}: expected `deps: [path: URL]` and `outs: [path: data/source]`") from None


LOCAL_ERRNOS = frozenset({errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT})
"""Causes that are this machine's (disk full, no permission, read-only): retrying cannot help."""


def _causes(error: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _network_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [TimeoutError, ConnectionError, socket.gaierror]
    try:
        import aiohttp

        types.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        import requests

        types += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    return tuple(types)


def is_network_error(error: BaseException) -> bool:
    """Whether `error` (e.g. DVC's) was caused by the network, found by walking its causes: worth
    retrying. A full disk, a permission error or bad content is not, whatever wraps it."""
    chain = _causes(error)
    if any(isinstance(cause, OSError) and cause.errno in LOCAL_ERRNOS for cause in chain):
        return False
    return any(isinstance(cause, _network_types()) for cause in chain)


def refuse_special_files(path: Path, shown: str) -> None:
    """Refuse a FIFO, socket or device as the source or inside a source folder: DVC would open it to
    hash it, and reading a FIFO blocks until someone writes to it."""
    paths = [path]
    if path.is_dir():
        paths += [Path(folder, name) for folder, _, names in os.walk(path) for name in names]
    for item in paths:
        try:
            mode = item.stat().st_mode
        except OSError:
            continue  # a broken link: DVC says so itself
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise SourceError(
                f"{shown}: {item} is not a regular file or folder (a FIFO, socket or device); reading it could "
                "block forever. Point the source at an archive or a folder of image files"
            )


def normalise_source(text: str, project_dir: str | Path) -> tuple[str, bool]:
    """The source as data.dvc must hold it, and whether it is a single file. A `file://` URL becomes a
    path (DVC does not read them); a local path must exist and is kept relative when it lies inside the
    project (relative to data.dvc's folder, the project root), else absolute."""
    parsed = urlparse(text)
    if "://" in text and (credentials := url_credentials(text)):
        raise SourceError(
            f"{redact_url(text)}: the URL carries {' and '.join(credentials)}. data.dvc is committed and DVC "
            "prints its source, so signflow does not write credentials there: give the URL without them. For "
            "http(s), put the login in ~/.netrc (`machine HOST login USER password PASS`, mode 600), which DVC's "
            "http client reads; for s3://, gs://, azure://, use the provider's own credentials (environment or "
            "config files), or DVC's `dvc remote modify --local`"
        )
    if parsed.scheme in ("http", "https"):
        if parsed.path.endswith("/") or not parsed.path.strip("/"):
            shown = redact_url(text)
            raise SourceError(f"{shown}: DVC fetches one file over http(s), not a folder; point at an archive")
        return text, True
    if parsed.scheme == "file":
        text = unquote(parsed.path)
    elif "://" in text:
        return text, not text.endswith("/")  # s3://, gs://, ssh://, ...: DVC checks it (with its plugin)
    root = Path(project_dir).resolve()
    path = Path(text).expanduser().resolve()
    if not path.exists():
        raise SourceError(f"{text}: no such file or folder")
    refuse_special_files(path, text)
    if path.is_relative_to(root):
        if path == root or path.is_relative_to(root / "data"):
            raise SourceError(f"{text}: the source must lie outside the project's data/ folder (DVC writes there)")
        return path.relative_to(root).as_posix(), path.is_file()
    return str(path), path.is_file()


def render_data_dvc(url: str, single_file: bool) -> str:
    """A data.dvc with no hashes yet: the next `dvc update data.dvc` or `dvc repro` fetches and fills them in."""
    out = {"path": "data/source", **({"persist": True} if single_file else {})}
    return HEADER + yaml.safe_dump({"deps": [{"path": url}], "outs": [out]}, sort_keys=False)


def set_source(project_dir: str | Path, text: str, fetch: bool = True) -> SourceSync:
    """Point data.dvc at `text` (a URL or path) and, with `fetch`, fetch it now. A failed fetch puts
    data.dvc and data/source back as they were."""
    workspace = Workspace(Path(project_dir))
    url, single_file = normalise_source(text, workspace.root)
    previous = workspace.data_dvc.read_bytes() if workspace.data_dvc.is_file() else None
    write_text_atomic(workspace.data_dvc, render_data_dvc(url, single_file))
    if not fetch:
        note = "data.dvc updated; the next `dvc repro` fetches it"
        return SourceSync(redact_url(url), NOT_FETCHED, False, None, note)
    with dvc_state.open_repo(workspace.root) as repo:
        try:
            _fetch(repo, url)
        except SourceError:
            if previous is not None:
                workspace.data_dvc.write_bytes(previous)
                _restore(repo)
            raise
    version = read_source(workspace.root).version
    return SourceSync(redact_url(url), CHANGED, True, version, f"fetched {redact_url(url)} (version {version})")


def _fetch(repo, url: str) -> None:
    """`dvc update data.dvc`: fetch the source if it changed (or was never fetched), record it."""
    from dvc.dependency.base import DependencyDoesNotExistError
    from dvc.exceptions import DvcException

    try:
        repo.update(targets=[Workspace().data_dvc.name])
    except DependencyDoesNotExistError:
        shown = redact_url(url)
        raise SourceError(f"{shown}: not found or not reachable (check the URL or path, and the network)") from None
    except DvcException as error:
        failure = NetworkError if is_network_error(error) else SourceError
        raise failure(f"{redact_url(url)}: could not fetch it: {redact_url(str(error))}") from None


def _restore(repo) -> None:
    """Put data/source back from the DVC cache as data.dvc records it (DVC may have removed it)."""
    from dvc.exceptions import DvcException

    try:
        repo.checkout(targets=[Workspace().data_dvc.name])
    except DvcException as error:
        log.warning("could not restore data/source from the DVC cache: %s", redact_url(str(error)))


def _state(repo) -> tuple[str, bool]:
    """The source's state against data.dvc (HEAD requests only, nothing downloaded), and whether
    data/source is there as recorded."""
    stage = repo.stage.load_one(Workspace().data_dvc.name)
    source, copy = stage.deps[0].status(), stage.outs[0].status()
    have_copy = not copy
    if stage.outs[0].hash_info.value is None:
        return NOT_FETCHED, False
    if "deleted" in source.values():
        return UNREACHABLE, have_copy
    return (CHANGED if source else UNCHANGED), have_copy


def check_source(project_dir: str | Path) -> tuple[SourceRecord, str]:
    """The recorded source and its state: unchanged, new data, unreachable, or not fetched yet."""
    record = read_source(project_dir)
    with dvc_state.open_repo(project_dir) as repo:
        state, _ = _state(repo)
    return record, state


def sync_source(repo, project_dir: str | Path) -> SourceSync:
    """Make data/source the source's current content, fetching only what changed; what a run does
    first. An unreachable source keeps the data already fetched (from the workspace, the DVC cache or
    the remote) with a warning: a scheduled run while the server is down still runs, on that data."""
    record = read_source(project_dir)
    shown = redact_url(record.url)
    local = Path(project_dir) / record.url
    if "://" not in record.url and local.exists():
        refuse_special_files(local, shown)
    state, have_copy = _state(repo)
    if state == UNCHANGED and have_copy:
        return SourceSync(shown, state, False, record.version, f"{shown}: unchanged, not downloaded")
    if state != UNREACHABLE:
        _fetch(repo, record.url)
        version = read_source(project_dir).version
        fetched = version != record.version or not have_copy
        note = f"{shown}: {state}, fetched (version {version})" if fetched else f"{shown}: same content"
        return SourceSync(shown, state, fetched, version, note)
    if record.version is None:
        raise SourceError(f"{shown}: not reachable, and it was never fetched; check the URL and the network")
    if not have_copy:
        _restore_or_pull(repo, record)
    note = (
        f"{shown} is not reachable: using the data fetched before (version {record.version}); "
        "new data there is noticed once it is back"
    )
    log.warning(note)
    return SourceSync(shown, state, False, record.version, note)


def _restore_or_pull(repo, record: SourceRecord) -> None:
    from dvc.exceptions import DvcException

    try:
        repo.checkout(targets=[Workspace().data_dvc.name])
        return
    except DvcException:
        pass
    if dvc_state.default_remote(repo) is None:
        raise SourceError(
            f"{redact_url(record.url)} is not reachable and data/source (version {record.version}) is neither in the "
            "workspace nor in the DVC cache, and no DVC remote is configured"
        )
    try:
        repo.pull(targets=[Workspace().data_dvc.name])
    except DvcException as error:
        shown = redact_url(record.url)
        failure = NetworkError if is_network_error(error) else SourceError
        raise failure(f"{shown} is not reachable and `dvc pull data.dvc` failed: {redact_url(str(error))}") from None


def require_fetched(repo, project_dir: str | Path) -> SourceRecord:
    """The source exactly as data.dvc records it, present in data/source; what an override run
    extracts. It fetches nothing and changes no record."""
    record = read_source(project_dir)
    stage = repo.stage.load_one(Workspace().data_dvc.name)
    if record.version is None or stage.outs[0].status():
        raise SourceError(
            f"data/source is missing or differs from what data.dvc records ({redact_url(record.url)}); an override "
            "run uses the recorded data and fetches nothing: run `dvc repro data.dvc` (or `dvc pull data.dvc`) first"
        )
    return record
