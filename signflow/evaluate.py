"""Evaluate step: the model on the test split only, and the report a person reads.

Writes into the reports folder (names in `signflow.layout`): `metrics.json` (accuracy, macro F1,
test-set size, mistakes, expected calibration error with the model's softmax temperature and
without it), `per_class.csv`, `predictions.csv` (one row per test image), `calibration.csv`,
`confusion.png` (counts and row-normalised), `learning_curves.png` (from the train step's epoch
log), `mistakes.png` (the most confident mistakes), `reliability.png` and `report.md` tying them
together. Probabilities are softmax(logits / temperature), the numbers every use of the model gives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from signflow import _report as report
from signflow import layout
from signflow._calibration import calibration_bins, expected_calibration_error, softmax
from signflow._forward import memory_format, predict_logits
from signflow._model import resolve_device
from signflow._model_file import ModelBundle, load_bundle
from signflow._preprocessing import decode_chunks
from signflow.config import EvaluateConfig
from signflow.fileio import atomic_paths, json_text
from signflow.split_files import read_class_names, read_manifest, read_split_report, test_split_description

__all__ = ["EvaluationResult", "evaluate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationResult:
    accuracy: float
    macro_f1: float
    test_images: int
    mistakes: int
    ece: float
    metrics_path: str
    report_path: str
    split: str
    """How the test split was made (the split step's description), shown wherever the accuracy is."""
    test_near_duplicates_in_train: int | None
    """Test images with a near-duplicate in train; None when the split step did not search."""
    accuracy_without_near_duplicates: float | None

    def summary_line(self) -> str:
        line = f"test accuracy {self.accuracy:.4f} on {self.test_images} images"
        if self.test_near_duplicates_in_train:
            line += (
                f" ({self.test_near_duplicates_in_train} with a near-duplicate in train; without them "
                f"{self.accuracy_without_near_duplicates:.4f})"
            )
        elif self.test_near_duplicates_in_train == 0:
            line += " (none with a near-duplicate in train)"
        return line


@dataclass(frozen=True)
class Scores:
    """Everything the report shows, computed from the test labels and the model's probabilities."""

    metrics: dict
    per_class: pd.DataFrame
    predictions: pd.DataFrame
    calibration: pd.DataFrame
    confusion: np.ndarray
    uncalibrated: pd.DataFrame
    """The calibration bins of softmax(logits) without the temperature: the "before" of the report."""


def evaluate(
    cfg: EvaluateConfig,
    model_path: str | Path,
    raw_dir: str | Path,
    split_dir: str | Path,
    reports_dir: str | Path,
    train_log: str | Path | None = None,
) -> EvaluationResult:
    """Score the model on `split_dir/test.csv` and write the report; refuse a model trained on
    another class list. `train_log` (the train step's epoch CSV) feeds the learning curves."""
    raw_dir, reports_dir = Path(raw_dir), Path(reports_dir)
    bundle = load_bundle(model_path)
    bundle.check_classes(read_class_names(split_dir), f"{split_dir}/classes.json")
    bundle.check_preprocessing(str(model_path))
    manifest = read_manifest(split_dir, "test")
    logits = logits_for(bundle, [raw_dir / p for p in manifest["path"]], cfg.batch_size)
    scores = score(manifest, logits, bundle.temperature, bundle.class_names, cfg.calibration_bins)
    split_report = read_split_report(split_dir)
    scores.metrics.update(near_duplicate_metrics(manifest, scores.predictions, split_report))
    split = test_split_description(split_report)
    write_report(scores, bundle, cfg, raw_dir, reports_dir, train_log, split)
    metrics = scores.metrics
    log.info(
        "test accuracy %.4f, macro F1 %.4f, ECE %.4f (%.4f before temperature %.3f) on %d images",
        *(metrics[k] for k in ("accuracy", "macro_f1", "ece", "ece_uncalibrated", "temperature", "test_images")),
    )
    return EvaluationResult(
        metrics["accuracy"],
        metrics["macro_f1"],
        metrics["test_images"],
        metrics["mistakes"],
        metrics["ece"],
        str(reports_dir / layout.METRICS),
        str(reports_dir / layout.REPORT_MARKDOWN),
        split,
        metrics.get("test_near_duplicates_in_train"),
        metrics.get("accuracy_without_near_duplicates"),
    )


def logits_for(bundle: ModelBundle, paths: list[Path], batch_size: int) -> np.ndarray:
    """The model's logits (float32, before the temperature) for each image, run as it was trained
    (channels_last: MobileNet-style CNNs ran about twice as fast with it on the CPU). Images are
    decoded and scored a chunk at a time: memory does not grow with the test split."""
    device = resolve_device("auto")
    model = bundle.build_model().to(device, memory_format=memory_format(bundle.channels_last))
    chunks = decode_chunks(paths, bundle.preprocessing, chunk_size=4 * batch_size, desc="evaluate test")
    logits = [
        predict_logits(model, images, bundle.preprocessing, batch_size, device, bundle.channels_last)
        for images in chunks
    ]
    if not logits:
        return np.empty((0, len(bundle.class_names)), dtype=np.float32)
    return torch.cat(logits).numpy()


def confusion_counts(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) int64 counts, rows the actual class, columns the predicted one (scikit-learn's
    confusion_matrix with labels 0..classes-1)."""
    cells = np.bincount(labels.astype(np.int64) * classes + predicted.astype(np.int64), minlength=classes * classes)
    return cells.reshape(classes, classes)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator as float64, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    result = np.asarray(numerator, dtype=np.float64) / np.where(denominator == 0, 1, denominator).astype(np.float64)
    result[denominator == 0] = 0.0
    return result


def compute_metrics(labels: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> tuple[dict, pd.DataFrame]:
    """Per-class precision, recall, F1 and support, the accuracy and the macro F1, as scikit-learn's
    precision_recall_fscore_support, accuracy_score and f1_score (zero_division=0) compute them, to the
    bit (tests/test_step_imports.py compares them): importing sklearn.metrics alone took 0.7 s of the step."""
    confusion = confusion_counts(labels, predicted, len(class_names))
    correct, support, predicted_count = np.diagonal(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    f1 = _divide(2.0 * correct.astype(np.float64), support.astype(np.float64) + predicted_count.astype(np.float64))
    per_class = pd.DataFrame(
        {
            "class": class_names,
            "precision": _divide(correct, predicted_count),
            "recall": _divide(correct, support),
            "f1": f1,
            "support": support,
        }
    )
    metrics = {
        "accuracy": float(np.average(labels == predicted)),
        "macro_f1": float(np.nanmean(f1)),
        "test_images": int(len(labels)),
        "mistakes": int((predicted != labels).sum()),
    }
    return metrics, per_class


def near_duplicate_metrics(manifest: pd.DataFrame, predictions: pd.DataFrame, split_report: dict) -> dict:
    """The number of test images with a near-duplicate in train and the accuracy on the others: a test
    image whose near-duplicate was trained on measures memory, not generalisation. {} when not searched."""
    if split_report.get("near_duplicates", {}).get("mode", "off") == "off" or "train_near_duplicate" not in manifest:
        return {}
    has_near_duplicate = (manifest["train_near_duplicate"].fillna("").astype(str) != "").to_numpy()
    metrics = {"test_near_duplicates_in_train": int(has_near_duplicate.sum())}
    others = predictions[~has_near_duplicate]
    if len(others):
        metrics["accuracy_without_near_duplicates"] = float((others["actual"] == others["predicted"]).mean())
    return metrics


def score(manifest: pd.DataFrame, logits: np.ndarray, temperature: float, class_names: list[str], bins: int) -> Scores:
    """Metrics of the probabilities the model gives (softmax of logits / temperature), and the
    calibration without the temperature for comparison (same predictions: same accuracy)."""
    labels = manifest["label_index"].to_numpy()
    probabilities, uncalibrated = softmax(logits, temperature), softmax(logits)
    predicted = probabilities.argmax(1)
    metrics, per_class = compute_metrics(labels, predicted, class_names)
    calibration, before = calibration_bins(labels, probabilities, bins), calibration_bins(labels, uncalibrated, bins)
    metrics["ece"] = expected_calibration_error(calibration)
    metrics["mean_confidence"] = float(probabilities.max(1).mean())
    metrics["temperature"] = float(temperature)
    metrics["ece_uncalibrated"] = expected_calibration_error(before)
    metrics["mean_confidence_uncalibrated"] = float(uncalibrated.max(1).mean())
    names = np.array(class_names)
    predictions = pd.DataFrame(
        {
            "path": manifest["path"],
            "actual": names[labels],
            "predicted": names[predicted],
            "probability": probabilities.max(1).round(6),
            "probability_actual": probabilities[np.arange(len(labels)), labels].round(6),
        }
    )
    confusion = confusion_counts(labels, predicted, len(names))
    return Scores(metrics, per_class, predictions, calibration, confusion, before)


def write_report(
    scores: Scores,
    bundle: ModelBundle,
    cfg: EvaluateConfig,
    raw_dir: Path,
    reports_dir: Path,
    train_log: str | Path | None,
    split: str,
) -> None:
    """Every report file, `split` saying how the test split was made. The files change together or
    not at all: each is written to a temporary file beside it, and all are renamed into place only
    once every one is written, so a failure (a full disk, a figure that cannot be drawn) leaves the
    previous report whole, never new metrics beside old figures."""
    figures = {title: reports_dir / name for title, name in layout.FIGURES.items()}
    tables = dict(zip(layout.TABLES, (scores.per_class, scores.predictions, scores.calibration), strict=True))
    tables["calibration.csv"] = scores.calibration[scores.calibration["images"] > 0]
    metrics_path, markdown_path = reports_dir / layout.METRICS, reports_dir / layout.REPORT_MARKDOWN
    targets = [metrics_path, *(reports_dir / name for name in tables), *figures.values(), markdown_path]
    with atomic_paths(*targets) as staged_paths:
        staged = dict(zip(targets, staged_paths, strict=True))
        staged[metrics_path].write_text(json_text(scores.metrics), encoding="utf-8")
        for name, table in tables.items():
            floats = "%.6f" if name == "per_class.csv" else None
            table.to_csv(staged[reports_dir / name], index=False, float_format=floats)
        staged_figures = {title: staged[path] for title, path in figures.items()}
        mistakes = draw_figures(scores, bundle, cfg, raw_dir, train_log, staged_figures)
        summary = {"model_name": bundle.model_name, **bundle.summary}
        markdown = report.markdown_report(scores.metrics, scores.per_class, mistakes, summary, layout.FIGURES, split)
        staged[markdown_path].write_text(markdown, encoding="utf-8")


def draw_figures(
    scores: Scores,
    bundle: ModelBundle,
    cfg: EvaluateConfig,
    raw_dir: Path,
    train_log: str | Path | None,
    paths: dict[str, Path],
) -> pd.DataFrame:
    """The report's figures, each to its path in `paths` (by title, as in layout.FIGURES); returns the
    mistakes the gallery shows."""
    metrics = scores.metrics
    mistakes = report.worst_mistakes(scores.predictions, cfg.gallery_size)
    report.plot_confusion(scores.confusion, bundle.class_names, paths["confusion matrix"])
    report.plot_learning_curves(_read_history(train_log), paths["learning curves"])
    report.plot_mistakes(mistakes, raw_dir, metrics["test_images"], paths["most confident mistakes"])
    report.plot_reliability(
        scores.calibration,
        metrics["ece"],
        paths["reliability diagram"],
        scores.uncalibrated,
        metrics["ece_uncalibrated"],
    )
    return mistakes


def _read_history(train_log: str | Path | None) -> pd.DataFrame:
    """The train step's epoch log; an empty frame (empty plot) when there is none."""
    if train_log is not None and Path(train_log).is_file():
        return pd.read_csv(train_log)
    if train_log is not None:
        log.warning("%s not found: the learning curves will be empty", train_log)
    return pd.DataFrame(columns=["epoch", "train_loss", "valid_loss", "train_accuracy", "valid_accuracy"])
