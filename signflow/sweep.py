"""Sweep: train every combination of the `sweep.grid` values (`sweep.method: grid`), or the trials
an Optuna study draws from `sweep.space` (`optuna`, see signflow._study), on one split, pick the
winner on the validation split, and leave a comparison a person can read.

Each trial is the train step with some `train.*` keys overridden, written to
`<sweep dir>/trials/<name>/` (model, epoch log, `result.json`). `result.json` is written last and
records the trial's exact train params: a rerun skips every trial whose result exists for the same
params, so an interrupted sweep continues where it stopped. The winner has the best validation
accuracy; ties go to the cheaper trial (less training time). Only the winner sees the test split.
With optuna, a trial whose validation accuracy falls below the median of the earlier trials at the
same epoch is pruned (stopped, recorded as pruned), and a rerun resumes the study: its finished
trials count against `max_trials` and are not trained again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from signflow._markdown import markdown_table
from signflow._report import new_figure, save_figure
from signflow.config import (
    Params,
    SweepConfig,
    TrainConfig,
    apply_overrides,
    parse_params,
    read_params_file,
    resolve_relative_paths,
)
from signflow.errors import SignflowError
from signflow.fileio import write_atomic, write_json_atomic, write_text_atomic
from signflow.layout import ModelOutputs, winner_outputs
from signflow.split_files import read_manifest

__all__ = [
    "StopTrial",
    "SweepError",
    "SweepResult",
    "Trial",
    "WinnerSteps",
    "plan_trials",
    "publish_winner",
    "run_search",
    "run_trials",
    "search_worker",
    "sweep",
    "trial_for",
]

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


class SweepError(SignflowError, RuntimeError):
    """The sweep cannot run or produced no usable trial."""


class StopTrial(Exception):  # noqa: N818 - not an error: the pruner stopped the trial
    """Raised by a trial's `on_epoch` to stop training there (the trial is pruned)."""

    def __init__(self, epoch: int, valid_accuracy: float) -> None:
        super().__init__(f"pruned after epoch {epoch} (validation accuracy {valid_accuracy:.4f})")
        self.epoch, self.valid_accuracy = epoch, valid_accuracy


@dataclass(frozen=True)
class Trial:
    name: str
    overrides: dict[str, Any]
    params: Params

    @property
    def train(self) -> TrainConfig:
        return self.params.train

    def dvc_command(self) -> str:
        """The `dvc exp run` that reproduces this trial as the pipeline's own train step."""
        sets = " ".join(f"-S {_single_quoted(f'{key}={json.dumps(value)}')}" for key, value in self.overrides.items())
        return f"dvc exp run {sets}"


def _single_quoted(text: str) -> str:
    """`text` as one shell word in single quotes; an embedded quote closes, escapes and reopens them."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


def plan_trials(raw_params: dict[str, Any], cfg: SweepConfig, base_dir: str | Path = ".") -> list[Trial]:
    """Every combination of the grid, in order, up to `max_trials`; each checked by the typed config
    (relative paths in params resolve against `base_dir`, the params file's folder)."""
    keys = list(cfg.grid)
    combinations = itertools.islice(itertools.product(*cfg.grid.values()), cfg.max_trials)
    return [trial_for(raw_params, dict(zip(keys, values, strict=True)), base_dir) for values in combinations]


def trial_for(
    raw_params: dict[str, Any], overrides: dict[str, Any], base_dir: str | Path = ".", drawn: bool = False
) -> Trial:
    """The trial that is `raw_params` with `overrides` (dotted train.* keys), checked by the typed
    config; named by its values (floats a search `drawn` to 4 significant digits) and a digest of its
    exact train params."""
    params = parse_params(apply_overrides(raw_params, overrides), source=f"sweep trial {overrides}")
    params = resolve_relative_paths(params, Path(base_dir))
    digest = hashlib.sha256(params.train.model_dump_json().encode()).hexdigest()[:10]
    shown = {key: _short(value) if drawn else value for key, value in overrides.items()}
    label = "-".join(f"{key.split('.')[-1]}={value}" for key, value in shown.items())
    return Trial(f"{safe_name(label)}-{digest}", overrides, params)


def _short(value: Any) -> Any:
    """A float a search drew (0.0012345678) as 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else value


def safe_name(label: str, limit: int = 80) -> str:
    """A folder name made from grid values: letters, digits and `_.=-` only, no `..`, bounded length
    (the hash that follows it keeps names unique)."""
    name = re.sub(r"[^A-Za-z0-9_.=-]", "_", label).replace("..", "_")
    return name.strip(".")[:limit] or "trial"


def trial_dir(sweep_dir: str | Path, trial: Trial) -> Path:
    trials = (Path(sweep_dir) / "trials").resolve()
    folder = (trials / trial.name).resolve()
    if folder.parent != trials:
        raise SweepError(f"trial name {trial.name!r} would leave {trials}")
    return folder


def finished_result(sweep_dir: str | Path, trial: Trial, pruned_counts: bool = False) -> dict[str, Any] | None:
    """The trial's earlier result for the same train params; a pruned one only if `pruned_counts`
    (in a search with the same pruner; a grid trains it in full)."""
    path = trial_dir(sweep_dir, trial) / RESULT_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("train") != trial.train.model_dump(mode="json"):
        return None
    return result if pruned_counts or "pruned_at_epoch" not in result else None


def run_trial(
    trial: Trial,
    raw_dir: str | Path,
    split_dir: str | Path,
    sweep_dir: str | Path,
    deadline: float | None = None,
    cache_dir: str | Path | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Train one trial (or return its earlier result); a trial past `deadline` (epoch seconds) is not run.
    Trials share `cache_dir`: those with the same image size decode the images once, and those that
    differ only past the frozen prefix (e.g. in the learning rate) share its cached features.
    `on_epoch` is the train loop's hook; a StopTrial it raises records the trial as pruned."""
    from signflow.train import train_model

    done = finished_result(sweep_dir, trial, pruned_counts=on_epoch is not None)
    if done is not None:
        log.info("trial %s: already finished, skipped", trial.name)
        return {**done, "status": "pruned" if "pruned_at_epoch" in done else "done earlier"}
    if deadline is not None and time.time() > deadline:
        log.info("trial %s: not run, sweep.max_minutes is used up", trial.name)
        return {"trial": trial.name, "overrides": trial.overrides, "status": "not run (budget)"}
    folder = trial_dir(sweep_dir, trial)
    folder.mkdir(parents=True, exist_ok=True)
    started, started_at = time.perf_counter(), time.time()
    try:
        result = train_model(
            trial.train, raw_dir, split_dir, folder / "model.pt", folder / "train_log.csv", cache_dir, on_epoch
        )
    except StopTrial as stop:
        return record_pruned(trial, folder, stop, time.perf_counter() - started, started_at)
    record = {
        "trial": trial.name,
        "overrides": trial.overrides,
        "valid_accuracy": result.best_valid_accuracy,
        "best_epoch": result.best_epoch,
        "train_seconds": round(time.perf_counter() - started, 1),
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
        "model_path": str(folder / "model.pt"),
        "reproduce": trial.dvc_command(),
        "train": trial.train.model_dump(mode="json"),
        **where_and_when(started_at),
    }
    write_json_atomic(folder / RESULT_FILE, record)
    return {**record, "status": "ran"}


def where_and_when(started_at: float) -> dict[str, Any]:
    """Which machine and process ran a trial, and when (epoch seconds): trials spread over workers."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started_at": started_at, "finished_at": time.time()}


def record_pruned(trial: Trial, folder: Path, stop: StopTrial, seconds: float, started_at: float) -> dict[str, Any]:
    """A pruned trial's result.json: where it stopped, its accuracy then, and its exact train params;
    its epoch checkpoint is removed (a pruned trial is not resumed)."""
    from signflow._training_state import resume_path

    resume_path(folder / "model.pt").unlink(missing_ok=True)
    record = {
        "trial": trial.name,
        "overrides": trial.overrides,
        "pruned_at_epoch": stop.epoch,
        "valid_accuracy_at_prune": stop.valid_accuracy,
        "train_seconds": round(seconds, 1),
        "reproduce": trial.dvc_command(),
        "train": trial.train.model_dump(mode="json"),
        **where_and_when(started_at),
    }
    write_json_atomic(folder / RESULT_FILE, record)
    log.info("trial %s: %s", trial.name, stop)
    return {**record, "status": "pruned"}


def pick_winner(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Best validation accuracy; ties to the lower training time."""
    finished = [r for r in results if "valid_accuracy" in r]
    if not finished:
        raise SweepError("no trial finished: raise sweep.max_minutes or check the trials' errors")
    return max(finished, key=lambda r: (r["valid_accuracy"], -r["train_seconds"]))


def comparison_table(results: list[dict[str, Any]], winner: dict[str, Any]) -> pd.DataFrame:
    """One row per trial; a search's tables also say each trial's Optuna number and where a pruned
    trial stopped."""
    searched = [c for c in ("optuna_trial", "pruned_at_epoch") if any(c in r for r in results)]
    rows = []
    for r in results:
        rows.append(
            {
                "trial": r["trial"],
                **{column: r.get(column) for column in searched},
                **{key: json.dumps(value) for key, value in r["overrides"].items()},
                "status": r["status"],
                "valid_accuracy": r.get("valid_accuracy", r.get("valid_accuracy_at_prune")),
                "best_epoch": r.get("best_epoch"),
                "train_seconds": r.get("train_seconds"),
                "trainable_parameters": r.get("trainable_parameters"),
                "winner": r["trial"] == winner["trial"],
                "reproduce": r.get("reproduce", ""),
            }
        )
    return pd.DataFrame(rows)


def write_comparison(table: pd.DataFrame, sweep_dir: str | Path) -> dict[str, Path]:
    """results.csv, results.md and trials.png (validation accuracy against trainable parameters and
    against training time, one point per trial, the winner circled)."""
    sweep_dir = Path(sweep_dir)
    paths = {"csv": sweep_dir / "results.csv", "markdown": sweep_dir / "results.md", "plot": sweep_dir / "trials.png"}
    write_atomic(paths["csv"], lambda tmp: table.to_csv(tmp, index=False))
    write_text_atomic(paths["markdown"], markdown_table(table.drop(columns=["reproduce"])) + "\n")
    ran = table[table["valid_accuracy"].notna() & (table["status"] != "pruned")]
    figure, axes = new_figure(1, 2, figsize=(11, 4.2))
    for ax, column, label in (
        (axes[0], "trainable_parameters", "trainable parameters"),
        (axes[1], "train_seconds", "training time (s)"),
    ):
        ax.scatter(ran[column], ran["valid_accuracy"])
        for _, row in ran.iterrows():
            ax.annotate(row["trial"].rsplit("-", 1)[0], (row[column], row["valid_accuracy"]), fontsize=7)
        best = ran[ran["winner"]]
        ax.scatter(best[column], best["valid_accuracy"], s=200, facecolors="none", edgecolors="red", label="winner")
        ax.set(xlabel=label, ylabel="validation accuracy", title=f"validation accuracy vs {label}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    save_figure(figure, paths["plot"])
    return paths


def run_trials(
    trials: list[Trial],
    raw_dir: str | Path,
    split_dir: str | Path,
    sweep_dir: str | Path,
    max_minutes: float,
    runner: Callable[[list[tuple[Trial, float | None]]], list[dict[str, Any]]] | None = None,
    cache_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """All trials, one after another, or through `runner([(trial, deadline), ...])` (e.g. Prefect
    tasks). The first trial has no deadline, so even a tiny budget yields a winner."""
    require_validation(split_dir)
    deadline = time.time() + max_minutes * 60
    jobs = [(trial, None if index == 0 else deadline) for index, trial in enumerate(trials)]
    if runner is not None:
        return runner(jobs)
    results = []
    for index, (trial, trial_deadline) in enumerate(jobs):
        results.append(run_trial(trial, raw_dir, split_dir, sweep_dir, trial_deadline, cache_dir))
        log.info("trial %d/%d %s: %s", index + 1, len(trials), trial.name, results[-1]["status"])
    return results


def search_worker(
    spec: Any,
    raw_params: dict[str, Any],
    base_dir: str | Path,
    raw_dir: str | Path,
    split_dir: str | Path,
    sweep_dir: str | Path,
    n_trials: int,
    deadline: float | None,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    worker: int = 0,
) -> list[dict[str, Any]]:
    """One worker of a search: up to `n_trials` trials asked from the study `spec` (a
    signflow._study.StudySpec), each trained with pruning and told back; returns their records.
    Workers on other machines join the same study through SIGNFLOW_OPTUNA_STORAGE. `threads` sets
    torch's threads for trials whose train.num_threads is 0 (several workers share the cores);
    `worker` (0, 1, ...) keeps workers that start together from drawing the same trial."""
    from signflow import _study
    from signflow.train import TrainingError

    if threads:
        import torch

        torch.set_num_threads(threads)

    study_dir = study_folder(sweep_dir, spec.name)

    def run_one(overrides: dict[str, Any], asked: Any) -> dict[str, Any]:
        trial = trial_for(raw_params, overrides, base_dir, drawn=True)
        try:
            return run_trial(trial, raw_dir, split_dir, study_dir, None, cache_dir, pruning_reporter(asked))
        except TrainingError as error:  # a learning rate the search drew made the loss diverge
            log.warning("trial %s failed: %s", trial.name, error)
            return {"trial": trial.name, "overrides": overrides, "status": "failed", "error": str(error)}

    return _study.search(spec, run_one, n_trials, deadline, worker)


def pruning_reporter(asked: Any) -> Callable[[dict], None]:
    """The train loop's `on_epoch` for an Optuna trial: report the epoch's validation accuracy, and
    stop (StopTrial) when the study's pruner says so."""

    def report(row: dict) -> None:
        asked.report(float(row["valid_accuracy"]), int(row["epoch"]))
        if asked.should_prune():
            raise StopTrial(int(row["epoch"]), float(row["valid_accuracy"]))

    return report


def study_folder(sweep_dir: str | Path, study_name: str) -> Path:
    """Where a study's trials go (`<sweep dir>/studies/<study>/trials/<trial>/`): a trial's result is
    reused only within its study, whose name covers the split as well as the params."""
    return Path(sweep_dir) / "studies" / study_name


def worker_shares(trials: int, workers: int) -> list[int]:
    """`trials` split as evenly as it goes over at most `workers` workers."""
    return [share for index in range(workers) if (share := trials // workers + (index < trials % workers))]


def run_search(
    raw_params: dict[str, Any],
    cfg: SweepConfig,
    base_dir: str | Path,
    raw_dir: str | Path,
    split_dir: str | Path,
    sweep_dir: str | Path,
    cache_dir: str | Path | None = None,
    runner: Callable[[Any, list[int], float], Any] | None = None,
) -> list[dict[str, Any]]:
    """The optuna sweep: open (or resume) the study, run the trials it still lacks in one worker here
    or through `runner(spec, shares, deadline)` (e.g. one Prefect task per share), and return every
    finished trial's record, those of earlier runs with status "done earlier" (or "pruned")."""
    from signflow import _study

    require_validation(split_dir)
    name = _study.study_name(raw_params, cfg, split_dir)
    spec = _study.StudySpec(name, str(Path(sweep_dir).resolve() / _study.JOURNAL_FILE), cfg)
    study = _study.open_study(spec)
    _study.fail_interrupted_trials(study)
    earlier = {record["optuna_trial"] for record in _study.finished_records(study)}
    remaining = max(0, cfg.max_trials - _study.taken(study))
    log.info(
        "optuna study %s in %s: %d trials finished earlier, %d to run",
        name,
        _study.storage_description(spec),
        len(earlier),
        remaining,
    )
    deadline = time.time() + cfg.max_minutes * 60
    if remaining and runner is not None:
        runner(spec, worker_shares(remaining, cfg.workers), deadline)
    elif remaining:
        search_worker(spec, raw_params, base_dir, raw_dir, split_dir, sweep_dir, remaining, deadline, cache_dir)
    return [
        {**r, "status": "done earlier"}
        if r["optuna_trial"] in earlier and r["status"] in ("ran", "done earlier")
        else r
        for r in _study.finished_records(study)
    ]


def winner_train_log(winner: dict[str, Any]) -> Path:
    return Path(winner["model_path"]).with_name("train_log.csv")


def winner_params(trials: list[Trial], winner: dict[str, Any]) -> Params:
    return next(t.params for t in trials if t.name == winner["trial"])


def winner_trials(
    raw_params: dict[str, Any], cfg: SweepConfig, base_dir: str | Path, winner: dict[str, Any]
) -> list[Trial]:
    """The trials `publish_winner` looks the winner up in: the grid's, or the searched winner's own."""
    if cfg.method == "grid":
        return plan_trials(raw_params, cfg, base_dir)
    return [trial_for(raw_params, winner["overrides"], base_dir, drawn=True)]


@dataclass(frozen=True)
class SweepResult:
    trials: int
    ran: int
    winner: str
    winner_valid_accuracy: float
    winner_test_accuracy: float
    registered_version: str
    table: str


def require_split(split_dir: str | Path) -> None:
    if not (Path(split_dir) / "classes.json").is_file():
        raise SweepError(f"{split_dir}: no split found; run `dvc repro split` (or the pipeline) first")


def require_validation(split_dir: str | Path) -> None:
    """The winner is the trial with the best validation accuracy: without validation images there is none."""
    if read_manifest(split_dir, "valid").empty:
        raise SweepError(
            f"{split_dir}/valid.csv has no images (split.valid: 0): a sweep picks its winner by validation "
            "accuracy. Set split.valid above 0 for the sweep"
        )


@dataclass(frozen=True)
class WinnerSteps:
    """The pipeline's evaluate, export and register steps, as the caller runs them: plain
    functions for `signflow sweep`, Prefect tasks for the sweep flow (so they show in its UI)."""

    evaluate: Callable[..., Any]
    export: Callable[..., Any]
    register: Callable[..., Any]


def publish_winner(
    trials: list[Trial],
    winner: dict[str, Any],
    raw_dir: str | Path,
    split_dir: str | Path,
    sweep_dir: str | Path,
    project_dir: str | Path,
    steps: WinnerSteps,
) -> tuple[Any, Any, ModelOutputs]:
    """Evaluate the winner on the test split, export it and register it, with the winner's params,
    into `winner_outputs(sweep_dir)`; returns (evaluation, registration, outputs)."""
    chosen = winner_params(trials, winner)
    outputs = winner_outputs(Path(sweep_dir))
    model = Path(winner["model_path"])
    evaluation = steps.evaluate(chosen.evaluate, model, raw_dir, split_dir, outputs.reports, winner_train_log(winner))
    steps.export(chosen.export, model, outputs.onnx)
    registration = steps.register(chosen, model, outputs, project_dir=project_dir, split_dir=split_dir)
    return evaluation, registration, outputs


def sweep(
    params_path: str | Path,
    raw_dir: str | Path,
    split_dir: str | Path,
    sweep_dir: str | Path,
    project_dir: str | Path,
    cache_dir: str | Path | None = None,
) -> SweepResult:
    """The whole sweep, one trial after another (`sweep.workers` is the flow's): trials, comparison,
    then the winner evaluated on the test split, exported and registered exactly as the pipeline's
    own steps do."""
    from signflow.evaluate import evaluate
    from signflow.export import export_onnx
    from signflow.register import register_run

    require_split(split_dir)
    params_path, sweep_dir = Path(params_path), Path(sweep_dir)
    raw_params = read_params_file(params_path)
    cfg = parse_params(raw_params, str(params_path)).sweep
    if cfg.method == "grid":
        trials = plan_trials(raw_params, cfg, params_path.parent)
        results = run_trials(trials, raw_dir, split_dir, sweep_dir, cfg.max_minutes, cache_dir=cache_dir)
    else:
        results = run_search(raw_params, cfg, params_path.parent, raw_dir, split_dir, sweep_dir, cache_dir)
    winner = pick_winner(results)
    table = comparison_table(results, winner)
    paths = write_comparison(table, sweep_dir)
    steps = WinnerSteps(evaluate, export_onnx, register_run)
    trials = winner_trials(raw_params, cfg, params_path.parent, winner)
    evaluation, registration, _ = publish_winner(trials, winner, raw_dir, split_dir, sweep_dir, project_dir, steps)
    log.info(
        "sweep winner %s: valid %.4f, %s, registered as version %s; test split: %s",
        winner["trial"],
        winner["valid_accuracy"],
        evaluation.summary_line(),
        registration.version,
        evaluation.split,
    )
    return SweepResult(
        trials=len(results),
        ran=sum(r["status"] == "ran" for r in results),
        winner=winner["trial"],
        winner_valid_accuracy=winner["valid_accuracy"],
        winner_test_accuracy=evaluation.accuracy,
        registered_version=registration.version,
        table=str(paths["markdown"]),
    )
