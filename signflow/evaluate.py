"""Evaluate step: the model on the test split only, and the report a person reads.

Writes into the reports folder: `metrics.json` (accuracy, macro F1, test-set size, mistakes,
expected calibration error), `per_class.csv`, `predictions.csv` (one row per test image),
`calibration.csv`, `confusion.png` (counts and row-normalised), `learning_curves.png` (from the
train step's epoch log), `mistakes.png` (the most confident mistakes), `reliability.png` and
`report.md` tying them together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from signflow import report
from signflow.checkpoint import load_bundle
from signflow.config import EvaluateConfig
from signflow.fileio import write_atomic, write_json_atomic
from signflow.inference import predict_logits
from signflow.model import resolve_device
from signflow.preprocess import load_images
from signflow.split import read_class_names, read_manifest

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


def compute_metrics(labels: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> tuple[dict, pd.DataFrame]:
    indices = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=indices, zero_division=0)
    per_class = pd.DataFrame(
        {"class": class_names, "precision": precision, "recall": recall, "f1": f1, "support": support}
    )
    metrics = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=indices, average="macro", zero_division=0)),
        "test_images": int(len(labels)),
    }
    return metrics, per_class


REPORT_FILES = {
    "confusion matrix": "confusion.png",
    "learning curves": "learning_curves.png",
    "most confident mistakes": "mistakes.png",
    "reliability diagram": "reliability.png",
}


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
    images = load_images([raw_dir / p for p in manifest["path"]], bundle.preprocessing, desc="decode test")
    device = resolve_device("auto")
    # channels_last (as trained): MobileNet-style CNNs ran about twice as fast with it on the CPU
    memory_format = torch.channels_last if bundle.channels_last else torch.contiguous_format
    model = bundle.build_model().to(device, memory_format=memory_format)
    logits = predict_logits(model, images, bundle.preprocessing, cfg.batch_size, device, bundle.channels_last)
    probabilities = torch.softmax(logits, dim=1).numpy().astype(np.float64)
    predicted = probabilities.argmax(1)
    labels = manifest["label_index"].to_numpy()
    metrics, per_class = compute_metrics(labels, predicted, bundle.class_names)
    calibration = report.calibration_bins(labels, probabilities, cfg.calibration_bins)
    metrics["mistakes"] = int((predicted != labels).sum())
    metrics["ece"] = report.expected_calibration_error(calibration)
    metrics["mean_confidence"] = float(probabilities.max(1).mean())
    names = np.array(bundle.class_names)
    predictions = pd.DataFrame(
        {
            "path": manifest["path"],
            "actual": names[labels],
            "predicted": names[predicted],
            "probability": probabilities.max(1).round(6),
            "probability_actual": probabilities[np.arange(len(labels)), labels].round(6),
        }
    )
    matrix = confusion_matrix(labels, predicted, labels=list(range(len(names))))
    mistakes = report.worst_mistakes(predictions, cfg.gallery_size)

    write_json_atomic(reports_dir / "metrics.json", metrics)
    write_atomic(reports_dir / "per_class.csv", lambda tmp: per_class.to_csv(tmp, index=False, float_format="%.6f"))
    write_atomic(reports_dir / "predictions.csv", lambda tmp: predictions.to_csv(tmp, index=False))
    used_bins = calibration[calibration["images"] > 0]
    write_atomic(reports_dir / "calibration.csv", lambda tmp: used_bins.to_csv(tmp, index=False))
    report.plot_confusion(matrix, bundle.class_names, reports_dir / REPORT_FILES["confusion matrix"])
    history = _read_history(train_log)
    report.plot_learning_curves(history, reports_dir / REPORT_FILES["learning curves"])
    report.plot_mistakes(mistakes, raw_dir, len(labels), reports_dir / REPORT_FILES["most confident mistakes"])
    report.plot_reliability(calibration, metrics["ece"], reports_dir / REPORT_FILES["reliability diagram"])
    summary = {"model_name": bundle.model_name, **bundle.summary}
    markdown = report.markdown_report(metrics, per_class, mistakes, summary, REPORT_FILES)
    write_atomic(reports_dir / "report.md", lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    log.info(
        "test accuracy %.4f, macro F1 %.4f, ECE %.4f on %d images",
        metrics["accuracy"],
        metrics["macro_f1"],
        metrics["ece"],
        len(labels),
    )
    return EvaluationResult(
        metrics["accuracy"],
        metrics["macro_f1"],
        metrics["test_images"],
        metrics["mistakes"],
        metrics["ece"],
        str(reports_dir / "metrics.json"),
        str(reports_dir / "report.md"),
    )


def _read_history(train_log: str | Path | None) -> pd.DataFrame:
    """The train step's epoch log; an empty frame (empty plot) when there is none."""
    if train_log is not None and Path(train_log).is_file():
        return pd.read_csv(train_log)
    if train_log is not None:
        log.warning("%s not found: the learning curves will be empty", train_log)
    return pd.DataFrame(columns=["epoch", "train_loss", "valid_loss", "train_accuracy", "valid_accuracy"])
