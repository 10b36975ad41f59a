"""What the split step costs and finds on a real dataset, with near-duplicate search off, grouping and reporting.

    python bench/split.py --archive ../shared/datasets/sign-language-digits.zip --montage bench/clusters.png

Extracts the archive once (the extract step), then times `split_dataset` with this repo's
params.yaml three times: `split.near_duplicates` off, group (the default) and report. Prints, per
mode, the split step's seconds, the pair search's seconds, the clusters found, the images in them,
the largest cluster and how many test images have a near-duplicate in train. `--montage` draws the
largest clusters found, one per row, to look at them. `--pairs N` also times the pair search alone on
N random hashes in `--classes` classes (the cost on a dataset of that size; random hashes have no
near pairs, so it is the comparisons alone). Nothing is asserted: timings on a shared machine are
noisy; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODES = ("off", "group", "report")


def time_split(raw: Path, out: Path, params: dict, mode: str) -> dict:
    from signflow.config import parse_params
    from signflow.split import split_dataset

    config = json.loads(json.dumps(params))
    config["split"]["near_duplicates"] = mode
    cfg = parse_params(config).split
    start = time.perf_counter()
    split_dataset(raw, out, cfg)
    seconds = time.perf_counter() - start
    near = json.loads((out / "report.json").read_text())["near_duplicates"]
    clusters = near.get("clusters", [])
    return {
        "mode": mode,
        "split_seconds": round(seconds, 2),
        "search_seconds": near.get("search_seconds"),
        "clusters": len(clusters),
        "images_in_clusters": near.get("images_in_clusters"),
        "largest_cluster": max((len(c["images"]) for c in clusters), default=0),
        "test_with_train_near_duplicate": len(near.get("test_images_with_train_near_duplicate", [])),
        "load_1min": round(os.getloadavg()[0], 2),
    }


def draw_montage(report: dict, raw: Path, path: Path, rows: int = 12, cell: int = 112) -> None:
    """The `rows` largest clusters, one per row, each image captioned with its class and file name."""
    from PIL import Image, ImageDraw

    from signflow._images import load_rgb

    clusters = report["near_duplicates"]["clusters"][:rows]
    columns = max((len(c["images"]) for c in clusters), default=1)
    canvas = Image.new("RGB", (columns * cell, max(1, len(clusters)) * (cell + 14)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, cluster in enumerate(clusters):
        for column, name in enumerate(cluster["images"]):
            image = load_rgb(raw / name, max_side=256)
            image.thumbnail((cell - 6, cell - 6))
            canvas.paste(image, (column * cell + 3, row * (cell + 14) + 14))
            draw.text((column * cell + 3, row * (cell + 14)), name[-18:], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def time_pair_search(images: int, classes: int, distance: int) -> dict:
    from signflow._near_duplicates import near_pairs

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, (images, 2, 4), dtype=np.int64).astype(np.uint64)
    labels = rng.integers(0, classes, images)
    start = time.perf_counter()
    pairs, _ = near_pairs(hashes, labels, distance)
    return {"images": images, "classes": classes, "seconds": round(time.perf_counter() - start, 2), "pairs": len(pairs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, required=True, help="dataset archive (or folder)")
    parser.add_argument("--montage", type=Path, help="PNG of the largest near-duplicate clusters")
    parser.add_argument("--pairs", type=int, help="also time the pair search alone on this many random hashes")
    parser.add_argument("--classes", type=int, default=3, help="classes of those random hashes (default: 3)")
    parser.add_argument("--out", type=Path, default=Path("bench/split.json"), help="JSON results file")
    args = parser.parse_args()
    from signflow.config import parse_params
    from signflow.extract import extract_dataset

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["extract"].update(sha256=None)
    results: dict = {"runs": []}
    with tempfile.TemporaryDirectory(prefix="signflow-split-bench-") as scratch:
        raw = Path(scratch) / "raw"
        info = extract_dataset(args.archive.resolve(), raw, parse_params(params).extract)
        results["images"] = info.num_images
        for mode in MODES:
            run = time_split(raw, Path(scratch) / f"split-{mode}", params, mode)
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
        if args.montage:
            draw_montage(json.loads((Path(scratch) / "split-group" / "report.json").read_text()), raw, args.montage)
    if args.pairs:
        results["pair_search"] = time_pair_search(args.pairs, args.classes, params["split"]["near_duplicate_distance"])
        print(json.dumps(results["pair_search"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['images']} images, split.near_duplicate_distance {params['split']['near_duplicate_distance']}")
    print(
        "| near_duplicates | split s | search s | clusters | images in clusters | largest "
        "| test images with a near-duplicate in train |"
    )
    print("|---|---|---|---|---|---|---|")
    for run in results["runs"]:
        print(
            f"| {run['mode']} | {run['split_seconds']} | {run['search_seconds'] or ''} | {run['clusters']} | "
            f"{run['images_in_clusters'] or ''} | {run['largest_cluster']} | {run['test_with_train_near_duplicate']} |"
        )
    extra = results["runs"][1]["split_seconds"] - results["runs"][0]["split_seconds"]
    print(f"\nnear-duplicate grouping added {extra:.2f} s to the split step (load {results['runs'][1]['load_1min']})")
    if args.montage:
        print(f"montage of the largest clusters: {args.montage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
