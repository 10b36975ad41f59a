"""The pipeline as a Prefect flow: download → split → fine-tune → evaluate → export → register.

Runs without a Prefect server (Prefect starts a temporary one), or against PREFECT_API_URL.
Each step is skipped when DVC says it is up to date, and recorded in dvc.lock after it ran, so
`dvc repro` and this flow share one notion of "done".

    python -m flows.pipeline                 # the whole chain with params.yaml
    python -m flows.pipeline --set train.epochs=3 --no-dvc
"""

from __future__ import annotations

import argparse
import os
import sys

# The temporary server's first start migrates its database; on 2 busy cores that can pass Prefect's
# 20 s default. Set before Prefect is imported; an explicit setting still wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout
from prefect import flow, get_run_logger  # noqa: E402

from signflow import dvc_state, layout
from signflow.config import ConfigError, Params, load_params
from signflow.errors import SignflowError
from tasks.pipeline import (
    SKIPPED,
    download_task,
    evaluate_task,
    export_task,
    record_stage_task,
    register_task,
    split_task,
    stage_up_to_date_task,
    summary_task,
    train_task,
)


def _run_stage(stage: str, project_dir: Path, use_dvc: bool, force: bool, step: Callable[[], Any]) -> Any:
    """Run one step unless DVC says it is up to date; record it in dvc.lock after it ran."""
    if use_dvc and not force and stage_up_to_date_task(stage, project_dir):
        get_run_logger().info("%s: up to date (dvc.lock), skipped", stage)
        return SKIPPED
    result = step()
    if use_dvc:
        record_stage_task(stage, project_dir)
    return result


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
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    params: Params = load_params(root / params_path, overrides)
    use_dvc = use_dvc and not overrides and dvc_state.is_dvc_project(root)
    if overrides:
        logger.info("overrides %s: every step runs and dvc.lock is not updated", overrides)
    raw, split, model = root / layout.RAW_DIR, root / layout.SPLIT_DIR, root / layout.MODEL_PATH
    reports, onnx = root / layout.REPORTS_DIR, root / layout.ONNX_PATH
    steps: dict[str, Callable[[], Any]] = {
        "download": lambda: download_task(params.download, raw),
        "split": lambda: split_task(params.split, raw, split),
        "train": lambda: train_task(params.train, raw, split, model, root / layout.TRAIN_LOG),
        "evaluate": lambda: evaluate_task(params.evaluate, model, raw, split, reports, root / layout.TRAIN_LOG),
        "export": lambda: export_task(params.export, model, onnx),
        "register": lambda: register_task(
            params, model, reports, root / layout.RECEIPT_PATH, root, split, onnx, root / layout.MODEL_CARD_PATH
        ),
    }
    lock = FileLock(str(root / layout.RUN_LOCK), timeout=lock_timeout_s)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("another signflow run holds %s; waiting up to %.0f s", root / layout.RUN_LOCK, lock_timeout_s)
        lock.acquire()
    try:
        results = {
            name: _run_stage(name, root, use_dvc, force or (refresh_data and name == "download"), step)
            for name, step in steps.items()
        }
    finally:
        lock.release()
    summary_task(results)
    return results


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def add_project_arguments(parser: argparse.ArgumentParser, overrides_help: str | None) -> None:
    """--params, --project-dir and (unless `overrides_help` is None) --set KEY=VALUE."""
    parser.add_argument("--params", default="params.yaml", help="params file, relative to --project-dir")
    parser.add_argument("--project-dir", default=".", help="project root holding dvc.yaml (default: .)")
    if overrides_help is None:
        return
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=_parse_override,
        default=[],
        metavar="KEY=VALUE",
        help=overrides_help,
    )


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


def run_reporting_errors(prog: str, call: Callable[[], Any]) -> int:
    """Run a flow for a command line: exit 0, or one message and 2 (bad params) / 1 (other errors)."""
    try:
        call()
    except SignflowError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
