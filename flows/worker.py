"""Run the work pool's pipeline runs in this checkout: a Prefect worker pinned to it.

    export PREFECT_API_URL=http://team-server:4200/api
    signflow worker                   # or: python -m flows.worker; in the checkout, stop with Ctrl-C

Starts `prefect worker start --pool <schedule.work_pool> --limit 1` with the environment that pins
its runs to this checkout and params file (as `python -m flows.serve` pins its own), and with this
checkout first on the import path, so `flows.pipeline` is this checkout's code. One run at a time:
the checkout is one DVC workspace. Ctrl-C or SIGTERM stops the worker (Prefect's worker stops on
SIGINT; it is sent SIGINT for both); a second one kills it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from flows._cli import add_project_arguments
from flows.pipeline import SERVED_PARAMS_ENV, SERVED_PROJECT_ENV
from flows.serve import prefect_server_problem
from signflow.config import ConfigError, load_params, params_file_in

RUNS_AT_ONCE = 1
"""Per worker: a checkout is one workspace, whose runs take turns on its run lock anyway."""


def worker_environment(project: Path, params_path: str, base: dict[str, str]) -> dict[str, str]:
    """`base` plus the pins a served run reads (flows/pipeline.py served_pipeline) and this checkout
    first on PYTHONPATH (flows/ and tasks/ are not installed)."""
    path = os.pathsep.join(filter(None, [str(project), base.get("PYTHONPATH")]))
    return {**base, SERVED_PROJECT_ENV: str(project), SERVED_PARAMS_ENV: params_path, "PYTHONPATH": path}


def worker_command(pool: str, name: str) -> list[str]:
    return [
        sys.executable, "-m", "prefect", "worker", "start",
        "--pool", pool, "--type", "process", "--name", name, "--limit", str(RUNS_AT_ONCE),
    ]  # fmt: skip


def default_worker_name(project: Path) -> str:
    """Unique per machine and checkout, and says where a run ran (the UI shows it on the pool's page);
    Prefect refuses '/' in a worker name, so the checkout is its folder name and a hash of its path."""
    digest = hashlib.sha256(str(project).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{project.name}-{digest}".replace("%", "_")


def run_worker(command: list[str], env: dict[str, str], cwd: Path) -> int:
    """Run the worker until it exits; SIGINT and SIGTERM here become SIGINT there (Prefect's worker
    ignores SIGTERM for longer than most service managers wait), a second signal kills it."""
    worker: subprocess.Popen | None = None
    signals_seen = 0

    def forward(signum, frame) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGINT if signals_seen == 1 else signal.SIGKILL)

    # Handled here before the worker starts, so it starts with SIGINT's default action: started in the
    # background by a shell (`signflow worker &`, nohup), it would inherit SIGINT ignored, and its own
    # SIGINT handler, which re-raises the signal with the inherited action, would then never stop it.
    previous = {number: signal.signal(number, forward) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker = subprocess.Popen(command, env=env, cwd=cwd, start_new_session=True)
        if signals_seen:  # a signal came before the worker existed
            os.killpg(worker.pid, signal.SIGINT)
        return worker.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def build_parser(prog: str = "python -m flows.worker") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_project_arguments(parser, None)
    parser.add_argument("--pool", help="work pool name, overriding schedule.work_pool")
    parser.add_argument("--name", help="worker name, unique in the pool (default: HOST-FOLDER-HASH of this checkout)")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m flows.worker") -> int:
    args = build_parser(prog).parse_args(argv)
    project = Path(args.project_dir).resolve()
    try:
        params = load_params(params_file_in(project, args.params))
        problem = prefect_server_problem()
        if problem:
            raise ConfigError(problem)
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    pool = args.pool or params.schedule.work_pool
    name = args.name or default_worker_name(project)
    if "/" in name or "%" in name:
        print(f"{prog}: error: --name {name!r}: a worker name cannot contain '/' or '%'", file=sys.stderr)
        return 2
    print(f"worker {name!r} takes runs of the work pool {pool!r} into {project} (params: {args.params})", flush=True)
    env = worker_environment(project, str(args.params), dict(os.environ))
    return run_worker(worker_command(pool, name), env, project)


if __name__ == "__main__":
    sys.exit(main())
