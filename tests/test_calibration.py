"""Calibrated probabilities: the temperature is fitted after training on the validation split, kept
in the model file, and the evaluation report shows the calibration error before and after it."""

import json

import numpy as np
import pytest
import torch

from signflow._calibration import (
    TEMPERATURE_RANGE,
    calibration_bins,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    softmax,
)
from signflow._model_file import load_bundle
from signflow.evaluate import evaluate, logits_for
from signflow.split_files import read_manifest
from tests.helpers import section


def ece_of(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> float:
    return expected_calibration_error(calibration_bins(labels, probabilities, bins))


def test_calibration_bins_and_ece_by_hand():
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.95, 0.05], [0.65, 0.35], [0.6, 0.4], [0.1, 0.9]])
    table = calibration_bins(labels, probabilities, bins=10)
    assert table["images"].sum() == 4
    row = table[table["bin"] == 6].iloc[0]  # (0.6, 0.7] holds only 0.65 (right); 0.6 is in (0.5, 0.6]
    assert row["images"] == 1 and row["accuracy"] == 1.0
    # |0.95-1| + |0.65-1| + |0.6-0| + |0.9-1| over 4 images
    assert expected_calibration_error(table) == pytest.approx((0.05 + 0.35 + 0.6 + 0.1) / 4)


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_with(true_temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20000, 5))
    probabilities = softmax(logits, true_temperature)
    labels = np.array([rng.choice(5, p=row) for row in probabilities])
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    assert ece_of(labels, softmax(logits, fitted), 10) < 0.02 < ece_of(labels, softmax(logits), 10)
    assert (softmax(logits, fitted).argmax(1) == logits.argmax(1)).all(), "the predicted class never changes"


def test_a_validation_split_without_mistakes_gets_a_finite_temperature():
    """The likelihood has no minimum here (it rises as T -> 0): the confidence is held at Laplace's
    (n + 1) / (n + 2) instead of running to 1."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 300)
    logits = rng.uniform(-1, 1, (300, 10))
    logits[np.arange(300), labels] += 3.0  # every image right, by a margin of at least 1
    assert negative_log_likelihood(logits, labels, 0.1) < negative_log_likelihood(logits, labels, 0.5)
    fitted = fit_temperature(logits, labels)
    assert TEMPERATURE_RANGE[0] < fitted < 1.0
    assert softmax(logits, fitted).max(1).mean() == pytest.approx(301 / 302, abs=1e-5)


def test_nothing_to_fit_on_leaves_probabilities_unchanged():
    assert fit_temperature(np.empty((0, 3)), np.empty(0, dtype=int)) == 1.0


def test_training_keeps_the_temperature_fitted_on_the_kept_weights(trained, tmp_path):
    params, raw, split, _ = trained
    bundle = load_bundle(tmp_path / "model.pt")
    manifest = read_manifest(split, "valid")
    logits = logits_for(bundle, [raw / p for p in manifest["path"]], 64)
    labels = manifest["label_index"].to_numpy()
    assert bundle.temperature != 1.0
    assert bundle.temperature == pytest.approx(fit_temperature(logits, labels), rel=1e-3)
    assert bundle.summary["temperature"] == bundle.temperature
    assert bundle.summary["valid_nll"] <= bundle.summary["valid_nll_uncalibrated"]


def test_a_model_file_without_a_temperature_is_read_as_uncalibrated(trained, tmp_path):
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    del payload["temperature"]
    torch.save(payload, tmp_path / "old.pt")
    old = load_bundle(tmp_path / "old.pt")
    assert old.temperature == 1.0
    calibrated = load_bundle(tmp_path / "model.pt")
    assert old.fingerprint() != calibrated.fingerprint(), "other probabilities, another model"
    calibrated.temperature = 1.0
    assert old.fingerprint() == calibrated.fingerprint(), "uncalibrated models keep their fingerprint"
    payload["temperature"] = -1.0
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(Exception, match="temperature -1.0 is not a positive number"):
        load_bundle(tmp_path / "bad.pt")


def test_evaluate_reports_calibration_before_and_after_with_the_same_accuracy(trained, tmp_path):
    params, raw, split, _ = trained
    reports = tmp_path / "reports"
    evaluate(section("evaluate"), tmp_path / "model.pt", raw, split, reports, tmp_path / "train_log.csv")
    metrics = json.loads((reports / "metrics.json").read_text())
    bundle = load_bundle(tmp_path / "model.pt")
    manifest = read_manifest(split, "test")
    logits = logits_for(bundle, [raw / p for p in manifest["path"]], 64)
    labels = manifest["label_index"].to_numpy()
    assert metrics["temperature"] == bundle.temperature
    assert metrics["accuracy"] == pytest.approx((logits.argmax(1) == labels).mean()), "accuracy is unchanged"
    assert metrics["ece_uncalibrated"] == pytest.approx(ece_of(labels, softmax(logits), 10))
    assert metrics["ece"] == pytest.approx(ece_of(labels, softmax(logits, bundle.temperature), 10))
    text = (reports / "report.md").read_text()
    assert f"| expected calibration error | {metrics['ece']:.4f} |" in text
    assert f"| expected calibration error before temperature scaling | {metrics['ece_uncalibrated']:.4f} |" in text
    assert f"| softmax temperature (fitted on validation) | {bundle.temperature:.4f} |" in text
