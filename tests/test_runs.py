"""Runs never clobber each other: every entry point that writes the workspace takes the project's
run lock, a waiting flow run reads params.yaml only once it has the lock and records nothing whose
inputs changed while it ran, and an override run works in its own `runs/<flow run id>/`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from filelock import FileLock
from mlflow import MlflowClient

from signflow.cli import COMMANDS, main
from signflow.errors import ExtractError
from signflow.fileio import LockBusyError, _host_tag
from signflow.split import split_dataset
from tests.helpers import make_project, section, tiny_params

WRITING_COMMANDS = sorted(COMMANDS)


def _hold(project: Path) -> FileLock:
    lock = FileLock(str(project / ".signflow-run.lock"))
    lock.acquire(timeout=0)
    return lock


@pytest.mark.parametrize("command", WRITING_COMMANDS)
def test_every_command_that_writes_the_workspace_takes_the_run_lock(command, tmp_path, monkeypatch, capsys):
    """Under `dvc repro` (DVC_STAGE set) a busy lock stops the command at once, before it reads or
    writes anything."""
    project = tmp_path
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    monkeypatch.chdir(project)
    monkeypatch.setenv("DVC_STAGE", command)
    lock = _hold(project)
    try:
        assert main([command]) == 1
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert "another signflow run" in err and "`dvc repro` stops at this stage" in err
    assert not (project / "data" / "raw").exists()


def test_a_command_waits_for_the_run_lock_and_reads_params_once_it_has_it(tmp_path, tiny_zip, venv_env):
    project = make_project(tmp_path, tiny_zip)
    assert main(["source", "set", str(tiny_zip), "--project-dir", str(project)]) == 0
    assert subprocess.run(["signflow", "extract"], cwd=project, env=venv_env).returncode == 0
    lock = _hold(project)
    process = subprocess.Popen(["signflow", "split"], cwd=project, env=venv_env, stderr=subprocess.PIPE, text=True)
    lines, waiting = [], threading.Event()

    def read_stderr():
        for line in process.stderr:
            lines.append(line)
            if "waiting for it to finish" in line:
                waiting.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert waiting.wait(120), "".join(lines)
        assert process.poll() is None and not (project / "data" / "split").exists(), "it waits"
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["split"]["seed"] = 7  # changed by whoever held the lock
        (project / "params.yaml").write_text(yaml.safe_dump(params))
    finally:
        lock.release()
    assert process.wait(timeout=300) == 0, "".join(lines)
    reader.join(10)
    made = (project / "data" / "split" / "test.csv").read_text()
    for seed in (7, 42):
        split_dataset(project / "data" / "raw", tmp_path / f"seed{seed}", section("split", seed=seed))
    assert made == (tmp_path / "seed7" / "test.csv").read_text() != (tmp_path / "seed42" / "test.csv").read_text()


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flows_wait_for_the_run_lock(tmp_path, tiny_zip, prefect_server):
    from flows.pipeline import pipeline
    from flows.sweep import sweep_flow

    project = make_project(tmp_path, tiny_zip)
    lock = _hold(project)
    try:
        for flow in (pipeline, sweep_flow):
            with pytest.raises(LockBusyError, match="was held by another run for 2 s"):  # waited, then gave up
                flow(project_dir=str(project), lock_timeout_s=2)
    finally:
        lock.release()
    assert not (project / "data" / "raw").exists() and not (project / "dvc.lock").exists()


def test_a_waiting_flow_run_reads_params_after_the_lock_and_records_nothing_that_changed_under_it(
    tmp_path, tiny_zip, prefect_server, monkeypatch, venv_env
):
    import flows.pipeline
    import signflow.project
    import tasks.pipeline

    project = make_project(tmp_path, tiny_zip, epochs=2)
    params_file = project / "params.yaml"
    waiting, real_lock = threading.Event(), signflow.project.held_lock

    def spy_lock(*args, **kwargs):
        waiting.set()
        return real_lock(*args, **kwargs)

    real_train = tasks.pipeline.train_model

    def edit_params_while_training(cfg, *args, **kwargs):
        params = yaml.safe_load(params_file.read_text())
        params["train"]["lr"] = 1e-4  # someone edits params.yaml while the step runs
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(signflow.project, "held_lock", spy_lock)
    monkeypatch.setattr(tasks.pipeline, "train_model", edit_params_while_training)
    lock, results = _hold(project), {}
    runner = threading.Thread(target=lambda: results.update(flows.pipeline.pipeline(project_dir=str(project))))
    runner.start()
    try:
        assert waiting.wait(120), "the flow run reached the lock"
        time.sleep(1)
        params = yaml.safe_load(params_file.read_text())
        params["train"]["epochs"] = 1  # changed by whoever held the lock
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    finally:
        lock.release()
    runner.join(600)
    assert results["train"].result.epochs_run == 1, "params.yaml was read after the lock was taken"
    assert results["split"].recorded and not results["train"].recorded
    assert "params.yaml" in " ".join(results["train"].notes)
    lock_file = yaml.safe_load((project / "dvc.lock").read_text())
    assert "split" in lock_file["stages"] and "train" not in lock_file["stages"], "train is not recorded"
    status = subprocess.run(["dvc", "status", "--json"], cwd=project, env=venv_env, capture_output=True, text=True)
    assert "train" in json.loads(status.stdout), "DVC still sees train as out of date"


def _digests(project: Path) -> dict[str, str]:
    files = [project / "dvc.lock", project / "data.dvc", *sorted((project / "models").iterdir())]
    files += sorted((project / "reports").iterdir()) + sorted((project / "data" / "raw").rglob("*.JPG"))[:3]
    return {str(f.relative_to(project)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


@pytest.mark.slow
def test_an_override_run_works_in_its_own_workspace_and_a_failed_one_leaves_nothing(
    tmp_path, tiny_zip, prefect_server, monkeypatch, venv_env
):
    import tasks.pipeline
    from flows.pipeline import pipeline

    project = make_project(tmp_path, tiny_zip, epochs=2)
    pipeline(project_dir=str(project))
    before = _digests(project)
    # scratch of an override run killed before this one (another run id), and of one still running
    killed = project / "runs" / f".0b1e-killed.{_host_tag()}-999999999.abc.partial"
    running = project / "runs" / f".0b1f-running.{_host_tag()}-{os.getpid()}.def.partial"
    for scratch in (killed, running):
        (scratch / "workspace" / "data" / "raw").mkdir(parents=True)

    state = pipeline(project_dir=str(project), overrides={"train.epochs": 1}, return_state=True)
    results, run_id = state.result(), str(state.state_details.flow_run_id)
    workspace = project / "runs" / run_id
    assert not killed.exists(), "a killed override run's scratch is removed by the next one"
    assert running.is_dir(), "a running one's is kept"
    shutil.rmtree(running)
    assert results["train"].result.epochs_run == 1 and results["train"].recorded is None
    for output in ("models/model.pt", "models/model.onnx", "reports/metrics.json", "models/registered.json"):
        assert (workspace / output).is_file(), output
    assert yaml.safe_load((workspace / "params.yaml").read_text())["train"]["epochs"] == 1
    assert _digests(project) == before, "the main workspace and dvc.lock are untouched"
    status = subprocess.run(["dvc", "status"], cwd=project, env=venv_env, capture_output=True, text=True)
    assert "up to date" in status.stdout
    version = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_model_version(
        "sign-language-digits", results["register"].result.version
    )
    assert version.tags["signflow.flow_run_id"] == run_id
    assert version.tags["signflow.workspace"] == f"runs/{run_id}"
    assert json.loads(version.tags["signflow.overrides"]) == {"train.epochs": 1}

    def broken_evaluate(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(tasks.pipeline, "evaluate", broken_evaluate)
    failed = pipeline(project_dir=str(project), overrides={"train.epochs": 1}, return_state=True)
    assert failed.is_failed()
    assert sorted(p.name for p in (project / "runs").iterdir()) == [run_id], "nothing half-written"
    assert _digests(project) == before


def _slow_source_project(tmp_path: Path, tiny_zip: Path) -> Path:
    """A project whose source takes seconds to extract (the tiny dataset and 60,000 notes), with an
    `extract.timeout_s` of one second."""
    import zipfile

    slow = tmp_path / "slow.zip"
    with zipfile.ZipFile(tiny_zip) as small, zipfile.ZipFile(slow, "w") as big:
        for item in small.infolist():
            big.writestr(item, small.read(item))
        for index in range(60000):  # about 4 s to extract here: well past the 1 s deadline
            big.writestr(f"notes/note_{index:05d}.txt", "x")
    project = make_project(tmp_path, slow)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["extract"]["timeout_s"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


@pytest.mark.slow
def test_the_pipeline_and_the_sweep_stop_an_extract_past_its_deadline(tmp_path, tiny_zip, prefect_server):
    from flows.pipeline import pipeline
    from flows.sweep import sweep_flow

    project = _slow_source_project(tmp_path, tiny_zip)
    for flow in (pipeline, sweep_flow):
        state = flow(project_dir=str(project), return_state=True)
        assert state.is_failed(), flow.name
        with pytest.raises(ExtractError, match=r"did not finish within extract.timeout_s \(1 s\); nothing was changed"):
            state.result()
        assert not (project / "data" / "raw").exists(), f"{flow.name}: the extract was stopped"


def test_the_sweep_refuses_a_params_file_outside_the_project(tmp_path, tiny_zip, prefect_server):
    from flows.sweep import sweep_flow
    from signflow.config import ConfigError

    project = make_project(tmp_path, tiny_zip)
    (tmp_path / "outside.yaml").write_text(yaml.safe_dump(tiny_params()))
    for path in ("../outside.yaml", str(tmp_path / "outside.yaml")):
        with pytest.raises(ConfigError, match="must be a path relative to the project, inside it"):
            sweep_flow(params_path=path, project_dir=str(project))
    assert not (project / "data" / "raw").exists()
