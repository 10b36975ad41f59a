"""One Prefect task per pipeline step. Each calls the library function `dvc.yaml` calls, and adds
only what Prefect is for: retries on network I/O, logs, and artifacts in the UI.

Prefect's own result caching is off (`cache_policy=NONE`): DVC decides what is up to date.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from signflow import dvc_state
from signflow.config import DownloadConfig, EvaluateConfig, Params, SplitConfig, TrainConfig
from signflow.download import DatasetInfo, NetworkError, download_dataset
from signflow.evaluate import EvaluationResult, evaluate
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
    cfg: EvaluateConfig, model_path: Path, raw_dir: Path, split_dir: Path, reports_dir: Path
) -> EvaluationResult:
    result = evaluate(cfg, model_path, raw_dir, split_dir, reports_dir)
    create_table_artifact(
        key="test-metrics",
        table=[
            {"metric": "accuracy", "value": result.accuracy},
            {"metric": "macro_f1", "value": result.macro_f1},
            {"metric": "test_images", "value": result.test_images},
        ],
        description="Test-split metrics of this run's model",
    )
    return result


@task(name="register", cache_policy=NONE)
def register_task(
    params: Params, model_path: Path, reports_dir: Path, receipt_path: Path, project_dir: Path
) -> Registration:
    result = register_run(params, model_path, reports_dir, receipt_path, project_dir)
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
