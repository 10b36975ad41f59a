"""Benchmark the sweep's two methods on the reference dataset: the grid against the Optuna search
(TPE, median pruning), as best validation accuracy reached against cumulative trial-hours.

    python bench/sweep_search.py --archive ../shared/datasets/sign-language-digits.zip \\
        --weights ../shared/weights/mobilenetv2_100.tv_in1k.safetensors --out bench/sweep_search.json

    # smoke test (proves the script runs; its figures mean nothing)
    python bench/sweep_search.py --archive ... --weights ... --trials 2 --set train.epochs=1 \\
        --set train.image_size=96 --out /tmp/sweep_search_smoke.json

Both methods get params.yaml's `sweep:` section (its grid, its space, seed, pruning) with
`max_trials` = `--trials` and no time budget, on one extract and split of the archive made once
(library calls, no DVC), each in its own sweep folder with its own feature cache so neither reuses
the other's work. Only the trials are run: no winner is evaluated or registered. For each method,
after each trial in the order they finished: the trial's status, its wall hours (a pruned trial
counts the epochs it ran), the cumulative trial-hours and the best validation accuracy so far. The
machine's cores and 1-minute load before and after each method are recorded; nothing here asserts
on time (a shared machine is noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from signflow.config import apply_overrides, load_params  # noqa: E402
from signflow.extract import extract_dataset  # noqa: E402
from signflow.split import split_dataset  # noqa: E402
from signflow.sweep import plan_trials, run_search, run_trials  # noqa: E402

METHODS = ("grid", "optuna")


def write_params(workdir: Path, weights: Path | None, trials: int, overrides: dict[str, Any]) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["weights_file"] = str(weights.resolve()) if weights else None
    params["train"]["pretrained"] = weights is not None
    params["sweep"].update(max_trials=trials, max_minutes=1e6)
    params = apply_overrides(params, overrides)
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_method(method: str, params_path: Path, raw: Path, split: Path, workdir: Path) -> list[dict[str, Any]]:
    raw_params = apply_overrides(yaml.safe_load(params_path.read_text()), {"sweep.method": method})
    cfg = load_params(params_path).sweep.model_copy(update={"method": method})
    sweep_dir, cache = workdir / f"sweep-{method}", workdir / f"cache-{method}"
    if method == "grid":
        trials = plan_trials(raw_params, cfg, workdir)
        return run_trials(trials, raw, split, sweep_dir, cfg.max_minutes, cache_dir=cache)
    return run_search(raw_params, cfg, workdir, raw, split, sweep_dir, cache)


def search_curve(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best validation accuracy so far against cumulative trial-hours, trials in the order they finished."""
    curve, hours, best = [], 0.0, None
    for record in sorted(records, key=lambda r: r.get("finished_at", 0)):
        trained = "finished_at" in record and record["status"] in ("ran", "pruned")  # not a result reused
        trial_hours = (record["finished_at"] - record["started_at"]) / 3600 if trained else 0.0
        hours += trial_hours
        if "valid_accuracy" in record:
            best = max(best or 0.0, record["valid_accuracy"])
        curve.append(
            {
                "trial": record["trial"],
                "status": record["status"],
                "overrides": record["overrides"],
                "valid_accuracy": record.get("valid_accuracy", record.get("valid_accuracy_at_prune")),
                "trial_hours": round(trial_hours, 5),
                "cumulative_trial_hours": round(hours, 5),
                "best_valid_accuracy": best,
            }
        )
    return curve


def summary_row(method: str, curve: list[dict[str, Any]], load: tuple[float, float]) -> dict[str, Any]:
    best = curve[-1]["best_valid_accuracy"] if curve else None
    reached = next((p["cumulative_trial_hours"] for p in curve if p["best_valid_accuracy"] == best), None)
    return {
        "method": method,
        "trials": len(curve),
        "pruned": sum(p["status"] == "pruned" for p in curve),
        "best_valid_accuracy": best,
        "trial_hours": curve[-1]["cumulative_trial_hours"] if curve else 0.0,
        "hours_to_best": reached,
        "load_1min_before": load[0],
        "load_1min_after": load[1],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--trials", type=int, default=8, help="max_trials for each method (default 8)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params override")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--workdir", type=Path, help="kept afterwards (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "sweep_search.json")
    args = parser.parse_args(argv)
    os.environ.pop("SIGNFLOW_OPTUNA_STORAGE", None)  # each run's study in its own journal file
    with tempfile.TemporaryDirectory(prefix="sweep-search-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        params_path = write_params(workdir, args.weights, args.trials, parse_overrides(args.set))
        params = load_params(params_path)
        raw, split = workdir / "data" / "raw", workdir / "data" / "split"
        extract_dataset(args.archive, raw, params.extract)
        split_dataset(raw, split, params.split)
        results: dict[str, Any] = {}
        for method in args.methods:
            load_before, started = os.getloadavg()[0], time.time()
            records = run_method(method, params_path, raw, split, workdir)
            curve = search_curve(records)
            load = (round(load_before, 2), round(os.getloadavg()[0], 2))
            results[method] = {
                "summary": summary_row(method, curve, load),
                "wall_seconds": round(time.time() - started, 1),
                "curve": curve,
            }
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "overrides": parse_overrides(args.set),
        "sweep": params.sweep.model_dump(mode="json"),
        "methods": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown([r["summary"] for r in results.values()]))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
