"""Choose train.early_stopping_patience from whole runs' epoch logs: which patience K stops a run
early without changing the model it keeps.

    python bench/patience.py --archive ../shared/datasets/sign-language-digits.zip \\
        --weights ../shared/weights/mobilenetv2_100.tv_in1k.safetensors --seeds 4 5 6 7 8 \\
        --logs bench/patience --out bench/patience.json
    python bench/patience.py --logs bench/patience --seeds 4 5 6 7 8 --out bench/patience.json  # reuse the logs

For each seed, a project as bench/pipeline.py makes it runs `dvc repro train` with patience off
(all `train.epochs`), and its reports/train_log.csv is copied to LOGS/seed-<n>.csv (skipped when
that file exists). Then, for each K, each log is replayed through train.py's own TrainingState: the
best epoch is the one with the highest validation accuracy (ties: lower validation loss), and the
run stops after the first epoch that is K past the best so far. The epochs up to that point are the
same computation with or without the stop (the learning-rate schedule follows `train.epochs`, the
data order the seed), so when the best epoch so far at the stop is the whole run's best epoch, the
kept model is bit for bit the same and only the later epochs are saved. Choose K on seeds other
than the reported ones (1 2 3), then confirm it there with bench/pipeline.py. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from pipeline import make_project  # bench/pipeline.py (this script's folder is on sys.path)

from signflow._training_state import TrainingState

PATIENCES = range(1, 9)


def whole_run_log(archive: Path, weights: Path | None, seed: int, scratch: Path) -> list[dict]:
    """Train one seed's project with every epoch run and return its epoch log rows."""
    project = make_project(scratch, archive, weights, seed, {"train.early_stopping_patience": 0})
    run = subprocess.run(["dvc", "repro", "train"], cwd=project, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"dvc repro train failed in {project}:\n{run.stderr[-3000:]}")
    return read_log(project / "reports" / "train_log.csv")


def read_log(path: Path) -> list[dict]:
    with path.open() as rows:
        return [
            {"epoch": int(r["epoch"]), **{key: float(r[key]) for key in ("valid_accuracy", "valid_loss")}}
            for r in csv.DictReader(rows)
        ]


def replayed(rows: list[dict], patience: int = 0) -> TrainingState:
    """The training state after `rows`, recorded and stopped exactly as train.py's loop does (its
    TrainingState: the best epoch, ties to the lower validation loss, and stops_early)."""
    state, stand_in = TrainingState(), torch.nn.Identity()  # record_epoch keeps a model's weights
    for row in rows:
        state.record_epoch(row, stand_in)
        if state.stops_early(patience):
            break
    return state


def best_epoch(rows: list[dict]) -> int:
    """The epoch a whole run keeps."""
    return replayed(rows).best_epoch


def replay(rows: list[dict], patience: int) -> dict:
    """Where a run with `patience` stops, and whether it keeps the whole run's model."""
    stopped = replayed(rows, patience)
    return {"epochs_run": stopped.epoch, "same_model": stopped.best_epoch == best_epoch(rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, help="dataset archive (or folder); needed for seeds without a log")
    parser.add_argument("--weights", type=Path, help="local ImageNet weights for train.model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[4, 5, 6, 7, 8], help="split/train seeds")
    parser.add_argument("--logs", type=Path, default=Path("bench/patience"), help="folder of seed-<n>.csv logs")
    parser.add_argument("--out", type=Path, default=Path("bench/patience.json"), help="JSON results file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.logs.mkdir(parents=True, exist_ok=True)
    logs = {}
    for seed in args.seeds:
        path = args.logs / f"seed-{seed}.csv"
        if not path.exists():
            if args.archive is None:
                parser.error(f"{path} is missing: pass --archive to train seed {seed}")
            with tempfile.TemporaryDirectory(prefix="signflow-patience-") as scratch:
                whole_run_log(args.archive, args.weights, seed, Path(scratch))
                shutil.copy(Path(scratch) / f"seed-{seed}" / "reports" / "train_log.csv", path)
        logs[seed] = read_log(path)
    epochs = {seed: len(rows) for seed, rows in logs.items()}
    results = {k: {seed: replay(rows, k) for seed, rows in logs.items()} for k in PATIENCES}
    print("best epoch of the whole run: " + ", ".join(f"seed {s}: {best_epoch(r)}" for s, r in logs.items()))
    print("\n| patience | " + " | ".join(f"seed {s}" for s in logs) + " | epochs saved | models changed |")
    print("|---|" + "---|" * (len(logs) + 2))
    for k, by_seed in results.items():
        cells = " | ".join(f"{r['epochs_run']}{'' if r['same_model'] else ' (changed)'}" for r in by_seed.values())
        saved = sum(epochs[s] - r["epochs_run"] for s, r in by_seed.items())
        changed = sum(not r["same_model"] for r in by_seed.values())
        print(f"| {k} | {cells} | {saved} of {sum(epochs.values())} | {changed} |")
    summary = {"epochs": epochs, "best_epoch": {s: best_epoch(r) for s, r in logs.items()}, "patience": results}
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
