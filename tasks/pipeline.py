"""One Prefect task per pipeline step. Each calls the library function `dvc.yaml` calls, and adds
only what Prefect is for: retries on network I/O, logs, and artifacts in the UI.

Prefect's own result caching is off (`cache_policy=NONE`): DVC decides what is up to date.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from signflow import dvc_state
from signflow.config import DownloadConfig, EvaluateConfig, ExportConfig, Params, SplitConfig, TrainConfig
from signflow.download import DatasetInfo, NetworkError, download_dataset
from signflow.evaluate import EvaluationResult, evaluate
from signflow.onnx_export import ExportResult, export_onnx
from signflow.registry import Registration, register_run
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
        ],
        description="Test-split metrics of this run's model",
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
    params: Params,
    model_path: Path,
    reports_dir: Path,
    receipt_path: Path,
    project_dir: Path,
    split_dir: Path,
    onnx_path: Path,
    card_path: Path,
) -> Registration:
    result = register_run(
        params,
        model_path,
        reports_dir,
        receipt_path,
        project_dir=project_dir,
        split_dir=split_dir,
        onnx_path=onnx_path,
        card_path=card_path,
    )
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
"""What the flow records for a step DVC reported up to date."""


@task(name="summary", cache_policy=NONE)
def summary_task(results: dict[str, Any]) -> str:
    """Say what this run did, in the log and as a markdown artifact on the run's page."""
    lines = ["| step | outcome |", "|---|---|"]
    for stage, result in results.items():
        lines.append(f"| {stage} | {result if result == SKIPPED else describe(result)} |")
    ran = [stage for stage, result in results.items() if result != SKIPPED]
    if ran in ([], ["download"]):
        headline = "Nothing changed since the last successful run (same data, same params): no new model."
    else:
        headline = f"Ran: {', '.join(ran)}."
    markdown = f"{headline}\n\n" + "\n".join(lines) + "\n"
    get_run_logger().info(headline)
    create_markdown_artifact(key="pipeline-summary", markdown=markdown, description="What this run did")
    return headline


def describe(result: Any) -> str:
    """One line for a step's result dataclass."""
    if isinstance(result, Registration):
        return (
            f"{result.model_name} v{result.version}, champion v{result.champion_version}, new: {result.newly_created}"
        )
    if isinstance(result, EvaluationResult):
        return f"test accuracy {result.accuracy:.4f} on {result.test_images} images"
    if isinstance(result, TrainResult):
        return f"best epoch {result.best_epoch}, valid accuracy {result.best_valid_accuracy:.4f}"
    if isinstance(result, SplitResult):
        return f"{result.counts}"
    if isinstance(result, DatasetInfo):
        return f"{result.num_images} images, {len(result.class_names)} classes"
    if isinstance(result, ExportResult):
        return f"max |ONNX - PyTorch| {result.max_abs_difference:.1e}"
    return "done"
