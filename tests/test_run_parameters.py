"""What a run may change: overrides only for train.* and evaluate.* keys (every entry: Prefect run
parameters, `--set`), and a served deployment pinned to its project folder and params file, since
anyone who can reach an unauthenticated Prefect server can start a run."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import yaml

from signflow.config import ConfigError, load_params
from tests.helpers import ROOT, tiny_params


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params()))
    return path


@pytest.mark.parametrize(
    "key", ["register.tracking_uri", "register.model_name", "extract.class_root", "train", "train.weights_file"]
)
def test_overrides_outside_train_and_evaluate_are_refused_naming_the_key(params_file, key):
    with pytest.raises(ConfigError) as error:
        load_params(params_file, {key: "/tmp/elsewhere"})
    message = str(error.value)
    assert f"override {key!r} is not allowed" in message
    assert "train.*, evaluate.*" in message, "the message lists what may be overridden"


def test_train_and_evaluate_overrides_are_allowed(params_file):
    params = load_params(params_file, {"train.epochs": 1, "train.augment.hflip": 0.5, "evaluate.gallery_size": 3})
    assert (params.train.epochs, params.train.augment.hflip, params.evaluate.gallery_size) == (1, 0.5, 3)


def test_params_file_must_lie_inside_the_project(tmp_path):
    from signflow.config import params_file_in

    project = tmp_path / "project"
    project.mkdir()
    assert params_file_in(project, "params.yaml") == (project / "params.yaml").resolve()
    for outside in ["/etc/passwd", "../params.yaml", str(project / "params.yaml")]:
        with pytest.raises(ConfigError, match="relative to the project"):
            params_file_in(project, outside)


@pytest.mark.parametrize("module", ["flows.pipeline", "flows.serve"])
def test_flow_command_lines_refuse_a_register_override(module, tmp_path, params_file):
    run = subprocess.run(
        [sys.executable, "-m", module, "--project-dir", str(tmp_path), "--set", "register.tracking_uri=sqlite:///x.db"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "override 'register.tracking_uri' is not allowed" in run.stderr


def test_a_served_run_can_change_only_the_overrides():
    from flows.pipeline import served_pipeline
    from flows.serve import build_deployment, deployment_parameters
    from signflow.config import ScheduleConfig

    assert list(inspect.signature(served_pipeline.fn).parameters) == ["overrides"]
    schedule = load_params(ROOT / "params.yaml").schedule
    deployment = build_deployment(ScheduleConfig.model_validate(schedule.model_dump()), deployment_parameters({}))
    assert deployment.parameters == {"overrides": None}
    assert set(deployment._parameter_openapi_schema.properties) == {"overrides"}
    assert deployment.flow_name == "signflow-pipeline" and deployment.entrypoint == "flows.pipeline.served_pipeline"
    with pytest.raises(TypeError):
        served_pipeline.fn(project_dir="/elsewhere")


def test_a_served_run_refuses_to_start_outside_flows_serve(monkeypatch):
    from flows.pipeline import SERVED_PROJECT_ENV, served_pipeline
    from signflow.errors import SignflowError

    monkeypatch.delenv(SERVED_PROJECT_ENV, raising=False)
    with pytest.raises(SignflowError, match="only under `python -m flows.serve`"):
        served_pipeline.fn()
