"""The pipeline as a Prefect flow: extract → split → train → evaluate → export → register.

Runs without a Prefect server (Prefect starts a temporary one), or against PREFECT_API_URL.
Each step is skipped when DVC says it is up to date, and recorded in dvc.lock after it ran, so
`dvc repro` and this flow share one notion of "done". A run with overrides works in its own
workspace, `runs/<flow run id>/`, and leaves the main workspace and dvc.lock alone.

    python -m flows.pipeline                          # the whole chain with params.yaml
    python -m flows.pipeline --set train.epochs=3     # an override run in runs/<flow run id>/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows._cli import add_project_arguments, run_reporting_errors
from signflow.config import Params, check_run_overrides
from signflow.errors import SignflowError
from signflow.fileio import remove_stale_scratch_in, replace_dir_atomic, staging_dir, write_text_atomic
from signflow.layout import Workspace
from signflow.project import LOCK_WAIT_S, project_run
from tasks.pipeline import (
    DvcRecorder,
    StepOutcome,
    evaluate_task,
    export_task,
    extract_with_deadline,
    library_logs_to_run,
    log_project,
    push_task,
    register_task,
    run_tags_for,
    split_task,
    summary_task,
    train_task,
)


@flow(name="signflow-pipeline", log_prints=True)
def pipeline(
    params_path: str = "params.yaml",
    project_dir: str = ".",
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    lock_timeout_s: float = LOCK_WAIT_S,
) -> dict[str, StepOutcome]:
    """Run extract → split → train → evaluate → export → register.

    The extract step fetches the source data.dvc names only when it changed (new data at the same
    URL is noticed by its ETag). Steps DVC reports up to date are skipped (`force` runs them all).
    `overrides` replace dotted params keys (train.* and evaluate.* only) for this run only: such a run
    works in its own workspace `runs/<flow run id>/` and records nothing in dvc.lock. `params_path` is
    relative to the project and inside it. One run at a time per project: a run waits
    up to `lock_timeout_s` for another run in the same project folder, then reads params.yaml.
    """
    with library_logs_to_run(), project_run(project_dir, params_path, overrides, lock_timeout_s) as (project, params):
        log_project(project.root)
        run_id, run_name = str(flow_run.id), str(flow_run.name)
        if overrides:
            return _override_run(params, project, overrides, run_id, run_name)
        tags = run_tags_for(run_id, run_name, None, ".")
        dvc = DvcRecorder.start(project.root, force)
        outcomes = _chain(params, project, dvc, project.root, tags)
        if dvc.remote is not None:
            push_task(project.root, after=outcomes["register"])
    summary_task(outcomes, [])
    return outcomes


SERVED_PROJECT_ENV, SERVED_PARAMS_ENV = "SIGNFLOW_SERVED_PROJECT_DIR", "SIGNFLOW_SERVED_PARAMS"
"""Set by `python -m flows.serve` in its own process, which its flow runs inherit: the project and
params file a served deployment is pinned to."""


@flow(name="signflow-pipeline", log_prints=True)
def served_pipeline(overrides: dict[str, Any] | None = None) -> dict[str, StepOutcome]:
    """The pipeline as `python -m flows.serve` serves it: on the project folder and params file that
    process was started with. A run's only parameter is `overrides` (train.* and evaluate.* keys):
    anyone who can reach an unauthenticated Prefect server can start a run, but cannot point it at
    another folder, params file, data source or registry."""
    project_dir, params_path = os.environ.get(SERVED_PROJECT_ENV), os.environ.get(SERVED_PARAMS_ENV)
    if not project_dir or not params_path:
        raise SignflowError(f"this flow runs only under `python -m flows.serve` ({SERVED_PROJECT_ENV} is not set)")
    return pipeline.fn(params_path, project_dir, overrides)


def _chain(
    params: Params, workspace: Workspace, dvc: DvcRecorder | None, project: Path, tags: dict[str, str]
) -> dict[str, StepOutcome]:
    """Each step's task, given the previous step's outcome (the edges of the run graph)."""
    extract = extract_with_deadline(params.extract)(params.extract, workspace, dvc, project)
    split = split_task(params.split, workspace, dvc, after=extract)
    train = train_task(params.train, workspace, dvc, after=split)
    evaluate = evaluate_task(params.evaluate, workspace, dvc, after=train)
    export = export_task(params.export, workspace, dvc, after=evaluate)
    register = register_task(params, workspace, dvc, after=export, project=project, run_tags=tags)
    steps = {"extract": extract, "split": split, "train": train, "evaluate": evaluate, "export": export}
    return {**steps, "register": register}


def _override_run(
    params: Params, project: Workspace, overrides: dict[str, Any], run_id: str, run_name: str
) -> dict[str, StepOutcome]:
    """Every step, in a scratch folder that becomes `runs/<run id>/` only once all succeeded (a
    failed run leaves nothing, and the scratch a killed one left is removed by the next); the main
    workspace and dvc.lock are not touched."""
    final = project.override_run(run_id)
    for stale in remove_stale_scratch_in(project.runs):  # a killed override run's, under another run id
        get_run_logger().info("removed %s, left by an override run that was killed", stale)
    get_run_logger().info("overrides %s: this run works in %s; dvc.lock is not updated", overrides, final.root)
    tags = run_tags_for(run_id, run_name, overrides, final.root.relative_to(project.root).as_posix())
    with staging_dir(final.root) as scratch:
        workspace = Workspace(scratch / "workspace")
        _write_run_params(params, overrides, workspace)
        outcomes = _chain(params, workspace, None, project.root, tags)
        replace_dir_atomic(workspace.root, final.root)
    summary_task(outcomes, [f"Override run {overrides}: its outputs are in `{final.root}`."])
    return outcomes


def _write_run_params(params: Params, overrides: dict[str, Any], workspace: Workspace) -> None:
    """The run's exact params (params.yaml with the overrides), so the workspace explains itself."""
    import yaml

    text = f"# params.yaml with the overrides {overrides}\n" + yaml.safe_dump(
        params.model_dump(mode="json"), sort_keys=False
    )
    write_text_atomic(workspace.params, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=pipeline.__doc__)
    add_project_arguments(parser, "override one params key for this run, which then runs in runs/<id>/ (repeatable)")
    parser.add_argument("--force", action="store_true", help="run every step even if DVC says it is up to date")
    args = parser.parse_args(argv)
    overrides = dict(args.overrides)

    def run() -> dict[str, StepOutcome]:
        check_run_overrides(overrides)  # before Prefect starts a server for the run
        return pipeline(args.params, args.project_dir, overrides or None, args.force)

    return run_reporting_errors("flows.pipeline", run)


if __name__ == "__main__":
    sys.exit(main())
