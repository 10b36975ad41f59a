"""Long-running server processes the team stack starts and stops: started in their own session with
their output in a log file, recorded by PID and start time (a recycled PID is never signalled), waited
for until a health check answers, stopped with SIGINT, then SIGTERM, then SIGKILL."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from signflow.errors import SignflowError


class ServiceError(SignflowError, RuntimeError):
    """A server of the stack could not be started, reached or stopped."""


@dataclass(frozen=True)
class Started:
    """What `down` needs to stop exactly the process `up` started."""

    name: str
    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22: tells this process from a later one with its PID

    def to_json(self) -> dict:
        return asdict(self)


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):  # exited; a child of this process stays a zombie until reaped
        _reap(pid)
        return None
    return int(fields[19])


def is_running(started: Started) -> bool:
    return start_ticks(started.pid) == started.start_ticks


def port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def free_port_base(count: int = 8, host: str = "127.0.0.1") -> int:
    """A base of `count` consecutive free ports whose +10000 (SeaweedFS's gRPC ports) are free too:
    for a stack beside others (tests, benchmarks)."""
    import random

    for _ in range(200):
        base = random.randrange(20000, 45000)
        ports = [base + i for i in range(count)] + [base + 10000 + i for i in range(count)]
        if not any(port_taken(host, port) for port in ports):
            return base
    raise ServiceError(f"no {count} free consecutive ports on {host} between 20000 and 55000")


def launch(name: str, command: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> Started:
    """Start `command` in a new session (so stopping it stops its children too), output to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        try:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=cwd, start_new_session=True,
            )  # fmt: skip
        except OSError as error:
            raise ServiceError(f"{name}: cannot run {command[0]}: {error.strerror}") from None
    ticks = start_ticks(process.pid)
    if ticks is None:
        raise ServiceError(f"{name} exited at once; see {log_path}")
    return Started(name, process.pid, ticks)


def wait_healthy(started: Started, healthy: Callable[[], bool], timeout_s: float, log_path: Path) -> float:
    """Seconds until `healthy()` is true; a clear error when the process died or the time ran out."""
    began = time.monotonic()
    while not healthy():
        if not is_running(started):
            raise ServiceError(f"{started.name} stopped while starting: {last_line(log_path)} (log: {log_path})")
        if time.monotonic() - began > timeout_s:
            raise ServiceError(f"{started.name} did not answer within {timeout_s:.0f} s (log: {log_path})")
        time.sleep(0.25)
    return time.monotonic() - began


def last_line(log_path: Path) -> str:
    try:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip()[:300] if lines else "no output"


def stop(started: Started, timeout_s: float = 20.0) -> bool:
    """Stop the process and its session; False when it was not running (or its PID is another's now).
    SIGINT first: Prefect workers and uvicorn shut down cleanly on it (a worker ignored SIGTERM for 11 s)."""
    if not is_running(started):
        return False
    for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            _signal(started.pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            _reap(started.pid)
            if not is_running(started) and not _group_alive(started.pid):  # children gone too
                return True
            time.sleep(0.1)
    return True


def _signal(pid: int, sig: int) -> None:
    """The whole process group when the process leads one (what `launch` starts: uvicorn workers,
    Prefect's services), else the process alone (PostgreSQL's postmaster stops its own children)."""
    if os.getpgid(pid) == pid:
        os.killpg(pid, sig)
    else:
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
