"""`sweep.method: optuna` on the tiny dataset: the study runs, draws the same trials from the same
seed, prunes a hopeless trial, resumes without training finished trials again, lives in a journal
file by default or in PostgreSQL when SIGNFLOW_OPTUNA_STORAGE names one, and spreads its trials
over Dask workers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest
import yaml

import signflow.train
from signflow.config import load_params
from signflow.extract import extract_dataset
from signflow.split import split_dataset
from signflow.sweep import sweep
from tests.helpers import make_project, tiny_params

HOPELESS = 1e-12
"""A learning rate at which nothing is learnt: validation accuracy stays at chance (1 in 3)."""


def _write_sweep(project: Path, **sweep_keys) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["sweep"].update(sweep_keys)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture
def project(tmp_path, tiny_zip, monkeypatch):
    raw = tiny_params(epochs=3)
    raw["sweep"].update(
        method="optuna",
        space={"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}, "train.trainable_blocks": [1, "all"]},
        seed=3,
        random_trials=2,
        pruning={"startup_trials": 1, "warmup_epochs": 1},
        max_trials=4,
        max_minutes=30,
        workers=1,
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(tmp_path / "params.yaml")
    extract_dataset(tiny_zip, tmp_path / "data" / "raw", params.extract)
    split_dataset(tmp_path / "data" / "raw", tmp_path / "data" / "split", params.split)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("SIGNFLOW_OPTUNA_STORAGE", raising=False)
    return tmp_path


def _sweep(project: Path, sweep_dir: str = "sweep"):
    data = project / "data"
    return sweep(project / "params.yaml", data / "raw", data / "split", project / sweep_dir, project)


def _table(project: Path, sweep_dir: str = "sweep") -> pd.DataFrame:
    return pd.read_csv(project / sweep_dir / "results.csv")


def _trial_folder(project: Path, trial: str) -> Path:
    (folder,) = (project / "sweep" / "studies").glob(f"*/trials/{trial}")
    return folder


def _drawn(table: pd.DataFrame) -> list[tuple]:
    return list(zip(table["train.lr"], table["train.trainable_blocks"], strict=True))


def test_an_optuna_sweep_draws_from_the_space_picks_the_best_and_keeps_its_study_in_a_journal(project):
    result = _sweep(project)
    table = _table(project)
    assert list(table["optuna_trial"]) == [0, 1, 2, 3] and result.trials == 4
    assert all(1e-4 <= lr <= 1e-2 for lr in table["train.lr"])
    assert len(set(table["train.lr"])) == 4, "a continuous range gives each trial its own learning rate"
    finished = table[table["status"] == "ran"]
    assert result.winner == table.loc[finished["valid_accuracy"].idxmax(), "trial"]
    assert json.loads((project / "sweep" / "winner" / "registered.json").read_text())["version"] == "1"
    recorded = json.loads((_trial_folder(project, result.winner) / "result.json").read_text())
    assert recorded["train"]["lr"] == recorded["overrides"]["train.lr"]
    journal = project / "sweep" / "optuna-journal.log"
    assert journal.is_file() and "signflow-sweep-" in journal.read_text()
    assert not [p for p in (project / "sweep").rglob("*") if p.suffix in (".db", ".sqlite", ".sqlite3")]


def test_the_same_seed_draws_the_same_trials_and_another_seed_others(project):
    _sweep(project, "sweep-a")
    _sweep(project, "sweep-b")
    first, again = _drawn(_table(project, "sweep-a")), _drawn(_table(project, "sweep-b"))
    assert first == again, "the same seed, space and split draw the same trials, TPE's included"
    _write_sweep(project, seed=4)
    _sweep(project, "sweep-c")
    assert _drawn(_table(project, "sweep-c")) != first


def test_a_hopeless_trial_is_pruned_after_the_warmup_and_recorded_as_pruned(project):
    # Seed 2 draws (random sampling, as random_trials > max_trials) 3e-3, 3e-3 again, then the
    # hopeless rate: the first trial learns, the third stays at chance and is below its median.
    _write_sweep(project, space={"train.lr": [3e-3, HOPELESS]}, seed=2, random_trials=10, max_trials=3)
    result = _sweep(project)
    table = _table(project)
    assert list(table["train.lr"]) == [3e-3, 3e-3, HOPELESS]
    assert list(table["status"]) == ["ran", "done earlier", "pruned"]
    pruned = table.iloc[2]
    assert pruned["pruned_at_epoch"] == 2, "warmup_epochs 1: epoch 1 is never pruned, epoch 2 is"
    assert not pruned["winner"] and result.winner == table.iloc[0]["trial"]
    folder = _trial_folder(project, pruned["trial"])
    recorded = json.loads((folder / "result.json").read_text())
    assert recorded["pruned_at_epoch"] == 2 and recorded["valid_accuracy_at_prune"] == pytest.approx(1 / 3)
    assert not (folder / "model.pt").exists() and not (folder / "model.pt.resume").exists()


def test_a_rerun_resumes_the_study_without_training_finished_trials_again(project, monkeypatch):
    _write_sweep(project, max_trials=2)
    real, calls = signflow.train.train_model, []

    def counted(cfg, *args, **kwargs):
        calls.append(cfg.lr)
        return real(cfg, *args, **kwargs)

    def interrupted_on_the_second(cfg, *args, **kwargs):
        if len(calls) == 1:
            calls.append(cfg.lr)
            raise KeyboardInterrupt("killed")
        return counted(cfg, *args, **kwargs)

    monkeypatch.setattr(signflow.train, "train_model", interrupted_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        _sweep(project)
    assert len(calls) == 2
    calls.clear()
    monkeypatch.setattr(signflow.train, "train_model", counted)
    _sweep(project)
    assert len(calls) == 1, "the finished first trial is not trained again; the interrupted one is drawn anew"
    assert list(_table(project)["status"]) == ["done earlier", "ran"]
    calls.clear()
    _write_sweep(project, max_trials=3)
    _sweep(project)
    assert len(calls) == 1, "a larger budget trains only the new trial"
    table = _table(project)
    assert list(table["status"]) == ["done earlier", "done earlier", "ran"]
    assert list(table["optuna_trial"]) == [0, 2, 3], "trial 1 was the interrupted one"
    calls.clear()
    _sweep(project)
    assert calls == [], "a finished study reruns nothing"


def test_another_split_starts_another_study(project):
    _write_sweep(project, max_trials=1)
    _sweep(project)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["split"]["seed"] = 7
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    split_dataset(project / "data" / "raw", project / "data" / "split", load_params(project / "params.yaml").split)
    _sweep(project)
    assert list(_table(project)["status"]) == ["ran"], "nothing of the first split's study is reused"
    assert len(list((project / "sweep" / "studies").iterdir())) == 2


# --- PostgreSQL (SIGNFLOW_OPTUNA_STORAGE) ---------------------------------------------------------


@pytest.mark.team
def test_a_postgresql_storage_holds_the_study_and_its_password_shows_nowhere(project, team_stack, monkeypatch, caplog):
    import optuna

    from signflow._study import study_name

    """Team mode: the study in the stack's PostgreSQL, the winner in its MLflow, no SQLite file anywhere."""
    postgres_url = team_stack["SIGNFLOW_DATABASE_URL"]
    assert postgres_url.startswith("postgresql://")
    for key, value in team_stack.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SIGNFLOW_OPTUNA_STORAGE", postgres_url)
    _write_sweep(project, max_trials=2)
    caplog.set_level("INFO")
    _sweep(project)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    name = study_name(raw, load_params(project / "params.yaml").sweep, project / "data" / "split")
    assert len(optuna.load_study(study_name=name, storage=postgres_url).trials) == 2
    assert not (project / "sweep" / "optuna-journal.log").exists(), "no journal file beside a database"
    password = urlsplit(postgres_url).password
    shown = caplog.text + "".join(p.read_text() for p in (project / "sweep").glob("results.*"))
    assert f"optuna study {name} in postgresql://***@127.0.0.1" in caplog.text
    assert password and password not in shown
    assert not [p for p in project.rglob("*") if p.suffix in (".db", ".sqlite", ".sqlite3")]
    calls = []
    monkeypatch.setattr(signflow.train, "train_model", lambda *a, **k: calls.append(a))
    _sweep(project)
    assert calls == [], "the study in the database is resumed: nothing to train"


# --- Dask ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_two_local_dask_workers_run_two_trials_at_once(tmp_path, tiny_zip, prefect_server, monkeypatch):
    from flows.sweep import create_task_runner, sweep_flow

    monkeypatch.delenv("SIGNFLOW_OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("SIGNFLOW_DASK_ADDRESS", raising=False)
    project = make_project(tmp_path, tiny_zip, epochs=4)
    _write_sweep(
        project,
        method="optuna",
        space={"train.lr": {"low": 1e-3, "high": 1e-2, "log": True}},
        random_trials=2,
        max_trials=2,
        workers=2,
    )
    cfg = load_params(project / "params.yaml").sweep
    runner, threads = create_task_runner(cfg, cfg.workers)
    assert type(runner).__name__ == "DaskTaskRunner" and threads == max(1, (os.cpu_count() or 1) // 2)
    started = time.time()
    winner = sweep_flow.with_options(task_runner=runner)(project_dir=str(project), threads_per_trial=threads)
    assert winner["registered_version"] == "1"
    records = [json.loads(p.read_text()) for p in (project / "sweep" / "studies").glob("*/trials/*/result.json")]
    assert len(records) == 2
    assert len({(r["host"], r["pid"]) for r in records}) == 2, "each trial ran in its own worker process"
    assert os.getpid() not in {r["pid"] for r in records}
    first, second = sorted(records, key=lambda r: r["started_at"])
    assert started < first["started_at"] and second["started_at"] < first["finished_at"], "the two ran at once"


def test_bad_search_settings_are_refused_with_the_key_named():
    from tests.helpers import section

    with pytest.raises(ValueError, match="train.\\* keys only"):
        section("sweep", space={"split.seed": [1, 2]})
    with pytest.raises(ValueError, match=r"low \(0.01\) must be below high \(0.001\)"):
        section("sweep", space={"train.lr": {"low": 1e-2, "high": 1e-3, "log": False}})
    with pytest.raises(ValueError, match="log: true needs low above 0"):
        section("sweep", space={"train.lr": {"low": 0, "high": 1e-3, "log": True}})
    with pytest.raises(ValueError, match="holds credentials.*SIGNFLOW_DASK_ADDRESS"):
        section("sweep", dask_address="tls://worker:s3cret@10.0.0.5:8786")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(command: list[str], log: Path, **env: str) -> subprocess.Popen:
    from tests.helpers import ROOT, venv_path

    with log.open("w") as out:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "PATH": venv_path(), "PYTHONPATH": str(ROOT), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen) -> None:
    import signal

    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
def test_the_workers_of_a_running_dask_cluster_run_the_trials(tmp_path, tiny_zip, prefect_server, monkeypatch):
    """`dask scheduler` and `dask worker` started apart from the flow (as on other machines), named by
    SIGNFLOW_DASK_ADDRESS: their processes train the trials."""
    from distributed import Client

    from flows.sweep import create_task_runner, sweep_flow

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = _start(
        ["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0"],
        tmp_path / "scheduler.log",
    )
    worker = _start(
        ["dask", "worker", address, "--nworkers", "2", "--nthreads", "1", "--host", "127.0.0.1"],
        tmp_path / "worker.log",
        DASK_DISTRIBUTED__WORKER__DAEMON="False",
    )
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            worker_pids = set(client.run(os.getpid).values())
        monkeypatch.setenv("SIGNFLOW_DASK_ADDRESS", address)
        monkeypatch.delenv("SIGNFLOW_OPTUNA_STORAGE", raising=False)
        project = make_project(tmp_path, tiny_zip)
        _write_sweep(project, grid={"train.lr": [3e-3, 1e-3]}, max_trials=2, workers=1)
        cfg = load_params(project / "params.yaml").sweep
        runner, threads = create_task_runner(cfg, cfg.workers)
        assert type(runner).__name__ == "DaskTaskRunner" and threads is None
        winner = sweep_flow.with_options(task_runner=runner)(project_dir=str(project))
        assert winner["registered_version"] == "1"
        records = [json.loads(p.read_text()) for p in (project / "sweep" / "trials").glob("*/result.json")]
        assert len(records) == 2 and {r["pid"] for r in records} <= worker_pids
    finally:
        _stop(worker)
        _stop(scheduler)
