"""The fine-tuning sweep on the tiny dataset: trials, winner by validation accuracy, comparison
table and plot, the winner registered, reruns that skip finished trials, and the time budget."""

import json
import shlex

import pandas as pd
import pytest
import yaml

import signflow.train
from signflow.config import ConfigError
from signflow.extract import extract_dataset
from signflow.split import split_dataset
from signflow.sweep import SweepError, plan_trials, sweep, trial_dir
from tests.helpers import section, tiny_params

GRID = {"train.trainable_blocks": [1, "all"], "train.lr": [3e-3, 1e-3]}


@pytest.fixture
def project(tmp_path, tiny_zip, monkeypatch):
    raw = tiny_params(epochs=2)
    raw["sweep"].update(grid=GRID, max_trials=3, max_minutes=30, workers=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    from signflow.config import load_params

    params = load_params(tmp_path / "params.yaml")
    extract_dataset(tiny_zip, tmp_path / "data" / "raw", params.extract)
    split_dataset(tmp_path / "data" / "raw", tmp_path / "data" / "split", params.split)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def _sweep(project):
    return sweep(
        project / "params.yaml", project / "data" / "raw", project / "data" / "split", project / "sweep", project
    )


def test_plan_is_every_combination_in_order_up_to_max_trials():
    trials = plan_trials(tiny_params(), section("sweep", grid=GRID, max_trials=3))
    assert [t.overrides for t in trials] == [
        {"train.trainable_blocks": 1, "train.lr": 3e-3},
        {"train.trainable_blocks": 1, "train.lr": 1e-3},
        {"train.trainable_blocks": "all", "train.lr": 3e-3},
    ]
    assert len({t.name for t in trials}) == 3
    assert trials[2].train.trainable_blocks == "all" and trials[2].train.lr == 3e-3
    assert trials[0].dvc_command() == "dvc exp run -S 'train.trainable_blocks=1' -S 'train.lr=0.003'"


def test_trial_names_stay_inside_the_trials_folder_and_commands_are_quoted(tmp_path):
    """Grid values become folder names and a shell command: `..`, slashes and quotes must not escape."""
    raw = tiny_params()
    raw["train"]["weights_file"] = None
    grid = {"train.weights_file": ["../../../etc/evil", "a'; rm -rf ~; '"]}
    trials = plan_trials(raw, section("sweep", grid=grid, max_trials=2), base_dir=tmp_path)
    for trial in trials:
        assert "/" not in trial.name and ".." not in trial.name
        folder = trial_dir(tmp_path / "sweep", trial)
        assert folder.parent == (tmp_path / "sweep" / "trials").resolve()
    command = shlex.split(trials[1].dvc_command())
    assert command == ["dvc", "exp", "run", "-S", "train.weights_file=" + json.dumps("a'; rm -rf ~; '")]


def test_bad_grids_are_refused_with_the_key_or_trial_named():
    with pytest.raises(ValueError, match="train.\\* keys only"):
        section("sweep", grid={"split.seed": [1, 2]})
    with pytest.raises(ConfigError, match="sweep trial .*train.lr"):
        plan_trials(tiny_params(), section("sweep", grid={"train.lr": [1e-3, -1]}))


def test_a_sweep_without_validation_images_is_refused_before_any_trial(project):
    """Its winner is chosen by validation accuracy: with split.valid 0 there is none to choose by."""
    split = project / "data" / "split-without-valid"
    split_dataset(project / "data" / "raw", split, section("split", train=0.75, valid=0.0, test=0.25))
    with pytest.raises(SweepError, match=r"valid.csv has no images \(split.valid: 0\): a sweep picks its winner"):
        sweep(project / "params.yaml", project / "data" / "raw", split, project / "sweep", project)
    assert not (project / "sweep" / "trials").exists()


def test_sweep_picks_the_best_validation_trial_writes_the_comparison_and_registers_it(project):
    result = _sweep(project)
    table = pd.read_csv(project / "sweep" / "results.csv")
    assert len(table) == 3 and result.trials == 3 and result.ran == 3
    winner = table[table["winner"]].iloc[0]
    assert winner["valid_accuracy"] == table["valid_accuracy"].max()
    ties = table[table["valid_accuracy"] == winner["valid_accuracy"]]
    assert winner["train_seconds"] == ties["train_seconds"].min(), "ties go to the cheaper trial"
    assert result.winner == winner["trial"]
    assert (project / "sweep" / "trials.png").read_bytes()[:4] == b"\x89PNG"
    assert "| trial |" in (project / "sweep" / "results.md").read_text()
    receipt = json.loads((project / "sweep" / "winner" / "registered.json").read_text())
    assert receipt["version"] == result.registered_version == "1"
    metrics = json.loads((project / "sweep" / "winner" / "reports" / "metrics.json").read_text())
    assert metrics["accuracy"] == result.winner_test_accuracy
    recorded = json.loads((project / "sweep" / "trials" / winner["trial"] / "result.json").read_text())
    grid_values = {key: json.loads(str(winner[key])) for key in GRID}
    assert recorded["overrides"] == grid_values, "each trial records the grid values it ran with"
    expected = plan_trials(yaml.safe_load((project / "params.yaml").read_text()), section("sweep", grid=GRID))
    expected_train = next(t.train for t in expected if t.name == winner["trial"]).model_dump(mode="json")
    assert recorded["train"] == expected_train, "and its exact train params"


def test_an_interrupted_sweep_skips_the_trials_it_finished(project, monkeypatch):
    real, calls = signflow.train.train_model, []

    def fail_on_the_second(cfg, *args, **kwargs):
        calls.append(cfg.lr)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(signflow.train, "train_model", fail_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        _sweep(project)
    calls.clear()
    monkeypatch.setattr(
        signflow.train, "train_model", lambda cfg, *a, **k: (calls.append(cfg.lr), real(cfg, *a, **k))[1]
    )
    result = _sweep(project)
    assert len(calls) == 2, "the finished first trial was not trained again"
    assert result.ran == 2
    calls.clear()
    _sweep(project)
    assert calls == [], "a finished sweep reruns nothing"


def test_the_budget_stops_new_trials_but_the_first_always_runs(project):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["sweep"]["max_minutes"] = 1e-6
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    result = _sweep(project)
    table = pd.read_csv(project / "sweep" / "results.csv")
    assert result.ran == 1
    assert list(table["status"]) == ["ran", "not run (budget)", "not run (budget)"]
