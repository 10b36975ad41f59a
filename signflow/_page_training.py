"""The "Train" action of `signflow serve --capture-dir`: the project's pipeline run in the background
on the capture folder, one run at a time, its step and epoch read from its log.

It runs what a person would: `dvc repro` in the project folder (TRAIN_COMMAND), with data.dvc pointed
at the capture folder first (`signflow source set <capture dir> --no-fetch`; the extract stage then
fetches it) when it pointed elsewhere. Each stage takes the project's run lock, so a run is refused
while another signflow run (a flow run, a sweep, a `dvc repro` in a terminal) holds it. The params
must split by burst (`split.strategy: group`, `split.group_pattern` = BURST_PATTERN): a random split
would put frames of one burst, near-identical, in train and test and report memory as accuracy.
A new champion is then served by the registry follower (signflow._hot_swap), not by this module.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from signflow._capture import BURST_PATTERN, CaptureError
from signflow.config import load_params
from signflow.errors import SignflowError
from signflow.fileio import LockBusyError, held_lock
from signflow.layout import Workspace

__all__ = ["PageTraining", "TRAIN_COMMAND"]

TRAIN_COMMAND = [sys.executable, "-m", "dvc", "repro"]
STEP_LINE = re.compile(r"Running stage '(\w+)'|Task run '(\w+?)-[0-9a-z]{3}'")
EPOCH_LINE = re.compile(r"\bepoch (\d+): train loss")
ERROR_LINE = re.compile(r"(?:signflow [\w.]+|flows\.\w+): error: (.+)|^ERROR: (.+)")
LOG_TAIL_BYTES = 256 * 1024


class PageTraining:
    """Start the pipeline and report on it. `command` is TRAIN_COMMAND unless a test gives another."""

    def __init__(self, project_dir: str | Path, capture_dir: str | Path, command: list[str] | None = None):
        self.workspace = Workspace(Path(project_dir).resolve())
        self.capture_dir = Path(capture_dir).resolve()
        self.command = command or TRAIN_COMMAND
        self.log_path = Path(tempfile.mkdtemp(prefix="signflow-serve-train-")) / "train.log"
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._started = self._ended = None
        self._epochs = 0

    def start(self) -> dict:
        """Start a run; refused (409) while one runs, from this page or anywhere in the project."""
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                status = self._read_status()
                raise CaptureError(
                    f"a training run is going already ({status['step'] or 'starting'}); wait for it to finish", 409
                )
            self._check_project()
            self._check_not_busy()
            self._point_source_at_captures()
            env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
            with self.log_path.open("wb") as log:
                self._process = subprocess.Popen(
                    self.command,
                    cwd=self.workspace.root,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self._started, self._ended = time.time(), None
        return self.status()

    def _check_project(self) -> None:
        try:
            params = load_params(self.workspace.params)
        except SignflowError as error:
            raise CaptureError(f"cannot train: {error}", 422) from None
        self._epochs = params.train.epochs
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
        if self._process is None:
            return {"state": "idle", "step": None, "epoch": None, "epochs": None, "error": None, "seconds": None}
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
        }

    def stop(self) -> None:
        """End a run still going (its process group only) and remove its log, when the server stops."""
        import shutil
        import signal

        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
        shutil.rmtree(self.log_path.parent, ignore_errors=True)


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
