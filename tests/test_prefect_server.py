"""Integration: a real Prefect server on 127.0.0.1, the pipeline served with a schedule, runs
triggered as a user would (`prefect deployment run`), then checked through the server's API."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import make_project

pytestmark = pytest.mark.slow

DEPLOYMENT = "signflow-pipeline/it-test"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            break
        time.sleep(1)
    value = predicate()  # the process may have exited right after finishing
    if value:
        return value
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free port with its own PREFECT_HOME and SQLite database."""
    from tests.helpers import venv_path

    tmp_path = tmp_path_factory.mktemp("prefect-server")
    venv_env = {**os.environ, "PATH": venv_path()}
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**venv_env, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env={**env, "PREFECT_UI_ENABLED": "false"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait(lambda: _healthy(url), 180, "the Prefect server", server, log)
        yield url, {**env, "PREFECT_API_URL": url}
    finally:
        _stop(server)


def _client(url: str):
    """A client for this test's server, whatever the process-wide Prefect settings say."""
    from prefect.client.orchestration import PrefectClient

    return PrefectClient(api=url)


async def _deployment(url: str, name: str):
    async with _client(url) as client:
        return await client.read_deployment_by_name(name)


async def _flow_run(url: str, run_id):
    async with _client(url) as client:
        return await client.read_flow_run(run_id)


async def _task_runs_and_artifacts(url: str, run_id):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    async with _client(url) as client:
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    return tasks, artifacts


def _trigger(env: dict, *options: str) -> str:
    """`prefect deployment run`, as a user types it; returns the flow run id it prints."""
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", DEPLOYMENT, *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout)
    assert found, f"no flow run id in:\n{result.stdout}"
    return found.group(1)


def _wait_for_run(env: dict, run_id: str, serve: subprocess.Popen, log: Path):
    def final():
        run = asyncio.run(_flow_run(env["PREFECT_API_URL"], run_id))
        return run if run.state and run.state.type.value in FINAL else None

    return _wait(final, 420, f"flow run {run_id}", serve, log)


def test_served_deployment_has_its_schedule_runs_skips_unchanged_work_and_isolates_override_runs(
    prefect_server, tmp_path, tiny_zip, venv_env, monkeypatch
):
    url, env = prefect_server
    project = make_project(tmp_path, tiny_zip)
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "--project-dir", str(project), "--name", "it-test"],
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deployment = _wait(
            lambda: _try(lambda: asyncio.run(_deployment(url, DEPLOYMENT))), 120, "the deployment", serve, log
        )
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"], "schedule from params.yaml"
        assert deployment.global_concurrency_limit.limit == 1, "concurrency limit from params.yaml"
        assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"
        assert deployment.parameters == {"overrides": None}, "project and params file are pinned, not run parameters"

        first = _wait_for_run(env, _trigger(env), serve, log)
        assert first.state.type.value == "COMPLETED", log.read_text()[-4000:]
        tasks, artifacts = asyncio.run(_task_runs_and_artifacts(url, first.id))
        names = {t.name.rsplit("-", 1)[0] for t in tasks}
        assert {"extract", "split", "train", "evaluate", "export", "register"} <= names, names
        assert all(t.state.type.value == "COMPLETED" for t in tasks)
        keys = {a.key for a in artifacts}
        assert {"test-metrics", "evaluation-report", "registration", "pipeline-summary"} <= keys, keys
        receipt = json.loads((project / "models" / "registered.json").read_text())
        assert receipt["version"] == "1" and receipt["is_champion"]

        second = _wait_for_run(env, _trigger(env), serve, log)
        assert second.state.type.value == "COMPLETED"
        tasks, artifacts = asyncio.run(_task_runs_and_artifacts(url, second.id))
        summary = next(a for a in artifacts if a.key == "pipeline-summary")
        assert summary.data.startswith("Nothing changed"), "unchanged data, code and params: nothing retrained"
        assert "registration" not in {a.key for a in artifacts}
        assert json.loads((project / "models" / "registered.json").read_text()) == receipt

        main_files = {p: p.read_bytes() for p in [project / "dvc.lock", *sorted((project / "models").iterdir())]}
        override = _wait_for_run(env, _trigger(env, "--param", 'overrides={"train.epochs": 1}'), serve, log)
        assert override.state.type.value == "COMPLETED", log.read_text()[-4000:]
        workspace = project / "runs" / str(override.id)
        run_receipt = json.loads((workspace / "models" / "registered.json").read_text())
        assert run_receipt["version"] == "2", "the override run registered its own model"
        assert {p: p.read_bytes() for p in main_files} == main_files, "the main workspace and dvc.lock are untouched"
        _, artifacts = asyncio.run(_task_runs_and_artifacts(url, override.id))
        by_key = {a.key: a.data for a in artifacts}
        assert str(workspace) in by_key["pipeline-summary"], "the run's page says where its outputs are"
        assert str(override.id) in by_key["registration"]
        from mlflow import MlflowClient

        version = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version("sign-language-digits", "2")
        assert version.tags["signflow.flow_run_id"] == str(override.id)
        assert version.tags["signflow.flow_run_name"] == override.name
    finally:
        _stop(serve)


def _try(function):
    try:
        return function()
    except Exception:  # noqa: BLE001 - not there yet
        return None


def test_the_same_flow_runs_on_a_process_work_pool_worker(prefect_server, tmp_path, tiny_zip, monkeypatch):
    """Scale-out as the README says: a work pool, a worker, the flow deployed to the pool from source."""
    url, env = prefect_server
    project = make_project(tmp_path, tiny_zip)
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    prefect = [sys.executable, "-m", "prefect"]
    subprocess.run([*prefect, "work-pool", "create", "it-pool", "--type", "process"], env=env, check=True, timeout=120)
    repo = Path(__file__).resolve().parents[1]
    deploy = (
        "from prefect import flow\n"
        f"flow.from_source({str(repo)!r}, 'flows/pipeline.py:pipeline').deploy(name='pool-test', "
        "work_pool_name='it-pool', cron='0 4 * * *', concurrency_limit=1, "
        f"parameters={{'project_dir': {str(project)!r}}}, print_next_steps=False)\n"
    )
    subprocess.run([sys.executable, "-c", deploy], env=env, cwd=repo, check=True, timeout=180)
    deployment = asyncio.run(_deployment(url, "signflow-pipeline/pool-test"))
    assert deployment.work_pool_name == "it-pool"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 4 * * *"]
    result = subprocess.run(
        [*prefect, "deployment", "run", "signflow-pipeline/pool-test"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout).group(1)
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [*prefect, "worker", "start", "--pool", "it-pool", "--run-once"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        run = _wait_for_run(env, run_id, worker, log)
        assert run.state.type.value == "COMPLETED", log.read_text()[-4000:]
        assert json.loads((project / "models" / "registered.json").read_text())["version"] == "1"
    finally:
        _stop(worker)
