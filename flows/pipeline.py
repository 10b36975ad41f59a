"""The pipeline as a Prefect flow: download → split → fine-tune → evaluate → export → register.

Runs without a Prefect server (Prefect starts a temporary one), or against PREFECT_API_URL.
Each step is skipped when DVC says it is up to date, and recorded in dvc.lock after it ran, so
`dvc repro` and this flow share one notion of "done".

    python -m flows.pipeline                 # the whole chain with params.yaml
    python -m flows.pipeline --set train.epochs=3 --no-dvc
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows._cli import add_project_arguments, run_reporting_errors
from signflow import _dvc_state as dvc_state
from signflow._fileio import held_lock
from signflow.config import Params, load_params
from signflow.layout import Workspace
from tasks.pipeline import (
    download_task,
    evaluate_task,
    export_task,
    register_task,
    run_stage,
    split_task,
    summary_task,
    train_task,
)


@flow(name="signflow-pipeline", log_prints=True)
def pipeline(
    params_path: str = "params.yaml",
    project_dir: str = ".",
    overrides: dict[str, Any] | None = None,
    use_dvc: bool = True,
    force: bool = False,
    refresh_data: bool = False,
    lock_timeout_s: float = 6 * 3600,
) -> dict[str, Any]:
    """Run download → split → fine-tune → evaluate → export → register.

    Steps DVC reports up to date are skipped. `refresh_data` always re-runs the download (what
    scheduled runs do, so new data at the same URL is noticed; unchanged data leaves every later
    step up to date). `overrides` replace dotted params keys for this run only; such a run is not
    recorded in DVC (dvc.lock must describe params.yaml). One run at a time per project: a run
    waits up to `lock_timeout_s` for another run in the same project folder to finish.
    """
    workspace = Workspace(Path(project_dir).resolve())
    params: Params = load_params(workspace.root / params_path, overrides)
    use_dvc = use_dvc and not overrides and dvc_state.is_dvc_project(workspace.root)
    if overrides:
        get_run_logger().info("overrides %s: every step runs and dvc.lock is not updated", overrides)
    waiting = f"another signflow run holds {workspace.run_lock}; waiting up to {lock_timeout_s:.0f} s"
    with held_lock(workspace.run_lock, lock_timeout_s, waiting):
        results = {
            name: run_stage(name, workspace.root, use_dvc, force or (refresh_data and name == "download"), step)
            for name, step in pipeline_steps(params, workspace).items()
        }
    summary_task(results)
    return results


def pipeline_steps(params: Params, workspace: Workspace) -> dict[str, Callable[[], Any]]:
    """Each stage of dvc.yaml as a call of its Prefect task, with the workspace's paths."""
    raw, split, model, train_log, outputs = (
        workspace.raw,
        workspace.split,
        workspace.model,
        workspace.train_log,
        workspace.outputs,
    )
    return {
        "download": lambda: download_task(params.download, raw),
        "split": lambda: split_task(params.split, raw, split),
        "train": lambda: train_task(params.train, raw, split, model, train_log, workspace.cache),
        "evaluate": lambda: evaluate_task(params.evaluate, model, raw, split, outputs.reports, train_log),
        "export": lambda: export_task(params.export, model, outputs.onnx),
        "register": lambda: register_task(params, model, outputs, project_dir=workspace.root, split_dir=split),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=pipeline.__doc__)
    add_project_arguments(parser, "override one params key for this run (repeatable)")
    parser.add_argument("--no-dvc", action="store_true", help="neither skip up-to-date steps nor write dvc.lock")
    parser.add_argument("--force", action="store_true", help="run every step even if DVC says it is up to date")
    parser.add_argument(
        "--refresh-data", action="store_true", help="re-run the download step to notice new data at download.url"
    )
    args = parser.parse_args(argv)
    return run_reporting_errors(
        "flows.pipeline",
        lambda: pipeline(
            args.params,
            args.project_dir,
            dict(args.overrides) or None,
            not args.no_dvc,
            args.force,
            args.refresh_data,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
