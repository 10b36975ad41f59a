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

DVC says an http(s) source whose host never answers (refused, no DNS name, silent) "does not exist",
as it says of a 404. When it does, signflow asks the host once itself, and says which it was: a host
that did not answer is a NetworkError, which a flow run's extract task retries.
"""

from __future__ import annotations

import errno
import http
import logging
import os
import socket
import ssl
import stat
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

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


def _fs_config(project_dir: str | Path) -> dict[str, Any]:
    """data.dvc's `fs_config` for the source (DVC's timeouts, ssl_verify, ...); {} when there is none."""
    record = yaml.safe_load(Workspace(Path(project_dir)).data_dvc.read_text(encoding="utf-8")) or {}
    try:
        fs_config = record["deps"][0].get("fs_config")
    except (KeyError, IndexError, TypeError, AttributeError):
        return {}
    return fs_config if isinstance(fs_config, dict) else {}


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


UNROUTABLE_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN})
"""Causes that mean this machine has no way to the host now (offline, no route): a retry may help."""


def _probe_timeout_s(fs_config: dict[str, Any]) -> float:
    from dvc_http import HTTPFileSystem

    # DVC's own per-request timeouts (data.dvc's fs_config, else dvc-http's default), so the probe
    # waits as long as DVC did for one request.
    values = [fs_config.get(key) for key in ("connect_timeout", "read_timeout")]
    return float(max(v if isinstance(v, int | float) else HTTPFileSystem.REQUEST_TIMEOUT for v in values))


def _http_status(url: str, fs_config: dict[str, Any]) -> int:
    """The HTTP status a GET of `url` gets (the body is not read). No credentials are sent: any
    answer shows the host is reachable, which is all this asks."""
    parts = urlsplit(url)
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
    context = ssl.create_default_context()
    if fs_config.get("ssl_verify") is False:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    elif isinstance(fs_config.get("ssl_verify"), str):
        context.load_verify_locations(fs_config["ssl_verify"])
    try:
        with urllib.request.urlopen(bare, timeout=_probe_timeout_s(fs_config), context=context) as response:
            return response.status
    except urllib.error.HTTPError as error:
        error.close()
        return error.code


def _no_answer(error: BaseException, timeout_s: float) -> str | None:
    """Why a host gave no answer at all (refused, no DNS name, silent, no route); None when it answered."""
    cause = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(cause, socket.gaierror):
        return "the DNS lookup of its name failed"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(cause, ConnectionError):
        return "it dropped the connection without answering"
    if isinstance(cause, OSError) and cause.errno in UNROUTABLE_ERRNOS:
        return "no route to it (is the network up?)"
    return None


@dataclass(frozen=True)
class _Missing:
    """Why DVC found no source: `what` happened, `why` (naming the host, never credentials; "" when
    unknown), the `advice`, and whether the network is to blame (a NetworkError, which a flow run retries)."""

    what: str
    why: str
    advice: str
    network: bool

    def describe(self) -> str:
        return f"{self.what} ({self.why})" if self.why else self.what

    def error(self, shown: str, then: str = "") -> SourceError:
        return (NetworkError if self.network else SourceError)(f"{shown} {self.describe()}{then}; {self.advice}")


def _why_missing(url: str, fs_config: dict[str, Any]) -> _Missing:
    """Why DVC says a source `does not exist`: for http(s) it says so as well when the host never
    answered, so the host is asked once more, by signflow."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return _Missing("was not found or is not reachable", "", "check the path or URL, and the network", False)
    host = parts.netloc.rsplit("@", 1)[-1]
    try:
        status = _http_status(url, fs_config)
    except Exception as error:  # noqa: BLE001 - every failure is reported, those of the network as such
        reason = _no_answer(error, _probe_timeout_s(fs_config))
        if reason:
            return _Missing("is not reachable", f"{host}: {reason}", "check the network, or try again later", True)
        return _Missing("could not be read", f"{host}: {redact_url(str(error))}", "check the URL and data.dvc", False)
    try:
        answer = f"{host} answered HTTP {status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        answer = f"{host} answered HTTP {status}"
    if status >= 500 or status == 429:
        return _Missing("is not available now", answer, "try again later", True)
    if status >= 400:
        what = "was not found" if status in (404, 410) else "was refused"
        return _Missing(what, answer, "check the URL and its credentials (`signflow source set URL_OR_PATH`)", False)
    return _Missing("could not be read by DVC", f"{answer} now", "try again", True)


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


def _fetch(repo, url: str, fs_config: dict[str, Any] | None = None) -> None:
    """`dvc update data.dvc`: fetch the source if it changed (or was never fetched), record it."""
    from dvc.dependency.base import DependencyDoesNotExistError
    from dvc.exceptions import DvcException

    try:
        repo.update(targets=[Workspace().data_dvc.name])
    except DependencyDoesNotExistError:
        raise _why_missing(url, fs_config or {}).error(redact_url(url)) from None
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
    if state == UNREACHABLE:
        missing = _why_missing(record.url, _fs_config(project_dir))
        log.warning("%s %s; %s", redact_url(record.url), missing.describe(), missing.advice)
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
        _fetch(repo, record.url, _fs_config(project_dir))
        version = read_source(project_dir).version
        fetched = version != record.version or not have_copy
        note = f"{shown}: {state}, fetched (version {version})" if fetched else f"{shown}: same content"
        return SourceSync(shown, state, fetched, version, note)
    missing = _why_missing(record.url, _fs_config(project_dir))
    if record.version is None:
        raise missing.error(shown, ", and it was never fetched")
    if not have_copy:
        _restore_or_pull(repo, record, missing)
    note = (
        f"{shown} {missing.what}: using the data fetched before (version {record.version}); "
        f"new data there is noticed once it is back{f' ({missing.why})' if missing.why else ''}"
    )
    log.warning(note)
    return SourceSync(shown, state, False, record.version, note)


def _restore_or_pull(repo, record: SourceRecord, missing: _Missing) -> None:
    """data/source from the DVC cache or the remote, when the source cannot give it (`missing` says why)."""
    from dvc.exceptions import DvcException

    try:
        repo.checkout(targets=[Workspace().data_dvc.name])
        return
    except DvcException:
        pass
    if dvc_state.default_remote(repo) is None:
        raise missing.error(
            redact_url(record.url),
            f", and data/source (version {record.version}) is neither in the workspace nor in the DVC cache, and no "
            "DVC remote is configured",
        )
    try:
        repo.pull(targets=[Workspace().data_dvc.name])
    except DvcException as error:
        shown = redact_url(record.url)
        failure = NetworkError if is_network_error(error) else SourceError
        raise failure(
            f"{shown} {missing.describe()}, and `dvc pull data.dvc` failed: {redact_url(str(error))}"
        ) from None


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
