"""The two ways to run the whole pipeline, on the tiny dataset in a temporary git + DVC repo."""

import asyncio
import json
import subprocess

import pytest
from mlflow import MlflowClient

from signflow import dvc_state
from tests.helpers import EtagServer, build_split_folders, make_project, zip_folder

pytestmark = pytest.mark.slow


def _versions(project):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return client.search_model_versions("name = 'sign-language-digits'")


def _dvc(project, env, *args):
    return subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True)


def test_dvc_repro_runs_the_chain_and_registers_then_is_a_no_op(tmp_path, tiny_zip, venv_env):
    """On a clone-like project `dvc repro` fetches the source data.dvc names and runs every stage; then
    it is a no-op, data.dvc works as DVC's record of the data, and code changes rerun their stages."""
    project = make_project(tmp_path, tiny_zip)
    run = _dvc(project, venv_env, "repro")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Importing" in run.stdout, "data.dvc is part of the pipeline: dvc repro fetched the source"
    receipt = json.loads((project / "models" / "registered.json").read_text())
    assert receipt["version"] == "1" and receipt["newly_created"]
    assert "split" in receipt["test_split"] and receipt["test_near_duplicates_in_train"] == "0", receipt
    assert len(_versions(project)) == 1
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["test_images"] > 0
    for output in ("models/model.onnx", "models/model_card.md", "reports/report.md", "reports/mistakes.png"):
        assert (project / output).is_file(), output
    plots = _dvc(project, venv_env, "plots", "show")
    assert plots.returncode == 0, plots.stderr
    html = (project / "dvc_plots" / "index.html").read_text()
    for plot in ("learning-curves-accuracy", "learning-curves-loss", "confusion-matrix", "calibration"):
        assert plot in html, plot
    again = _dvc(project, venv_env, "repro")
    assert again.returncode == 0 and "Data and pipelines are up to date" in again.stdout
    assert len(_versions(project)) == 1
    _data_dvc_is_dvcs_record(project, tiny_zip, venv_env)
    _code_is_a_dependency(project, venv_env)

    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("seed: 42", "seed: 43", 1))
    stale = _stale_stages(project, venv_env)
    assert stale == {"split", "register", "train"}, "the stages that read split.* (and train, for its code)"


def _data_dvc_is_dvcs_record(project, source, env):
    """data.dvc records the source and what was fetched; dvc status / data status / update work on it."""
    record = (project / "data.dvc").read_text()
    assert "md5:" in record and str(source) in record and "persist: true" in record
    assert (project / "data" / "source").is_file()
    assert _stale_stages(project, env) == set()
    data_status = _dvc(project, env, "data", "status", "--json")
    assert data_status.returncode == 0 and "data/source" not in json.loads(data_status.stdout).get("uncommitted", {})
    update = _dvc(project, env, "update", "data.dvc")
    assert update.returncode == 0 and "didn't change" in update.stdout + update.stderr


def _code_is_a_dependency(project, env):
    """A README edit reruns nothing; an edit of the training code makes exactly the train stage out of
    date (its downstream stages follow once it reruns)."""
    (project / "README.md").write_text("# edited\n")
    assert _stale_stages(project, env) == set(), "a README edit reruns nothing"
    with (project / "signflow" / "train.py").open("a") as module:
        module.write("\n# a change to the training code\n")
    assert _stale_stages(project, env) == {"train"}, "only the train stage depends on train.py"
    dry = _dvc(project, env, "repro", "--dry")
    assert "Running stage 'extract'" not in dry.stdout and "Running stage 'split'" not in dry.stdout
    assert "Running stage 'train'" in dry.stdout


def _stale_stages(project, env) -> set[str]:
    status = _dvc(project, env, "status", "--json")
    assert status.returncode == 0, status.stderr
    return set(json.loads(status.stdout))


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


async def _task_runs(run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))


def test_prefect_flow_runs_the_chain_and_leaves_dvc_up_to_date(tmp_path, tiny_zip, prefect_server, venv_env):
    """An https source; the run graph is the chain of steps; a second run while the server is down
    keeps the data it fetched before and skips every step."""
    from flows.pipeline import pipeline

    served = EtagServer(tiny_zip.read_bytes())
    project = make_project(tmp_path, served.url)
    state = pipeline(project_dir=str(project), return_state=True)
    results = state.result()
    assert results["register"].result.version == "1"
    assert results["evaluate"].result.test_images > 0
    assert all(outcome.ran and outcome.recorded for outcome in results.values())
    status = _dvc(project, venv_env, "status")
    assert "up to date" in status.stdout, status.stdout

    tasks = asyncio.run(_task_runs(state.state_details.flow_run_id))
    by_id = {task.id: task.name.rsplit("-", 1)[0] for task in tasks}
    chain = ["extract", "split", "train", "evaluate", "export", "register"]
    assert sorted(by_id.values()) == sorted([*chain, "summary"]), "one task per step: no separate DVC tasks"
    upstream = {
        by_id[task.id]: {by_id[i.id] for inputs in task.task_inputs.values() for i in inputs if i.id in by_id}
        for task in tasks
    }
    for before, after in zip(chain, chain[1:], strict=False):
        assert upstream[after] == {before}, f"the run graph has the edge {before} -> {after}"

    served.stop()
    second = pipeline(project_dir=str(project))
    assert not any(outcome.ran for outcome in second.values()), "an unchanged pipeline skips every step"
    assert "not reachable: using the data fetched before" in second["extract"].summary_line()
    assert (project / "data" / "source").is_file()
    assert len(_versions(project)) == 1
    with dvc_state.open_repo(project) as repo:
        assert all(dvc_state.stage_is_up_to_date(repo, s) for s in ("extract", "split", "train", "evaluate"))


def test_sweep_flow_runs_trials_through_the_task_runner_and_registers_the_winner(tmp_path, tiny_zip, prefect_server):
    import yaml
    from prefect.task_runners import ProcessPoolTaskRunner

    from flows.sweep import sweep_flow
    from signflow._model_file import load_bundle
    from signflow.config import load_params, read_params_file
    from signflow.sweep import plan_trials, run_trial

    project = make_project(tmp_path, tiny_zip)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sweep"].update(grid={"train.lr": [3e-3, 1e-3]}, max_trials=2, max_minutes=30, workers=2)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    winner = sweep_flow.with_options(task_runner=ProcessPoolTaskRunner(max_workers=2))(project_dir=str(project))
    assert winner["registered_version"] == "1"
    assert len((project / "sweep" / "results.csv").read_text().strip().splitlines()) == 3
    assert (project / "sweep" / "winner" / "model.onnx").is_file()
    # Two trials at once give exactly the models they give one after another in this process (with
    # a thread pool they did not: the trials shared and interleaved torch's global generator).
    trials = plan_trials(read_params_file(project / "params.yaml"), load_params(project / "params.yaml").sweep, project)
    for trial in trials:
        alone = run_trial(trial, project / "data" / "raw", project / "data" / "split", tmp_path / "sequential")
        together = project / "sweep" / "trials" / trial.name / "model.pt"
        assert load_bundle(alone["model_path"]).fingerprint() == load_bundle(together).fingerprint(), trial.name
