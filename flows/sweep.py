"""The sweep as a Prefect flow: extract → split (skipped when DVC says up to date) → one task per
trial, run through the flow's task runner → comparison → evaluate, export and register the winner.
Like the pipeline, it holds the project's run lock and reads params.yaml once it has it.

    python -m flows.sweep                       # sweep.* from params.yaml, sweep.workers trials at once
    python -m flows.sweep --workers 2

Trials are submitted to the flow's task runner (a pool of `--workers` processes). To fan out
further, call `sweep_flow.with_options(task_runner=...)` with `prefect-dask`'s DaskTaskRunner or
`prefect-ray`'s RayTaskRunner, or deploy the flow to a work pool.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run
from prefect.task_runners import ProcessPoolTaskRunner

from flows._cli import add_project_arguments, run_reporting_errors
from signflow import sweep
from signflow.config import Params, load_params, params_file_in, read_params_file
from signflow.evaluate import evaluate
from signflow.export import export_onnx
from signflow.layout import Workspace
from signflow.project import LOCK_WAIT_S, project_run
from signflow.register import register_run
from tasks.pipeline import (
    DvcRecorder,
    extract_with_deadline,
    publish_evaluation,
    publish_registration,
    run_tags_for,
    split_task,
)


@task(name="trial", cache_policy=NONE)
def trial_task(
    trial: sweep.Trial, raw_dir: Path, split_dir: Path, sweep_dir: Path, deadline: float | None, cache_dir: Path
):
    return sweep.run_trial(trial, raw_dir, split_dir, sweep_dir, deadline, cache_dir)


@task(name="compare", cache_policy=NONE)
def compare_task(results: list[dict[str, Any]], sweep_dir: Path) -> dict[str, Any]:
    winner = sweep.pick_winner(results)
    table = sweep.comparison_table(results, winner)
    paths = sweep.write_comparison(table, sweep_dir)
    create_table_artifact(
        key="sweep-comparison",
        table=table.drop(columns=["reproduce"]).where(table.notna(), None).to_dict(orient="records"),
        description=f"One row per trial; winner {winner['trial']} (best validation accuracy)",
    )
    create_markdown_artifact(
        key="sweep-winner",
        markdown=f"Winner **{winner['trial']}**, validation accuracy {winner['valid_accuracy']:.4f}.\n\n"
        f"Reproduce it as the pipeline's train step: `{winner['reproduce']}`\n\nTable: `{paths['markdown']}`, "
        f"plot: `{paths['plot']}`\n",
    )
    return winner


@task(name="evaluate", cache_policy=NONE)
def evaluate_winner_task(cfg, model_path, raw_dir, split_dir, reports_dir, train_log):
    result = evaluate(cfg, model_path, raw_dir, split_dir, reports_dir, train_log)
    publish_evaluation(result, reports_dir)
    return result


@task(name="export", cache_policy=NONE)
def export_winner_task(cfg, model_path, onnx_path):
    return export_onnx(cfg, model_path, onnx_path)


@task(name="register", cache_policy=NONE)
def register_winner_task(params, model_path, outputs, *, project_dir, split_dir):
    tags = run_tags_for(str(flow_run.id), str(flow_run.name), None, ".")  # as a pipeline run's version has
    result = register_run(params, model_path, outputs, project_dir=project_dir, split_dir=split_dir, run_tags=tags)
    publish_registration(result, {})
    return result


# Trials run in worker processes, not threads: each trial seeds and uses the process-wide torch,
# numpy and Python generators (model initialisation, dropout), which threads would share and
# interleave, making trials irreproducible.
@flow(name="signflow-sweep", log_prints=True, task_runner=ProcessPoolTaskRunner(max_workers=1))
def sweep_flow(params_path: str = "params.yaml", project_dir: str = ".", lock_timeout_s: float = LOCK_WAIT_S):
    """Run `sweep.grid` (see signflow.sweep) and register the winner; returns the winner's row. Holds
    the project's run lock (waiting up to `lock_timeout_s`), and reads params.yaml once it has it."""
    with project_run(project_dir, params_path, None, lock_timeout_s) as (workspace, params):
        return _sweep(workspace, params, params_file_in(workspace.root, params_path))


def _sweep(workspace: Workspace, params: Params, params_file: Path) -> dict[str, Any]:
    raw, split, sweep_dir, cache = workspace.raw, workspace.split, workspace.sweep, workspace.cache
    dvc = DvcRecorder.start(workspace.root)
    extract = extract_with_deadline(params.extract)(params.extract, workspace, dvc, workspace.root)
    split_task(params.split, workspace, dvc, after=extract)
    trials = sweep.plan_trials(read_params_file(params_file), params.sweep, workspace.root)
    get_run_logger().info("%d trials, %d at a time", len(trials), params.sweep.workers)

    def submit(jobs: list[tuple[sweep.Trial, float | None]]) -> list[dict[str, Any]]:
        futures = [trial_task.submit(trial, raw, split, sweep_dir, deadline, cache) for trial, deadline in jobs]
        return [future.result() for future in futures]

    results = sweep.run_trials(trials, raw, split, sweep_dir, params.sweep.max_minutes, runner=submit)
    winner = compare_task(results, sweep_dir)
    steps = sweep.WinnerSteps(evaluate_winner_task, export_winner_task, register_winner_task)
    _, registration, _ = sweep.publish_winner(trials, winner, raw, split, sweep_dir, workspace.root, steps)
    return {**winner, "registered_version": registration.version}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_project_arguments(parser, None)  # a trial is params.yaml plus its grid values: no --set
    parser.add_argument("--workers", type=int, help="trials at once (default: sweep.workers)")
    args = parser.parse_args(argv)

    def run() -> None:
        workers = args.workers or load_params(Path(args.project_dir) / args.params).sweep.workers
        sweep_flow.with_options(task_runner=ProcessPoolTaskRunner(max_workers=workers))(args.params, args.project_dir)

    return run_reporting_errors("flows.sweep", run)


if __name__ == "__main__":
    sys.exit(main())
