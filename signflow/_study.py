"""The Optuna study behind `sweep.method: optuna`: where it is stored, what it is called, and the
loop each worker runs (ask a trial, train it with pruning, tell the result).

The storage is never in params.yaml (it may hold a password): `SIGNFLOW_OPTUNA_STORAGE`
(`postgresql://...`, shared by workers on several machines) when set, else a JournalStorage file in
the sweep folder (no SQLite: team mode creates no SQLite file). The study name is a digest of the
base train params, the search settings and the split's files, so a rerun resumes its own study and
a different split or recipe never mixes with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from signflow._redact import redact_url
from signflow.config import SearchRange, SweepConfig
from signflow.errors import SignflowError

log = logging.getLogger(__name__)


class StudyError(SignflowError, RuntimeError):
    """The study's storage cannot be opened."""


STORAGE_ENV = "SIGNFLOW_OPTUNA_STORAGE"
JOURNAL_FILE = "optuna-journal.log"
SPLIT_FILES = ("classes.json", "train.csv", "valid.csv")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
RECORD_ATTR = "signflow_result"


@dataclass(frozen=True)
class StudySpec:
    """What a worker needs to join the study; picklable, and without the storage URL (which workers
    read from their own environment, so it never becomes a Prefect task parameter)."""

    name: str
    journal_path: str
    cfg: SweepConfig


def study_name(raw_params: dict[str, Any], cfg: SweepConfig, split_dir: str | Path) -> str:
    digest = hashlib.sha256()
    search = {"train": raw_params.get("train"), "space": cfg.model_dump(mode="json")["space"], "seed": cfg.seed}
    digest.update(json.dumps(search, sort_keys=True, default=str).encode())
    for name in SPLIT_FILES:
        path = Path(split_dir) / name
        digest.update(path.read_bytes() if path.is_file() else b"")
    return f"signflow-sweep-{digest.hexdigest()[:16]}"


def storage_description(spec: StudySpec) -> str:
    """Where the study lives, for logs and tables: the URL with its credentials hidden, or the file."""
    url = os.environ.get(STORAGE_ENV)
    return redact_url(url) if url else spec.journal_path


def open_study(spec: StudySpec, worker: int = 0) -> optuna.Study:
    """Create or load the study, with the sampler and pruner its params describe.

    The sampler's seed is `sweep.seed` mixed with the worker's index and the number of trials the
    study already holds: a resumed study draws new random trials rather than its first ones again,
    and workers starting together do not draw the same trial; one worker on a fresh study draws
    the same trials every time."""
    url = os.environ.get(STORAGE_ENV)
    if url:
        storage: Any = url
    else:
        Path(spec.journal_path).parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(spec.journal_path)
        storage = optuna.storages.journal.JournalStorage(backend)
    cfg = spec.cfg
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=cfg.pruning.startup_trials,
        n_warmup_steps=cfg.pruning.warmup_epochs + 1,  # steps are epochs, from 1
    )
    try:
        study = optuna.create_study(
            study_name=spec.name, storage=storage, pruner=pruner, direction="maximize", load_if_exists=True
        )
        existing = len(study.get_trials(deepcopy=False))
    except Exception as error:  # a driver's error may quote the URL
        raise StudyError(
            f"cannot open the Optuna study in {storage_description(spec)}: {redact_url(str(error))}"
        ) from None
    seed = int(np.random.SeedSequence([cfg.seed, worker, existing]).generate_state(1)[0])
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.random_trials)
    return study


def fail_interrupted_trials(study: optuna.Study) -> None:
    """Trials left running by an interrupted sweep would count against the budget forever; the
    project's run lock means no other sweep of this project runs them now."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.info("optuna trial %d was left running by an interrupted sweep: marked failed", trial.number)
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


def suggest(trial: optuna.Trial, space: dict[str, SearchRange | list[Any]]) -> dict[str, Any]:
    overrides = {}
    for key, choices in space.items():
        if isinstance(choices, list):
            overrides[key] = trial.suggest_categorical(key, choices)
        elif choices.integer:
            overrides[key] = trial.suggest_int(key, int(choices.low), int(choices.high), log=choices.log)
        else:
            overrides[key] = trial.suggest_float(key, float(choices.low), float(choices.high), log=choices.log)
    return overrides


def taken(study: optuna.Study) -> int:
    """Trials finished or running: what counts against `max_trials` (not those an interrupted
    sweep left, marked failed without a record: their trials are drawn again)."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return sum(t.state != TrialState.FAIL or RECORD_ATTR in t.user_attrs for t in trials)


def search(
    spec: StudySpec,
    run_one: Callable[[dict[str, Any], optuna.Trial], dict[str, Any]],
    n_trials: int,
    deadline: float | None,
    worker: int = 0,
) -> list[dict[str, Any]]:
    """Up to `n_trials` trials of the study, while it has fewer than `max_trials` and the deadline is
    not past (a study without a finished trial always starts one). `run_one(overrides, trial)`
    trains a trial, reporting its epochs to `trial`, and returns its record: status "pruned",
    "failed" (told as a failure), or one with `valid_accuracy`."""
    study = open_study(spec, worker)
    records = []
    for _ in range(n_trials):
        if taken(study) >= spec.cfg.max_trials:
            break
        if deadline is not None and time.time() > deadline and has_complete(study):
            log.info("optuna: no new trial, sweep.max_minutes is used up")
            break
        trial = study.ask()
        overrides = suggest(trial, spec.cfg.space)
        record = {**run_one(overrides, trial), "optuna_trial": trial.number}
        trial.set_user_attr(RECORD_ATTR, record)
        if record["status"] == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        elif record["status"] == "failed":
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, record["valid_accuracy"])
        log.info("optuna trial %d %s: %s", trial.number, record["trial"], record["status"])
        records.append(record)
    return records


def has_complete(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def finished_records(study: optuna.Study) -> list[dict[str, Any]]:
    """Each finished trial's record, in trial order."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    return [t.user_attrs[RECORD_ATTR] for t in sorted(trials, key=lambda t: t.number) if RECORD_ATTR in t.user_attrs]
