"""`signflow stack up | down | status | env | connect`: the team stack from the command line."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

DESCRIPTION = (
    "Start, stop or inspect the team stack on this machine: PostgreSQL, an S3 store (SeaweedFS), an MLflow "
    "tracking server and a Prefect server, bound to 127.0.0.1, credentials generated into <dir>/stack.env "
    '(mode 0600). Needs `pip install -e ".[team]"` and PostgreSQL\'s server binaries (apt-get install postgresql). '
    "See docs/team.md."
)


def add_stack_parser(commands) -> None:
    sub = commands.add_parser("stack", help="start/stop the team servers (Postgres, S3, MLflow, Prefect)",
                              description=DESCRIPTION)  # fmt: skip
    actions = sub.add_subparsers(dest="action", required=True, metavar="ACTION")
    folder = argparse.ArgumentParser(add_help=False)
    folder.add_argument("--dir", type=Path, default=None,
                        help="the stack's folder: data, logs, credentials (default: $SIGNFLOW_STACK_DIR or "
                        "~/.signflow/stack)")  # fmt: skip
    up = actions.add_parser("up", parents=[folder], help="start the servers that are not running (waits until healthy)")
    up.add_argument("--port-base", type=int, default=None,
                    help="first of 8 consecutive ports, fixed at the first up (default 17400: Prefect 17400, "
                    "MLflow 17401, Postgres 17402, S3 17403, SeaweedFS internals 17404-17407 and +10000)")  # fmt: skip
    up.add_argument("--host", default="127.0.0.1", help="address to bind, fixed at the first up (default 127.0.0.1)")
    actions.add_parser("down", parents=[folder], help="stop the servers `up` started (data and credentials stay)")
    actions.add_parser("status", parents=[folder], help="each server: PID, running, answering, address")
    actions.add_parser("env", parents=[folder],
                       help="print export lines for a client shell (prints secrets)")  # fmt: skip
    connect = actions.add_parser("connect", parents=[folder],
                                 help="make the stack's bucket this project's default DVC remote (keys in "
                                 ".dvc/config.local)")  # fmt: skip
    connect.add_argument("--project-dir", type=Path, default=Path("."), help="the project (default: .)")


def run_stack(args: argparse.Namespace) -> int:
    from signflow import stack

    if args.action == "up":
        states = stack.stack_up(args.dir, args.host, args.port_base)
        for state in states:
            took = f"started in {state.start_s:.1f} s" if state.start_s is not None else "already running"
            print(f"{state.name:9} {state.address:45} pid {state.pid:<8} {took}")
        return 0
    if args.action == "down":
        stopped = stack.stack_down(args.dir)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    if args.action == "status":
        states = stack.stack_status(args.dir)
        for state in states:
            health = "answering" if state.healthy else ("running, not answering" if state.running else "stopped")
            print(f"{state.name:9} {state.address:45} pid {state.pid or '-':<8} {health}")
        return 0 if all(state.healthy for state in states) else 1
    env = stack.read_stack_env(args.dir)
    if args.action == "env":
        for key, value in env.items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    url = stack.connect_project(args.project_dir, env)
    print(f"DVC remote 'team' ({url}) is now the default of {args.project_dir.resolve()}; keys in .dvc/config.local")
    return 0
