"""One Prefect task per pipeline step: extract → split → train → evaluate → export → register.

Each task asks DVC whether its stage is up to date (and then skips it), runs the library function
`dvc.yaml` runs, and records the stage in dvc.lock, unless a dep or param changed while it ran. Each
takes the previous step's outcome, so the run graph in the UI shows the chain. Without a recorder
(an override run in its own workspace) a task just runs its step and records nothing.

Prefect's own result caching is off (`cache_policy=NONE`): DVC decides what is up to date.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from signflow import dvc_state
from signflow._archive import Deadline
from signflow.config import EvaluateConfig, ExportConfig, ExtractConfig, Params, SplitConfig, TrainConfig
from signflow.evaluate import EvaluationResult, evaluate
from signflow.export import export_onnx
from signflow.extract import extract_dataset
from signflow.layout import STAGES, Workspace
from signflow.register import Registration, register_run
from signflow.source import NetworkError, require_fetched, sync_source
from signflow.split import split_dataset
from signflow.train import train_model

LIBRARY_LOGGER = "signflow"


@contextmanager
def library_logs_to_run(level: int = logging.INFO) -> Iterator[None]:
    """While it is open, the library's log lines (`signflow.*`: the train step's "epoch N: train loss
    ...", the split's counts) go to the flow run's logs on the Prefect API, beside its tasks' own.
    Prefect sends only its own loggers there (and PREFECT_LOGGING_EXTRA_LOGGERS, read once at import);
    without this the UI, and the serve page that reads the epoch from the API, never see them."""
    from prefect.logging.handlers import APILogHandler

    logger, handler = logging.getLogger(LIBRARY_LOGGER), APILogHandler(level)
    previous = logger.level
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def log_project(project: Path) -> None:
    """The first line of a run: where it works. The serve page compares it with its own project
    (signflow/_prefect_run.py PROJECT_LINE) to say when a run works in another checkout."""
    get_run_logger().info("signflow project: %s on %s", project, socket.gethostname())


@dataclass(frozen=True)
class DvcRecorder:
    """How a run on the main workspace uses DVC: the project, the inputs (code, params) each stage
    had when the run started, whether to run up-to-date stages anyway, and the default remote."""

    project: Path
    started_with: dict[str, dvc_state.StageInputs]
    force: bool = False
    remote: str | None = None

    @classmethod
    def start(cls, project: Path, force: bool = False) -> DvcRecorder:
        with dvc_state.open_repo(project) as repo:
            return cls(project, dvc_state.source_inputs(repo, STAGES), force, dvc_state.default_remote(repo))

    @contextmanager
    def repo(self) -> Iterator[Any]:
        with dvc_state.open_repo(self.project) as repo:
            yield repo

    def check(self, repo, stage: str) -> tuple[dvc_state.StageInputs, bool]:
        """What the step will run with (its produced deps as they are now, the rest as at the start),
        and whether DVC says it is up to date with exactly that."""
        if self.force:
            return {**dvc_state.stage_inputs(repo, stage), **self.started_with[stage]}, False
        now, up_to_date = dvc_state.stage_state(repo, stage)
        expected = {**now, **self.started_with[stage]}
        return expected, now == expected and up_to_date


class StepOutcome:
    """What one step did: its library result (None when skipped) and whether dvc.lock records it
    (None when the run keeps no DVC record).

    A plain class on purpose: Prefect links a task's result, and a dataclass's fields too, to the task
    by identity, and a field such as the stage name (an interned string, also in DvcRecorder) would
    draw false edges in the run graph."""

    __slots__ = ("notes", "ran", "recorded", "result", "stage")

    def __init__(
        self, stage: str, result: Any = None, ran: bool = True, recorded: bool | None = None, notes: tuple = ()
    ):
        self.stage, self.result, self.ran, self.recorded, self.notes = stage, result, ran, recorded, tuple(notes)

    def __repr__(self) -> str:
        return f"StepOutcome({self.stage!r}, ran={self.ran}, recorded={self.recorded}, notes={self.notes})"

    def noted(self, *notes: str) -> StepOutcome:
        return StepOutcome(self.stage, self.result, self.ran, self.recorded, (*notes, *self.notes))

    def summary_line(self) -> str:
        outcome = self.result.summary_line() if self.ran and self.result is not None else "skipped (up to date)"
        return "; ".join([outcome, *self.notes])


def run_step(stage: str, dvc: DvcRecorder | None, step: Callable[[], Any]) -> StepOutcome:
    """Run one step unless DVC says its stage is up to date; record it in dvc.lock afterwards. DVC's
    lock is held while checking and recording, not while the step runs."""
    if dvc is None:
        return StepOutcome(stage, step())
    with dvc.repo() as repo:
        expected, fresh = dvc.check(repo, stage)
    if fresh:
        get_run_logger().info("%s: up to date (dvc.lock), skipped", stage)
        return StepOutcome(stage, ran=False, recorded=True)
    result = step()
    with dvc.repo() as repo:
        return _recorded(repo, stage, expected, result)


def _recorded(repo, stage: str, expected: dvc_state.StageInputs, result: Any) -> StepOutcome:
    changed = dvc_state.record_stage(repo, stage, expected)
    if not changed:
        return StepOutcome(stage, result, recorded=True)
    note = (
        f"not recorded in dvc.lock: {', '.join(changed)} changed while it ran; the next run (or `dvc repro`) "
        "runs it again with what is there now"
    )
    get_run_logger().warning("%s: %s", stage, note)
    return StepOutcome(stage, result, recorded=False, notes=(note,))


def _network_failure(task, task_run, state) -> bool:
    try:
        state.result()
    except NetworkError:
        return True
    except Exception:  # noqa: BLE001 - bad input is not retried blindly
        return False
    return False


@task(name="extract", retries=2, retry_delay_seconds=[30, 120], retry_condition_fn=_network_failure, cache_policy=NONE)
def extract_task(cfg: ExtractConfig, workspace: Workspace, dvc: DvcRecorder | None, project: Path) -> StepOutcome:
    """Fetch the source data.dvc names if it changed (a HEAD request when it did not), then extract it
    into the raw dataset. DVC's lock is held throughout, so no `dvc repro` fetches at the same time.
    An override run (no recorder) extracts the source the project has fetched, fetching nothing.
    Extraction checks the deadline `extract.timeout_s` itself, between files (see _archive.Deadline)."""
    source, deadline = Workspace(project).source, Deadline.after(cfg.timeout_s)
    with dvc_state.open_repo(project) as repo:
        if dvc is None:
            require_fetched(repo, project)
            return StepOutcome("extract", extract_dataset(source, workspace.raw, cfg, project, deadline))
        sync = sync_source(repo, project)
        get_run_logger().info(sync.note)
        expected, fresh = dvc.check(repo, "extract")
        if fresh:
            return StepOutcome("extract", ran=False, recorded=True, notes=(sync.note,))
        result = extract_dataset(source, workspace.raw, cfg, project, deadline)
        outcome = _recorded(repo, "extract", expected, result)
    return outcome.noted(sync.note)


FETCH_GRACE_S = 60
"""Prefect's own timeout on the extract task comes this long after `extract.timeout_s`: it stops a
fetch that stalls, while extraction, which checks the deadline itself, stops first and cleanly."""


def extract_with_deadline(cfg: ExtractConfig):
    """The extract task with `extract.timeout_s` as its deadline: a source that stalls fails the
    run instead of holding it (and the run lock) for ever. A timed-out task is not retried."""
    return extract_task.with_options(timeout_seconds=cfg.timeout_s + FETCH_GRACE_S)


@task(name="split", cache_policy=NONE)
def split_task(cfg: SplitConfig, workspace: Workspace, dvc: DvcRecorder | None, after: StepOutcome) -> StepOutcome:
    return run_step("split", dvc, lambda: split_dataset(workspace.raw, workspace.split, cfg))


@task(name="train", cache_policy=NONE)
def train_task(cfg: TrainConfig, workspace: Workspace, dvc: DvcRecorder | None, after: StepOutcome) -> StepOutcome:
    w = workspace
    return run_step("train", dvc, lambda: train_model(cfg, w.raw, w.split, w.model, w.train_log, w.cache))


@task(name="evaluate", cache_policy=NONE)
def evaluate_task(
    cfg: EvaluateConfig, workspace: Workspace, dvc: DvcRecorder | None, after: StepOutcome
) -> StepOutcome:
    w = workspace
    reports = w.outputs.reports
    outcome = run_step("evaluate", dvc, lambda: evaluate(cfg, w.model, w.raw, w.split, reports, w.train_log))
    if outcome.ran:
        publish_evaluation(outcome.result, reports)
    return outcome


def publish_evaluation(result: EvaluationResult, reports_dir: Path) -> None:
    """The test metrics (table) and the evaluation report (markdown) as artifacts on the run's page."""
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


@task(name="export", cache_policy=NONE)
def export_task(cfg: ExportConfig, workspace: Workspace, dvc: DvcRecorder | None, after: StepOutcome) -> StepOutcome:
    return run_step(
        "export", dvc, lambda: export_onnx(cfg, workspace.model, workspace.outputs.onnx, workspace.raw, workspace.split)
    )


@task(name="register", cache_policy=NONE)
def register_task(
    params: Params,
    workspace: Workspace,
    dvc: DvcRecorder | None,
    after: StepOutcome,
    *,
    project: Path,
    run_tags: dict[str, str],
) -> StepOutcome:
    w = workspace
    outcome = run_step(
        "register",
        dvc,
        lambda: register_run(params, w.model, w.outputs, project_dir=project, split_dir=w.split, run_tags=run_tags),
    )
    if outcome.ran:
        publish_registration(outcome.result, run_tags)
    return outcome


def publish_registration(result: Registration, run_tags: dict[str, str]) -> None:
    """The registration, with why the champion alias moved or not, as an artifact on the run's page."""
    lines = [
        f"**{result.model_name}** version {result.version} (test accuracy {result.test_accuracy:.4f}); "
        f"champion: version {result.champion_version}; new version: {result.newly_created}",
        "",
        f"Test split: {result.test_split} Test images with a near-duplicate in train: "
        f"{result.test_near_duplicates_in_train}.",
        "",
        f"Champion: {result.champion_reason}",
    ]
    lines += [f"- `{key}`: {value}" for key, value in sorted(run_tags.items())]
    create_markdown_artifact(key="registration", markdown="\n".join(lines) + "\n")


@task(name="push", retries=2, retry_delay_seconds=[30, 120], cache_policy=NONE)
def push_task(project: Path, after: StepOutcome) -> str:
    """`dvc push` to the default remote: the data, the model and everything else DVC caches."""
    with dvc_state.open_repo(project) as repo:
        remote = dvc_state.default_remote(repo)
        count = dvc_state.push(repo)
    message = f"dvc push: {count} file(s) sent to remote {remote!r}"
    get_run_logger().info(message)
    return message


@task(name="summary", cache_policy=NONE)
def summary_task(outcomes: dict[str, StepOutcome], header: list[str]) -> str:
    """Say what this run did, in the log and as a markdown artifact on the run's page."""
    lines = ["| step | outcome |", "|---|---|"]
    lines += [f"| {step} | {outcome.summary_line()} |" for step, outcome in outcomes.items()]
    ran = [step for step, outcome in outcomes.items() if outcome.ran]
    if not ran:
        headline = "Nothing changed since the last successful run (same data, code and params): no new model."
    else:
        headline = f"Ran: {', '.join(ran)}."
    markdown = "\n\n".join([headline, *header, "\n".join(lines)]) + "\n"
    get_run_logger().info(headline)
    create_markdown_artifact(key="pipeline-summary", markdown=markdown, description="What this run did")
    return headline


def run_tags_for(flow_run_id: str, flow_run_name: str, overrides: dict[str, Any] | None, workspace: str) -> dict:
    """MLflow tags that tie a registered version to the Prefect flow run (and workspace) that made it."""
    tags = {"signflow.flow_run_id": flow_run_id, "signflow.flow_run_name": flow_run_name}
    if overrides:
        tags.update({"signflow.overrides": json.dumps(overrides, sort_keys=True), "signflow.workspace": workspace})
    return tags
