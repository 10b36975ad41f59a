"""Split step: check every image, drop duplicates, and write stratified train/valid/test manifests.

Manifests are CSV files (`path,label,label_index,sha256,width,height`, paths relative to the raw
dataset folder) plus `classes.json`, whose order *is* the label index used by every later step,
and `report.json`, which lists every file left out and why.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from signflow._fileio import replace_dir_atomic, sha256_file, staging_dir, write_json_atomic
from signflow._images import DEFAULT_MAX_PIXELS, ImageRefused, check_image, is_junk
from signflow.config import SplitConfig
from signflow.errors import SignflowError

__all__ = ["SplitError", "SplitResult", "read_class_names", "read_manifest", "split_dataset"]

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["path", "label", "label_index", "sha256", "width", "height"]


class SplitError(SignflowError, ValueError):
    """The dataset cannot be split as asked; the message names the class and what to change."""


@dataclass(frozen=True)
class SplitResult:
    class_names: list[str]
    counts: dict[str, int]
    excluded: int

    def summary_line(self) -> str:
        return f"{self.counts}"


def _check_file(file: Path, cfg: SplitConfig) -> tuple[int, int, str] | Exception:
    """(width, height, sha256) of a usable image, or the error that makes it unusable."""
    try:
        width, height = check_image(file, cfg.max_pixels, cfg.max_aspect_ratio)
    except Exception as error:  # noqa: BLE001 - any decoder failure means "unusable image"
        return error
    return width, height, sha256_file(file)


def _reason(error: Exception) -> str:
    if isinstance(error, ImageRefused):
        return f"refused: {error}"
    return f"unreadable image: {type(error).__name__}: {error}"


def scan_images(raw_dir: Path, cfg: SplitConfig) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Open and hash every file under `raw_dir/<class>/`; return usable rows and the rejects
    (unreadable, or refused by `split.max_pixels` / `split.max_aspect_ratio`)."""
    files = sorted(
        p for p in raw_dir.rglob("*") if p.is_file() and p.parent != raw_dir and not is_junk(p.relative_to(raw_dir))
    )
    rows, rejected = [], []
    # Decoding releases the GIL: threads check images in parallel; map keeps the files' order.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        checked = pool.map(lambda file: _check_file(file, cfg), files)
        checked = tqdm(checked, total=len(files), desc="check images", unit="img")
        for file, result in zip(files, checked, strict=True):
            relative = file.relative_to(raw_dir).as_posix()
            if isinstance(result, Exception):
                rejected.append({"path": relative, "reason": _reason(result)})
                continue
            width, height, digest = result
            label = relative.split("/", 1)[0]
            rows.append({"path": relative, "label": label, "sha256": digest, "width": width, "height": height})
    return pd.DataFrame(rows, columns=["path", "label", "sha256", "width", "height"]), rejected


def drop_duplicates(images: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Keep one file per content hash; a file whose copies carry different labels is dropped entirely."""
    rejected: list[dict[str, str]] = []
    keep = []
    for _digest, group in images.groupby("sha256", sort=True):
        group = group.sort_values("path")
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


def _check_class_sizes(images: pd.DataFrame, class_names: list[str], cfg: SplitConfig) -> None:
    needed = 2 + (cfg.valid > 0)
    for name in class_names:
        count = int((images["label"] == name).sum())
        if count < needed:
            raise SplitError(
                f"class {name!r} has {count} usable image(s); a stratified train/valid/test split needs at least "
                f"{needed} per class. Add images, remove the class folder, or set split.valid to 0."
            )


def stratified_split(images: pd.DataFrame, cfg: SplitConfig) -> dict[str, pd.DataFrame]:
    """Deterministic for a seed: rows are ordered by content hash before sklearn shuffles them."""
    ordered = images.sort_values(["label", "sha256"]).reset_index(drop=True)
    try:
        rest, test = train_test_split(ordered, test_size=cfg.test, stratify=ordered["label"], random_state=cfg.seed)
        if cfg.valid > 0:
            train, valid = train_test_split(
                rest, test_size=cfg.valid / (cfg.train + cfg.valid), stratify=rest["label"], random_state=cfg.seed
            )
        else:
            train, valid = rest, rest.iloc[0:0]
    except ValueError as error:
        raise SplitError(f"cannot split with fractions {cfg.train}/{cfg.valid}/{cfg.test}: {error}") from None
    return {"train": train, "valid": valid, "test": test}


def split_dataset(raw_dir: str | Path, out_dir: str | Path, cfg: SplitConfig) -> SplitResult:
    """Write `out_dir/{train,valid,test}.csv`, `classes.json` and `report.json` atomically."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise SplitError(f"{raw_dir}: raw dataset folder not found; run the download step first")
    images, rejected = scan_images(raw_dir, cfg)
    images, duplicates = drop_duplicates(images)
    rejected += duplicates
    class_names = sorted(images["label"].unique().tolist()) if len(images) else []
    if len(class_names) < 2:
        raise SplitError(f"{raw_dir}: {len(class_names)} class(es) with usable images; at least two are needed")
    _check_class_sizes(images, class_names, cfg)
    images["label_index"] = images["label"].map({name: i for i, name in enumerate(class_names)})
    parts = stratified_split(images, cfg)
    with staging_dir(out_dir) as staged:
        for name, frame in parts.items():
            frame.sort_values("path")[MANIFEST_COLUMNS].to_csv(staged / f"{name}.csv", index=False)
        write_json_atomic(staged / "classes.json", class_names)
        per_class = {
            n: f.groupby("label").size().reindex(class_names, fill_value=0).to_dict() for n, f in parts.items()
        }
        write_json_atomic(
            staged / "report.json",
            {
                "counts": {n: len(f) for n, f in parts.items()},
                "per_class": per_class,
                "excluded": rejected,
                "max_pixels": cfg.max_pixels,
            },
        )
        replace_dir_atomic(staged, out_dir)
    unreadable = sum(r["reason"].startswith("unreadable") for r in rejected)
    refused = sum(r["reason"].startswith("refused") for r in rejected)
    log.info(
        "split %d images into %s; left out %d (%d unreadable, %d refused, %d duplicates), listed in %s",
        len(images),
        {n: len(f) for n, f in parts.items()},
        len(rejected),
        unreadable,
        refused,
        len(rejected) - unreadable - refused,
        out_dir / "report.json",
    )
    return SplitResult(class_names, {n: len(f) for n, f in parts.items()}, len(rejected))


def read_manifest(split_dir: str | Path, name: str) -> pd.DataFrame:
    path = Path(split_dir) / f"{name}.csv"
    if not path.is_file():
        raise SplitError(f"{path}: manifest not found; run the split step first")
    return pd.read_csv(path, dtype={"path": str, "label": str, "sha256": str})


def read_class_names(split_dir: str | Path) -> list[str]:
    path = Path(split_dir) / "classes.json"
    if not path.is_file():
        raise SplitError(f"{path}: class list not found; run the split step first")
    return json.loads(path.read_text(encoding="utf-8"))


def read_max_pixels(split_dir: str | Path) -> int:
    """The split.max_pixels the split was made with (a split from before it was recorded: the
    default). Training keeps it in the model, so every later step refuses the images the split did."""
    path = Path(split_dir) / "report.json"
    if not path.is_file():
        return DEFAULT_MAX_PIXELS
    return int(json.loads(path.read_text(encoding="utf-8")).get("max_pixels", DEFAULT_MAX_PIXELS))
