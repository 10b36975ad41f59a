"""The split step's report.json and its one-line description of the test split.

The description is what the evaluation report, the model card and the registry repeat next to the
accuracy: the strategy, the seed where it matters, the near-duplicate clusters and how many test
images have a near-duplicate in train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from signflow._near_duplicates import HASH_BITS, NearDuplicates, components
from signflow.config import SplitConfig
from signflow.split_files import SPLITS


@dataclass(frozen=True)
class Assignment:
    """How the split was made (strategy, shipped split folders), which split each image row went to,
    and the groups kept together on the way."""

    strategy: str
    split_folders: dict[str, str]
    split: np.ndarray
    group: np.ndarray
    """Id of the set of images kept in one split with this one; -1 when alone or not assigned by signflow."""
    pool: np.ndarray
    """Rows signflow assigned (all, or the train folder's when the dataset ships split folders)."""
    fractions: dict[str, float] | None
    """Target share of each split in the pool; None when the dataset's folders fix every split."""
    group_pattern: str | None
    group_count: int


def _clusters(images: pd.DataFrame, near: NearDuplicates) -> list[dict[str, Any]]:
    """Every near-duplicate cluster (two or more images), largest first, with the splits its images went to."""
    label = components(len(images), near.pairs)
    shared = np.bincount(label)[label] > 1
    members = images[shared].assign(cluster=label[shared])
    clusters = [
        {"images": group["path"].tolist(), "splits": group["split"].value_counts().sort_index().to_dict()}
        for _, group in members.groupby("cluster", sort=True)
    ]
    return sorted(clusters, key=lambda cluster: -len(cluster["images"]))


def _class_balance(images: pd.DataFrame, assignment: Assignment) -> dict[str, Any] | None:
    """Target share of each split, and per split the class furthest from its target count."""
    if assignment.fractions is None:
        return None
    pool = images.iloc[assignment.pool]
    totals = pool.groupby("label").size()
    deviation = {}
    for name in (n for n in SPLITS if assignment.fractions[n] > 0):
        counts = pool[pool["split"] == name].groupby("label").size().reindex(totals.index, fill_value=0)
        off = counts - assignment.fractions[name] * totals
        worst = off.abs().idxmax()
        deviation[name] = {
            "class": worst,
            "images_off_target": round(float(off[worst]), 2),
            "share_points_off_target": round(float(100 * off[worst] / totals[worst]), 2),
        }
    return {"targets": {k: round(v, 6) for k, v in assignment.fractions.items()}, "largest_deviation": deviation}


def _near_duplicate_report(
    images: pd.DataFrame, near: NearDuplicates | None, cfg: SplitConfig, in_train: pd.DataFrame
) -> dict[str, Any]:
    if near is None:
        return {"mode": "off"}
    clusters = _clusters(images, near)
    split, path = images["split"].to_numpy(), images["path"].to_numpy()
    in_test = in_train[split[in_train["row"]] == "test"]
    return {
        "mode": cfg.near_duplicates,
        "hash": f"{HASH_BITS}-bit DCT perceptual hash of the whole image and of its central 90%, same class only",
        "max_distance": cfg.near_duplicate_distance,
        "search_seconds": round(near.seconds, 3),
        "images_in_clusters": sum(len(cluster["images"]) for cluster in clusters),
        "clusters": clusters,
        "test_images_with_train_near_duplicate": [
            {"path": path[row], "train_path": path[partner], "distance": int(distance)}
            for row, partner, distance in in_test[["row", "partner", "distance"]].itertuples(index=False)
        ],
        "valid_images_with_train_near_duplicate": int((split[in_train["row"]] == "valid").sum()),
    }


def describe_split(report: dict[str, Any]) -> str:
    """One sentence saying how the test split was made and whether any test image has a near-duplicate in
    train: what the evaluation report, the model card and the registry repeat next to the accuracy."""
    return f"{_how_split(report)}; {_near_duplicate_sentence(report)}."


def _how_split(report: dict[str, Any]) -> str:
    seed, balance = report["seed"], report["class_balance"]
    if report["strategy"] == "folders":
        folders = report["split_folders"]
        shipped = ", ".join(f"{folders[name]}/" for name in SPLITS if name in folders)
        carved = [name for name in SPLITS if name not in folders]
        text = f"the dataset's own split folders ({shipped}), kept as shipped"
        if carved:
            text += f", with {' and '.join(carved)} carved out of {folders['train']}/ (stratified, seed {seed})"
        return text
    targets = "/".join(f"{balance['targets'][name]:g}" for name in SPLITS)
    if report["strategy"] == "random":
        return f"stratified random split {targets} (train/valid/test, seed {seed})"
    moved = max(abs(d["share_points_off_target"]) for d in balance["largest_deviation"].values())
    return (
        f"grouped split {targets} (train/valid/test, seed {seed}): the {report['groups']['keys']} keys of "
        f"split.group_pattern {report['groups']['pattern']!r} each in one split, class shares within "
        f"{moved:.1f} points of their targets"
    )


def _near_duplicate_sentence(report: dict[str, Any]) -> str:
    near = report["near_duplicates"]
    if near["mode"] == "off":
        return "near-duplicates not searched (split.near_duplicates: off)"
    found = (
        f"{len(near['clusters'])} near-duplicate cluster(s) of {near['images_in_clusters']} images "
        f"(perceptual hash distance <= {near['max_distance']})"
    )
    if near["mode"] == "report":
        kept = "not kept together (split.near_duplicates: report)"
    elif report["strategy"] == "folders":
        kept = "kept together where signflow chose the split (the shipped folders are not changed)"
    else:
        kept = "each kept within one split"
    leaks = len(near["test_images_with_train_near_duplicate"])
    return f"{found}, {kept}; {leaks} of {report['counts']['test']} test images have a near-duplicate in train"


def build_report(
    images: pd.DataFrame,
    rejected: list[dict[str, str]],
    class_names: list[str],
    cfg: SplitConfig,
    assignment: Assignment,
    near: NearDuplicates | None,
    in_train: pd.DataFrame,
) -> dict[str, Any]:
    """report.json's content: `images` carry their split; `in_train` are train_near_duplicates' rows."""
    parts = {name: images[images["split"] == name] for name in SPLITS}
    report = {
        "strategy": assignment.strategy,
        "strategy_asked": cfg.strategy,
        "seed": cfg.seed,
        "split_folders": assignment.split_folders,
        "counts": {name: len(frame) for name, frame in parts.items()},
        "per_class": {
            name: frame.groupby("label").size().reindex(class_names, fill_value=0).to_dict()
            for name, frame in parts.items()
        },
        "class_balance": _class_balance(images, assignment),
        "groups": {"pattern": assignment.group_pattern, "keys": assignment.group_count}
        if assignment.group_pattern
        else None,
        "kept_together": {
            "groups": int(len(np.unique(assignment.group[assignment.group >= 0]))),
            "images": int((assignment.group >= 0).sum()),
        },
        "near_duplicates": _near_duplicate_report(images, near, cfg, in_train),
        "excluded": rejected,
        "max_pixels": cfg.max_pixels,
    }
    return {"description": describe_split(report), **report}
