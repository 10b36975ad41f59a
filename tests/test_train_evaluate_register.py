import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from signflow._model_card import render_model_card
from signflow._model_file import CheckpointError, load_bundle, save_bundle
from signflow.config import parse_params
from signflow.evaluate import evaluate
from signflow.extract import extract_dataset
from signflow.register import TEST_SET_TAG, Candidate, register_model
from signflow.split import split_dataset
from signflow.split_files import read_manifest, read_split_report
from signflow.train import TrainingError, train_model
from tests.helpers import section, tiny_params


def test_train_model_writes_best_checkpoint_and_epoch_log(trained, tmp_path):
    params, raw, split, result = trained
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert list(log["epoch"]) == [1, 2, 3]
    assert {"train_loss", "train_accuracy", "valid_loss", "valid_accuracy"} <= set(log.columns)
    assert result.best_valid_accuracy == pytest.approx(log["valid_accuracy"].max())
    bundle = load_bundle(tmp_path / "model.pt")
    assert bundle.class_names == json.loads((split / "classes.json").read_text())
    assert bundle.preprocessing.image_size == 32
    assert bundle.summary["best_epoch"] == result.best_epoch


def test_training_is_reproducible_for_a_seed(trained, tmp_path):
    params, raw, split, _ = trained
    train_model(params.train, raw, split, tmp_path / "again.pt", tmp_path / "again.csv")
    assert load_bundle(tmp_path / "again.pt").fingerprint() == load_bundle(tmp_path / "model.pt").fingerprint()
    assert (tmp_path / "again.csv").read_text().split("\n")[1].split(",")[:5] == (
        (tmp_path / "train_log.csv").read_text().split("\n")[1].split(",")[:5]
    )


def test_evaluate_reports_match_the_test_split(trained, tmp_path):
    params, raw, split, _ = trained
    result = evaluate(section("evaluate"), tmp_path / "model.pt", raw, split, tmp_path / "reports")
    test = pd.read_csv(split / "test.csv")
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["test_images"] == len(test) == result.test_images
    predictions = pd.read_csv(tmp_path / "reports" / "predictions.csv")
    assert list(predictions["path"]) == list(test["path"])
    assert metrics["accuracy"] == pytest.approx((predictions["actual"] == predictions["predicted"]).mean())
    per_class = pd.read_csv(tmp_path / "reports" / "per_class.csv")
    assert dict(zip(per_class["class"], per_class["support"], strict=True)) == test["label"].value_counts().to_dict()
    assert (tmp_path / "reports" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_refuses_a_model_with_another_class_list(trained, tmp_path):
    params, raw, split, _ = trained
    bundle = load_bundle(tmp_path / "model.pt")
    bundle.class_names = list(reversed(bundle.class_names))
    save_bundle(bundle, tmp_path / "shifted.pt")
    with pytest.raises(CheckpointError, match="class list mismatch"):
        evaluate(section("evaluate"), tmp_path / "shifted.pt", raw, split, tmp_path / "reports")


def _register(params, tmp_path, model, accuracy, test_set="test set A"):
    metrics = tmp_path / f"metrics-{accuracy}.json"
    metrics.write_text(json.dumps({"accuracy": accuracy, "macro_f1": accuracy, "test_images": 9}))
    tags = {"signflow.data_version": "abc.dir", "signflow.git_commit": "none", TEST_SET_TAG: test_set}
    candidate = Candidate.from_files(model, metrics, params.model_dump(mode="json"), tags)
    return register_model(params.register, candidate, tmp_path / "rec.json")


def test_register_versions_champion_gate_and_no_duplicates(trained, tmp_path, monkeypatch):
    params, *_ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    gated = params.register.model_copy(update={"min_accuracy": 0.5})
    params = params.model_copy(update={"register": gated})
    first = _register(params, tmp_path, tmp_path / "model.pt", 0.8)
    assert first.version == "1" and first.is_champion and first.newly_created
    again = _register(params, tmp_path, tmp_path / "model.pt", 0.8)
    assert again.version == "1" and not again.newly_created, "same model registered twice adds no version"

    bundle = load_bundle(tmp_path / "model.pt")
    for index, accuracy in enumerate([0.7, 0.9, 0.3]):
        bundle.state_dict = {k: v + (index + 1) if v.is_floating_point() else v for k, v in bundle.state_dict.items()}
        save_bundle(bundle, tmp_path / f"m{index}.pt")
        result = _register(params, tmp_path, tmp_path / f"m{index}.pt", accuracy)
        assert result.version == str(index + 2)
        assert result.champion_version == ("1" if index == 0 else "3")

    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    version = client.get_model_version(params.register.model_name, "3")
    assert version.tags["signflow.data_version"] == "abc.dir"
    run = client.get_run(version.run_id)
    assert run.data.params["train.model"] == "test_efficientnet"
    assert run.data.metrics["accuracy"] == pytest.approx(0.9)
    assert json.loads((tmp_path / "rec.json").read_text())["champion_version"] == "3"


def _variant(tmp_path, offset: float) -> Path:
    bundle = load_bundle(tmp_path / "model.pt")
    bundle.state_dict = {k: v + offset if v.is_floating_point() else v for k, v in bundle.state_dict.items()}
    return save_bundle(bundle, tmp_path / f"variant-{offset}.pt")


def test_the_champion_is_compared_only_with_a_model_scored_on_the_same_test_set(trained, tmp_path, monkeypatch, caplog):
    params, *_ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert _register(params, tmp_path, tmp_path / "model.pt", 0.8).is_champion
    with caplog.at_level("WARNING"):
        other = _register(params, tmp_path, _variant(tmp_path, 1.0), 0.99, test_set="test set B")
    assert other.version == "2" and other.newly_created and other.champion_version == "1"
    assert "another test set" in other.champion_reason and "not comparable" in other.champion_reason
    assert "another test set" in caplog.text
    receipt = json.loads((tmp_path / "rec.json").read_text())
    assert "another test set" in receipt["champion_reason"], "the registration artifact says why"
    better = _register(params, tmp_path, _variant(tmp_path, 2.0), 0.85)
    assert better.is_champion and "beats champion version 1 (0.8000) on the same test set" in better.champion_reason


def test_the_test_set_fingerprint_is_the_test_images_and_labels(trained, tmp_path):
    from signflow._provenance import fingerprint_test_set

    _, raw, split, _ = trained
    same = fingerprint_test_set(split)
    split_dataset(raw, tmp_path / "again", section("split"))
    assert fingerprint_test_set(tmp_path / "again") == same, "same data and split: same test set"
    split_dataset(raw, tmp_path / "other", section("split", seed=7))
    assert fingerprint_test_set(tmp_path / "other") != same, "another split: another test set"


def test_checkpoint_write_is_atomic(trained, tmp_path, monkeypatch):
    bundle = load_bundle(tmp_path / "model.pt")
    before = (tmp_path / "model.pt").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        save_bundle(bundle, tmp_path / "model.pt")
    assert (tmp_path / "model.pt").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.pt")]


def test_the_champion_rescored_on_a_new_test_set_carries_the_alias_and_tags_never_lie(trained, tmp_path, monkeypatch):
    """The same weights registered after the test set changed are a new version with the new test set
    and accuracy; it takes the alias from the champion with those weights, so later models trained on
    the new test set are compared with it instead of being refused for ever."""
    from mlflow import MlflowClient

    params, *_ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert _register(params, tmp_path, tmp_path / "model.pt", 0.8).is_champion
    rescored = _register(params, tmp_path, tmp_path / "model.pt", 0.75, test_set="test set B")
    assert rescored.version == "2" and rescored.newly_created and rescored.is_champion
    assert "the champion's own weights (version 1) scored on the current test set" in rescored.champion_reason
    client = MlflowClient()
    tags = {str(v.version): v.tags for v in client.search_model_versions(f"name = '{params.register.model_name}'")}
    assert (tags["1"][TEST_SET_TAG], float(tags["1"]["signflow.test_accuracy"])) == ("test set A", 0.8)
    assert (tags["2"][TEST_SET_TAG], float(tags["2"]["signflow.test_accuracy"])) == ("test set B", 0.75)
    later = _register(params, tmp_path, _variant(tmp_path, 1.0), 0.9, test_set="test set B")
    assert later.is_champion and "beats champion version 2 (0.7500) on the same test set" in later.champion_reason


@pytest.fixture
def without_validation(tmp_path, tiny_zip):
    """The tiny dataset split with `split.valid: 0`: train and test only."""
    raw_params = tiny_params(epochs=2)
    raw_params["split"].update(train=0.75, valid=0.0, test=0.25)
    params = parse_params(raw_params)
    raw, split = tmp_path / "raw", tmp_path / "split"
    extract_dataset(tiny_zip, raw, params.extract)
    split_dataset(raw, split, params.split)
    assert read_manifest(split, "valid").empty
    return params, raw, split


@pytest.mark.parametrize(("cache_frozen_features", "trainable_blocks"), [(False, "all"), (True, 1)])
def test_without_a_validation_split_training_keeps_the_last_epoch_uncalibrated_and_evaluates(
    without_validation, tmp_path, cache_frozen_features, trainable_blocks
):
    params, raw, split = without_validation
    train = params.train.model_copy(
        update={"cache_frozen_features": cache_frozen_features, "trainable_blocks": trainable_blocks}
    )
    result = train_model(train, raw, split, tmp_path / "model.pt", tmp_path / "train_log.csv")
    assert result.best_epoch == result.epochs_run == 2
    assert result.summary_line() == "last epoch 2 kept (no validation split)"
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert list(log["epoch"]) == [1, 2] and log["valid_accuracy"].isna().all()
    bundle = load_bundle(tmp_path / "model.pt")
    assert bundle.temperature == 1.0 and "valid_nll" not in bundle.summary
    evaluation = evaluate(section("evaluate"), tmp_path / "model.pt", raw, split, tmp_path / "reports")
    assert evaluation.test_images == len(read_manifest(split, "test"))
    report = (tmp_path / "reports" / "report.md").read_text()
    assert "kept at epoch 2, the last (no validation split)" in report
    assert "| softmax temperature | none fitted: probabilities are the plain softmax |" in report
    assert not re.search(r"\bnan\b", report, re.IGNORECASE)
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    registration = {"model_name": "m", "version": "1", "data_version": "d", "data_source": "s", "git_commit": "g"}
    card = render_model_card(bundle, metrics, params.model_dump(mode="json"), read_split_report(split), registration)
    assert "the checkpoint kept is the last epoch" in card
    assert "Probabilities are not calibrated" in card and "calibrated: the logits are divided" not in card
    assert not re.search(r"\bnan\b", card, re.IGNORECASE)


def test_without_a_validation_split_early_stopping_is_refused_before_training(without_validation, tmp_path):
    params, raw, split = without_validation
    train = params.train.model_copy(update={"early_stopping_patience": 2})
    with pytest.raises(TrainingError, match=r"valid.csv has no images \(split.valid: 0\).*early_stopping_patience: 0"):
        train_model(train, raw, split, tmp_path / "model.pt", tmp_path / "train_log.csv")
    assert not (tmp_path / "model.pt").exists()


def test_an_early_stopped_run_is_the_whole_runs_first_epochs_and_keeps_their_best(tmp_path, tiny_zip):
    """train.early_stopping_patience stops K epochs after the best validation epoch so far. The epochs
    before the stop are the same computation as a run of all epochs (the learning-rate schedule
    follows train.epochs, the data order the seed: same losses to the last digit), and the kept model
    is the best of them; so when the whole run's best epoch comes before the stop, the stopped run
    keeps the whole run's model (bench/patience.py replays epoch logs on this)."""
    params = parse_params(tiny_params(epochs=8))
    raw, split = tmp_path / "raw", tmp_path / "split"
    extract_dataset(tiny_zip, raw, params.extract)
    split_dataset(raw, split, params.split)
    train_model(params.train, raw, split, tmp_path / "whole.pt", tmp_path / "whole.csv")
    whole = pd.read_csv(tmp_path / "whole.csv").drop(columns="seconds")

    stopped_params = params.train.model_copy(update={"early_stopping_patience": 1})
    stopped = train_model(stopped_params, raw, split, tmp_path / "stopped.pt", tmp_path / "stopped.csv")
    log = pd.read_csv(tmp_path / "stopped.csv").drop(columns="seconds")
    assert stopped.epochs_run < 8, "patience 1 stops at the first epoch that is no better"
    assert log.equals(whole.iloc[: stopped.epochs_run]), "the same epochs, to the last digit, lr included"
    ranked = log.sort_values(["valid_accuracy", "valid_loss"], ascending=[False, True], kind="stable")
    assert stopped.best_epoch == ranked["epoch"].iloc[0] == stopped.epochs_run - 1
    assert load_bundle(tmp_path / "stopped.pt").summary["best_epoch"] == stopped.best_epoch


def test_a_train_split_one_image_over_a_whole_number_of_batches_trains(tmp_path, tiny_zip):
    """k x batch_size + 1 training images (captured frames make any count) left a last batch of one image,
    which BatchNorm in training mode cannot normalise: the run stopped with a PyTorch error. That image
    now joins the batch before it, and every image is still trained on each epoch."""
    params = parse_params(tiny_params(epochs=2, cache_frozen_features=False))
    raw, split = tmp_path / "raw", tmp_path / "split"
    extract_dataset(tiny_zip, raw, params.extract)
    split_dataset(raw, split, params.split)
    images = len(read_manifest(split, "train"))
    batch_size = images - 1  # one whole batch and one image over
    assert batch_size > 1
    train = params.train.model_copy(update={"batch_size": batch_size})
    result = train_model(train, raw, split, tmp_path / "model.pt", tmp_path / "log.csv")
    assert result.epochs_run == 2

    from signflow._runners import epoch_batches

    sizes = [len(b) for b in epoch_batches(torch.arange(images), batch_size)]
    assert sizes == [images]
    assert [len(b) for b in epoch_batches(torch.arange(17), 8)] == [8, 9]
    assert [len(b) for b in epoch_batches(torch.arange(18), 8)] == [8, 8, 2], "other splits are unchanged"
    assert [len(b) for b in epoch_batches(torch.arange(1), 8)] == [1], "a split of one image stays one batch"
