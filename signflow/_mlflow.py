"""The MLflow client the register step, predict and serve share, bound to one registry without
global state, and how they find a registered version by alias or number."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from signflow.config import ConfigError, RegisterConfig, load_params
from signflow.errors import SignflowError


class VersionNotFound(SignflowError, LookupError):
    """No registered version answers to the alias or number asked for."""


def resolve_tracking_uri(cfg: RegisterConfig) -> str:
    """`MLFLOW_TRACKING_URI` when set (a team server), else `register.tracking_uri`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def mlflow_client(tracking_uri: str):
    # Not mlflow.set_tracking_uri: it also exports MLFLOW_TRACKING_URI to this process's environment,
    # and every later subprocess would then register into this run's registry.
    from mlflow import MlflowClient

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
            f"{model_name!r} has no version or alias {spec!r} in the registry at {tracking_uri} "
            f"({error.message.splitlines()[0]}); run the pipeline first, or give a model file path"
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
