"""The page's Train as a run of the Prefect deployment `signflow-pipeline/<schedule.deployment>`, and
how that run goes, read from the Prefect API (signflow._page_training decides when).

Why here and not in flows/: `signflow serve` is an installed command and flows/ is not installed;
only the Prefect *client* is used (imported when a server is configured), never a flow or a task.

What the page shows comes from the server, not from a process of ours: the flow run's state, the step
(the task run running, else the last one started), the epoch (the train step's "epoch N: train loss"
log lines, which the flow sends to the API: flows/pipeline.py `library_logs_to_run`), the error (the
state's message, one line), and the project folder and host the run works in (its "signflow project"
log line), so a run served from another checkout is said to be one.

Every request has a timeout (REQUEST_TIMEOUT_S) and Prefect's client retries none of them (its
default is 5 retries with backoff on a timeout): a server that stops answering costs one poll
REQUEST_TIMEOUT_S, not minutes. Credentials never reach the page: the server is shown as its URL
redacted (signflow._redact), and PREFECT_API_AUTH_STRING is only sent to the server.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from signflow._capture import CaptureError
from signflow._redact import redact_url

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["FLOW_NAME", "PrefectServer", "deployment_id", "read_run", "start_run"]

FLOW_NAME = "signflow-pipeline"
REQUEST_TIMEOUT_S = 5.0
RUN_TAG = "signflow-serve"
"""Tag on the flow runs the page starts, so they can be told apart from scheduled ones in the UI."""
PROJECT_LINE = re.compile(r"signflow project: (?P<folder>.+) on (?P<host>\S+)$")
"""The line flows/pipeline.py logs first in every run: where it works."""
EPOCH_LINE = re.compile(r"\bepoch (\d+): train loss")
QUEUED = {"SCHEDULED", "PENDING", "PAUSED"}
ACTIVE = {"RUNNING", "CANCELLING"}
FAILED = {"FAILED", "CRASHED", "CANCELLED"}


@dataclass(frozen=True)
class PrefectServer:
    """The Prefect API the page talks to: PREFECT_API_URL (and PREFECT_API_AUTH_STRING) as Prefect
    reads them, from the environment or the active profile."""

    url: str
    auth_string: str | None = None

    @classmethod
    def from_settings(cls) -> PrefectServer | None:
        """The configured server, or None when PREFECT_API_URL is not set (Train then runs locally)."""
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

        url = PREFECT_API_URL.value()
        if not url:
            return None
        auth = PREFECT_API_AUTH_STRING.value()
        return cls(url, auth.get_secret_value() if hasattr(auth, "get_secret_value") else auth)

    @property
    def shown(self) -> str:
        """The URL as the page and the logs show it: no user, password or query values."""
        return redact_url(self.url)

    @contextmanager
    def client(self) -> Iterator[Any]:
        """A client with a timeout on every request and no retries; an unreachable server, a refused
        password or a failing server become a CaptureError of one line (503, 502)."""
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):
            try:
                with SyncPrefectClient(
                    api=self.url, auth_string=self.auth_string, httpx_settings={"timeout": REQUEST_TIMEOUT_S}
                ) as client:
                    yield client
            except CaptureError:
                raise
            except Exception as error:  # noqa: BLE001 - httpx and Prefect raise many types
                raise CaptureError(self.describe_failure(error), _status_of(error)) from None

    def describe_failure(self, error: BaseException) -> str:
        from prefect.exceptions import PrefectHTTPStatusError

        if isinstance(error, PrefectHTTPStatusError):
            code = error.response.status_code
            if code in (401, 403):
                return (
                    f"the Prefect server at {self.shown} refused the credentials (HTTP {code}): set "
                    "PREFECT_API_AUTH_STRING to its user:password"
                )
            return f"the Prefect server at {self.shown} answered HTTP {code}: see its log"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return (
            f"the Prefect server at {self.shown} cannot be reached ({redact_url(reason)}): start it, or unset "
            "PREFECT_API_URL to train locally"
        )


def _status_of(error: BaseException) -> int:
    from prefect.exceptions import PrefectHTTPStatusError

    return 502 if isinstance(error, PrefectHTTPStatusError) else 503


BUSY_STATUSES = (429, 503)
"""Answers by which a server says it did not do the request and asks for a retry (Prefect's server
answers 503 when its SQLite database is locked by a writer, e.g. its scheduler's)."""
BUSY_RETRIES = 3
BUSY_WAIT_S = 1.0


def while_busy(call: Callable[[], T]) -> T:
    """`call()`, again up to BUSY_RETRIES times (BUSY_WAIT_S apart, or the server's Retry-After up to 5 s)
    while the server answers that it is busy. Unlike Prefect's own retries, a timeout or a refused
    connection is not retried: an unreachable server still costs one request."""
    from prefect.exceptions import PrefectHTTPStatusError

    for _ in range(BUSY_RETRIES):
        try:
            return call()
        except PrefectHTTPStatusError as error:
            if error.response.status_code not in BUSY_STATUSES:
                raise
            wait = _retry_after(error.response.headers.get("Retry-After"))
            log.info("the Prefect server is busy (HTTP %d): again in %.1f s", error.response.status_code, wait)
            time.sleep(wait)
    return call()


def _retry_after(header: str | None) -> float:
    """Retry-After in seconds, bounded to 0-5 s; BUSY_WAIT_S when absent, not a number (an HTTP date) or NaN."""
    try:
        seconds = float(header) if header else math.nan
    except ValueError:
        return BUSY_WAIT_S
    return min(max(seconds, 0.0), 5.0) if not math.isnan(seconds) else BUSY_WAIT_S


def deployment_id(server: PrefectServer, deployment: str) -> Any | None:
    """The id of `signflow-pipeline/<deployment>` on the server, None when it has no such deployment;
    a CaptureError when the server cannot be asked."""
    from prefect.exceptions import ObjectNotFound

    with server.client() as client:
        problem = client.api_healthcheck()
        if problem is not None:
            raise CaptureError(server.describe_failure(problem), 503)
        try:
            return while_busy(lambda: client.read_deployment_by_name(f"{FLOW_NAME}/{deployment}").id)
        except ObjectNotFound:
            return None


def start_run(server: PrefectServer, deployment: Any) -> tuple[str, str]:
    """A flow run of the deployment with its own parameters (as the schedule or the UI's Run starts one);
    returns its id and name."""
    with server.client() as client:
        run = while_busy(lambda: client.create_flow_run_from_deployment(deployment, tags=[RUN_TAG]))
    return str(run.id), run.name


@dataclass
class RunReport:
    """What the page shows of a flow run."""

    state: str
    """"queued", "running", "done" or "failed"."""
    state_name: str
    step: str | None = None
    epoch: int | None = None
    error: str | None = None
    waiting: str | None = None
    """Why a queued run is not running (Late, waiting for the concurrency slot, ...)."""
    project: tuple[str, str] | None = None
    """(folder, host) the run works in, once it said so."""


def read_run(server: PrefectServer, run_id: str, deployment: str, project: tuple[str, str] | None) -> RunReport:
    """The run's state, step, epoch and error, read in at most three requests (`project`, once known,
    saves the fourth)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with server.client() as client:
        run = client.read_flow_run(run_id)
        state_type, state_name = run.state.type.value, run.state.name
        report = RunReport(_page_state(state_type), state_name, project=project)
        if state_type in QUEUED:
            report.waiting = _why_waiting(state_type, state_name, deployment, run.state.message)
            return report
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        step_run = _current_task(tasks)
        report.step = _step_name(step_run) if step_run else None
        if report.step == "train":
            report.epoch = _last_epoch(client, step_run.id)
        if project is None:
            report.project = _project_of(client, run.id)
        if report.state == "failed":
            report.error = one_line_error(run.state, step_run)
    return report


def _page_state(state_type: str) -> str:
    if state_type in QUEUED:
        return "queued"
    if state_type == "COMPLETED":
        return "done"
    return "failed" if state_type in FAILED else "running"


def _why_waiting(state_type: str, state_name: str, deployment: str, message: str | None) -> str:
    name = f"{FLOW_NAME}/{deployment}"
    if state_name == "Late":
        return f"Late: nothing has picked it up; is `python -m flows.serve` or a `signflow worker` serving {name}?"
    if state_name == "AwaitingConcurrencySlot":
        return f"waiting for a slot: another run of {name} is going (its concurrency limit)"
    if state_type == "PENDING":
        return "Pending: its process is starting"
    if state_type == "PAUSED":
        return "Paused (resume it in the Prefect UI)"
    return f"{state_name}: waiting for `python -m flows.serve` or a `signflow worker` serving {name}" + (
        f" ({message})" if message else ""
    )


def _current_task(tasks: list) -> Any | None:
    """The task run running now, else the last one that started (the one that failed, for a failed run)."""
    running = [t for t in tasks if t.state_type is not None and t.state_type.value == "RUNNING"]
    pool = running or tasks
    if not pool:
        return None
    return max(pool, key=lambda t: (t.start_time or t.expected_start_time or t.created).timestamp())


def _step_name(task_run: Any) -> str:
    return task_run.name.rsplit("-", 1)[0]


def _last_epoch(client: Any, task_run_id: Any) -> int | None:
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.client.schemas.sorting import LogSort

    logs = client.read_logs(
        LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])), limit=50, sort=LogSort.TIMESTAMP_DESC
    )
    epochs = [int(found.group(1)) for log in logs if (found := EPOCH_LINE.search(log.message))]
    return epochs[0] if epochs else None


def _project_of(client: Any, flow_run_id: Any) -> tuple[str, str] | None:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    logs = client.read_logs(
        LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=20, sort=LogSort.TIMESTAMP_ASC
    )
    for log in logs:
        if found := PROJECT_LINE.search(log.message.strip()):
            return found.group("folder"), found.group("host")
    return None


EXCEPTION_PREFIX = re.compile(r"^(?:Flow|Task) run encountered an exception:?\s*")
EXCEPTION_NAME = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Timeout): ")


def one_line_error(state: Any, failed_task: Any | None) -> str:
    """The failed state's message as a person reads it: no 'Flow run encountered an exception:', no
    exception class name, first line only; the failed task's when the flow's says nothing more."""
    messages = [state.message]
    if failed_task is not None and failed_task.state is not None:
        messages.insert(0, failed_task.state.message)
    for message in messages:
        text = EXCEPTION_PREFIX.sub("", (message or "").strip())
        text = EXCEPTION_NAME.sub("", text.splitlines()[0].strip() if text else "")
        if text:
            return redact_url(text)
    return f"the run ended {state.name}"


def other_project(report: RunReport, project_dir: Path) -> str | None:
    """What the page says when the run works in another checkout than this page's project, else None."""
    if report.project is None:
        return None
    folder, host = report.project
    if host == socket.gethostname() and Path(folder) == project_dir:
        return None
    return (
        f"this run works in {folder} on {host}, not in {project_dir}: it trains on that checkout's data.dvc, "
        "which sees these captures only if it points at a folder holding them"
    )
