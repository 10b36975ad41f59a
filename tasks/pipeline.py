"""One Prefect task per pipeline step. Each calls the library function `dvc.yaml` calls, and adds
only what Prefect is for: retries on network I/O, logs, and artifacts in the UI.

Prefect's own result caching is off (`cache_policy=NONE`): DVC decides what is up to date.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from signflow import _dvc_state as dvc_state
from signflow.config import DownloadConfig, EvaluateConfig, ExportConfig, Params, SplitConfig, TrainConfig
from signflow.download import DatasetInfo, NetworkError, download_dataset
from signflow.evaluate import EvaluationResult, evaluate
from signflow.export import ExportResult, export_onnx
from signflow.layout import ModelOutputs
from signflow.register import Registration, register_run
from signflow.split import SplitResult, split_dataset
from signflow.train import TrainResult, fine_tune


def _network_failure(task, task_run, state) -> bool:
    try:
        state.result()
    except NetworkError:
        return True
    except Exception:  # noqa: BLE001 - bad input is not retried blindly
        return False
    return False


@task(name="download", retries=2, retry_delay_seconds=[30, 120], retry_condition_fn=_network_failure, cache_policy=NONE)
def download_task(cfg: DownloadConfig, dest: Path) -> DatasetInfo:
    return download_dataset(cfg, dest)


@task(name="split", cache_policy=NONE)
def split_task(cfg: SplitConfig, raw_dir: Path, split_dir: Path) -> SplitResult:
    return split_dataset(raw_dir, split_dir, cfg)


@task(name="fine-tune", cache_policy=NONE)
def train_task(cfg: TrainConfig, raw_dir: Path, split_dir: Path, model_path: Path, log_path: Path) -> TrainResult:
    return fine_tune(cfg, raw_dir, split_dir, model_path, log_path)


@task(name="evaluate", cache_policy=NONE)
def evaluate_task(
    cfg: EvaluateConfig, model_path: Path, raw_dir: Path, split_dir: Path, reports_dir: Path, train_log: Path
) -> EvaluationResult:
    result = evaluate(cfg, model_path, raw_dir, split_dir, reports_dir, train_log)
    create_table_artifact(
        key="test-metrics",
        table=[
            {"metric": "accuracy", "value": result.accuracy},
            {"metric": "macro_f1", "value": result.macro_f1},
            {"metric": "test_images", "value": result.test_images},
            {"metric": "mistakes", "value": result.mistakes},
            {"metric": "expected_calibration_error", "value": result.ece},
            {"metric": "test_near_duplicates_in_train", "value": result.test_near_duplicates_in_train},
            {"metric": "accuracy_without_near_duplicates", "value": result.accuracy_without_near_duplicates},
        ],
        description=f"Test-split metrics of this run's model. Test split: {result.split}",
    )
    create_markdown_artifact(
        key="evaluation-report",
        markdown=Path(result.report_path).read_text(encoding="utf-8")
        + f"\nThe figures are in `{reports_dir}`; `dvc plots show` renders them as HTML.\n",
        description="Evaluation report of this run's model",
    )
    return result


@task(name="export", cache_policy=NONE)
def export_task(cfg: ExportConfig, model_path: Path, onnx_path: Path) -> ExportResult:
    return export_onnx(cfg, model_path, onnx_path)


@task(name="register", cache_policy=NONE)
def register_task(
    params: Params, model_path: Path, outputs: ModelOutputs, *, project_dir: Path, split_dir: Path
) -> Registration:
    result = register_run(params, model_path, outputs, project_dir=project_dir, split_dir=split_dir)
    create_markdown_artifact(
        key="registration",
        markdown=(
            f"**{result.model_name}** version {result.version} (test accuracy {result.test_accuracy:.4f}); "
            f"champion: version {result.champion_version}; new version: {result.newly_created}"
        ),
    )
    return result


@task(name="dvc-status", cache_policy=NONE)
def stage_up_to_date_task(stage: str, project_dir: Path) -> bool:
    return dvc_state.stage_is_up_to_date(stage, project_dir)


@task(name="dvc-commit", cache_policy=NONE)
def record_stage_task(stage: str, project_dir: Path) -> None:
    dvc_state.record_stage(stage, project_dir)


SKIPPED = "skipped (up to date)"
"""What a flow records for a step DVC reported up to date."""


def run_stage(stage: str, project_dir: Path, use_dvc: bool, force: bool, step: Callable[[], Any]) -> Any:
    """Run one step's task unless DVC says the stage is up to date; record it in dvc.lock after it ran."""
    if use_dvc and not force and stage_up_to_date_task(stage, project_dir):
        get_run_logger().info("%s: up to date (dvc.lock), skipped", stage)
        return SKIPPED
    result = step()
    if use_dvc:
        record_stage_task(stage, project_dir)
    return result


@task(name="summary", cache_policy=NONE)
def summary_task(results: dict[str, Any]) -> str:
    """Say what this run did, in the log and as a markdown artifact on the run's page."""
    lines = ["| step | outcome |", "|---|---|"]
    for stage, result in results.items():
        lines.append(f"| {stage} | {result if result == SKIPPED else result.summary_line()} |")
    ran = [stage for stage, result in results.items() if result != SKIPPED]
    if ran in ([], ["download"]):
        headline = "Nothing changed since the last successful run (same data, same params): no new model."
    else:
        headline = f"Ran: {', '.join(ran)}."
    markdown = f"{headline}\n\n" + "\n".join(lines) + "\n"
    get_run_logger().info(headline)
    create_markdown_artifact(key="pipeline-summary", markdown=markdown, description="What this run did")
    return headline
