"""Markdown the evaluation report, the model card and the sweep's comparison share: one table
writer, and the rows every report puts next to an accuracy (near-duplicates in train, calibration)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def markdown_table(frame: pd.DataFrame, floats: str = "{:.4f}") -> str:
    """A GitHub table of `frame`: floats formatted with `floats`, missing values left empty."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    for _, row in frame.iterrows():
        cells = ["" if _missing(v) else floats.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def near_duplicate_rows(metrics: dict[str, Any]) -> list[str]:
    """Metric-table rows: the test images with a near-duplicate in train, and the accuracy without them."""
    if "test_near_duplicates_in_train" not in metrics:
        return ["| test images with a near-duplicate in train | not searched |"]
    in_train, test_images = metrics["test_near_duplicates_in_train"], metrics["test_images"]
    rows = [f"| test images with a near-duplicate in train | {in_train} |"]
    if in_train and "accuracy_without_near_duplicates" in metrics:
        without = metrics["accuracy_without_near_duplicates"]
        shown = f"{without:.4f}" if in_train < test_images else "n/a"
        rows.append(f"| accuracy without those {in_train} (on {test_images - in_train} images) | {shown} |")
    return rows


def calibration_rows(metrics: dict[str, Any]) -> list[str]:
    """Metric-table rows: ECE and mean confidence as served (after temperature scaling), and before it
    when known. A temperature of exactly 1.0 is one that was never fitted (no validation split, or a
    model file from before calibration): its "before" rows would only repeat the others."""
    rows = [
        f"| expected calibration error | {metrics['ece']:.4f} |",
        f"| mean confidence | {metrics['mean_confidence']:.4f} |",
    ]
    if metrics.get("temperature") == 1.0:
        rows.append("| softmax temperature | none fitted: probabilities are the plain softmax |")
    elif "ece_uncalibrated" in metrics:
        rows += [
            f"| softmax temperature (fitted on validation) | {metrics['temperature']:.4f} |",
            f"| expected calibration error before temperature scaling | {metrics['ece_uncalibrated']:.4f} |",
            f"| mean confidence before temperature scaling | {metrics['mean_confidence_uncalibrated']:.4f} |",
        ]
    return rows


def has_validation(model_summary: dict[str, Any]) -> bool:
    """Whether the model was selected on a validation split: trained without one (split.valid: 0),
    its validation accuracy is NaN."""
    return not _missing(model_summary.get("valid_accuracy", 0.0))


def kept_epoch(model_summary: dict[str, Any]) -> str:
    """Which epoch the model's weights are from, and why: 'epoch 3 (validation accuracy 0.9500)'."""
    epoch, accuracy = model_summary.get("best_epoch", "?"), model_summary.get("valid_accuracy")
    if not has_validation(model_summary):
        return f"epoch {epoch}, the last (no validation split)"
    return f"epoch {epoch}" + (f" (validation accuracy {accuracy:.4f})" if accuracy is not None else "")
