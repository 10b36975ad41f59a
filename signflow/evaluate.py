"""Evaluate step: the model on the test split only; metrics, per-class table, confusion matrix."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support  # noqa: E402

from signflow.checkpoint import load_bundle  # noqa: E402
from signflow.config import EvaluateConfig  # noqa: E402
from signflow.fileio import write_atomic, write_json_atomic  # noqa: E402
from signflow.inference import predict_logits  # noqa: E402
from signflow.model import resolve_device  # noqa: E402
from signflow.preprocess import load_images  # noqa: E402
from signflow.split import read_class_names, read_manifest  # noqa: E402

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationResult:
    accuracy: float
    macro_f1: float
    test_images: int
    metrics_path: str


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


def plot_confusion(matrix: np.ndarray, class_names: list[str], path: Path) -> None:
    size = max(5.0, 0.6 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix, cmap="Blues")
    axes.set(
        xticks=range(len(class_names)),
        yticks=range(len(class_names)),
        xticklabels=class_names,
        yticklabels=class_names,
        xlabel="predicted",
        ylabel="true",
        title=f"Confusion matrix (test, n={int(matrix.sum())})",
    )
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, col), value in np.ndenumerate(matrix):
        axes.text(col, row, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)


def evaluate(
    cfg: EvaluateConfig, model_path: str | Path, raw_dir: str | Path, split_dir: str | Path, reports_dir: str | Path
) -> EvaluationResult:
    """Score the model on `split_dir/test.csv`; refuse a model trained on another class list."""
    raw_dir, reports_dir = Path(raw_dir), Path(reports_dir)
    bundle = load_bundle(model_path)
    bundle.check_classes(read_class_names(split_dir), f"{split_dir}/classes.json")
    manifest = read_manifest(split_dir, "test")
    images = load_images([raw_dir / p for p in manifest["path"]], bundle.preprocessing, desc="decode test")
    device = resolve_device("auto")
    model = bundle.build_model().to(device)
    logits = predict_logits(model, images, bundle.preprocessing, cfg.batch_size, device)
    probabilities = torch.softmax(logits, dim=1).numpy()
    predicted = probabilities.argmax(1)
    labels = manifest["label_index"].to_numpy()
    metrics, per_class = compute_metrics(labels, predicted, bundle.class_names)
    names = np.array(bundle.class_names)
    predictions = pd.DataFrame(
        {
            "path": manifest["path"],
            "actual": names[labels],
            "predicted": names[predicted],
            "probability": probabilities.max(1).round(6),
        }
    )
    write_json_atomic(reports_dir / "metrics.json", metrics)
    write_atomic(reports_dir / "per_class.csv", lambda tmp: per_class.to_csv(tmp, index=False, float_format="%.6f"))
    write_atomic(reports_dir / "predictions.csv", lambda tmp: predictions.to_csv(tmp, index=False))
    matrix = confusion_matrix(labels, predicted, labels=list(range(len(names))))
    plot_confusion(matrix, bundle.class_names, reports_dir / "confusion.png")
    log.info("test accuracy %.4f, macro F1 %.4f on %d images", metrics["accuracy"], metrics["macro_f1"], len(labels))
    return EvaluationResult(
        metrics["accuracy"], metrics["macro_f1"], metrics["test_images"], str(reports_dir / "metrics.json")
    )
