"""The MLflow client the register step, predict and serve share, bound to one registry without
global state, and how they find a registered version by alias or number."""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from signflow._redact import redact_url
from signflow.config import ConfigError, RegisterConfig, load_params
from signflow.errors import SignflowError

log = logging.getLogger(__name__)


CHAMPION_LOCK_SUFFIX = ".champion-lock"
CHAMPION_LOCK_LEASE_S = 300.0
"""A champion lock older than this was left by a registration that died; the next one removes it.
It is held while a version's files are uploaded (seconds for a few-MB model), hence minutes."""


class RegistryError(SignflowError, RuntimeError):
    """The registry could not be reached or refused the model."""


class VersionNotFound(SignflowError, LookupError):
    """No registered version answers to the alias or number asked for."""


def resolve_tracking_uri(cfg: RegisterConfig) -> str:
    """`MLFLOW_TRACKING_URI` when set (a team server), else `register.tracking_uri`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def mlflow_client(tracking_uri: str):
    # Not mlflow.set_tracking_uri: it also exports MLFLOW_TRACKING_URI to this process's environment,
    # and every later subprocess would then register into this run's registry.
    from mlflow import MlflowClient

    # MLflow prints "View run ... at <tracking URI>" when a run ends on a tracking server, with any
    # user:password@ in it; signflow says where the version went itself, without credentials.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def is_registry_reference(spec: str) -> bool:
    """A version number or an alias name (letters, digits, - and _), unless such a path exists."""
    return not Path(spec).exists() and re.fullmatch(r"[A-Za-z0-9_-]+", spec) is not None


def registry_settings(spec: str, params_path: str | Path) -> tuple[str, str]:
    """(register.model_name, tracking URI) for `--model <alias or version>`, from the params file
    (`MLFLOW_TRACKING_URI` wins): what `signflow predict` and `signflow serve` both need."""
    if not Path(params_path).is_file():
        raise ConfigError(
            f"--model {spec}: a registry reference needs {params_path} for register.model_name and the "
            "tracking URI; give --params, or a model path"
        )
    register = load_params(params_path).register
    return register.model_name, resolve_tracking_uri(register)


def find_version(client, model_name: str, spec: str, tracking_uri: str):
    """The model version `spec` names: a version number, else an alias (`champion`)."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version(model_name, spec) if spec.isdigit() else None
        return version or client.get_model_version_by_alias(model_name, spec)
    except MlflowException as error:
        raise VersionNotFound(
            f"{model_name!r} has no version or alias {spec!r} in the registry at {redact_url(tracking_uri)} "
            f"({redact_url(error.message.splitlines()[0])}); run the pipeline first, or give a model file path"
        ) from None


@contextmanager
def downloaded_version(model_name: str, spec: str, tracking_uri: str) -> Iterator[tuple[Path, str]]:
    """Download the `model/` folder of a registered version to a temporary folder (removed on exit);
    yields (folder, version number). `models:/` URIs are not used: MLflow resolves those through
    the global registry URI (MLFLOW_TRACKING_URI), not this one."""
    from mlflow.artifacts import download_artifacts

    version = find_version(mlflow_client(tracking_uri), model_name, spec, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="signflow-model-") as tmp:
        folder = download_artifacts(artifact_uri=version.source, dst_path=tmp, tracking_uri=tracking_uri)
        yield Path(folder), str(version.version)


@contextmanager
def champion_lock(client, model_name: str, timeout_s: float = 900) -> Iterator[None]:
    """Mutual exclusion for comparing and moving the champion alias, shared by every machine that
    uses this registry: the registry itself refuses a second registered model of the same name, so
    whoever creates `<model name>.champion-lock` holds the lock until it deletes it. A lock whose
    holder died expires after CHAMPION_LOCK_LEASE_S seconds."""
    from mlflow.exceptions import MlflowException

    name, holder = model_name + CHAMPION_LOCK_SUFFIX, f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                name,
                tags={"holder": holder, "expires": repr(time.time() + CHAMPION_LOCK_LEASE_S)},
                description=f"signflow: held while a version of {model_name} is registered and its aliases moved",
            )
            break
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        _remove_expired_lock(client, name)
        if time.monotonic() > deadline:
            raise RegistryError(f"{name} was held by another registration for {timeout_s:.0f} s; try again")
        time.sleep(0.2)
    try:
        yield
    finally:
        _release_lock(client, name, holder)


def _remove_expired_lock(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        lock = client.get_registered_model(name)
        holder = lock.tags.get("holder", "")
        if float(lock.tags.get("expires", "0")) < time.time() or _holder_died_here(holder):
            log.warning("removing %s left by a registration that stopped (%s)", name, holder)
            client.delete_registered_model(name)
    except MlflowException:
        pass  # released meanwhile


def _holder_died_here(holder: str) -> bool:
    """The lock's holder ran on this machine and its process is gone: no need to wait for the lease."""
    from signflow.fileio import _pid_alive

    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))


def _release_lock(client, name: str, holder: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        if client.get_registered_model(name).tags.get("holder") == holder:
            client.delete_registered_model(name)
    except MlflowException:
        log.warning("%s: could not release the champion lock; it expires by itself", name)
