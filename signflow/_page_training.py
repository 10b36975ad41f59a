"""The "Train" action of `signflow serve --capture-dir`: the project's pipeline run on the capture
folder, one run at a time, its step, epoch and error shown on the page.

It runs the pipeline the way the project runs it. With a Prefect server configured (PREFECT_API_URL,
from the environment or the Prefect profile) that has the deployment
`signflow-pipeline/<schedule.deployment>`, Train creates a flow run of that deployment, and the page
reads the run's state, step, epoch and error from the Prefect API (signflow._prefect_run). Otherwise
it runs what a person would: `dvc repro` in the project folder (TRAIN_COMMAND) in the background,
and reads its log. Either way data.dvc is pointed at the capture folder first (`signflow source set
<capture dir> --no-fetch`; the extract stage then fetches it) when it pointed elsewhere.

When PREFECT_API_URL is set but does not lead to a run:
- the server cannot be reached (or refuses the password): Train is refused with that error in one
  line (503) and nothing changes. A user who configured a server expects the run on it, in its UI,
  with its concurrency limit; a silent local run would train where nobody looks, and could run
  beside the server's own run of the same project.
- the server answers but has no such deployment (nobody ran `python -m flows.serve` or `signflow
  deploy` for it): the steps run locally, and the page says "no deployment signflow-pipeline/X on
  <server>: ran locally". Nothing would ever run a flow run created without a deployment, and the
  local run is the same pipeline on the same folder.

A deployment run executes in the checkout of whoever serves the deployment (`python -m flows.serve`
in a project folder, or a `signflow worker` in its checkout), which sees these captures only if its
data.dvc points at a folder holding them: the page says so when the run reports another folder or
host than this page's project (nothing is shipped there).

One run at a time: a second Train is refused (409) while the run this page started has not ended
(a deployment run queued behind the deployment's concurrency limit, or Late because nothing serves
the deployment, counts: the page shows it queued and why), and while another signflow run holds the
project's run lock. The params must split by burst (`split.strategy: group`, `split.group_pattern` =
BURST_PATTERN): a random split would put frames of one burst, near-identical, in train and test and
report memory as accuracy. A new champion is then served by the registry follower
(signflow._hot_swap), not by this module.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signflow._capture import BURST_PATTERN, CaptureError
from signflow._prefect_run import (
    EPOCH_LINE,
    FLOW_NAME,
    PrefectServer,
    RunReport,
    deployment_id,
    other_project,
    read_run,
    start_run,
)
from signflow.config import load_params
from signflow.errors import SignflowError
from signflow.fileio import LockBusyError, held_lock
from signflow.layout import Workspace

__all__ = ["PageTraining", "TRAIN_COMMAND"]

TRAIN_COMMAND = [sys.executable, "-m", "dvc", "repro"]
STEP_LINE = re.compile(r"Running stage '(\w+)'|Task run '(\w+?)-[0-9a-z]{3}'")
ERROR_LINE = re.compile(r"(?:signflow [\w.]+|flows\.\w+): error: (.+)|^ERROR: (.+)")
LOG_TAIL_BYTES = 256 * 1024

log = logging.getLogger(__name__)


class PageTraining:
    """Start the pipeline and report on it. `command` is TRAIN_COMMAND unless a test gives another;
    `prefect` is the configured Prefect server (None: always local)."""

    def __init__(
        self,
        project_dir: str | Path,
        capture_dir: str | Path,
        command: list[str] | None = None,
        prefect: PrefectServer | None = None,
    ):
        self.workspace = Workspace(Path(project_dir).resolve())
        self.capture_dir = Path(capture_dir).resolve()
        self.command = command or TRAIN_COMMAND
        self.prefect = prefect
        self.log_path = Path(tempfile.mkdtemp(prefix="signflow-serve-train-")) / "train.log"
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._remote: _RemoteRun | None = None
        self._note: str | None = None
        self._started = self._ended = None
        self._epochs = 0
        self._deployment = ""

    def start(self) -> dict:
        """Start a run; refused (409) while one runs, from this page or anywhere in the project."""
        with self._lock:
            self._refuse_while_going()
            self._check_project()
            self._check_not_busy()
            deployment = self._find_deployment()
            self._point_source_at_captures()
            if deployment is not None:
                self._start_remote(deployment)
            else:
                self._start_local()
            self._started, self._ended = time.time(), None
            return self._read_status()

    def _refuse_while_going(self) -> None:
        if self._process is not None and self._process.poll() is None:
            status = self._read_status()
            raise CaptureError(
                f"a training run is going already ({status['step'] or 'starting'}); wait for it to finish", 409
            )
        remote = self._remote
        if remote is None or remote.report.state in ("done", "failed"):
            return
        remote.poll(self.prefect, force=True)
        if remote.report.state in ("done", "failed"):
            return
        if remote.poll_error:
            raise CaptureError(f"cannot tell whether flow run {remote.name} has finished: {remote.poll_error}", 409)
        where = remote.report.step or remote.report.state_name
        raise CaptureError(
            f"a training run is going already (flow run {remote.name}: {where}); wait for it to finish", 409
        )

    def _find_deployment(self) -> Any | None:
        """The deployment to run, or None to run locally (with the note why, when a server is configured)."""
        self._note = None
        if self.prefect is None:
            return None
        found = deployment_id(self.prefect, self._deployment)
        if found is None:
            self._note = f"no deployment {FLOW_NAME}/{self._deployment} on {self.prefect.shown}: ran locally"
            log.warning("%s", self._note)
        return found

    def _start_remote(self, deployment: Any) -> None:
        run_id, name = start_run(self.prefect, deployment)
        self._process = None
        self._remote = _RemoteRun(run_id, name, self._deployment)
        log.info(
            "Train: flow run %s (%s) of %s/%s on %s", name, run_id, FLOW_NAME, self._deployment, self.prefect.shown
        )

    def _start_local(self) -> None:
        self._remote = None
        env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
        with self.log_path.open("wb") as log_file:
            self._process = subprocess.Popen(
                self.command,
                cwd=self.workspace.root,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _check_project(self) -> None:
        try:
            params = load_params(self.workspace.params)
        except SignflowError as error:
            raise CaptureError(f"cannot train: {error}", 422) from None
        self._epochs = params.train.epochs
        self._deployment = params.schedule.deployment
        split = params.split
        if split.strategy != "group" or split.group_pattern != BURST_PATTERN:
            raise CaptureError(
                f"cannot train on captures with split.strategy {split.strategy!r}: frames of one burst are nearly "
                "identical, so a burst must stay in one split or the test accuracy measures memory. Set "
                f"split.strategy: group and split.group_pattern: '{BURST_PATTERN}' in {self.workspace.params}",
                422,
            )

    def _check_not_busy(self) -> None:
        lock = self.workspace.run_lock
        busy = f"another signflow run holds {lock} (a flow run, a sweep or `dvc repro`); train when it has finished"
        try:
            with held_lock(lock, 0, "", busy):
                pass
        except LockBusyError as error:
            raise CaptureError(str(error), 409) from None

    def _point_source_at_captures(self) -> None:
        from signflow.source import normalise_source, read_source, set_source

        self.capture_dir.mkdir(parents=True, exist_ok=True)
        wanted, _ = normalise_source(str(self.capture_dir), self.workspace.root)
        try:
            current = read_source(self.workspace.root).url
        except SignflowError:
            current = None
        if current != wanted:
            set_source(self.workspace.root, str(self.capture_dir), fetch=False)

    def status(self) -> dict:
        with self._lock:
            return self._read_status()

    def _read_status(self) -> dict:
        idle = {"state": "idle", "step": None, "epoch": None, "epochs": None, "error": None, "seconds": None}
        if self._remote is not None:
            return self._remote_status()
        if self._process is None:
            return {**idle, "flow_run": None, "waiting": None, "note": None}
        code = self._process.poll()
        if code is not None and self._ended is None:
            self._ended = time.time()
        text = _tail(self.log_path)
        steps = [m.group(1) or m.group(2) for m in STEP_LINE.finditer(text)]
        epochs = EPOCH_LINE.findall(text)
        state = "running" if code is None else ("done" if code == 0 else "failed")
        return {
            "state": state,
            "step": steps[-1] if steps else None,
            "epoch": int(epochs[-1]) if epochs and steps and steps[-1] == "train" else None,
            "epochs": self._epochs,
            "error": _error_in(text, code) if state == "failed" else None,
            "seconds": round((self._ended or time.time()) - self._started, 1),
            "flow_run": None,
            "waiting": None,
            "note": self._note,
        }

    def _remote_status(self) -> dict:
        remote = self._remote
        remote.poll(self.prefect)
        report = remote.report
        if report.state in ("done", "failed") and self._ended is None:
            self._ended = time.time()
        notes = [
            remote.poll_error and f"{remote.poll_error}; showing what it said last",
            other_project(report, self.workspace.root),
        ]
        return {
            "state": report.state,
            "step": report.step,
            "epoch": report.epoch if report.step == "train" else None,
            "epochs": self._epochs,
            "error": report.error,
            "seconds": round((self._ended or time.time()) - self._started, 1),
            "flow_run": {
                "id": remote.run_id,
                "name": remote.name,
                "state": report.state_name,
                "server": self.prefect.shown,
                "works_in": None if report.project is None else " on ".join(report.project),
            },
            "waiting": report.waiting,
            "note": "; ".join(note for note in notes if note) or None,
        }

    def stop(self) -> None:
        """End a local run still going (its process group only) and remove its log, when the server
        stops. A deployment run belongs to the Prefect server: it goes on (cancel it in the UI)."""
        import shutil
        import signal

        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
        shutil.rmtree(self.log_path.parent, ignore_errors=True)


POLL_S = 2.0
"""The page asks every second; the Prefect API is asked at most this often (3 small requests a poll)."""


@dataclass
class _RemoteRun:
    """A flow run this page started, and what the API said of it last."""

    run_id: str
    name: str
    deployment: str
    report: RunReport = field(default_factory=lambda: RunReport("queued", "Scheduled"))
    polled_at: float = 0.0
    poll_error: str | None = None

    def poll(self, server: PrefectServer, force: bool = False) -> None:
        """Ask the API again when the last answer is older than POLL_S (or `force`) and the run had not ended."""
        if self.report.state in ("done", "failed") or (not force and time.monotonic() - self.polled_at < POLL_S):
            return
        self.polled_at = time.monotonic()
        try:
            self.report = read_run(server, self.run_id, self.deployment, self.report.project)
            self.poll_error = None
        except CaptureError as error:
            self.poll_error = str(error)


def _tail(path: Path) -> str:
    if not path.is_file():
        return ""
    with path.open("rb") as log:
        log.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
        return log.read().decode("utf-8", errors="replace")


def _error_in(text: str, code: int) -> str:
    """The run's own one-line error (signflow's, else DVC's), or its last line."""
    found = [m for line in text.splitlines() if (m := ERROR_LINE.search(line.strip()))]
    errors = [m.group(1) for m in found if m.group(1)] or [m.group(2) for m in found]
    if errors:
        return errors[-1].strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return f"the run stopped with exit code {code}" + (f": {lines[-1].strip()}" if lines else "")
