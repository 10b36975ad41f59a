"""PostgreSQL for the team stack, from the Debian package's binaries (`apt-get install postgresql`).

The server refuses to run as root: as root, its commands run as the `postgres` user, and its data
folder lives in that user's home (it cannot enter root's folders, where the stack folder usually is).
It listens on TCP 127.0.0.1 only (no Unix socket: a long stack path would not fit one) and asks
every client for a password (scram-sha-256)."""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from signflow._processes import ServiceError, Started, start_ticks

POSTGRES_USER = "postgres"
"""The system user the server runs as when signflow runs as root (Debian's package creates it)."""


def server_bin() -> Path:
    """The folder with `initdb`, `pg_ctl` and `postgres`: `SIGNFLOW_PG_BIN`, PATH, or the newest
    /usr/lib/postgresql/*/bin."""
    chosen = os.environ.get("SIGNFLOW_PG_BIN")
    if chosen:
        if not ((Path(chosen) / "initdb").is_file() and (Path(chosen) / "pg_ctl").is_file()):
            raise ServiceError(f"SIGNFLOW_PG_BIN={chosen} has no initdb/pg_ctl: point it at PostgreSQL's bin folder")
        return Path(chosen)
    candidates = []
    on_path = shutil.which("pg_ctl")
    candidates += [str(Path(on_path).parent)] if on_path else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_major_version, reverse=True)
    for folder in filter(None, candidates):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    raise ServiceError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in SIGNFLOW_PG_BIN, PATH or "
        "/usr/lib/postgresql/*/bin: install them (Debian/Ubuntu: apt-get install postgresql)"
    )


def _major_version(folder: str) -> int:
    part = Path(folder).parent.name
    return int(part) if part.isdigit() else 0


def as_root() -> bool:
    return os.geteuid() == 0


def data_dir(stack_dir: Path) -> Path:
    """Where the cluster lives: under the stack folder, or, as root, in the postgres user's home."""
    if not as_root():
        return stack_dir / "postgres"
    try:
        home = Path(pwd.getpwnam(POSTGRES_USER).pw_dir)
    except KeyError:
        raise ServiceError(
            "running as root, PostgreSQL needs the 'postgres' system user: apt-get install postgresql"
        ) from None
    digest = hashlib.sha256(str(stack_dir.resolve()).encode()).hexdigest()[:12]
    return home / "signflow-stack" / digest


def _run(command: list[str], what: str, timeout_s: float = 120) -> str:
    if as_root():
        command = ["runuser", "-u", POSTGRES_USER, "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise ServiceError(f"PostgreSQL {what} failed: {detail[-1] if detail else 'exit ' + str(result.returncode)}")
    return result.stdout


def _make_own_dir(folder: Path) -> None:
    """Create `folder` as the user the server runs as (as root: postgres, with every folder it adds)."""
    if as_root():
        _run(["mkdir", "-p", "-m", "700", str(folder)], f"mkdir {folder}")
    else:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)


def initialise(cluster: Path, superuser: str, password: str) -> None:
    """A new cluster in `cluster/data` whose superuser logs in with `password` (given in a file that
    is removed at once: a command line is visible to every user of the machine)."""
    bin_dir = server_bin()
    _make_own_dir(cluster)
    password_file = cluster / "initdb-password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    if as_root():
        entry = pwd.getpwnam(POSTGRES_USER)
        os.chown(password_file, entry.pw_uid, entry.pw_gid)
    try:
        _run(
            [str(bin_dir / "initdb"), "-D", str(cluster / "data"), f"--username={superuser}",
             f"--pwfile={password_file}", "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"],
            "initdb",
        )  # fmt: skip
    finally:
        password_file.unlink(missing_ok=True)


def start(cluster: Path, host: str, port: int) -> Started:
    """Start the cluster and wait until it accepts connections (pg_ctl -w)."""
    options = f"-c listen_addresses={host} -p {port} -c unix_socket_directories=''"
    log = cluster / "server.log"
    _run(
        [str(server_bin() / "pg_ctl"), "-D", str(cluster / "data"), "-l", str(log), "-o", options, "-w", "-t", "60",
         "start"],
        f"start on {host}:{port} (log: {log})",
    )  # fmt: skip
    pid = int((cluster / "data" / "postmaster.pid").read_text().split()[0])
    ticks = start_ticks(pid)
    if ticks is None:
        raise ServiceError(f"PostgreSQL stopped right after starting (log: {log})")
    return Started("postgres", pid, ticks)


def is_initialised(cluster: Path) -> bool:
    if as_root():
        check = ["runuser", "-u", POSTGRES_USER, "--", "test", "-f", str(cluster / "data" / "PG_VERSION")]
        return subprocess.run(check, capture_output=True).returncode == 0
    return (cluster / "data" / "PG_VERSION").is_file()


def create_databases(url_admin: dict, client_role: str, client_password: str, databases: list[str]) -> None:
    """The servers' databases (owned by the superuser) and the clients' own database and role, which
    is not a superuser: what a worker's Optuna study may touch."""
    import psycopg2
    from psycopg2 import sql

    connection = psycopg2.connect(**url_admin, dbname="postgres", connect_timeout=10)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            for name in databases:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (client_role,))
            if cursor.fetchone() is None:
                cursor.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(client_role)), (client_password,)
                )
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (client_role,))
            if cursor.fetchone() is None:
                role = sql.Identifier(client_role)
                cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(role, role))
    finally:
        connection.close()
