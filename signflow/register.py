"""Register step: a model version in MLflow's registry, with params, metrics, data version, commit.

The `champion` alias moves to the new version only when its test accuracy passes the gate and
beats the current champion's on the same test set (the same images: same data and split). A model
scored on another test set is registered without moving the alias, and the receipt says why. The
alias is compared and moved under a lock kept in the registry itself, so machines sharing one
MLflow server take turns. Registering the same model twice (same fingerprint) adds no version.
The version's `model/` folder is also an MLflow model (signflow._mlflow_model), so
`mlflow.pyfunc.load_model` and `mlflow models serve` can use the version directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from filelock import FileLock

from signflow._mlflow import RegistryError, champion_lock, mlflow_client, resolve_tracking_uri
from signflow._mlflow_model import log_mlflow_model
from signflow._model_card import render_model_card
from signflow._model_file import ModelBundle, load_bundle
from signflow._onnx import META_FINGERPRINT
from signflow._provenance import data_source, data_version, fingerprint_test_set, git_commit
from signflow._redact import redact_url
from signflow.config import Params, RegisterConfig
from signflow.fileio import write_json_atomic, write_text_atomic
from signflow.layout import DATA_DVC, REPORT_FILES, ModelOutputs
from signflow.split_files import read_split_report, test_split_description

__all__ = ["Candidate", "ChampionDecision", "Registration", "RegistryError", "register_model", "register_run"]

log = logging.getLogger(__name__)

CHAMPION = "champion"
FINGERPRINT_TAG = "signflow.fingerprint"
ACCURACY_TAG = "signflow.test_accuracy"
TEST_SET_TAG = "signflow.test_set"
DATA_VERSION_TAG = "signflow.data_version"
COMPLETE_TAG = "signflow.complete"
"""Set last, once the version's model card is uploaded: a version without it was left by a
registration that stopped; the next registration of the same weights completes it, and only a
complete version can take the champion alias."""

CardWriter = Callable[[ModelBundle, dict, str], Path]
"""Writes the model card of (bundle, metrics, version number) and returns its path."""


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
    champion_reason: str
    test_split: str  # how the test split behind test_accuracy was made (the split step's description)
    test_near_duplicates_in_train: str  # test images with a near-duplicate in train ("not searched" when off)

    def summary_line(self) -> str:
        return f"{self.model_name} v{self.version}, champion v{self.champion_version}, new: {self.newly_created}"


@dataclass(frozen=True)
class Candidate:
    """One model to register: its weights, the files that go with it, its test metrics, the params
    it was made with and the provenance tags."""

    bundle: ModelBundle
    fingerprint: str
    model_files: list[Path]
    report_files: list[Path]
    metrics: dict[str, Any]
    params: dict[str, Any]
    tags: dict[str, str]

    @classmethod
    def from_files(
        cls,
        model_path: str | Path,
        metrics_path: str | Path,
        params: dict[str, Any],
        tags: dict[str, str],
        onnx_path: str | Path | None = None,
        report_files: list[Path] = (),
    ) -> Candidate:
        """Read the model and its metrics; refuse an ONNX file exported from other weights."""
        bundle = load_bundle(model_path)
        fingerprint = bundle.fingerprint()
        model_files = [Path(model_path)]
        if onnx_path is not None:
            _check_exported_from(Path(onnx_path), fingerprint, model_path)
            model_files.append(Path(onnx_path))
        metrics = json.loads(Path(metrics_path).read_text(encoding="utf-8"))
        reports = [Path(metrics_path), *(p for p in map(Path, report_files) if p.is_file())]
        tags = {**tags, "signflow.classes": json.dumps(bundle.class_names)}
        return cls(bundle, fingerprint, model_files, reports, metrics, params, tags)

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])

    @property
    def onnx_file(self) -> Path | None:
        return next((path for path in self.model_files if path.suffix == ".onnx"), None)


def register_model(
    cfg: RegisterConfig, candidate: Candidate, receipt_path: str | Path, write_card: CardWriter | None = None
) -> Registration:
    """Register `candidate` (unless a version with its fingerprint exists), move `champion` if it is
    better, write the receipt. `write_card` writes the model card once the version number is
    known (inside the lock); the card becomes the version's description."""
    tracking_uri = resolve_tracking_uri(cfg)
    with registry_lock(tracking_uri), registry_errors(tracking_uri):
        client = mlflow_client(tracking_uri)
        # The files go up first, outside the registry-wide lock (a large model takes minutes, longer
        # than the lock's lease); the lock is held from the duplicate check to the alias, so two
        # machines registering the same weights at once make one version, and the alias is compared
        # and moved by one machine at a time.
        found = _find_version(client, cfg.model_name, candidate)
        run = None if found is not None else _log_candidate_run(client, cfg, tracking_uri, candidate)
        with champion_lock(client, cfg.model_name):
            version, created = _version_for(client, cfg, candidate, run)
            card = write_card(candidate.bundle, candidate.metrics, str(version.version)) if write_card else None
            if version.tags.get(COMPLETE_TAG) != "true":  # new, or left half-made by a registration that stopped
                _complete_version(client, cfg.model_name, version, card)
            champion, decision = move_champion(client, cfg, version.version, candidate)
    result = Registration(
        model_name=cfg.model_name,
        version=str(version.version),
        run_id=str(version.run_id),
        fingerprint=candidate.fingerprint,
        test_accuracy=candidate.accuracy,
        is_champion=champion is not None and champion.version == version.version,
        champion_version=str(champion.version) if champion else None,
        newly_created=created,
        tracking_uri=redact_url(tracking_uri),
        champion_reason=decision.reason,
        test_split=candidate.tags.get("signflow.split", "unknown"),
        test_near_duplicates_in_train=candidate.tags.get("signflow.test_near_duplicates_in_train", "unknown"),
    )
    write_json_atomic(receipt_path, asdict(result))
    return result


def register_run(
    params: Params,
    model_path: str | Path,
    outputs: ModelOutputs,
    *,
    project_dir: str | Path,
    split_dir: str | Path,
    run_tags: dict[str, str] | None = None,
) -> Registration:
    """Register the evaluate step's outputs with their provenance (data version from `data.dvc`, the
    test set's fingerprint, git commit of `project_dir`, and `run_tags`, e.g. the Prefect flow run) and
    the ONNX export when there is one, then write the model card; what `signflow register`, the Prefect
    task and the sweep's winner all call."""
    project_dir = Path(project_dir)
    tags = {
        **provenance_tags(project_dir, Path(split_dir)),
        **split_tags(read_split_report(split_dir), outputs.metrics),
        **(run_tags or {}),
    }
    onnx = outputs.onnx if outputs.onnx.is_file() else None
    if onnx is None:
        log.info("%s not found: registering the PyTorch model only", outputs.onnx)
    candidate = Candidate.from_files(
        model_path,
        outputs.metrics,
        params.model_dump(mode="json"),
        tags,
        onnx_path=onnx,
        report_files=[outputs.reports / name for name in REPORT_FILES],
    )
    card = partial(_write_card, params=params, split_dir=Path(split_dir), tags=tags, card_path=outputs.model_card)
    return register_model(params.register, candidate, outputs.receipt, card)


def provenance_tags(project_dir: Path, split_dir: Path) -> dict[str, str]:
    """Where the model came from: the data (data.dvc's version and source), the exact test set it was
    scored on, and the code (git commit)."""
    return {
        DATA_VERSION_TAG: data_version(project_dir / DATA_DVC),
        "signflow.data_source": data_source(project_dir / DATA_DVC),
        TEST_SET_TAG: fingerprint_test_set(split_dir),
        "signflow.git_commit": git_commit(project_dir),
    }


def split_tags(split_report: dict[str, Any], metrics_path: Path) -> dict[str, str]:
    """How the test split was made, for the version's tags: the strategy, the split step's description
    and how many test images have a near-duplicate in train ("not searched" / "unknown" otherwise)."""
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    in_train = metrics.get("test_near_duplicates_in_train")
    searched = split_report.get("near_duplicates", {}).get("mode", "off") != "off"
    return {
        "signflow.split_strategy": split_report.get("strategy", "unknown"),
        "signflow.split": test_split_description(split_report)[:5000],
        "signflow.test_near_duplicates_in_train": str(in_train)
        if in_train is not None
        else ("unknown" if searched else "not searched"),
    }


def _complete_version(client, model_name: str, version, card: Path | None) -> None:
    if card is not None:
        client.log_artifact(version.run_id, str(card), artifact_path="model")
        client.update_model_version(model_name, version.version, description=card.read_text("utf-8"))
    client.set_model_version_tag(model_name, version.version, COMPLETE_TAG, "true")


@contextmanager
def registry_errors(tracking_uri: str) -> Iterator[None]:
    """A registry that cannot be reached or fails mid-way is one line naming it: nothing was written
    locally, the alias moved only if the receipt says so, and running register again finishes the job."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    try:
        yield
    except (MlflowException, RequestException) as error:
        raise RegistryError(
            f"the MLflow registry at {redact_url(tracking_uri)} failed: {server_problem(error)}; the champion alias "
            "did not move and a half-made version is finished by the next register: run register again"
        ) from None


def server_problem(error: Exception) -> str:
    """What went wrong with a tracking server, in a few words rather than MLflow's retry trace."""
    text = str(error)
    status = re.search(r"too many (\d{3}) error responses|error code (\d{3})", text)
    if status:
        code = status.group(1) or status.group(2)
        return f"it answered HTTP {code} (a server error: is its database or artifact store down? see its log)"
    if "Connection refused" in text or "NewConnectionError" in text or "Max retries exceeded" in text:
        return "it cannot be reached (connection refused or lost)"
    if "timed out" in text.lower():
        return "it did not answer in time"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return redact_url(first)[:300]


@contextmanager
def registry_lock(tracking_uri: str) -> Iterator[None]:
    """One registration per registry at a time on this machine: creating a fresh SQLite registry and
    checking for a duplicate are not safe to interleave. (The champion alias is also guarded across
    machines, by `champion_lock`.)"""
    key = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
    with FileLock(str(Path(tempfile.gettempdir()) / f"signflow-register-{key}.lock"), timeout=600):
        yield


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if not isinstance(value, str) else value
    return flat


def _experiment_id(client, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # Keep artifacts beside a local database rather than in whatever folder MLflow was run from.
        database = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        location = (database.parent / "mlartifacts").as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        # Another machine created it between our lookup and our create (shared registry).
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _find_version(client, model_name: str, candidate: Candidate):
    """The version of these weights scored on this test set, if any: the same weights scored on
    another test set are another version, so that a version's test-set and accuracy tags never lie."""
    test_set = candidate.tags.get(TEST_SET_TAG)
    for version in client.search_model_versions(f"name = '{model_name}'"):
        if version.tags.get(FINGERPRINT_TAG) == candidate.fingerprint and version.tags.get(TEST_SET_TAG) == test_set:
            return version
    return None


def _champion(client, model_name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def _log_run(client, run_id: str, candidate: Candidate) -> None:
    from mlflow.entities import Metric, Param

    # One batch, not a call (and a database transaction) per param and metric; MLflow splits it at its limits.
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(key, float(value), now, 0) for key, value in candidate.metrics.items()],
        params=[Param(key, value[:6000]) for key, value in sorted(flatten(candidate.params).items())],
    )
    for model_file in candidate.model_files:
        if model_file != candidate.onnx_file:  # the MLflow model holds it (model/artifacts/model.onnx)
            client.log_artifact(run_id, str(model_file), artifact_path="model")
    _log_mlflow_model(client, run_id, candidate)
    for report in candidate.report_files:
        client.log_artifact(run_id, str(report), artifact_path="reports")


def _log_mlflow_model(client, run_id: str, candidate: Candidate) -> None:
    """Make the run's `model/` folder an MLflow model that runs the ONNX file (no PyTorch needed)."""
    if candidate.onnx_file is None:
        log.warning("no ONNX file: this version gets no MLflow model (mlflow.pyfunc and `mlflow models serve` need it)")
        return
    log_mlflow_model(client, run_id, candidate.onnx_file, candidate.bundle.preprocessing.image_size, "model")


def _log_candidate_run(client, cfg: RegisterConfig, tracking_uri: str, candidate: Candidate):
    """A finished MLflow run holding the candidate's files, params and metrics."""
    tags = {**candidate.tags, FINGERPRINT_TAG: candidate.fingerprint}
    experiment_id = _experiment_id(client, cfg.experiment, tracking_uri)
    run = client.create_run(experiment_id, tags=tags, run_name=f"register-{candidate.fingerprint[:12]}")
    try:
        _log_run(client, run.info.run_id, candidate)
        client.set_terminated(run.info.run_id, "FINISHED")
    except Exception:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    return run


def _version_for(client, cfg: RegisterConfig, candidate: Candidate, run) -> tuple[Any, bool]:
    """(the version of these weights on this test set, whether it is new): the one registered
    meanwhile by another machine (`run`, uploaded in vain, is deleted), or a new one pointing at
    `run`'s `model/` folder. The caller holds the champion lock."""
    existing = _find_version(client, cfg.model_name, candidate)
    if existing is not None:
        if run is not None:
            client.delete_run(run.info.run_id)
        log.info("model already registered as %s version %s; no new version", cfg.model_name, existing.version)
        return existing, False
    if run is None:
        raise RegistryError(
            f"{cfg.model_name}: the version of these weights was deleted while registering; run register again"
        )
    if not client.search_registered_models(f"name = '{cfg.model_name}'"):
        client.create_registered_model(cfg.model_name, description="signflow image classifier")
    version_tags = {**candidate.tags, FINGERPRINT_TAG: candidate.fingerprint, ACCURACY_TAG: repr(candidate.accuracy)}
    source = f"{run.info.artifact_uri}/model"
    return client.create_model_version(cfg.model_name, source, run_id=run.info.run_id, tags=version_tags), True


@dataclass(frozen=True)
class ChampionDecision:
    promote: bool
    reason: str
    warn: bool = False
    """The user should hear about it: below the gate, or not comparable with the champion."""


def decide_champion(cfg: RegisterConfig, version: str, candidate: Candidate, champion) -> ChampionDecision:
    """Whether `version` should become the champion, and why (or why not), in words for the log and
    the receipt. Accuracies are compared only when both models were scored on the same test set."""
    accuracy, test_set = candidate.accuracy, candidate.tags.get(TEST_SET_TAG)
    if champion is not None and champion.version == version:
        return ChampionDecision(False, f"version {version} is the champion already")
    if accuracy < cfg.min_accuracy:
        return ChampionDecision(
            False, f"test accuracy {accuracy:.4f} is below register.min_accuracy {cfg.min_accuracy:.4f}", warn=True
        )
    if champion is None:
        return ChampionDecision(True, f"no champion yet: version {version} (test accuracy {accuracy:.4f})")
    theirs = champion.tags.get(TEST_SET_TAG)
    if champion.tags.get(FINGERPRINT_TAG) == candidate.fingerprint and theirs != test_set:
        return ChampionDecision(
            True,
            f"version {version} holds the champion's own weights (version {champion.version}) scored on the current "
            f"test set (test accuracy {accuracy:.4f}): the alias moves to it, so later models are compared on this "
            "test set",
        )
    if theirs is None or theirs != test_set:
        return ChampionDecision(
            False,
            f"champion version {champion.version} was scored on another test set (test set "
            f"{(theirs or 'unrecorded')[:12]}, data {champion.tags.get(DATA_VERSION_TAG, 'unrecorded')[:12]}) than "
            f"version {version} (test set {(test_set or 'unrecorded')[:12]}, data "
            f"{candidate.tags.get(DATA_VERSION_TAG, 'unrecorded')[:12]}): their accuracies are not comparable, so "
            "the alias was not moved. To promote it, set the alias `champion` on it in the MLflow UI",
            warn=True,
        )
    best = float(champion.tags.get(ACCURACY_TAG, "-inf"))
    if accuracy > best:
        return ChampionDecision(
            True,
            f"test accuracy {accuracy:.4f} beats champion version {champion.version} ({best:.4f}) on the same test set",
        )
    return ChampionDecision(
        False, f"test accuracy {accuracy:.4f} does not beat champion version {champion.version} ({best:.4f})"
    )


def move_champion(client, cfg: RegisterConfig, version: str, candidate: Candidate):
    """Compare `version` with the champion and move the alias if it is better (the caller holds the
    registry's champion lock); re-read the alias after setting it. Returns (the champion afterwards, the decision)."""
    decision = decide_champion(cfg, version, candidate, _champion(client, cfg.model_name))
    if decision.promote:
        client.set_registered_model_alias(cfg.model_name, CHAMPION, version)
    champion = _champion(client, cfg.model_name)
    if decision.promote and (champion is None or champion.version != version):
        raise RegistryError(
            f"{cfg.model_name}: the champion alias was set to version {version} but reads "
            f"{champion.version if champion else 'nothing'}: something outside signflow moves it"
        )
    (log.warning if decision.warn else log.info)("champion: %s", decision.reason)
    return champion, decision


def _check_exported_from(onnx_path: Path, fingerprint: str, model_path: str | Path) -> None:
    """Refuse an ONNX file exported from other weights than the model being registered."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    if meta.get(META_FINGERPRINT) != fingerprint:
        raise RegistryError(
            f"{onnx_path} was exported from other weights than {model_path}; run `signflow export` again"
        )


def _write_card(bundle, metrics, version, *, params: Params, split_dir: Path, tags: dict, card_path: Path) -> Path:
    registration = {
        "model_name": params.register.model_name,
        "version": version,
        "data_version": tags[DATA_VERSION_TAG],
        "data_source": tags["signflow.data_source"],
        "git_commit": tags["signflow.git_commit"],
    }
    text = render_model_card(
        bundle, metrics, params.model_dump(mode="json"), read_split_report(split_dir), registration
    )
    return write_text_atomic(card_path, text)
