"""Serve the pipeline flow on a Prefect server with the schedule from params.yaml.

    prefect server start                                   # terminal 1 (UI at http://127.0.0.1:4200)
    export PREFECT_API_URL=http://127.0.0.1:4200/api       # terminal 2, then:
    python -m flows.serve                                  # schedule.* from params.yaml
    python -m flows.serve --cron "*/30 * * * *" --set train.epochs=5

This creates (or updates) the deployment `signflow-pipeline/<schedule.deployment>` with its
schedule and a deployment concurrency limit, then keeps running and executes the runs the server
schedules, or that are started from the UI or with `prefect deployment run`, in this project folder.
Stop it with Ctrl-C (its schedule is paused until it is served again). A run's only parameter is
`overrides` (train.* and evaluate.* keys): the project folder and params file are this process's
(--project-dir, --params), pinned, whatever a run asks for.

`flow.serve` is used rather than `flow.deploy`: the runs need this folder (the DVC workspace,
its data and models), which is exactly where a served flow runs, with no work pool, image or code
storage to set up. To run on other machines, deploy the same flow to a work pool instead:
`signflow deploy`, and `signflow worker` in each checkout (flows/deploy.py, flows/worker.py,
docs/prefect.md "Scale-out: work pools").
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from flows._cli import add_project_arguments
from signflow.config import ConfigError, ScheduleConfig, load_params, params_file_in


def deployment_parameters(overrides: dict[str, Any]) -> dict:
    """The run parameters every run of the deployment gets: only `overrides` (a run started from the UI
    can change them, within train.* and evaluate.*); the project and params file are the serving process's."""
    return {"overrides": overrides or None}


def pin_project(project_dir: Path, params_path: str) -> None:
    """Pin the served runs to this project and params file: they run in subprocesses of this process
    and inherit its environment, which no run parameter can change."""
    from flows.pipeline import SERVED_PARAMS_ENV, SERVED_PROJECT_ENV

    params_file_in(project_dir, params_path)
    os.environ.update({SERVED_PROJECT_ENV: str(project_dir), SERVED_PARAMS_ENV: str(params_path)})


def build_deployment(schedule: ScheduleConfig, parameters: dict[str, Any]):
    """A RunnerDeployment of the pipeline flow with `schedule`'s timing and concurrency."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from prefect.flows import EntrypointType

    from flows.pipeline import served_pipeline

    try:
        if schedule.cron is not None:
            timing = CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
        else:
            timing = IntervalSchedule(interval=timedelta(seconds=schedule.interval_s), timezone=schedule.timezone)
    except ValueError as error:
        raise ConfigError(f"schedule: {error}") from None
    return served_pipeline.to_deployment(
        name=schedule.deployment,
        schedule=timing,
        parameters=parameters,
        concurrency_limit=ConcurrencyLimitConfig(
            limit=schedule.concurrency_limit,
            collision_strategy=ConcurrencyLimitStrategy(schedule.collision_strategy),
        ),
        description="signflow: extract → split → train → evaluate → export → register, skipping what is up to date",
        tags=["signflow"],
        # The module path resolves from the project root, where this process runs (flows/ is not installed).
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def prefect_server_problem() -> str | None:
    """Why the Prefect server PREFECT_API_URL names cannot be used (unset, or not answering), in one
    line; None when it answers. A schedule and a work pool need a server that outlives this process."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return (
            "PREFECT_API_URL is not set. Start a server (`prefect server start`) and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`, or point it at your team's server: a schedule "
            "needs a server that outlives this process."
        )
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"the Prefect server at PREFECT_API_URL={url} does not answer ({reason}); is it running?"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_project_arguments(
        parser,
        "params override for every run of this deployment (repeatable; each such run works in its own "
        "runs/<flow run id>/, see docs/prefect.md)",
    )
    add_schedule_arguments(parser)
    return parser


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """--cron / --interval / --name, which `schedule_from` applies to params.yaml's schedule."""
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--cron", help="cron schedule, overriding schedule.cron (e.g. '0 3 * * *')")
    timing.add_argument("--interval", type=int, metavar="SECONDS", help="interval schedule, overriding schedule.cron")
    parser.add_argument("--name", help="deployment name, overriding schedule.deployment")


def schedule_from(args: argparse.Namespace, schedule: ScheduleConfig) -> ScheduleConfig:
    """params.yaml's schedule with --cron / --interval / --name applied (validated again)."""
    updates: dict[str, Any] = {}
    if args.cron:
        updates.update(cron=args.cron, interval_s=None)
    if args.interval:
        updates.update(cron=None, interval_s=args.interval)
    if args.name:
        updates["deployment"] = args.name
    return ScheduleConfig.model_validate({**schedule.model_dump(), **updates})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    project = Path(args.project_dir).resolve()
    overrides = dict(args.overrides)
    try:
        params = load_params(params_file_in(project, args.params), overrides or None)  # validates the overrides
        schedule = schedule_from(args, params.schedule)
        deployment = build_deployment(schedule, deployment_parameters(overrides))
    except (ConfigError, ValueError) as error:
        print(f"flows.serve: error: {error}", file=sys.stderr)
        return 2
    problem = prefect_server_problem()
    if problem:
        print(f"flows.serve: error: {problem}", file=sys.stderr)
        return 2
    from prefect import serve

    pin_project(project, args.params)
    serve(deployment, limit=schedule.concurrency_limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
