"""The evaluation report: plots and a markdown summary a person reads, from arrays already computed.

Every function takes plain numbers (labels, probabilities, the epoch log) and writes one file at the
path it is given, as it is: the evaluate step gives temporary paths and renames the whole report into
place once every file is written (`signflow.fileio.atomic_paths`). Nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from signflow._images import load_rgb
from signflow._markdown import calibration_rows, kept_epoch, markdown_table, near_duplicate_rows
from signflow.fileio import write_atomic


def new_figure(rows: int = 1, columns: int = 1, *, figsize: tuple[float, float], squeeze: bool = True):
    """A figure and its axes, without pyplot: no global backend or figure registry is touched."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(rows, columns, squeeze=squeeze)


def write_png(figure: Figure, path: Path) -> None:
    """The figure as a PNG at `path`, written in place: the caller makes it atomic."""
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)


def save_figure(figure: Figure, path: Path) -> None:
    """The figure as a PNG replacing `path` in one rename, for a figure that changes on its own."""
    write_atomic(path, lambda tmp: write_png(figure, tmp))


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    """Two panels: counts, and rows normalised to recall (each true class sums to 1)."""
    n = len(class_names)
    size = max(4.5, 0.5 * n + 2)
    figure, axes = new_figure(1, 2, figsize=(2 * size, size))
    row_sums = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, row_sums, out=np.zeros(matrix.shape, dtype=float), where=row_sums > 0)
    panels = (
        (axes[0], matrix, f"Counts (test, n={int(matrix.sum())})", lambda v: str(int(v))),
        (axes[1], normalised, "Normalised by true class (recall)", lambda v: f"{v:.2f}"),
    )
    for ax, values, title, fmt in panels:
        ax.imshow(values, cmap="Blues", vmin=0)
        ax.set(
            xticks=range(n),
            yticks=range(n),
            xticklabels=class_names,
            yticklabels=class_names,
            xlabel="predicted",
            ylabel="true",
            title=title,
        )
        ax.tick_params(axis="x", labelrotation=45 if n > 6 and max(map(len, class_names)) > 2 else 0)
        threshold = values.max() / 2 if values.size else 0
        for (row, col), value in np.ndenumerate(values):
            if value:
                ax.text(col, row, fmt(value), ha="center", va="center", color="white" if value > threshold else "black")
    write_png(figure, path)


def plot_learning_curves(history: pd.DataFrame, path: Path) -> None:
    """Loss and accuracy per epoch, train against valid, with the selected (best) epoch marked."""
    figure, (loss_ax, acc_ax) = new_figure(1, 2, figsize=(11, 4))
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        for split, style in (("train", "-o"), ("valid", "-s")):
            column = f"{split}_{metric}"
            if column in history and history[column].notna().any():
                ax.plot(history["epoch"], history[column], style, label=split, markersize=4)
        ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    if "valid_accuracy" in history and history["valid_accuracy"].notna().any():
        best = history.sort_values(["valid_accuracy", "valid_loss"], ascending=[False, True]).iloc[0]
        acc_ax.axvline(best["epoch"], color="grey", linestyle="--", linewidth=1)
        label = f"kept: epoch {int(best['epoch'])} "
        acc_ax.annotate(label, (best["epoch"], acc_ax.get_ylim()[0]), fontsize=8, ha="right")
    write_png(figure, path)


def plot_reliability(
    table: pd.DataFrame, ece: float, path: Path, uncalibrated: pd.DataFrame | None = None, ece_before: float = 0.0
) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with bin counts; with
    `uncalibrated` (the bins before temperature scaling) also its mean confidence against accuracy."""
    figure, ax = new_figure(figsize=(5.5, 6))
    used = table[table["images"] > 0]
    width = float(table["upper"].iloc[0] - table["lower"].iloc[0]) if len(table) else 0.1
    ax.bar(used["lower"], used["accuracy"], width=width, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    if uncalibrated is not None:
        before = uncalibrated[uncalibrated["images"] > 0]
        label = f"before temperature scaling (ECE {ece_before:.4f})"
        ax.plot(before["confidence"], before["accuracy"], "o:", color="tab:red", markersize=4, label=label)
    for _, row in used.iterrows():
        ax.text(
            row["lower"] + width / 2,
            min(row["accuracy"], 0.95) + 0.02,
            str(int(row["images"])),
            ha="center",
            fontsize=7,
        )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.05),
        xlabel="confidence (top-1 probability)",
        ylabel="accuracy",
        title=f"Reliability (ECE {ece:.4f}; numbers = images)",
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8, frameon=False)  # below: no data hidden
    write_png(figure, path)


SURE_MISTAKE = 0.99
"""A mistake made with at least this (calibrated) probability is flagged as a label to check."""


def label_check_note(mistakes: pd.DataFrame) -> list[str]:
    """A note under the mistakes table when some were made with near certainty: on photos of hands
    that is most often a wrong label in the dataset (on Sign Language Digits, e.g. `3/IMG_5108.JPG`
    shows another sign), which the accuracy counts as the model's mistake."""
    sure = mistakes[mistakes["probability"] >= SURE_MISTAKE]
    if sure.empty:
        return []
    return [
        "",
        f"{len(sure)} of these mistakes were predicted with probability >= {SURE_MISTAKE}: "
        f"{', '.join(f'`{path}`' for path in sure['path'])}. Such confident mistakes are often images "
        "labelled wrongly in the dataset; look at them in `mistakes.png`. The accuracy above counts them "
        "as the model's mistakes either way.",
    ]


def worst_mistakes(predictions: pd.DataFrame, limit: int) -> pd.DataFrame:
    """The wrong predictions, most confident first."""
    wrong = predictions[predictions["actual"] != predictions["predicted"]]
    return wrong.sort_values(["probability", "path"], ascending=[False, True]).head(limit)


def plot_mistakes(mistakes: pd.DataFrame, raw_dir: Path, total: int, path: Path) -> None:
    """A gallery of the given mistakes: image, true label, predicted label and its probability."""
    if mistakes.empty:
        figure, ax = new_figure(figsize=(5, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"No mistakes on the {total} test images", ha="center", va="center", fontsize=12)
        write_png(figure, path)
        return
    columns = min(4, len(mistakes))
    rows = -(-len(mistakes) // columns)
    figure, axes = new_figure(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, row) in zip(axes.flat, mistakes.iterrows(), strict=False):
        try:
            ax.imshow(load_rgb(raw_dir / row["path"], max_side=256))
        except (OSError, ValueError):
            ax.text(0.5, 0.5, "image unreadable", ha="center", va="center")
        ax.set_title(
            f"true {row['actual']} → {row['predicted']} ({row['probability']:.2f})\n{Path(row['path']).name}",
            fontsize=9,
        )
    figure.suptitle(f"Most confident mistakes ({len(mistakes)} shown, of {total} test images)")
    write_png(figure, path)


def split_section(split: str, metrics: dict) -> list[str]:
    """How the test split was made and, when some test images have a near-duplicate in train, the
    accuracy with and without them."""
    lines = ["## How the test split was made", "", split[0].upper() + split[1:], ""]
    in_train = metrics.get("test_near_duplicates_in_train", 0)
    if in_train:
        lines += [
            "| metric | value |",
            "|---|---|",
            f"| test accuracy | {metrics['accuracy']:.4f} |",
            *near_duplicate_rows(metrics),
            "",
            f"{in_train} test image(s) have a near-duplicate in train (listed in the split's report.json): on them the "
            "model may be recalling a training image rather than recognising a new one.",
            "",
        ]
    return lines


def markdown_report(
    metrics: dict,
    per_class: pd.DataFrame,
    mistakes: pd.DataFrame,
    model_summary: dict,
    images: dict[str, str],
    split: str,
) -> str:
    """The report as markdown: headline metrics, how the test split was made, per-class table, worst
    mistakes, figure links."""
    lines = [
        "# Evaluation report",
        "",
        f"Model `{model_summary.get('model_name', '?')}`, kept at {kept_epoch(model_summary)}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| test accuracy | {metrics['accuracy']:.4f} |",
        f"| macro F1 | {metrics['macro_f1']:.4f} |",
        f"| test images | {metrics['test_images']} |",
        f"| mistakes | {metrics['mistakes']} |",
        *calibration_rows(metrics),
        "",
        *split_section(split, metrics),
        "## Per class",
        "",
        markdown_table(per_class),
        "",
        "## Most confident mistakes",
        "",
        markdown_table(mistakes[["path", "actual", "predicted", "probability"]])
        if not mistakes.empty
        else "None: every test image was classified correctly.",
        *label_check_note(mistakes),
        "",
        "## Figures",
        "",
    ]
    lines += [f"- {title}: `{name}`" for title, name in images.items()]
    return "\n".join(lines) + "\n"
