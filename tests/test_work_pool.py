"""Team mode: the pipeline deployed to a process work pool (`signflow deploy`) and run by two workers
(`signflow worker`), each in its own checkout (a git clone with its own workspace and DVC cache), against
a real Prefect server. `check_work_pool` does every check given an environment with PREFECT_API_URL, so
it runs the same on the team stack."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import ROOT, make_project, venv_path
from tests.test_prefect_server import FINAL, _wait, prefect_server  # noqa: F401 - the server fixture

HEARTBEAT_S = 30  # Prefect's smallest: a killed run is marked Crashed about 90 s after its last beat


SERVERS = "team_stack"  # "prefect_server": the same checks on a bare SQLite Prefect server


@pytest.fixture
def team_env(request) -> dict[str, str]:
    """The client environment of the team's servers: PREFECT_API_URL (on the stack also MLFLOW_TRACKING_URI
    and the S3 keys), with this venv's commands on PATH."""
    servers = request.getfixturevalue(SERVERS)
    client_env = servers[1] if isinstance(servers, tuple) else servers
    return {**os.environ, "PATH": venv_path(), **client_env}


def make_checkouts(tmp_path: Path, source: Path, names: tuple[str, ...], **schedule) -> list[Path]:
    """A project repository with this code (signflow/, flows/, tasks/) and tiny params, and `names` clones
    of it: the checkouts on several machines, each with its own workspace and DVC cache."""
    project = make_project(tmp_path, source)
    for package in ("flows", "tasks"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["schedule"].update(schedule)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": venv_path()}
    subprocess.run(["git", "add", "-A"], cwd=project, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "flows and tasks"], cwd=project, check=True, env=env)
    checkouts = [tmp_path / name for name in names]
    for checkout in checkouts:
        subprocess.run(["git", "clone", "-q", str(project), str(checkout)], check=True, env=env)
    return checkouts


def _as_background_job() -> None:
    """What `signflow worker &` (or nohup) in a shell script does to the worker: SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Worker:
    """`signflow worker` started in a checkout, as a user starts it there in the background (its log in `log`)."""

    def __init__(self, checkout: Path, env: dict[str, str], log: Path):
        self.checkout, self.log = checkout, log
        with log.open("a") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "signflow", "worker"],
                cwd=checkout,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_as_background_job,
            )

    def ran(self, run_id: str) -> bool:
        """Whether this worker started the run: a submission the server refused (to wait for the
        deployment's concurrency slot) is logged as 'Aborted submission', and another worker may take it."""
        text = self.log.read_text(errors="replace")
        return text.count(f"submitting flow run '{run_id}'") > text.count(f"Aborted submission of flow run '{run_id}'")

    def run_folders(self) -> set[Path]:
        """The working folders of this worker and of the processes running its flow run."""
        return {Path(child.cwd()) for child in psutil.Process(self.process.pid).children(recursive=True)}

    @contextlib.contextmanager
    def paused(self):
        """SIGSTOP the worker and its processes (it polls no runs), SIGCONT on exit."""
        processes = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        for process in processes:
            process.suspend()
        try:
            yield
        finally:
            for process in processes:
                process.resume()

    def kill(self) -> None:
        """SIGKILL the worker and every process under it (the flow run's supervisor and engine, in their
        own process group): a machine lost, or `kill -9`."""
        parent = psutil.Process(self.process.pid)
        for process in [parent, *parent.children(recursive=True)]:
            process.kill()
        self.process.wait()

    def stop(self, timeout: float = 60) -> float:
        """SIGTERM, as a service manager stops it; returns the seconds it took to exit."""
        start = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"signflow worker did not stop within {timeout} s of SIGTERM") from None
        return time.monotonic() - start


def _run_prefect(env: dict, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return result.stdout


def _trigger(env: dict, deployment: str) -> str:
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", _run_prefect(env, "deployment", "run", deployment))
    assert found, "no flow run id printed"
    return found.group(1)


def _client(env: dict[str, str]):
    """A client for these servers (with the team stack's basic auth), whatever the process-wide settings say."""
    from prefect.client.orchestration import PrefectClient

    return PrefectClient(api=env["PREFECT_API_URL"], auth_string=env.get("PREFECT_API_AUTH_STRING"))


async def _read_run(env: dict[str, str], run_id: str):
    async with _client(env) as client:
        return await client.read_flow_run(uuid.UUID(run_id))


async def _read_deployment(env: dict[str, str], name: str):
    async with _client(env) as client:
        return await client.read_deployment_by_name(name)


async def _running_task_names(env: dict[str, str], run_id: str) -> set[str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with _client(env) as client:
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(run_id)])))
    return {t.name.rsplit("-", 1)[0] for t in tasks if t.state and t.state.type.value == "RUNNING"}


def _wait_final(env: dict[str, str], run_id: str, timeout: float = 600):
    def final():
        run = asyncio.run(_read_run(env, run_id))
        return run if run.state and run.state.type.value in FINAL else None

    return _wait(final, timeout, f"flow run {run_id} to end")


def _outputs(checkout: Path) -> dict[Path, bytes]:
    files = [checkout / "dvc.lock", *(checkout / "models").rglob("*"), *(checkout / "reports").rglob("*")]
    return {path: path.read_bytes() for path in files if path.is_file()}


def check_work_pool(env: dict[str, str], checkouts: list[Path], logs: Path, deployment: str, pool: str) -> None:
    """Deploy from the first checkout, start a worker in each of two, and check: both ran runs, never two at
    once; a worker killed mid-run leaves its checkout's outputs as they were, its run ends Crashed, and the
    next run completes. `env` has PREFECT_API_URL (and MLFLOW_TRACKING_URI for a shared registry)."""
    full_name = f"signflow-pipeline/{deployment}"
    deployed = subprocess.run(
        [sys.executable, "-m", "signflow", "deploy"], cwd=checkouts[0], env=env, capture_output=True, text=True
    )
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    found = asyncio.run(_read_deployment(env, full_name))
    assert found.work_pool_name == pool and found.entrypoint == "flows.pipeline.served_pipeline"
    assert found.pull_steps == [] and found.path is None, "no code storage: each worker runs its own checkout"
    assert found.global_concurrency_limit.limit == 1 and [s.schedule.cron for s in found.schedules] == ["0 3 * * *"]
    assert found.parameters == {"overrides": None}

    workers = [Worker(checkout, env, logs / f"worker-{checkout.name}.log") for checkout in checkouts[:2]]
    try:
        run_ids = [_trigger(env, full_name) for _ in range(4)]
        runs = [_wait_final(env, run_id) for run_id in run_ids]
        ran_by = {run_id: [w.checkout.name for w in workers if w.ran(run_id)] for run_id in run_ids}
        busy = [w for w in workers if any(w.checkout.name in names for names in ran_by.values())]
        if len(busy) == 1:  # one worker polled first every time (it happens): paused, the other takes the next run
            with busy[0].paused():
                run_ids.append(_trigger(env, full_name))
                runs.append(_wait_final(env, run_ids[-1]))
            ran_by[run_ids[-1]] = [w.checkout.name for w in workers if w.ran(run_ids[-1])]
        assert [r.state.type.value for r in runs] == ["COMPLETED"] * len(runs), [r.state for r in runs]
        assert all(len(names) == 1 for names in ran_by.values()), ran_by
        assert {names[0] for names in ran_by.values()} == {c.name for c in checkouts[:2]}, f"both ran runs: {ran_by}"
        spans = sorted((r.start_time, r.end_time) for r in runs)
        assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans)), f"runs overlapped: {spans}"
        for checkout in checkouts[:2]:
            assert (checkout / "models" / "registered.json").is_file(), "each run worked in its worker's checkout"
            if "MLFLOW_TRACKING_URI" not in env:
                assert (checkout / "mlflow.db").is_file(), "register.tracking_uri resolved in the checkout"
            else:  # the team stack: every worker registers into the one MLflow server, none into SQLite
                receipt = json.loads((checkout / "models" / "registered.json").read_text())
                assert receipt["tracking_uri"] == env["MLFLOW_TRACKING_URI"] and not (checkout / "mlflow.db").exists()

        stopped_in = workers[1].stop()
        assert stopped_in < 30, f"SIGTERM stopped the worker in {stopped_in:.1f} s"
        _check_killed_worker(env, workers[0], full_name, logs)
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.kill()


def _check_killed_worker(env: dict[str, str], worker: Worker, deployment: str, logs: Path) -> None:
    checkout = worker.checkout
    before = _outputs(checkout)
    params_file = checkout / "params.yaml"
    committed = params_file.read_text()
    params = yaml.safe_load(committed)
    params["train"]["epochs"] = 500  # long enough to be killed in
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    run_id = _trigger(env, deployment)
    _wait(lambda: "train" in asyncio.run(_running_task_names(env, run_id)), 300, "the run to be training")
    assert worker.run_folders() == {checkout}, "the run works in its worker's checkout, not a temporary folder"
    killed_at = datetime.now().astimezone()
    worker.kill()

    after = _outputs(checkout)
    assert {p: after.get(p) for p in before} == before, "the killed run changed the checkout's previous outputs"
    # New files may be the resume checkpoint and the scratch of a write the kill interrupted (a dot-file ending
    # .tmp beside its target, never read, removed by the next run in this checkout); nothing earlier changed.
    added = {p.name for p in set(after) - set(before)}
    scratch = {name for name in added if name.startswith(".") and name.endswith(".tmp")}
    assert added - scratch <= {"model.pt.resume"}, sorted(set(after) - set(before))
    crashed = _wait_final(env, run_id, timeout=4 * HEARTBEAT_S + 120)
    assert crashed.state.type.value == "CRASHED", crashed.state
    assert crashed.state.timestamp >= killed_at

    params_file.write_text(committed)
    restarted = Worker(checkout, env, logs / f"worker-{checkout.name}-restarted.log")
    try:
        next_run = _wait_final(env, _trigger(env, deployment))
        assert next_run.state.type.value == "COMPLETED", restarted.log.read_text()[-3000:]
        assert restarted.ran(str(next_run.id))
    finally:
        restarted.stop()


@pytest.mark.slow
@pytest.mark.team
def test_two_workers_in_two_checkouts_share_the_pool_one_run_at_a_time_and_survive_a_killed_worker(
    team_env, tmp_path, tiny_zip
):
    pool, deployment = f"signflow-test-{uuid.uuid4().hex[:8]}", "pool-test"
    checkouts = make_checkouts(
        tmp_path, tiny_zip, ("machine-a", "machine-b"), deployment=deployment, work_pool=pool, heartbeat_s=HEARTBEAT_S
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    check_work_pool(team_env, checkouts, logs, deployment, pool)


@pytest.mark.parametrize("command", ["deploy", "worker"])
def test_deploy_and_worker_say_in_one_line_when_the_prefect_server_is_unset_or_down(command, tmp_path):
    from tests.test_prefect_server import _free_port

    env = {**os.environ, "PATH": venv_path(), "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    for api_url, expected in [
        (None, "PREFECT_API_URL is not set"),
        (f"http://127.0.0.1:{_free_port()}/api", "does not answer"),
    ]:
        run_env = env if api_url is None else {**env, "PREFECT_API_URL": api_url}
        result = subprocess.run(
            [sys.executable, "-m", "signflow", command], cwd=ROOT, env=run_env, capture_output=True, text=True
        )
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"signflow {command}: error: ") and expected in lines[0], lines


def test_deploy_outside_a_checkout_says_where_it_looked(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "signflow", "deploy", "--project-dir", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "PATH": venv_path()},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"signflow deploy: error: no flows/deploy.py in {tmp_path}: run it in a checkout of the project "
        "(or give --project-dir)"
    )
