"""The MLflow client the register step and predict share, bound to one registry without global state."""

from __future__ import annotations

import os

from signflow.config import RegisterConfig


def resolve_tracking_uri(cfg: RegisterConfig) -> str:
    """`MLFLOW_TRACKING_URI` when set (a team server), else `register.tracking_uri`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def mlflow_client(tracking_uri: str):
    # Not mlflow.set_tracking_uri: it also exports MLFLOW_TRACKING_URI to this process's environment,
    # and every later subprocess would then register into this run's registry.
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
