"""Deploy the pipeline to a Prefect work pool, whose workers run it each in their own checkout.

    export PREFECT_API_URL=http://team-server:4200/api     # the team's Prefect server
    signflow deploy                                        # or: python -m flows.deploy
    signflow worker                                        # in each checkout that should run the pipeline

This creates the `process` work pool `schedule.work_pool` if it is missing, and creates (or updates)
the deployment `signflow-pipeline/<schedule.deployment>` on it, with the schedule and concurrency
limit of params.yaml `schedule:` (the same deployment `python -m flows.serve` makes, on a pool instead
of in one process), then exits. Each run goes to one worker (`signflow worker`, flows/worker.py)
and runs in that worker's checkout with its params file: the code is not shipped (no storage, no
pull steps), the worker's checkout is the code, the DVC workspace and the DVC cache.

A run that stops reporting (its worker was killed, its machine lost) is marked Crashed by an
automation this command creates beside the deployment, once it has missed 3 heartbeats
(`schedule.heartbeat_s`); that frees the deployment's concurrency slot for the next run.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from flows._cli import add_project_arguments, describe_prefect_failure
from flows.pipeline import SERVED_PROJECT_ENV
from flows.serve import (
    add_schedule_arguments,
    build_deployment,
    deployment_parameters,
    prefect_server_problem,
    schedule_from,
)
from signflow.config import ConfigError, ScheduleConfig, load_params, params_file_in

POOL_TYPE = "process"
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
MISSED_HEARTBEATS = 3


def pool_job_template() -> dict[str, Any]:
    """The process pool's job template, with each run's working directory the checkout of the worker
    that runs it (the `$SIGNFLOW_SERVED_PROJECT_DIR` its `signflow worker` sets) rather than Prefect's
    temporary folder: a run's processes work where `dvc repro` or `flows.serve` started there would."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    placeholder = "$" + SERVED_PROJECT_ENV
    template["job_configuration"]["working_dir"] = "{{ " + placeholder + " }}"
    # The server accepts only declared placeholders; a worker fills a `$NAME` one from its own environment.
    template["variables"]["properties"][placeholder] = {
        "type": "string",
        "title": "Checkout (set by signflow worker)",
        "description": "Each run works in the checkout of the `signflow worker` that runs it; nothing to set here.",
    }
    return template


def ensure_work_pool(name: str) -> str:
    """Create the process pool `name`, or give an existing one signflow's job template; says which."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    template = pool_job_template()
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=POOL_TYPE, base_job_template=template))
            return f"created the {POOL_TYPE} work pool {name!r}"
        if pool.type != POOL_TYPE:
            raise ConfigError(
                f"schedule.work_pool: the work pool {name!r} is a {pool.type!r} pool; signflow's workers need a "
                f"{POOL_TYPE!r} pool: name another one"
            )
        if pool.base_job_template != template:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
            return f"work pool {name!r}: runs now work in their worker's checkout"
    return f"work pool {name!r} is there"


def crash_automation_name(deployment_name: str) -> str:
    return f"signflow: mark silent runs of signflow-pipeline/{deployment_name} crashed"


def ensure_crash_automation(deployment_id: UUID, deployment_name: str, heartbeat_s: int) -> None:
    """Prefect's zombie detection for self-hosted servers (docs: "detect zombie flows"): a run of this
    deployment that sent a heartbeat and then neither another one nor a final state within
    `MISSED_HEARTBEATS` beats is set to Crashed. Replaced on every deploy, so it follows heartbeat_s."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    name = crash_automation_name(deployment_name)
    with get_client(sync_client=True) as client:
        for existing in client.read_automations_by_name(name):
            client.delete_automation(existing.id)
    Automation(
        name=name,
        description="The worker that ran it stopped (killed, machine lost): `signflow deploy` made this.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.id": f"prefect.deployment.{deployment_id}"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=MISSED_HEARTBEATS * heartbeat_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {MISSED_HEARTBEATS * heartbeat_s} s: its worker stopped",
            )
        ],
    ).create()


def deploy(schedule: ScheduleConfig, overrides: dict[str, Any]) -> tuple[UUID, list[str]]:
    """The pool, the deployment on it and its crash automation; returns the deployment id and what was done."""
    done = [ensure_work_pool(schedule.work_pool)]
    deployment = build_deployment(schedule, deployment_parameters(overrides))
    deployment.job_variables = {"env": {HEARTBEAT_ENV: str(schedule.heartbeat_s)}}
    deployment_id = deployment.apply(work_pool_name=schedule.work_pool)
    done.append(f"deployed signflow-pipeline/{schedule.deployment} to the work pool {schedule.work_pool!r}")
    ensure_crash_automation(deployment_id, schedule.deployment, schedule.heartbeat_s)
    done.append(f"a run silent for {MISSED_HEARTBEATS * schedule.heartbeat_s} s is marked Crashed")
    return deployment_id, done


def build_parser(prog: str = "python -m flows.deploy") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_project_arguments(parser, "params override for every run of this deployment (repeatable)")
    add_schedule_arguments(parser)
    parser.add_argument("--pool", help="work pool name, overriding schedule.work_pool")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m flows.deploy") -> int:
    args = build_parser(prog).parse_args(argv)
    project = Path(args.project_dir).resolve()
    overrides = dict(args.overrides)
    try:
        params = load_params(params_file_in(project, args.params), overrides or None)  # validates the overrides
        schedule = schedule_from(args, params.schedule)
        if args.pool:
            schedule = ScheduleConfig.model_validate({**schedule.model_dump(), "work_pool": args.pool})
        problem = prefect_server_problem()
        if problem:
            raise ConfigError(problem)
        _, done = deploy(schedule, overrides)
    except (ConfigError, ValueError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # the server answered the health check, then refused (401) or went away
        problem = describe_prefect_failure(error)
        if problem is None:
            raise
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 1
    for line in done:
        print(line)
    print(f"start a worker in each checkout that should run it: `signflow worker` (pool {schedule.work_pool!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
