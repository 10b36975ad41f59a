"""Split step: check every image, drop exact copies, find near-duplicates, write train/valid/test manifests.

How the test split is made is `split.strategy`:
- `folders`: the split folders the dataset ships (`data/raw/{train,valid,test}/<class>/`, kept by the
  extract step). A missing valid (or test) folder is carved out of train; the seed affects only that.
- `random`: a stratified random split of all images (split folders, if any, merged first).
- `group`: all images whose path gives the same key (`split.group_pattern`) land in one split.
- `auto`: `folders` when the dataset ships split folders, otherwise `random`.
With `split.near_duplicates: group` each cluster of near-identical images (perceptual hashes within
`split.near_duplicate_distance`, `signflow._near_duplicates`) also lands in one split wherever signflow
chooses the split; `report` only counts the test images with a near-duplicate in train; `off` skips it.

Manifests are CSV files (`MANIFEST_COLUMNS`, paths relative to the raw dataset folder) plus
`classes.json`, whose order *is* the label index used by every later step, and `report.json`: the
counts, the strategy and a one-line `description` of the split that every report repeats, the
near-duplicate clusters and groups kept together, how far class proportions moved, and every file left
out and why.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from signflow._group_split import assign_groups
from signflow._images import ImageRefused, check_image, is_junk, split_folder_name
from signflow._near_duplicates import HASH_BITS, NearDuplicates, components, find_near_pairs, image_hashes
from signflow._progress import progress
from signflow._split_report import Assignment, build_report
from signflow.config import SplitConfig
from signflow.fileio import replace_dir_atomic, sha256_file, staging_dir, write_json_atomic
from signflow.split_files import MANIFEST_COLUMNS, SPLITS, SplitError

__all__ = ["SplitError", "SplitResult", "split_dataset"]

log = logging.getLogger(__name__)

_KEEP_FIRST = {"test": 0, "valid": 1, "train": 2}
"""Of identical files in several split folders, the test copy is kept, then valid: fixed splits stay fixed."""


@dataclass(frozen=True)
class SplitResult:
    class_names: list[str]
    counts: dict[str, int]
    excluded: int
    strategy: str
    description: str

    def summary_line(self) -> str:
        return f"{self.counts}; {self.description}"


def _check_file(file: Path, cfg: SplitConfig, hash_images: bool) -> tuple[int, int, str, np.ndarray | None] | Exception:
    """(width, height, sha256, perceptual hashes) of a usable image, or the error that makes it unusable."""
    try:
        width, height, image = check_image(file, cfg.max_pixels, cfg.max_aspect_ratio)
        hashes = image_hashes(image) if hash_images else None
    except Exception as error:  # noqa: BLE001 - any decoder failure means "unusable image"
        return error
    return width, height, sha256_file(file), hashes


def _reason(error: Exception) -> str:
    if isinstance(error, ImageRefused):
        return f"refused: {error}"
    return f"unreadable image: {type(error).__name__}: {error}"


def shipped_split_folders(raw_dir: Path) -> dict[str, str]:
    """{split: folder name} when every folder in `raw_dir` names a split (train/, valid/, test/ or another
    common spelling: training/, val/, testing/, ...); {} when they are class folders."""
    folders = sorted(p.name for p in raw_dir.iterdir() if p.is_dir() and not is_junk(p.name))
    splits = {folder: split_folder_name(folder) for folder in folders}
    if not folders or None in splits.values():
        return {}
    found: dict[str, str] = {}
    for folder, split in splits.items():
        if split in found:
            raise SplitError(f"{raw_dir}: {found[split]}/ and {folder}/ both hold the {split} split; keep one of them")
        found[split] = folder
    return found


def scan_images(
    raw_dir: Path, cfg: SplitConfig, split_folders: dict[str, str] | None = None
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Open and hash every file under `raw_dir/<class>/` (or `raw_dir/<split folder>/<class>/`); return
    usable rows (path, label, folder, sha256, width, height, and perceptual `hashes` unless
    split.near_duplicates is off) and the rejects (unreadable, or refused by `split.max_pixels` /
    `split.max_aspect_ratio`)."""
    depth = 2 if split_folders else 1
    folder_split = {folder: split for split, folder in (split_folders or {}).items()}
    hash_images = cfg.near_duplicates != "off"
    files = sorted(
        p
        for p in raw_dir.rglob("*")
        if p.is_file() and len(p.relative_to(raw_dir).parts) > depth and not is_junk(p.relative_to(raw_dir))
    )
    rows, rejected = [], []
    # Decoding releases the GIL: threads check images in parallel; map keeps the files' order.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        checked = pool.map(lambda file: _check_file(file, cfg, hash_images), files)
        checked = progress(checked, total=len(files), desc="check images", unit="img")
        for file, result in zip(files, checked, strict=True):
            parts = file.relative_to(raw_dir).parts
            relative = "/".join(parts)
            if isinstance(result, Exception):
                rejected.append({"path": relative, "reason": _reason(result)})
                continue
            width, height, digest, hashes = result
            row = {"path": relative, "label": parts[depth - 1], "folder": folder_split.get(parts[0], "")}
            rows.append({**row, "sha256": digest, "width": width, "height": height, "hashes": hashes})
    columns = ["path", "label", "folder", "sha256", "width", "height", "hashes"]
    return pd.DataFrame(rows, columns=columns), rejected


def drop_duplicates(images: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Keep one file per content hash (a test-folder copy before a valid one before a train one, then the
    first path); a file whose copies carry different labels is dropped entirely."""
    rejected: list[dict[str, str]] = []
    copied = images["sha256"].duplicated(keep=False).to_numpy()
    keep = images.index[~copied].tolist()  # a file with no copy is kept as it is
    for _digest, group in images[copied].groupby("sha256", sort=True):
        rank = group["folder"].map(_KEEP_FIRST).fillna(len(_KEEP_FIRST)) if "folder" in group else 0
        group = group.assign(_rank=rank).sort_values(["_rank", "path"])
        if group["label"].nunique() > 1:
            rejected += [
                {"path": p, "reason": f"identical file appears in classes {sorted(group['label'].unique())}"}
                for p in group["path"]
            ]
            continue
        keep.append(group.index[0])
        first = group["path"].iloc[0]
        rejected += [{"path": p, "reason": f"duplicate of {first}"} for p in group["path"].iloc[1:]]
    return images.loc[sorted(keep)].reset_index(drop=True), rejected


def choose_strategy(cfg: SplitConfig, split_folders: dict[str, str], raw_dir: Path) -> str:
    """The strategy `auto` stands for, checked against what the dataset ships."""
    strategy = cfg.strategy
    if strategy == "auto":
        strategy = "folders" if split_folders else "random"
    if strategy == "folders" and not split_folders:
        raise SplitError(
            f"split.strategy is folders, but {raw_dir} holds class folders, not split folders (train/, valid/, "
            "test/): set split.strategy to auto or random, or give the dataset as train/<class>/... and "
            "test/<class>/..."
        )
    if strategy == "folders" and "train" not in split_folders:
        shipped = ", ".join(f"{split_folders[name]}/" for name in SPLITS if name in split_folders)
        raise SplitError(
            f"{raw_dir} has split folder(s) {shipped} but no train folder (train/ or training/): put the training "
            "images in train/<class>/, or set split.strategy: random to merge the folders and split them again"
        )
    return strategy


def _check_folders_agree(images: pd.DataFrame, split_folders: dict[str, str], raw_dir: Path) -> None:
    """Every class has usable images in every split folder, or the error names the class and the folder."""
    classes = sorted(images["label"].unique())
    for split, folder in split_folders.items():
        present = set(images.loc[images["folder"] == split, "label"])
        missing = [name for name in classes if name not in present]
        if missing:
            also = f" (nor do {', '.join(map(repr, missing[1:]))})" if len(missing) > 1 else ""
            raise SplitError(
                f"class {missing[0]!r} has no usable images in the {folder}/ folder ({raw_dir / folder}){also}, "
                "but it has some in another split folder. With the dataset's own split folders every class needs "
                "images in each of them: add them, remove the class folder from every split folder, or set "
                "split.strategy: random to merge the folders and split them again."
            )


def group_keys(paths: pd.Series, pattern: str) -> pd.Series:
    """The group key of each path: the capture group of `pattern` searched in it; every path needs one."""
    regex = re.compile(pattern)
    keys = paths.map(lambda path: (found := regex.search(path)) and found.group(1))
    missing = keys.isna()
    how = (
        "It is searched (re.search) in each image's path relative to data/raw, such as "
        f"{paths.iloc[0]!r}, and its capture group is the group key."
    )
    if missing.all():
        raise SplitError(
            f"split.group_pattern {pattern!r} matches none of the {len(paths)} image paths, e.g. "
            f"{paths.iloc[0]!r}. {how}"
        )
    if missing.any():
        raise SplitError(
            f"split.group_pattern {pattern!r} gives no group key for {int(missing.sum())} of {len(paths)} image "
            f"paths, e.g. {paths[missing].iloc[0]!r} (it does for e.g. {paths[~missing].iloc[0]!r}). Every image "
            f"needs a key: change the pattern, or rename or move those files. {how}"
        )
    return keys


def _key_edges(keys: pd.Series) -> np.ndarray:
    """Edges (E, 2) of row positions chaining together the rows that share a key."""
    codes = pd.factorize(keys)[0]
    order = np.argsort(codes, kind="stable")
    same = codes[order][1:] == codes[order][:-1]
    return np.stack([order[:-1][same], order[1:][same]], axis=1)


def find_near_duplicates(images: pd.DataFrame, cfg: SplitConfig) -> NearDuplicates | None:
    """Near pairs among the scanned images (same class); None when split.near_duplicates is off."""
    if cfg.near_duplicates == "off":
        return None
    hashes = np.stack(images["hashes"].to_numpy()) if len(images) else np.empty((0, 2, HASH_BITS // 64), np.uint64)
    return find_near_pairs(hashes, images["label_index"].to_numpy(), cfg.near_duplicate_distance)


def _fractions(cfg: SplitConfig, fixed: set[str] = frozenset()) -> dict[str, float]:
    """Target share of each split among the images signflow assigns (splits given by folders get none)."""
    wanted = {name: (0.0 if name in fixed else getattr(cfg, name)) for name in SPLITS}
    total = sum(wanted.values())
    return {name: value / total for name, value in wanted.items()}


def stratified_split(
    images: pd.DataFrame, fractions: dict[str, float], seed: int, groups: pd.Series | None = None
) -> dict[str, pd.DataFrame]:
    """Split `images` by class with these target fractions, each group (same value in `groups`, indexed
    like `images`) in one split. Deterministic for a seed whatever the row order: rows are ordered by
    class and content hash first. Without groups of two or more images it is scikit-learn's stratified
    `train_test_split` (test first, then valid out of the rest); with them, `assign_groups`."""
    ordered = images.sort_values(["label", "sha256"])
    units = pd.factorize(groups.loc[ordered.index] if groups is not None else pd.RangeIndex(len(ordered)))[0]
    needed = sum(fraction > 0 for fraction in fractions.values())
    _check_class_sizes(ordered, units, needed, grouped=groups is not None)
    if np.bincount(units).max(initial=1) == 1:
        names = _random_names(ordered.reset_index(drop=True), fractions, seed)
    else:
        class_index = pd.factorize(ordered["label"], sort=True)[0]
        names = assign_groups(class_index, units, fractions, seed)
    parts = {name: ordered[names == name] for name in SPLITS}
    _check_every_class_in_every_split(ordered, parts, fractions)
    return parts


def _random_names(ordered: pd.DataFrame, fractions: dict[str, float], seed: int) -> np.ndarray:
    from sklearn.model_selection import train_test_split  # 0.5 s to import; only the random split needs it

    names = np.full(len(ordered), "train", dtype=object)
    rest = ordered
    try:
        if fractions["test"] > 0:
            rest, test = train_test_split(rest, test_size=fractions["test"], stratify=rest["label"], random_state=seed)
            names[test.index] = "test"
        if fractions["valid"] > 0:
            share = fractions["valid"] / (fractions["train"] + fractions["valid"])
            _, valid = train_test_split(rest, test_size=share, stratify=rest["label"], random_state=seed)
            names[valid.index] = "valid"
    except ValueError as error:
        shares = "/".join(f"{fractions[name]:g}" for name in SPLITS)
        raise SplitError(f"cannot split with fractions {shares} (train/valid/test): {error}") from None
    return names


_WITHOUT_VALIDATION = (
    ", or set split.valid to 0 (then training keeps its last epoch, fits no temperature to calibrate the "
    "probabilities and cannot stop early)"
)


_GROUP_REASON = (
    " Images kept together (same group key or near-duplicates) count as one: frames of one group are near-copies "
    "(one burst, recording or signer), and with some in train and others in test the test accuracy would measure "
    "memory, not an honest test on new images; record more groups of that class (e.g. more bursts)."
)


def _check_class_sizes(images: pd.DataFrame, units: np.ndarray, needed: int, grouped: bool) -> None:
    for name in sorted(images["label"].unique()):
        mask = (images["label"] == name).to_numpy()
        count, groups = int(mask.sum()), len(np.unique(units[mask]))
        if groups < needed:
            what = f"{count} usable image(s) in {groups} group(s)" if grouped else f"{count} usable image(s)"
            raise SplitError(
                f"class {name!r} has {what}; splitting it into {needed} parts needs at least {needed}"
                f"{' groups' if grouped else ''} per class. Add images or remove the class folder"
                + (_WITHOUT_VALIDATION if needed == len(SPLITS) else "")
                + "."
                + (_GROUP_REASON if grouped else "")
            )


def _check_every_class_in_every_split(images: pd.DataFrame, parts: dict, fractions: dict[str, float]) -> None:
    for split in (name for name in SPLITS if fractions[name] > 0):
        missing = sorted(set(images["label"]) - set(parts[split]["label"]))
        if missing:
            raise SplitError(
                f"class {missing[0]!r} got no images in the {split} split: its images form too few or too uneven "
                "groups (same group key or near-duplicates) to spread over train/valid/test. Add images from more "
                "groups, change split.group_pattern, or set split.near_duplicates: report."
            )


def assign_splits(
    images: pd.DataFrame, strategy: str, split_folders: dict[str, str], cfg: SplitConfig, near: NearDuplicates | None
) -> Assignment:
    fixed = set(images["folder"]) & {"valid", "test"} if strategy == "folders" else set()
    pool_rows = np.flatnonzero(~images["folder"].isin(fixed).to_numpy())
    split = images["folder"].to_numpy().astype(object)
    edges, keys = [np.empty((0, 2), np.int64)], None
    if strategy == "group":
        keys = group_keys(images["path"], cfg.group_pattern)
        edges.append(_key_edges(keys))
    if near is not None and cfg.near_duplicates == "group":
        edges.append(near.pairs)
    fractions = _fractions(cfg, fixed)
    units = components(len(pool_rows), _edges_within(np.concatenate(edges), pool_rows, len(images)))
    if fractions["train"] == 1.0:
        split[pool_rows] = "train"
        fractions = None
    else:
        if near is not None and cfg.near_duplicates == "group":
            _check_cluster_sizes(images, near, pool_rows, cfg)
        many = np.bincount(units).max(initial=1) > 1
        groups = pd.Series(units, index=images.index[pool_rows]) if many else None
        for name, part in stratified_split(images.iloc[pool_rows], fractions, cfg.seed, groups).items():
            split[part.index] = name
    return Assignment(
        strategy=strategy,
        split_folders=split_folders,
        split=split,
        group=_kept_together(units, pool_rows, len(images)),
        pool=pool_rows,
        fractions=fractions,
        group_pattern=cfg.group_pattern if keys is not None else None,
        group_count=int(keys.nunique()) if keys is not None else 0,
    )


def _edges_within(edges: np.ndarray, rows: np.ndarray, total: int) -> np.ndarray:
    """The edges between two of `rows`, renumbered as positions in `rows`."""
    position = np.full(total, -1)
    position[rows] = np.arange(len(rows))
    mapped = position[edges]
    return mapped[(mapped >= 0).all(axis=1)]


def _kept_together(units: np.ndarray, pool_rows: np.ndarray, total: int) -> np.ndarray:
    """Group id per image row: units of two or more images numbered 0, 1, ... in row order; -1 otherwise."""
    group = np.full(total, -1)
    sizes = np.bincount(units)
    shared = sizes[units] > 1
    group[pool_rows[shared]] = pd.factorize(units[shared])[0]
    return group


def _check_cluster_sizes(images: pd.DataFrame, near: NearDuplicates, pool_rows: np.ndarray, cfg: SplitConfig) -> None:
    """Refuse to group by a near-duplicate cluster that swallowed a large share of its class: then the
    hash cannot tell the recordings apart (one fixed camera and background), and grouping by it would
    put most of the class in one split."""
    cluster = components(len(pool_rows), _edges_within(near.pairs, pool_rows, len(images)))
    pool = images.iloc[pool_rows].assign(cluster=cluster)
    sizes = pool.groupby(["label", "cluster"]).size()
    shares = sizes / pool.groupby("label").size().reindex(sizes.index.get_level_values(0)).to_numpy()
    shares = shares[sizes > 1]
    if shares.empty:
        return
    (label, worst), share = shares.idxmax(), float(shares.max())
    if share > cfg.max_cluster_fraction:
        members = pool.loc[pool["cluster"] == worst, "path"]
        raise SplitError(
            f"a cluster of {len(members)} near-duplicate images holds {share:.0%} of class {label!r} (more than "
            f"split.max_cluster_fraction {cfg.max_cluster_fraction:g}), e.g. {members.iloc[0]!r} ~ "
            f"{members.iloc[-1]!r}. The images are too alike for the perceptual hash to tell recordings apart "
            "(typical of one fixed camera and background), and grouping by it would put most of the class in one "
            "split. Name the clip, session or signer in the paths and set split.strategy: group with "
            "split.group_pattern; or set split.near_duplicates: report to split without grouping and count the "
            "near-duplicates; or raise split.max_cluster_fraction."
        )


def train_near_duplicates(images: pd.DataFrame, near: NearDuplicates | None) -> pd.DataFrame:
    """For each valid or test row with a train image within the distance: the nearest one (row, partner, distance)."""
    if near is None or not len(near.pairs):
        return pd.DataFrame({"row": [], "partner": [], "distance": []}, dtype=np.int64)
    first, second = near.pairs[:, 0], near.pairs[:, 1]
    links = pd.DataFrame(
        {
            "row": np.r_[first, second],
            "partner": np.r_[second, first],
            "distance": np.r_[near.distances, near.distances],
        }
    )
    split = images["split"].to_numpy()
    links = links[(split[links["row"]] != "train") & (split[links["partner"]] == "train")]
    return links.sort_values(["distance", "partner"]).drop_duplicates("row").sort_values("row")


def split_dataset(raw_dir: str | Path, out_dir: str | Path, cfg: SplitConfig) -> SplitResult:
    """Write `out_dir/{train,valid,test}.csv`, `classes.json` and `report.json` atomically."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise SplitError(f"{raw_dir}: raw dataset folder not found; run the extract step first")
    split_folders = shipped_split_folders(raw_dir)
    strategy = choose_strategy(cfg, split_folders, raw_dir)
    if cfg.group_pattern and strategy != "group":
        log.warning("split.group_pattern is used only with split.strategy: group; ignored (strategy %s)", strategy)
    images, rejected = scan_images(raw_dir, cfg, split_folders)
    images, duplicates = drop_duplicates(images)
    rejected += duplicates
    class_names = sorted(images["label"].unique().tolist()) if len(images) else []
    if len(class_names) < 2:
        raise SplitError(f"{raw_dir}: {len(class_names)} class(es) with usable images; at least two are needed")
    images = images.sort_values(["label", "sha256"]).reset_index(drop=True)
    images["label_index"] = images["label"].map({name: i for i, name in enumerate(class_names)})
    if strategy == "folders":
        _check_folders_agree(images, split_folders, raw_dir)
    near = find_near_duplicates(images, cfg)
    assignment = assign_splits(images, strategy, split_folders, cfg, near)
    images["split"], images["group"] = assignment.split, assignment.group
    in_train = train_near_duplicates(images, near)
    images["train_near_duplicate"] = ""
    images.loc[in_train["row"].to_numpy(), "train_near_duplicate"] = images["path"].to_numpy()[in_train["partner"]]
    report = build_report(images, rejected, class_names, cfg, assignment, near, in_train)
    _write_split(out_dir, images, class_names, report)
    _log_summary(report, out_dir)
    return SplitResult(class_names, report["counts"], len(rejected), strategy, report["description"])


def _write_split(out_dir: Path, images: pd.DataFrame, class_names: list[str], report: dict[str, Any]) -> None:
    with staging_dir(out_dir) as staged:
        for name in SPLITS:
            part = images[images["split"] == name].sort_values("path")
            part[MANIFEST_COLUMNS].to_csv(staged / f"{name}.csv", index=False)
        write_json_atomic(staged / "classes.json", class_names)
        write_json_atomic(staged / "report.json", report)
        replace_dir_atomic(staged, out_dir)


def _log_summary(report: dict[str, Any], out_dir: Path) -> None:
    excluded = report["excluded"]
    unreadable = sum(r["reason"].startswith("unreadable") for r in excluded)
    refused = sum(r["reason"].startswith("refused") for r in excluded)
    log.info(
        "split %d images into %s; left out %d (%d unreadable, %d refused, %d duplicates), listed in %s",
        sum(report["counts"].values()),
        report["counts"],
        len(excluded),
        unreadable,
        refused,
        len(excluded) - unreadable - refused,
        out_dir / "report.json",
    )
    log.info("test split: %s", report["description"])
