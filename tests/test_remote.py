"""A DVC remote (`dvc remote add -d` with a local folder): the flow pushes after a successful run, a
fresh clone with `dvc pull` gets exactly the registered model, and `dvc repro --pull` redoes nothing
that is already in the remote."""

from __future__ import annotations

import json
import subprocess

import pytest

from signflow._model_file import load_bundle
from tests.helpers import make_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _run(command, cwd, env):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{command}: {result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_the_flow_pushes_and_a_fresh_clone_pulls_exactly_the_registered_model(
    tmp_path, tiny_zip, prefect_server, venv_env
):
    from flows.pipeline import pipeline

    project = make_project(tmp_path, tiny_zip)
    remote = tmp_path / "dvc-remote"
    _run(["dvc", "remote", "add", "-d", "store", str(remote)], project, venv_env)
    _run(["git", "commit", "-qam", "a DVC remote"], project, venv_env)
    pipeline(project_dir=str(project))
    assert "in sync" in _run(["dvc", "status", "--cloud"], project, venv_env), "the run pushed everything"
    receipt = json.loads((project / "models" / "registered.json").read_text())
    _run(["git", "add", "-A"], project, venv_env)
    _run(["git", "commit", "-qm", "a scheduled run"], project, venv_env)

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path, venv_env)
    _run(["dvc", "pull"], clone, venv_env)
    assert load_bundle(clone / "models" / "model.pt").fingerprint() == receipt["fingerprint"]
    assert (clone / "models" / "model.onnx").read_bytes() == (project / "models" / "model.onnx").read_bytes()
    for report in ("reports/metrics.json", "reports/report.md", "models/model_card.md", "models/registered.json"):
        assert (clone / report).read_bytes() == (project / report).read_bytes(), report

    again = tmp_path / "again"
    _run(["git", "clone", "-q", str(project), str(again)], tmp_path, venv_env)
    output = _run(["dvc", "repro", "--pull"], again, venv_env)
    assert "Running stage" not in output and "Importing" not in output, "nothing is redone"
    assert load_bundle(again / "models" / "model.pt").fingerprint() == receipt["fingerprint"]
