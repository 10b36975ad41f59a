"""The team stack for real: `signflow stack up` starts PostgreSQL, SeaweedFS, MLflow and Prefect on
127.0.0.1 with generated credentials that stay out of logs and command lines, data survives a
restart, and `down` stops exactly what `up` started."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from signflow import stack
from signflow._processes import ServiceError, Started, start_ticks
from signflow.cli import main as signflow_main

pytestmark = pytest.mark.team


def _s3(env: dict[str, str], secret: str | None = None):
    import boto3

    return boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=secret or env["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip


def _stack_processes(folder: Path):
    """Every process of the stack: the recorded ones and all their descendants."""
    import psutil

    pids = json.loads((folder / "pids.json").read_text())
    for entry in pids.values():
        parent = psutil.Process(entry["pid"])
        yield parent
        yield from parent.children(recursive=True)


def _listening(folder: Path):
    """The listening sockets of the stack's processes (a PostgreSQL backend may end meanwhile)."""
    import psutil

    for process in _stack_processes(folder):
        try:
            connections = process.net_connections("inet")
        except psutil.NoSuchProcess:
            continue
        yield from (conn for conn in connections if conn.status == "LISTEN")


@pytest.mark.slow
def test_servers_listen_on_loopback_only_and_credentials_stay_out_of_logs_and_command_lines(team_stack):
    folder = Path(team_stack["SIGNFLOW_STACK_DIR"])
    assert all(state.healthy for state in stack.stack_status(folder))
    listening = {conn.laddr.ip for conn in _listening(folder)}
    assert listening == {"127.0.0.1"}
    for name in ("stack.env", "stack.json", "s3-identities.json", "s3-options"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    import psutil

    secrets = json.loads((folder / "stack.json").read_text())["secrets"]
    secret_values = [value for key, value in secrets.items() if key != "s3_access_key"]
    command_lines = " ".join(" ".join(p.cmdline()) for p in psutil.process_iter() if _readable(p))
    logs = " ".join(path.read_text(errors="replace") for path in (folder / "logs").glob("*.log"))
    for value in secret_values:
        assert value not in command_lines
        assert value not in logs


def _readable(process) -> bool:
    import psutil

    try:
        process.cmdline()
    except (psutil.Error, OSError):
        return False
    return True


@pytest.mark.slow
def test_the_store_refuses_anonymous_and_wrong_keys_and_prefect_asks_for_its_password(team_stack):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="SignatureDoesNotMatch|InvalidAccessKeyId|AccessDenied"):
        _s3(team_stack, secret="wrong-secret").list_objects_v2(Bucket=stack.BUCKET)
    anonymous = boto3.client("s3", endpoint_url=team_stack["AWS_ENDPOINT_URL"], region_name="us-east-1",
                             config=Config(signature_version=UNSIGNED))  # fmt: skip
    with pytest.raises(ClientError, match="AccessDenied"):
        anonymous.list_objects_v2(Bucket=stack.BUCKET)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(team_stack["PREFECT_API_URL"] + "/flows/filter", data=b"{}", timeout=10)
    assert refused.value.code == 401


@pytest.mark.slow
def test_data_survives_a_restart_and_down_stops_every_process_it_started(team_stack):
    import mlflow

    folder = Path(team_stack["SIGNFLOW_STACK_DIR"])
    _s3(team_stack).put_object(Bucket=stack.BUCKET, Key="restart/probe.txt", Body=b"still here")
    client = mlflow.MlflowClient(team_stack["MLFLOW_TRACKING_URI"])
    client.create_registered_model("restart-probe")
    recorded = [Started(**entry) for entry in json.loads((folder / "pids.json").read_text()).values()]
    children = [p.pid for p in _stack_processes(folder) if p.is_running()]

    assert sorted(stack.stack_down(folder, progress=lambda _: None)) == sorted(stack.SERVICES)
    assert all(start_ticks(s.pid) != s.start_ticks for s in recorded)
    assert all(start_ticks(pid) is None for pid in children)

    stack.stack_up(folder, progress=lambda _: None)  # same folder: same ports and credentials
    assert stack.read_stack_env(folder).items() <= team_stack.items()
    body = _s3(team_stack).get_object(Bucket=stack.BUCKET, Key="restart/probe.txt")["Body"].read()
    assert body == b"still here"
    assert client.get_registered_model("restart-probe").name == "restart-probe"


def test_up_names_a_taken_port_and_starts_nothing(tmp_path):
    from signflow._processes import free_port_base

    base = free_port_base()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base + 1))  # MLflow's
        squatter.listen()
        with pytest.raises(ServiceError, match=f"port {base + 1} on 127.0.0.1 \\(mlflow\\) is taken"):
            stack.stack_up(tmp_path / "stack", port_base=base, progress=lambda _: None)
    assert not (tmp_path / "stack" / "pids.json").exists()


def test_a_missing_postgres_is_one_line_naming_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SIGNFLOW_PG_BIN", str(tmp_path))
    assert signflow_main(["stack", "up", "--dir", str(tmp_path / "stack")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert error.startswith("signflow stack: error: SIGNFLOW_PG_BIN=") and "initdb" in error
    assert not (tmp_path / "stack" / "pids.json").exists()


def test_down_never_signals_a_process_it_did_not_start(tmp_path):
    """A PID in pids.json that now belongs to another process (recycled) is left alone."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        folder = tmp_path / "stack"
        folder.mkdir()
        wrong = Started("mlflow", bystander.pid, (start_ticks(bystander.pid) or 0) + 1)
        (folder / "pids.json").write_text(json.dumps({"mlflow": wrong.to_json()}))
        assert stack.stack_down(folder, progress=lambda _: None) == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.slow
def test_stack_env_prints_exports_a_shell_can_source(team_stack, capsys):
    assert signflow_main(["stack", "env", "--dir", team_stack["SIGNFLOW_STACK_DIR"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    result = subprocess.run(["bash", "-c", "\n".join(lines) + "\nenv"], capture_output=True, text=True, check=True)
    exported = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert exported["MLFLOW_TRACKING_URI"] == team_stack["MLFLOW_TRACKING_URI"]
    assert exported["PREFECT_API_AUTH_STRING"] == team_stack["PREFECT_API_AUTH_STRING"]
    assert os.environ.get("MLFLOW_TRACKING_URI") is None
