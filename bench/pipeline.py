"""Benchmark the real pipeline on the real dataset, and the notebook recipe it replaces, side by side.

    python bench/pipeline.py --archive ../shared/datasets/sign-language-digits.zip \\
        --weights ../shared/weights/mobilenetv2_100.tv_in1k.safetensors --seeds 1 2 3 --out bench/results.json

For each seed it makes a fresh project (this repo's dvc.yaml, the signflow code its stages depend
on, a data.dvc pointing at the archive, and params.yaml with train.weights_file and
split.seed/train.seed set), runs one whole `dvc repro`, and records its wall seconds and those of
each step (the extract step's include DVC's import of the archive, which comes first), peak RSS
of the step's processes, test accuracy, macro F1, the expected calibration error before and after
temperature scaling, and training images/s (through the epochs only; the step's seconds include
decoding and caching). Then it trains the notebook recipe (MobileNet at 224 px, batch 10, Adam 1e-4,
all but the last blocks frozen, plain loop) for `--notebook-epochs` epochs on the first seed's split
and extrapolates to its 30 epochs. Figures are printed as markdown tables and written as JSON,
with each seed's test split as the split step describes it (strategy, near-duplicate clusters, test
images with a near-duplicate in train).
Nothing here asserts on time: timings on a shared 2-core machine are noisy; the load is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _timing import STAGES, timed_repro  # bench/_timing.py

from signflow.config import apply_overrides
from signflow.source import normalise_source, render_data_dvc

ROOT = Path(__file__).resolve().parents[1]


def _peak_child_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def make_project(
    workdir: Path, archive: Path, weights: Path | None, seed: int, overrides: dict, name: str | None = None
) -> Path:
    """`workdir/<name>` (default `seed-<seed>`): this repository's dvc.yaml and the signflow code its
    stages depend on, a data.dvc pointing at `archive` (an archive or a folder), and params.yaml
    with the weights file, both seeds and `overrides` (dotted keys) set; `dvc init --no-scm`."""
    project = workdir / (name or f"seed-{seed}")
    project.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", project)
    shutil.copytree(ROOT / "signflow", project / "signflow", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "data.dvc").write_text(render_data_dvc(*normalise_source(str(Path(archive).resolve()), project)))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["weights_file"] = str(weights.resolve()) if weights else None
    params["train"]["pretrained"] = weights is not None
    params["split"]["seed"] = seed
    params["train"]["seed"] = seed
    params = apply_overrides(params, overrides)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    return project


def run_pipeline(project: Path) -> dict:
    """One whole `dvc repro`, timed end to end (step seconds: see _timing.ReproTiming). RSS is the
    peak of any child process so far."""
    timing = timed_repro(project)
    steps, total = timing.step_seconds(), timing.total
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    split = json.loads((project / "data" / "split" / "report.json").read_text())
    import torch

    summary = torch.load(project / "models" / "model.pt", map_location="cpu", weights_only=True)["summary"]
    return {
        "test_accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "test_images": metrics["test_images"],
        "test_near_duplicates_in_train": metrics.get("test_near_duplicates_in_train"),
        "split": split["description"],
        "near_duplicate_clusters": len(split["near_duplicates"].get("clusters", [])),
        "images_in_clusters": split["near_duplicates"].get("images_in_clusters", 0),
        "step_seconds": steps,
        "total_seconds": round(total, 1),
        "train_images_per_second": round(summary["train_images_per_second"], 1),
        "peak_rss_mb_so_far": round(_peak_child_rss_mb()),
        "temperature": metrics.get("temperature", 1.0),
        "ece_uncalibrated": metrics.get("ece_uncalibrated", metrics["ece"]),
        "ece": metrics["ece"],
        "mean_confidence_uncalibrated": metrics.get("mean_confidence_uncalibrated", metrics["mean_confidence"]),
        "mean_confidence": metrics["mean_confidence"],
        "valid_accuracy": summary["valid_accuracy"],
    }


def time_notebook_recipe(project: Path, epochs: int, weights: Path | None) -> dict:
    """The Keras-notebook recipe on signflow's plain loop: 224 px, batch 10, Adam 1e-4, no caching."""
    from signflow.config import load_params
    from signflow.train import train_model

    params = load_params(project / "params.yaml")
    recipe = params.train.model_copy(
        update={
            "image_size": 224,
            "batch_size": 10,
            "optimizer": "adam",
            "lr": 1e-4,
            "weight_decay": 0.0,
            "epochs": epochs,
            "trainable_blocks": 4,
            "cache_frozen_features": False,
            "channels_last": False,
            "augment": params.train.augment.model_copy(update={"enabled": False}),
            "weights_file": str(weights) if weights else None,
        }
    )
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        result = train_model(
            recipe,
            project / "data" / "raw",
            project / "data" / "split",
            Path(scratch) / "m.pt",
            Path(scratch) / "log.csv",
        )
        seconds = time.perf_counter() - start
    per_epoch = seconds / result.epochs_run
    return {
        "epochs_timed": result.epochs_run,
        "seconds_per_epoch": round(per_epoch, 1),
        "estimated_seconds_30_epochs": round(30 * per_epoch),
        "valid_accuracy_after_timed_epochs": round(result.best_valid_accuracy, 4),
    }


def markdown_table(runs: dict[int, dict], notebook: dict | None) -> str:
    rows = [
        "| seed | test acc | macro F1 | " + " | ".join(f"{s} s" for s in STAGES) + " | total s | train img/s |",
        "|---|---|---|" + "---|" * len(STAGES) + "---|---|",
    ]
    for seed, run in runs.items():
        steps = " | ".join(str(run["step_seconds"][s]) for s in STAGES)
        rows.append(
            f"| {seed} | {run['test_accuracy']:.4f} | {run['macro_f1']:.4f} | {steps} | "
            f"{run['total_seconds']} | {run['train_images_per_second']} |"
        )
    mean = lambda key: statistics.mean(r[key] for r in runs.values())  # noqa: E731
    steps = " | ".join(str(round(statistics.mean(r["step_seconds"][s] for r in runs.values()), 1)) for s in STAGES)
    rows.append(
        f"| **mean** | **{mean('test_accuracy'):.4f}** | {mean('macro_f1'):.4f} | {steps} | "
        f"**{mean('total_seconds'):.1f}** | {mean('train_images_per_second'):.1f} |"
    )
    rows += [
        "",
        "| seed | valid acc | temperature | test ECE before | test ECE after | mean confidence before | after |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, run in runs.items():
        rows.append(
            f"| {seed} | {run['valid_accuracy']:.4f} | {run['temperature']:.3f} | {run['ece_uncalibrated']:.4f} | "
            f"{run['ece']:.4f} | {run['mean_confidence_uncalibrated']:.4f} | {run['mean_confidence']:.4f} |"
        )
    rows.append("")
    rows += [f"Seed {seed}'s test split: {run['split']}" for seed, run in runs.items()]
    if notebook:
        ours = statistics.mean(r["step_seconds"]["train"] for r in runs.values())
        rows.append("")
        rows.append(
            f"Notebook recipe (224 px, batch 10, Adam 1e-4, 30 epochs): {notebook['seconds_per_epoch']} s/epoch "
            f"measured, ~{notebook['estimated_seconds_30_epochs']} s estimated; signflow's train step "
            f"{ours:.0f} s: **{notebook['estimated_seconds_30_epochs'] / ours:.0f}x faster**."
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, required=True, help="dataset archive (or folder)")
    parser.add_argument("--weights", type=Path, help="local ImageNet weights for train.model (else no weights)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="split/train seeds")
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"), help="JSON results file")
    parser.add_argument("--notebook-epochs", type=int, default=1, help="epochs of the notebook recipe to time; 0 skips")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params key for every seed, e.g. train.epochs=5",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # each project registers into its own sqlite file
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    runs, notebook = {}, None
    with tempfile.TemporaryDirectory(prefix="signflow-bench-") as scratch:
        for seed in args.seeds:
            project = make_project(Path(scratch), args.archive, args.weights, seed, overrides)
            load_before = os.getloadavg()[0]
            runs[seed] = {
                **run_pipeline(project),
                "load_1min_before": round(load_before, 2),
                "load_1min_after": round(os.getloadavg()[0], 2),
            }
            print(f"seed {seed}: {json.dumps(runs[seed])}", flush=True)
        if args.notebook_epochs:
            notebook = time_notebook_recipe(Path(scratch) / f"seed-{args.seeds[0]}", args.notebook_epochs, args.weights)
            print(f"notebook recipe: {json.dumps(notebook)}", flush=True)
    summary = {
        "runs": runs,
        "mean_test_accuracy": statistics.mean(r["test_accuracy"] for r in runs.values()),
        "mean_total_seconds": statistics.mean(r["total_seconds"] for r in runs.values()),
        "median_total_seconds": statistics.median(r["total_seconds"] for r in runs.values()),
        "peak_rss_mb": max(r["peak_rss_mb_so_far"] for r in runs.values()),
        "notebook_recipe": notebook,
        "cpu_count": os.cpu_count(),
        "overrides": overrides,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(markdown_table(runs, notebook))
    print(f"\npeak RSS of any step: {summary['peak_rss_mb']} MB; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
