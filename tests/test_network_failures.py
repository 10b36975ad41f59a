"""Fetching fails in bounded time and is retried only when the network failed: a deadline on the
extract task, DVC's per-request timeouts, special files refused before anything blocks, and a
full disk or a permission error never retried as if it were the network. A host that does not
answer (refused, no DNS name, silent) is "not reachable" and retried, though DVC calls it a source
that does not exist; a 404 is not retried."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import threading

import pytest

from signflow import dvc_state, source
from signflow.cli import main
from signflow.extract import ExtractError, extract_dataset
from signflow.source import NetworkError, SourceError, _fetch, set_source, sync_source
from tests.helpers import EtagServer, make_project, section


def _dvc_error(cause: BaseException):
    from dvc.exceptions import DvcException

    try:
        try:
            raise cause
        except BaseException as error:
            raise DvcException("failed to import") from error
    except DvcException as wrapped:
        return wrapped


class _FailingRepo:
    def __init__(self, error: BaseException):
        self.error = error

    def update(self, targets):
        raise self.error


@pytest.mark.parametrize(
    "cause",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        PermissionError(errno.EACCES, "denied"),
        OSError(errno.EROFS, "read-only"),
        ValueError("bad content"),
    ],
)
def test_local_and_content_failures_are_not_network_errors(cause):
    error = _dvc_error(cause)
    assert not source.is_network_error(error)
    with pytest.raises(SourceError) as raised:
        _fetch(_FailingRepo(error), "https://example.org/d.zip")
    assert not isinstance(raised.value, NetworkError), "a full disk or bad content is not retried"


@pytest.mark.parametrize("cause", [TimeoutError("timed out"), ConnectionResetError(), socket.gaierror(-2, "no name")])
def test_network_failures_are_network_errors(cause):
    import aiohttp

    error = _dvc_error(cause)
    assert source.is_network_error(error)
    assert source.is_network_error(_dvc_error(aiohttp.ClientPayloadError("cut short")))
    with pytest.raises(NetworkError):
        _fetch(_FailingRepo(error), "https://example.org/d.zip")


def _retried_by_the_extract_task(error: BaseException) -> bool:
    from tasks.pipeline import _network_failure

    class State:
        def result(self):
            raise error

    return _network_failure(None, None, State())


def test_the_extract_task_retries_only_network_errors():
    assert _retried_by_the_extract_task(NetworkError("down"))
    assert not _retried_by_the_extract_task(SourceError("disk full"))
    assert not _retried_by_the_extract_task(TimeoutError("the task's deadline"))


def _sync(project):
    with dvc_state.open_repo(project) as repo:
        return sync_source(repo, project)


@pytest.fixture
def refused_url():
    """An http URL whose port on 127.0.0.1 is bound but not listening: every connection is refused."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{closed.getsockname()[1]}/dataset.zip"
    closed.close()


def test_an_unreachable_source_is_a_network_error_naming_the_host_never_its_credentials(
    tmp_path, tiny_zip, refused_url, capsys
):
    project = make_project(tmp_path, tiny_zip)
    host = refused_url.split("/")[2]
    with_secrets = refused_url.replace("//", "//reader:s3cret@") + "?token=t0ken"
    before = (project / "data.dvc").read_bytes()
    with pytest.raises(NetworkError) as raised:
        set_source(project, refused_url)
    assert f"is not reachable ({host}: connection refused)" in str(raised.value)
    assert (project / "data.dvc").read_bytes() == before
    assert main(["source", "set", refused_url, "--project-dir", str(project)]) == 1
    assert f"is not reachable ({host}: connection refused)" in capsys.readouterr().err

    # A data.dvc written by hand with credentials (`signflow source set` refuses them): never shown.
    (project / "data.dvc").write_text(source.render_data_dvc(with_secrets, True))  # a run, never fetched
    with pytest.raises(NetworkError, match=r"is not reachable \(127\.0\.0\.1:\d+: connection refused\)") as raised:
        _sync(project)
    assert "s3cret" not in str(raised.value) and "t0ken" not in str(raised.value)
    assert _retried_by_the_extract_task(raised.value)


def test_a_host_name_that_does_not_resolve_is_a_network_error(tmp_path, tiny_zip, monkeypatch):
    real_getaddrinfo = socket.getaddrinfo

    def resolve(host, *args, **kwargs):  # no DNS server is asked: this name fails as an unknown one would
        if host == "datasets.example.org":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    project = make_project(tmp_path, "https://datasets.example.org/signs.zip")
    with pytest.raises(
        NetworkError, match=r"is not reachable \(datasets\.example\.org: the DNS lookup of its name failed"
    ) as raised:
        _sync(project)
    assert _retried_by_the_extract_task(raised.value)


def test_a_fresh_clone_with_the_host_down_is_retried_and_source_check_says_why(tmp_path, tiny_zip, caplog):
    server = EtagServer(tiny_zip.read_bytes())
    project = make_project(tmp_path, server.url)
    assert _sync(project).fetched
    server.stop()
    host = server.url.split("/")[2]
    with caplog.at_level(logging.WARNING, logger="signflow.source"):
        assert main(["source", "check", "--project-dir", str(project)]) == 1
    assert f"is not reachable ({host}: connection refused)" in caplog.text

    (project / "data" / "source").unlink()  # a fresh clone: data.dvc records a version, nothing is here
    shutil.rmtree(project / ".dvc" / "cache")
    with pytest.raises(NetworkError, match=r"is not reachable .* no DVC remote is configured") as raised:
        _sync(project)
    assert _retried_by_the_extract_task(raised.value)


def test_a_source_the_server_says_is_missing_is_not_retried(tmp_path, tiny_zip):
    server = EtagServer(tiny_zip.read_bytes())
    project = make_project(tmp_path, tiny_zip)
    gone = server.url.replace("dataset.zip", "gone.zip")
    try:
        with pytest.raises(
            SourceError, match=r"was not found \(127\.0\.0\.1:\d+ answered HTTP 404 Not Found\)"
        ) as raised:
            set_source(project, gone)
    finally:
        server.stop()
    assert not _retried_by_the_extract_task(raised.value)


def test_the_extract_task_has_the_deadline_from_params():
    """Extraction checks `extract.timeout_s` itself; Prefect's timeout, a little later, stops a stalled fetch."""
    from tasks.pipeline import FETCH_GRACE_S, extract_with_deadline

    assert extract_with_deadline(section("extract", timeout_s=7)).timeout_seconds == 7 + FETCH_GRACE_S


@pytest.mark.parametrize("source", ["tiny_zip", "class_folders"])
def test_an_extract_past_its_deadline_stops_and_changes_nothing(source, request, tmp_path):
    from signflow.extract import Deadline

    extract_dataset(request.getfixturevalue(source), tmp_path / "raw", section("extract"))
    before = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "raw").rglob("*"))
    with pytest.raises(ExtractError, match=r"did not finish within extract.timeout_s \(5 s\)"):
        extract_dataset(request.getfixturevalue(source), tmp_path / "raw", section("extract"), ".", Deadline(0, 5))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "raw").rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "incoming.zip"
    os.mkfifo(path)
    yield path
    try:  # release anything still blocked reading it
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_a_fifo_source_is_refused_before_anything_blocks(tmp_path, tiny_zip, fifo, class_folders):
    project = make_project(tmp_path, tiny_zip)
    with pytest.raises(SourceError, match="not a regular file or folder"):
        set_source(project, str(fifo), fetch=False)
    os.mkfifo(class_folders / "alpha" / "pipe.JPG")
    with pytest.raises(SourceError, match="pipe.JPG is not a regular file"):
        set_source(project, str(class_folders), fetch=False)
    with pytest.raises(ExtractError, match="not a regular file or folder"):
        extract_dataset(fifo, tmp_path / "raw", section("extract"))


def test_a_fifo_recorded_in_data_dvc_is_refused_by_a_run(tmp_path, tiny_zip, fifo):
    from signflow.source import render_data_dvc

    project = make_project(tmp_path, tiny_zip)
    (project / "data.dvc").write_text(render_data_dvc(str(fifo), True))
    outcome: list[BaseException | None] = []

    def run():
        try:
            with dvc_state.open_repo(project) as repo:
                sync_source(repo, project)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - reported below
            outcome.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert outcome, "the run blocked reading the FIFO"
    assert isinstance(outcome[0], SourceError) and "not a regular file or folder" in str(outcome[0])


@pytest.mark.timeout(300)  # a hang guard: DVC's default, 60 s per attempt over several attempts, would trip it
@pytest.mark.slow
def test_a_server_that_never_answers_fails_within_the_request_timeout(tmp_path, tiny_zip):
    """DVC's per-request timeouts (60 s by default) can be set in data.dvc's `fs_config`; the run then
    stops saying the source is not reachable, a NetworkError the extract task retries."""
    import yaml

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts connections (the kernel does), never answers
    project = make_project(tmp_path, tiny_zip)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/d.zip"
    record = {
        "deps": [{"path": url, "fs_config": {"read_timeout": 1, "connect_timeout": 1}}],
        "outs": [{"path": "data/source", "persist": True}],
    }
    (project / "data.dvc").write_text(yaml.safe_dump(record))
    try:
        with pytest.raises(
            NetworkError, match=r"is not reachable \(127\.0\.0\.1:\d+: no answer within 1 s\)"
        ) as raised:
            _sync(project)
    finally:
        listener.close()
    assert _retried_by_the_extract_task(raised.value)
