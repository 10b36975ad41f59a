"""Shared fixtures: a tiny class-folder dataset made with PIL, packed like the upstream archive."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CLASS_COLOURS = {"alpha": (200, 40, 40), "beta": (40, 200, 40), "gamma ü": (40, 40, 200)}
PER_CLASS = 12


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
    yield
    os.environ.clear()
    os.environ.update(saved)


def make_image(path: Path, colour: tuple[int, int, int], seed: int, size: int = 40, fmt: str = "JPEG") -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt)
    return path


def build_class_folders(root: Path, per_class: int = PER_CLASS) -> Path:
    for index, (name, colour) in enumerate(CLASS_COLOURS.items()):
        for i in range(per_class):
            make_image(root / name / f"IMG_{i:03d}.JPG", colour, seed=index * 1000 + i)
    return root


@pytest.fixture
def class_folders(tmp_path) -> Path:
    return build_class_folders(tmp_path / "dataset")


def pack_upstream_zip(class_root: Path, archive: Path) -> Path:
    """Lay the classes out as the upstream branch archive does, with an Examples/ folder beside them."""
    with zipfile.ZipFile(archive, "w") as bundle:
        prefix = "Sign-Language-Digits-Dataset-master"
        for file in sorted(class_root.rglob("*")):
            if file.is_file():
                bundle.write(file, f"{prefix}/Dataset/{file.relative_to(class_root).as_posix()}")
        example = make_image(archive.parent / "example.JPG", (128, 128, 128), seed=7)
        bundle.write(example, f"{prefix}/Examples/example_0.JPG")
        bundle.writestr(f"{prefix}/README.md", "# dataset\n")
        bundle.writestr("__MACOSX/._junk", "junk")
    return archive


@pytest.fixture
def tiny_zip(tmp_path, class_folders) -> Path:
    return pack_upstream_zip(class_folders, tmp_path / "tiny.zip")


def tiny_params(url: str | Path, **train_overrides) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["download"].update(url=str(url), sha256=None, retries=0)
    params["train"].update(
        model="test_efficientnet",
        pretrained=False,
        weights_file=None,
        trainable_blocks="all",
        image_size=32,
        batch_size=8,
        epochs=2,
        lr=3e-3,
        early_stopping_patience=0,
    )
    params["train"].update(train_overrides)
    params["register"].update(min_accuracy=0.0)
    return params


def make_project(tmp_path: Path, url: str | Path, **train_overrides) -> Path:
    """A git + DVC repo holding this project's dvc.yaml and a params.yaml for the tiny dataset."""
    import subprocess

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(url, **train_overrides), sort_keys=False))
    for command in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        subprocess.run(command, cwd=project, check=True, env={**os.environ, "PATH": _venv_path()})
    return project


def _venv_path() -> str:
    import sys

    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture
def venv_env() -> dict[str, str]:
    """Environment whose PATH finds this interpreter's `signflow` and `dvc` commands."""
    return {**os.environ, "PATH": _venv_path()}


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "datasets" / "sign-language-digits.zip").is_file():
        pytest.skip("../shared (real dataset and weights) is not present")
    return SHARED


@pytest.fixture
def scratch_dir():
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


@pytest.fixture
def trained(tmp_path, tiny_zip):
    """A tiny model trained end to end on the tiny dataset (library calls, no DVC, no Prefect)."""
    from signflow.config import parse_params
    from signflow.download import download_dataset
    from signflow.split import split_dataset
    from signflow.train import fine_tune

    params = parse_params(tiny_params(tiny_zip, epochs=3))
    raw, split = tmp_path / "raw", tmp_path / "split"
    download_dataset(params.download, raw)
    split_dataset(raw, split, params.split)
    result = fine_tune(params.train, raw, split, tmp_path / "model.pt", tmp_path / "train_log.csv")
    return params, raw, split, result
