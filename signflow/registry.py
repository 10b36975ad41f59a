"""Register step: a model version in MLflow's registry, with params, metrics, data version, commit.

The `champion` alias moves to the new version only when its test accuracy passes the gate and
beats the current champion. Registering the same model twice (same fingerprint) adds no version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from filelock import FileLock

from signflow.checkpoint import ModelBundle, load_bundle
from signflow.config import Params, RegisterConfig
from signflow.errors import SignflowError
from signflow.fileio import write_atomic, write_json_atomic
from signflow.provenance import data_version, git_commit

log = logging.getLogger(__name__)

CHAMPION = "champion"
FINGERPRINT_TAG = "signflow.fingerprint"
ACCURACY_TAG = "signflow.test_accuracy"


class RegistryError(SignflowError, RuntimeError):
    """The registry could not be reached or refused the model."""


@dataclass(frozen=True)
class Registration:
    model_name: str
    version: str
    run_id: str
    fingerprint: str
    test_accuracy: float
    is_champion: bool
    champion_version: str | None
    newly_created: bool
    tracking_uri: str


def resolve_tracking_uri(cfg: RegisterConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if not isinstance(value, str) else value
    return flat


def _client(tracking_uri: str):
    # Not mlflow.set_tracking_uri: it also exports MLFLOW_TRACKING_URI to this process's environment,
    # and every later subprocess would then register into this run's registry.
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _experiment_id(client, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # Keep artifacts beside a local database rather than in whatever folder MLflow was run from.
        database = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        location = (database.parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _find_version(client, model_name: str, fingerprint: str):
    for version in client.search_model_versions(f"name = '{model_name}'"):
        if version.tags.get(FINGERPRINT_TAG) == fingerprint:
            return version
    return None


def _champion(client, model_name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def _create_version(client, cfg, tracking_uri, model_files, reports, params, metrics, tags, fingerprint):
    experiment_id = _experiment_id(client, cfg.experiment, tracking_uri)
    run = client.create_run(
        experiment_id, tags={**tags, FINGERPRINT_TAG: fingerprint}, run_name=f"register-{fingerprint[:12]}"
    )
    run_id = run.info.run_id
    try:
        for key, value in sorted(flatten(params).items()):
            client.log_param(run_id, key, value[:6000])
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value))
        for model_file in model_files:
            client.log_artifact(run_id, str(model_file), artifact_path="model")
        for report in reports:
            client.log_artifact(run_id, str(report), artifact_path="reports")
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    if not client.search_registered_models(f"name = '{cfg.model_name}'"):
        client.create_registered_model(cfg.model_name, description="signflow image classifier")
    source = f"{run.info.artifact_uri}/model"
    version_tags = {**tags, FINGERPRINT_TAG: fingerprint, ACCURACY_TAG: repr(float(metrics["accuracy"]))}
    return client.create_model_version(cfg.model_name, source, run_id=run_id, tags=version_tags)


def register_model(
    cfg: RegisterConfig,
    model_path: str | Path,
    metrics_path: str | Path,
    params: dict[str, Any],
    tags: dict[str, str],
    receipt_path: str | Path,
    extra_artifacts: list[Path] | None = None,
    extra_model_files: list[Path] | None = None,
    write_card: Callable[[ModelBundle, dict, str], str] | None = None,
) -> Registration:
    """Register `model_path` (with its test metrics, and `extra_model_files` beside it in the
    artifact folder `model/`) and move `champion` if it is better. `write_card(bundle, metrics,
    version)` writes a model card and returns its path; it becomes the version's description."""
    bundle = load_bundle(model_path)
    metrics = json.loads(Path(metrics_path).read_text(encoding="utf-8"))
    fingerprint = bundle.fingerprint()
    for extra in extra_model_files or []:
        if Path(extra).suffix == ".onnx":
            _check_exported_from(Path(extra), fingerprint, model_path)
    accuracy = float(metrics["accuracy"])
    tracking_uri = resolve_tracking_uri(cfg)
    # One registration per registry at a time: creating a fresh SQLite registry, checking for a
    # duplicate and moving the champion alias are not safe to interleave between processes.
    key = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"signflow-register-{key}.lock"
    with FileLock(str(lock_path), timeout=600):
        client = _client(tracking_uri)
        existing = _find_version(client, cfg.model_name, fingerprint)
        if existing is None:
            reports = [Path(metrics_path), *(extra_artifacts or [])]
            version = _create_version(
                client,
                cfg,
                tracking_uri,
                [Path(model_path), *(extra_model_files or [])],
                [r for r in reports if r.is_file()],
                params,
                metrics,
                {**tags, "signflow.classes": json.dumps(bundle.class_names)},
                fingerprint,
            )
        else:
            version = existing
            log.info("model already registered as %s version %s; no new version", cfg.model_name, version.version)
        champion = _champion(client, cfg.model_name)
        champion_accuracy = float(champion.tags.get(ACCURACY_TAG, "-inf")) if champion else float("-inf")
        promote = accuracy >= cfg.min_accuracy and (champion is None or accuracy > champion_accuracy)
        if promote and (champion is None or champion.version != version.version):
            client.set_registered_model_alias(cfg.model_name, CHAMPION, version.version)
            log.info("champion -> version %s (test accuracy %.4f)", version.version, accuracy)
        elif accuracy < cfg.min_accuracy:
            log.warning(
                "test accuracy %.4f is below register.min_accuracy %.4f: champion not moved", accuracy, cfg.min_accuracy
            )
        champion = _champion(client, cfg.model_name)
        if write_card is not None:
            card = Path(write_card(bundle, metrics, str(version.version)))
            if existing is None:
                client.log_artifact(version.run_id, str(card), artifact_path="model")
                client.update_model_version(cfg.model_name, version.version, description=card.read_text("utf-8"))
    result = Registration(
        model_name=cfg.model_name,
        version=str(version.version),
        run_id=str(version.run_id),
        fingerprint=fingerprint,
        test_accuracy=accuracy,
        is_champion=champion is not None and champion.version == version.version,
        champion_version=str(champion.version) if champion else None,
        newly_created=existing is None,
        tracking_uri=tracking_uri,
    )
    write_json_atomic(receipt_path, asdict(result))
    return result


def register_run(
    params: Params,
    model_path: str | Path,
    reports_dir: str | Path,
    receipt_path: str | Path,
    *,
    project_dir: str | Path,
    split_dir: str | Path,
    onnx_path: str | Path | None,
    card_path: str | Path,
) -> Registration:
    """Register the evaluate step's outputs with their provenance (data version from `dvc.lock`, git
    commit of `project_dir`) and the ONNX export when there is one, then write the model card;
    what both `signflow register` and the Prefect task call."""
    reports_dir, project_dir = Path(reports_dir), Path(project_dir)
    tags = {
        "signflow.data_version": data_version(project_dir / "dvc.lock"),
        "signflow.git_commit": git_commit(project_dir),
    }
    reports = [reports_dir / name for name in REPORT_ARTIFACTS]
    model_files = [Path(onnx_path)] if onnx_path and Path(onnx_path).is_file() else []
    if onnx_path and not model_files:
        log.info("%s not found: registering the PyTorch model only", onnx_path)
    card = partial(_write_card, params=params, split_dir=Path(split_dir), tags=tags, card_path=Path(card_path))
    return register_model(
        params.register,
        model_path,
        reports_dir / "metrics.json",
        params.model_dump(mode="json"),
        tags,
        receipt_path,
        reports,
        model_files,
        card,
    )


REPORT_ARTIFACTS = (
    "report.md",
    "per_class.csv",
    "predictions.csv",
    "calibration.csv",
    "confusion.png",
    "learning_curves.png",
    "mistakes.png",
    "reliability.png",
)


def _check_exported_from(onnx_path: Path, fingerprint: str, model_path: str | Path) -> None:
    """Refuse an ONNX file exported from other weights than the model being registered."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    if meta.get("signflow.fingerprint") != fingerprint:
        raise RegistryError(
            f"{onnx_path} was exported from other weights than {model_path}; run `signflow export` again"
        )


def _write_card(bundle, metrics, version, *, params: Params, split_dir: Path, tags: dict, card_path: Path) -> str:
    from signflow.model_card import read_split_report, render_model_card

    registration = {
        "model_name": params.register.model_name,
        "version": version,
        "data_version": tags["signflow.data_version"],
        "git_commit": tags["signflow.git_commit"],
    }
    text = render_model_card(
        bundle, metrics, params.model_dump(mode="json"), read_split_report(split_dir), registration
    )
    write_atomic(card_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return str(card_path)
