"""Markdown the evaluation report, the model card and the sweep's comparison share: one table
writer, and the rows every report puts next to an accuracy (near-duplicates in train, calibration)."""

from __future__ import annotations

from typing import Any

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
    when known."""
    rows = [
        f"| expected calibration error | {metrics['ece']:.4f} |",
        f"| mean confidence | {metrics['mean_confidence']:.4f} |",
    ]
    if "ece_uncalibrated" in metrics:
        rows += [
            f"| softmax temperature (fitted on validation) | {metrics['temperature']:.4f} |",
            f"| expected calibration error before temperature scaling | {metrics['ece_uncalibrated']:.4f} |",
            f"| mean confidence before temperature scaling | {metrics['mean_confidence_uncalibrated']:.4f} |",
        ]
    return rows
