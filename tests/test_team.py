"""signflow on the real team stack: a flow run registers through the MLflow server (PostgreSQL
rows, S3 objects) and pushes to the S3 DVC remote, a fresh clone pulls the same model, predict and
`mlflow models serve` follow the champion on the server, two machines registering the same weights
make one version, and the MLflow server stopping mid-register leaves everything consistent."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from signflow import stack
from signflow.register import COMPLETE_TAG, FINGERPRINT_TAG
from tests.helpers import ROOT, build_class_folders, make_project, pack_upstream_zip, venv_path
from tests.test_serving import free_port, post_json, start_server, stop_server

pytestmark = [pytest.mark.team, pytest.mark.slow]

MODEL = "team-e2e-digits"  # its own name: other tests register into the same session's stack


def _env(team_stack: dict[str, str], **extra: str) -> dict[str, str]:
    return {**os.environ, **team_stack, "PATH": venv_path(), "PYTHONPATH": str(ROOT), **extra}


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(project: Path) -> dict[str, str]:
    """Every file the local workspace holds as a result: models/, reports/ and dvc.lock."""
    files = [project / "dvc.lock", *(project / "models").rglob("*"), *(project / "reports").rglob("*")]
    return {str(path.relative_to(project)): _sha256(path) for path in files if path.is_file()}


def _postgres(team_stack: dict[str, str], sql: str, *args) -> list[tuple]:
    """Ask the MLflow server's own database, not the server: what is really stored."""
    import psycopg2

    folder = Path(team_stack["SIGNFLOW_STACK_DIR"])
    config = json.loads((folder / "stack.json").read_text())
    port = config["port_base"] + 2
    with psycopg2.connect(host="127.0.0.1", port=port, user="signflow_admin", dbname="mlflow",
                          password=config["secrets"]["postgres_admin_password"]) as connection:  # fmt: skip
        with connection.cursor() as cursor:
            cursor.execute(sql, args)
            return cursor.fetchall()


def _objects(team_stack: dict[str, str], prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=team_stack["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=team_stack["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=team_stack["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=stack.BUCKET, Prefix=prefix)
    return [entry["Key"] for page in pages for entry in page.get("Contents", [])]


def _set_train_seed(project: Path, seed: int) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["seed"] = seed
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _fingerprint(project: Path) -> str:
    from signflow._model_file import load_bundle

    return load_bundle(project / "models" / "model.pt").fingerprint()


def _versions_of(team_stack: dict[str, str], fingerprint: str) -> list[tuple]:
    return _postgres(
        team_stack,
        "SELECT version FROM model_version_tags WHERE name = %s AND key = %s AND value = %s",
        MODEL, FINGERPRINT_TAG, fingerprint,
    )  # fmt: skip


def _champion(team_stack: dict[str, str]) -> list[tuple]:
    return _postgres(team_stack, "SELECT version FROM registered_model_aliases WHERE name = %s AND alias = %s",
                     MODEL, "champion")  # fmt: skip


@pytest.fixture(scope="module")
def team_project(team_stack, tmp_path_factory):
    """A tiny project pointed at the stack (`signflow stack connect`), after one flow run."""
    root = tmp_path_factory.mktemp("team-project")
    archive = pack_upstream_zip(build_class_folders(root / "dataset"), root / "tiny.zip")
    project = make_project(root, archive)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["register"]["model_name"] = MODEL
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(team_stack)
    _ok(_run(["signflow", "stack", "connect", "--dir", team_stack["SIGNFLOW_STACK_DIR"]], project, env))
    _ok(_run(["git", "commit", "-qam", "the team's DVC remote"], project, env))
    _ok(_run(["python", "-m", "flows.pipeline"], project, env))
    _ok(_run(["git", "add", "dvc.lock", "data.dvc", ".gitignore"], project, env))
    _ok(_run(["git", "commit", "-qm", "the run's dvc.lock and data.dvc: what a clone pulls"], project, env))
    return project


def test_a_flow_run_registers_through_the_server_into_postgres_and_the_bucket(team_stack, team_project):
    receipt = json.loads((team_project / "models" / "registered.json").read_text())
    assert receipt["tracking_uri"] == team_stack["MLFLOW_TRACKING_URI"]
    version = receipt["version"]
    tags = dict(_postgres(team_stack, "SELECT key, value FROM model_version_tags WHERE name = %s AND version = %s",
                          MODEL, int(version)))  # fmt: skip
    assert tags[FINGERPRINT_TAG] == _fingerprint(team_project) and tags[COMPLETE_TAG] == "true"
    assert "split" in tags["signflow.split"] and tags["signflow.test_near_duplicates_in_train"] == "0"
    assert _champion(team_stack) == [(int(version),)]

    artifacts = _objects(team_stack, "mlflow/")
    for name in ("model/artifacts/model.onnx", "model/model_card.md", "model/MLmodel", "model/model.pt"):
        assert any(key.endswith(name) for key in artifacts), name
    lock = yaml.safe_load((team_project / "dvc.lock").read_text())
    model_md5 = next(out["md5"] for out in lock["stages"]["train"]["outs"] if out["path"] == "models/model.pt")
    assert f"dvc/files/md5/{model_md5[:2]}/{model_md5[2:]}" in _objects(team_stack, "dvc/")

    # No SQLite anywhere signflow, MLflow or Prefect keep state (DVC's own local hash cache aside).
    folders = [team_project, Path(team_stack["SIGNFLOW_STACK_DIR"]), Path(os.environ["PREFECT_HOME"])]
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and path.stat().st_size >= 16:
                with open(path, "rb") as handle:
                    assert handle.read(16) != b"SQLite format 3\x00", path


def test_a_fresh_clone_pulls_exactly_the_registered_model(team_stack, team_project, tmp_path):
    env = _env(team_stack)
    clone = tmp_path / "clone"
    _ok(_run(["git", "clone", "-q", str(team_project), str(clone)], tmp_path, env))
    assert not (clone / ".dvc" / "config.local").exists(), "the keys are not in git"
    _ok(_run(["signflow", "stack", "connect", "--dir", team_stack["SIGNFLOW_STACK_DIR"]], clone, env))
    _ok(_run(["dvc", "pull", "--quiet"], clone, env))
    assert _sha256(clone / "models" / "model.pt") == _sha256(team_project / "models" / "model.pt")
    assert _sha256(clone / "data" / "split" / "test.csv") == _sha256(team_project / "data" / "split" / "test.csv")


def test_predict_and_mlflow_models_serve_use_the_champion_on_the_server(team_stack, team_project, tmp_path):
    env = _env(team_stack)
    image = next((team_project / "data" / "raw" / "beta").iterdir())
    answer = _ok(_run(["signflow", "predict", "--model", "champion", str(image)], team_project, env))
    output = answer.stdout + answer.stderr
    assert f"{MODEL} version" in output and image.parent.name in answer.stdout

    port = free_port()
    command = ["mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    server = start_server(command, env, tmp_path / "serve.log", f"http://127.0.0.1:{port}/ping")
    try:
        import base64

        rows = {"columns": ["image"], "data": [[base64.b64encode(image.read_bytes()).decode()]]}
        served = post_json(f"http://127.0.0.1:{port}/invocations", {"dataframe_split": rows})["predictions"][0]
        assert served["error"] is None and served["label"] in {"alpha", "beta", "gamma ü"}
    finally:
        stop_server(server)


def test_signflow_serve_follows_the_champion_on_the_server(team_stack, team_project, monkeypatch):
    from fastapi.testclient import TestClient

    from signflow.serve import create_app, open_live_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_stack["MLFLOW_TRACKING_URI"])
    live = open_live_model("champion", team_project / "params.yaml")
    with TestClient(create_app(live)) as client:
        info = client.get("/info").json()
        assert (int(info["version"]),) in _champion(team_stack)
        image = next((team_project / "data" / "raw" / "alpha").iterdir())
        answer = client.post("/predict", content=image.read_bytes()).json()
        assert len(answer["top"]) == 3


def _train_new_weights(project: Path, seed: int, env: dict[str, str]) -> str:
    """New weights up to export (register not run): what a second machine would hold."""
    _set_train_seed(project, seed)
    _ok(_run(["dvc", "repro", "export"], project, env))
    return _fingerprint(project)


def test_two_machines_registering_the_same_weights_at_once_make_one_version(team_stack, team_project, tmp_path):
    env = _env(team_stack)
    fingerprint = _train_new_weights(team_project, 7, env)
    machines = [tmp_path / "a", tmp_path / "b"]
    for machine in machines:
        shutil.copytree(team_project, machine, symlinks=True)
    registering = [subprocess.Popen(["signflow", "register"], cwd=m, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for m in machines]  # fmt: skip
    outcomes = [process.communicate(timeout=300) for process in registering]
    assert [p.returncode for p in registering] == [0, 0], outcomes
    assert len(_versions_of(team_stack, fingerprint)) == 1
    receipts = [json.loads((m / "models" / "registered.json").read_text()) for m in machines]
    assert sorted(r["newly_created"] for r in receipts) == [False, True]
    assert receipts[0]["version"] == receipts[1]["version"]


def _stack_pid(team_stack: dict[str, str], service: str) -> int:
    pids = json.loads((Path(team_stack["SIGNFLOW_STACK_DIR"]) / "pids.json").read_text())
    return pids[service]["pid"]


def _runs_count(team_stack: dict[str, str]) -> int:
    return _postgres(team_stack, "SELECT count(*) FROM runs")[0][0]


def test_the_mlflow_server_stopping_mid_register_leaves_everything_consistent(team_stack, team_project):
    env = _env(team_stack, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    fingerprint = _train_new_weights(team_project, 11, env)
    before, champion_before, runs_before = _snapshot(team_project), _champion(team_stack), _runs_count(team_stack)
    registering = subprocess.Popen(["signflow", "register"], cwd=team_project, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while _runs_count(team_stack) == runs_before and registering.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    mlflow_pid = _stack_pid(team_stack, "mlflow")
    os.killpg(mlflow_pid, signal.SIGSTOP)  # mid-upload: the run exists, its files and version do not yet
    os.killpg(mlflow_pid, signal.SIGKILL)
    _, stderr = registering.communicate(timeout=300)
    stack.stack_up(team_stack["SIGNFLOW_STACK_DIR"], progress=lambda _: None)  # the server comes back

    assert registering.returncode == 1
    error = stderr.strip().splitlines()[-1]
    assert error.startswith(f"signflow register: error: the MLflow registry at {team_stack['MLFLOW_TRACKING_URI']}")
    assert _champion(team_stack) == champion_before
    complete = _postgres(team_stack, "SELECT version FROM model_version_tags WHERE name = %s AND key = %s",
                         MODEL, COMPLETE_TAG)  # fmt: skip
    assert not set(_versions_of(team_stack, fingerprint)) & set(complete)
    assert _snapshot(team_project) == before, "nothing local changed or was deleted"

    _ok(_run(["signflow", "register"], team_project, env))
    assert len(_versions_of(team_stack, fingerprint)) == 1
    receipt = json.loads((team_project / "models" / "registered.json").read_text())
    assert (int(receipt["version"]),) in complete + _postgres(
        team_stack, "SELECT version FROM model_version_tags WHERE name = %s AND key = %s", MODEL, COMPLETE_TAG
    )


def test_a_flow_run_with_a_wrong_s3_key_fails_in_one_line_naming_the_remote(team_stack, team_project):
    env = _env(team_stack)
    keys = team_project / ".dvc" / "config.local"
    saved = keys.read_text()
    try:
        _ok(_run(["dvc", "remote", "modify", "--local", "team", "secret_access_key", "wrong"], team_project, env))
        (team_project / "reports" / "extra.txt").write_text("not pushed yet\n")
        _ok(_run(["dvc", "add", "-q", "reports/extra.txt"], team_project, env))
        run = _run(["python", "-m", "flows.pipeline"], team_project, env)
    finally:
        keys.write_text(saved)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        f"flows.pipeline: error: dvc push to remote 'team' (s3://signflow/dvc at {team_stack['AWS_ENDPOINT_URL']}) "
        "failed: the store refused the keys (check access_key_id and secret_access_key: dvc remote modify --local)"
    )


@pytest.mark.parametrize("service", ["postgres", "s3"])
def test_a_stopped_database_or_store_fails_register_in_one_line_and_a_retry_succeeds(team_stack, team_project, service):
    """PostgreSQL restarting or the S3 store refusing: the MLflow server answers errors; register says
    so in one line, moves no alias, changes nothing local; once the server is back, a retry succeeds."""
    from signflow._processes import Started, stop

    env = _env(team_stack, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    fingerprint = _train_new_weights(team_project, {"postgres": 21, "s3": 23}[service], env)
    before, champion_before = _snapshot(team_project), _champion(team_stack)
    pids = json.loads((Path(team_stack["SIGNFLOW_STACK_DIR"]) / "pids.json").read_text())
    assert stop(Started(**pids[service]))
    try:
        failed = _run(["signflow", "register"], team_project, env)
    finally:
        stack.stack_up(team_stack["SIGNFLOW_STACK_DIR"], progress=lambda _: None)
    assert failed.returncode == 1
    assert failed.stderr.strip().count("\n") == 0, failed.stderr
    registry = team_stack["MLFLOW_TRACKING_URI"]
    assert failed.stderr.startswith(f"signflow register: error: the MLflow registry at {registry}")
    assert _champion(team_stack) == champion_before
    assert _snapshot(team_project) == before

    _ok(_run(["signflow", "register"], team_project, env))
    assert len(_versions_of(team_stack, fingerprint)) == 1
