"""Readers of the split step's files, for every later step.

The split step writes `data/split/`: one manifest CSV per split (`MANIFEST_COLUMNS`, paths relative
to the raw dataset folder), `classes.json` (its order is the label index of every later step) and
`report.json` (how the split was made). Train, evaluate and register read them through this module,
never by importing the split step: a step's DVC code deps are its imports, so rewording how the
split is made must not rerun training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from signflow._images import DEFAULT_MAX_PIXELS
from signflow.errors import SignflowError

__all__ = [
    "MANIFEST_COLUMNS",
    "SPLITS",
    "SplitError",
    "read_class_names",
    "read_manifest",
    "read_max_pixels",
    "read_split_report",
    "test_split_description",
]

SPLITS = ("train", "valid", "test")
MANIFEST_COLUMNS = ["path", "label", "label_index", "sha256", "width", "height", "group", "train_near_duplicate"]
"""`group`: id of the images kept in one split with this one (-1: none); `train_near_duplicate`: for a
valid or test image, the nearest train image within the near-duplicate distance (empty: none)."""
_TEXT_COLUMNS = ("path", "label", "sha256", "train_near_duplicate")
NO_REPORT = (
    "unknown: the split has no report.json (made by an older signflow), so whether test images have "
    "near-duplicates in train is unknown"
)


class SplitError(SignflowError, ValueError):
    """The images cannot be split as configured, or the split's files are missing; the message says why."""


def read_manifest(split_dir: str | Path, name: str) -> pd.DataFrame:
    """One split's manifest. Text columns stay text: a class folder named `None`, `NA` or `nan` is a
    label like any other, not a missing value."""
    path = Path(split_dir) / f"{name}.csv"
    if not path.is_file():
        raise SplitError(f"{path}: manifest not found; run the split step first")
    return pd.read_csv(path, dtype=dict.fromkeys(_TEXT_COLUMNS, str), keep_default_na=False)


def read_class_names(split_dir: str | Path) -> list[str]:
    path = Path(split_dir) / "classes.json"
    if not path.is_file():
        raise SplitError(f"{path}: class list not found; run the split step first")
    return json.loads(path.read_text(encoding="utf-8"))


def read_split_report(split_dir: str | Path) -> dict[str, Any]:
    """The split step's report.json; {} when there is none (a split made by an older signflow)."""
    path = Path(split_dir) / "report.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def test_split_description(split_report: dict[str, Any]) -> str:
    """The one sentence every report repeats next to an accuracy: how the test split was made."""
    return split_report.get("description", NO_REPORT)


def read_max_pixels(split_dir: str | Path) -> int:
    """The split.max_pixels the split was made with (a split from before it was recorded: the
    default). Training keeps it in the model, so every later step refuses the images the split did."""
    return int(read_split_report(split_dir).get("max_pixels", DEFAULT_MAX_PIXELS))
