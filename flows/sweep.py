"""The sweep as a Prefect flow: extract → split (skipped when DVC says up to date) → one task per
trial (grid) or per worker asking the Optuna study for trials (optuna), run through the flow's task
runner → comparison → evaluate, export and register the winner (once, in the flow).
Like the pipeline, it holds the project's run lock and reads params.yaml once it has it.

    python -m flows.sweep                       # sweep.* from params.yaml, sweep.workers trials at once
    python -m flows.sweep --workers 2           # a local Dask cluster of 2 single-threaded processes
    SIGNFLOW_DASK_ADDRESS=tcp://10.0.0.5:8786 python -m flows.sweep   # the workers of a running cluster

The task runner: an existing Dask scheduler (SIGNFLOW_DASK_ADDRESS, else sweep.dask_address) when
one is named; else, for more than one worker, a local Dask cluster (prefect-dask's DaskTaskRunner)
whose trials each get cores / workers torch threads; else one worker process.
"""

from __future__ import annotations

import argparse
import os
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
from signflow.config import Params, SweepConfig, load_params, params_file_in, read_params_file
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

DASK_ADDRESS_ENV = "SIGNFLOW_DASK_ADDRESS"


@task(name="trial", cache_policy=NONE)
def trial_task(
    trial: sweep.Trial,
    raw_dir: Path,
    split_dir: Path,
    sweep_dir: Path,
    deadline: float | None,
    cache_dir: Path,
    threads: int | None = None,
):
    if threads:
        import torch

        torch.set_num_threads(threads)
    return sweep.run_trial(trial, raw_dir, split_dir, sweep_dir, deadline, cache_dir)


@task(name="search", cache_policy=NONE)
def search_task(
    spec, raw_params, base_dir, raw_dir, split_dir, sweep_dir, n_trials, deadline, cache_dir, threads, worker
):
    """One worker of the Optuna search: asks the shared study for up to `n_trials` trials."""
    return sweep.search_worker(
        spec, raw_params, base_dir, raw_dir, split_dir, sweep_dir, n_trials, deadline, cache_dir, threads, worker
    )


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
def sweep_flow(
    params_path: str = "params.yaml",
    project_dir: str = ".",
    lock_timeout_s: float = LOCK_WAIT_S,
    threads_per_trial: int | None = None,
):
    """Run the sweep (see signflow.sweep) and register the winner; returns the winner's row. Holds
    the project's run lock (waiting up to `lock_timeout_s`), and reads params.yaml once it has it.
    `threads_per_trial` sets torch's threads in each trial (trials side by side share the cores)."""
    with project_run(project_dir, params_path, None, lock_timeout_s) as (workspace, params):
        return _sweep(workspace, params, params_file_in(workspace.root, params_path), threads_per_trial)


def _sweep(workspace: Workspace, params: Params, params_file: Path, threads: int | None) -> dict[str, Any]:
    raw, split, sweep_dir, cache = workspace.raw, workspace.split, workspace.sweep, workspace.cache
    dvc = DvcRecorder.start(workspace.root)
    extract = extract_with_deadline(params.extract)(params.extract, workspace, dvc, workspace.root)
    split_task(params.split, workspace, dvc, after=extract)
    raw_params, cfg, root = read_params_file(params_file), params.sweep, workspace.root
    if cfg.method == "grid":
        trials = sweep.plan_trials(raw_params, cfg, root)
        get_run_logger().info("%d trials, %d at a time", len(trials), cfg.workers)

        def submit(jobs: list[tuple[sweep.Trial, float | None]]) -> list[dict[str, Any]]:
            futures = [trial_task.submit(t, raw, split, sweep_dir, deadline, cache, threads) for t, deadline in jobs]
            return [future.result() for future in futures]

        results = sweep.run_trials(trials, raw, split, sweep_dir, cfg.max_minutes, runner=submit)
    else:

        def search(spec: Any, shares: list[int], deadline: float) -> list[list[dict[str, Any]]]:
            get_run_logger().info("optuna study %s: %d workers ask it for %s trials", spec.name, len(shares), shares)
            futures = [
                search_task.submit(spec, raw_params, root, raw, split, sweep_dir, n, deadline, cache, threads, index)
                for index, n in enumerate(shares)
            ]
            return [future.result() for future in futures]

        results = sweep.run_search(raw_params, cfg, root, raw, split, sweep_dir, cache, runner=search)
    winner = compare_task(results, sweep_dir)
    steps = sweep.WinnerSteps(evaluate_winner_task, export_winner_task, register_winner_task)
    trials = sweep.winner_trials(raw_params, cfg, root, winner)
    _, registration, _ = sweep.publish_winner(trials, winner, raw, split, sweep_dir, workspace.root, steps)
    return {**winner, "registered_version": registration.version}


def dask_address(cfg: SweepConfig) -> str | None:
    return os.environ.get(DASK_ADDRESS_ENV) or cfg.dask_address


def create_task_runner(cfg: SweepConfig, workers: int) -> tuple[Any, int | None]:
    """The flow's task runner and torch threads per trial (None: torch's default): an existing Dask
    cluster's workers, a local Dask cluster of `workers` single-threaded processes, or one process."""
    address = dask_address(cfg)
    if address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=address), None
    if workers == 1:
        return ProcessPoolTaskRunner(max_workers=1), None
    import dask
    from prefect_dask import DaskTaskRunner

    # Dask's worker processes are daemons by default, and daemons may not start the DataLoader's
    # processes (train.loader_workers).
    dask.config.set({"distributed.worker.daemon": False})
    cluster = {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
    }
    return DaskTaskRunner(cluster_kwargs=cluster), max(1, (os.cpu_count() or 1) // workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_project_arguments(parser, None)  # a trial is params.yaml plus its grid values: no --set
    parser.add_argument("--workers", type=int, help="trials at once (default: sweep.workers)")
    args = parser.parse_args(argv)

    def run() -> None:
        cfg = load_params(Path(args.project_dir) / args.params).sweep
        runner, threads = create_task_runner(cfg, args.workers or cfg.workers)
        sweep_flow.with_options(task_runner=runner)(args.params, args.project_dir, threads_per_trial=threads)

    return run_reporting_errors("flows.sweep", run)


if __name__ == "__main__":
    sys.exit(main())
