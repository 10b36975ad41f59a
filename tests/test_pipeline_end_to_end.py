"""The two ways to run the whole pipeline, on the tiny dataset in a temporary git + DVC repo."""

import json
import subprocess

import pytest
from mlflow import MlflowClient

from signflow import _dvc_state as dvc_state
from tasks.pipeline import SKIPPED
from tests.helpers import build_split_folders, make_project, zip_folder

pytestmark = pytest.mark.slow


def _versions(project):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return client.search_model_versions("name = 'sign-language-digits'")


def test_dvc_repro_runs_the_chain_and_registers_then_is_a_no_op(tmp_path, tiny_zip, venv_env):
    project = make_project(tmp_path, tiny_zip)
    run = subprocess.run(["dvc", "repro"], cwd=project, env=venv_env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    receipt = json.loads((project / "models" / "registered.json").read_text())
    assert receipt["version"] == "1" and receipt["newly_created"]
    assert len(_versions(project)) == 1
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["test_images"] > 0
    for output in ("models/model.onnx", "models/model_card.md", "reports/report.md", "reports/mistakes.png"):
        assert (project / output).is_file(), output
    plots = subprocess.run(["dvc", "plots", "show"], cwd=project, env=venv_env, capture_output=True, text=True)
    assert plots.returncode == 0, plots.stderr
    html = (project / "dvc_plots" / "index.html").read_text()
    for plot in ("learning-curves-accuracy", "learning-curves-loss", "confusion-matrix", "calibration"):
        assert plot in html, plot
    again = subprocess.run(["dvc", "repro"], cwd=project, env=venv_env, capture_output=True, text=True)
    assert again.returncode == 0 and "Data and pipelines are up to date" in again.stdout
    assert len(_versions(project)) == 1

    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("seed: 42", "seed: 43", 1))
    status = subprocess.run(["dvc", "status"], cwd=project, env=venv_env, capture_output=True, text=True)
    assert "split" in status.stdout and "download" not in status.stdout.split("split")[0]


def test_dvc_repro_on_an_archive_with_its_own_train_and_test_folders(tmp_path, venv_env):
    """Only the data source differs from the default params: the shipped test folder is the test split."""
    source = build_split_folders(tmp_path / "src", {"train": "training", "test": "testing"}, per_class=10)
    project = make_project(tmp_path, zip_folder(source, tmp_path / "gestures.zip", prefix="gestures-v1"))
    run = subprocess.run(["dvc", "repro"], cwd=project, env=venv_env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in (project / "data" / "raw").iterdir() if p.is_dir()) == ["test", "train"]
    split = json.loads((project / "data" / "split" / "report.json").read_text())
    assert split["strategy"] == "folders" and split["counts"]["test"] == 30
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["test_images"] == 30 and metrics["test_near_duplicates_in_train"] == 0
    card = (project / "models" / "model_card.md").read_text()
    assert "- Split: The dataset's own split folders (train/, test/), kept as shipped, with valid carved out" in card


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_prefect_flow_runs_the_chain_and_leaves_dvc_up_to_date(tmp_path, tiny_zip, prefect_server, venv_env):
    from flows.pipeline import pipeline

    project = make_project(tmp_path, tiny_zip)
    results = pipeline(project_dir=str(project))
    assert results["register"].version == "1"
    assert results["evaluate"].test_images > 0
    status = subprocess.run(["dvc", "status"], cwd=project, env=venv_env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
    assert all(dvc_state.stage_is_up_to_date(s, project) for s in ("download", "split", "train", "evaluate"))

    second = pipeline(project_dir=str(project))
    assert all(value == SKIPPED for value in second.values()), "an unchanged pipeline skips every step"
    assert len(_versions(project)) == 1


def test_sweep_flow_runs_trials_through_the_task_runner_and_registers_the_winner(tmp_path, tiny_zip, prefect_server):
    import yaml
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.sweep import sweep_flow

    project = make_project(tmp_path, tiny_zip)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sweep"] = {"grid": {"train.lr": [3e-3, 1e-3]}, "max_trials": 2, "max_minutes": 30, "workers": 2}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    winner = sweep_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))(project_dir=str(project))
    assert winner["registered_version"] == "1"
    assert len((project / "sweep" / "results.csv").read_text().strip().splitlines()) == 3
    assert (project / "sweep" / "winner" / "model.onnx").is_file()
