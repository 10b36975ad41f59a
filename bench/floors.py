"""The small steps against their floor: each step's command, and the bare imports its work needs.

    python bench/floors.py --project /tmp/ref --runs 5 --out bench/floors.json

`--project` is a project where `dvc repro` has run once (bench/pipeline.py makes one; a training run
with train.epochs=1 gives the model files just as well). It is copied to a scratch folder (without
DVC's cache and the registry) and left as it is. Then, `--runs` times over, each small step runs
there as DVC runs it (`signflow <step>`, a fresh process, the same inputs every time, so the same
outputs), each right after its floor: a fresh `python -c "import ..."` of the libraries the step
needs for its work (`FLOORS`). The register step starts each run from an empty registry, as in a
new project's first `dvc repro`: it registers version 1, creating MLflow's database (its schema
migrations are in the step's time). DVC's own time around a stage (hashing deps and outs, writing
dvc.lock) is not in these figures; bench/pipeline.py measures whole `dvc repro` runs.

Printed and written as JSON: per step the median seconds of the step and of its floor, their
difference, the median CPU seconds of both (user + system: less at the mercy of other processes
than wall time on a busy machine), every sample, and the 1-minute load average before each run. The
signflow that runs is the one this environment imports, or each of `--code DIR ...` in turn (on
PYTHONPATH), run after run against the same floor run: before and after a change under the same
load, e.g.

    git worktree add /tmp/base main
    python bench/floors.py --project /tmp/ref --code /tmp/base . --runs 5 --out bench/floors.json

Nothing is asserted: timings on a shared machine are noisy; compare medians taken close in time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMON = ["yaml", "pydantic.main", "filelock"]
"""Every step reads params.yaml into the typed config and takes the run lock."""
FLOORS = {
    "extract": [*COMMON],
    "split": [*COMMON, "numpy", "pandas", "PIL.Image", "scipy.fft", "scipy.sparse.csgraph", "sklearn.model_selection"],
    "evaluate": [*COMMON, "numpy", "pandas", "PIL.Image", "torch", "timm", "matplotlib.figure"],
    "export": [*COMMON, "numpy", "torch", "timm", "onnx", "onnxruntime"],
    "register": [
        *COMMON,
        "pandas",
        "torch",
        "onnx",
        "mlflow",
        "mlflow.pyfunc",
        "mlflow.store.tracking.sqlalchemy_store",
    ],
}
"""The libraries each step's work needs (the split's scikit-learn: a random split, the default):
reading and decoding images, the model (torch, and timm to build it), the figures, the ONNX file,
the MLflow client with its SQL store and its model flavour."""
STEPS = tuple(FLOORS)
SKIPPED = (".dvc", "mlflow.db", "mlartifacts", "mlruns", ".signflow-cache")
"""Not copied: DVC's cache and state, the registry, the training cache; no small step reads them."""


def signflow_command() -> list[str]:
    """`signflow` as DVC runs it: the console script of this interpreter's environment (the current
    folder is not on its import path: a project's own copy of signflow/ is not what runs)."""
    script = Path(sys.executable).parent / "signflow"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-P", "-c", "import sys; from signflow.cli import main; sys.exit(main())"]


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the process and its children) of one run."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def fresh_registry(project: Path) -> None:
    for name in ("mlflow.db", "mlartifacts", "mlruns"):
        path = project / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _environment(code: Path | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)  # register.tracking_uri: the scratch project's own registry
    if code is not None:
        env["PYTHONPATH"] = str(code)
    return env


def _signflow_location(env: dict[str, str]) -> str:
    command = [sys.executable, "-P", "-c", "import signflow; print(signflow.__file__)"]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip()


def measure(project: Path, steps: list[str], runs: int, codes: list[Path | None]) -> dict:
    """Per code (a checkout on PYTHONPATH, or None: what `import signflow` finds), per step: the step's
    and its floor's seconds. In each run every code's step follows the same floor run, so several
    codes are compared under the same load."""
    envs = {code: _environment(code) for code in codes}
    samples = {
        code: {step: {key: [] for key in ("step", "floor", "step_cpu", "floor_cpu", "load")} for step in steps}
        for code in codes
    }
    for step in steps:
        floor_command = [sys.executable, "-c", "import " + ", ".join(FLOORS[step])]
        timed(floor_command, project, envs[codes[0]])  # warm the file cache: every run after this one finds it warm
        for code in codes:
            if step == "register":
                fresh_registry(project)
            timed([*signflow_command(), step], project, envs[code])
        for run in range(runs):
            load = round(os.getloadavg()[0], 2)
            floor, floor_cpu = timed(floor_command, project, envs[codes[0]])
            for code in codes if run % 2 == 0 else codes[::-1]:  # neither code always goes first
                if step == "register":
                    fresh_registry(project)
                seconds, cpu = timed([*signflow_command(), step], project, envs[code])
                taken = {"step": seconds, "floor": floor, "step_cpu": cpu, "floor_cpu": floor_cpu, "load": load}
                for key, value in taken.items():
                    samples[code][step][key].append(round(value, 3))
        for code in codes:
            taken = samples[code][step]
            step_s, floor_s = statistics.median(taken["step"]), statistics.median(taken["floor"])
            print(
                f"{step:9} {step_s:6.2f} s  floor {floor_s:5.2f} s  difference {step_s - floor_s:5.2f} s  "
                f"load {statistics.median(taken['load']):.2f}  ({code or 'signflow as installed'})",
                flush=True,
            )
    measured = {}
    for code in codes:
        results = {}
        for step in steps:
            taken = samples[code][step]
            step_s, floor_s = statistics.median(taken["step"]), statistics.median(taken["floor"])
            results[step] = {
                "median_s": round(step_s, 2),
                "floor_s": round(floor_s, 2),
                "difference_s": round(step_s - floor_s, 2),
                "median_cpu_s": round(statistics.median(taken["step_cpu"]), 2),
                "floor_cpu_s": round(statistics.median(taken["floor_cpu"]), 2),
                "floor_imports": FLOORS[step],
                "load_1min": taken["load"],
                "samples": {key: taken[key] for key in ("step", "floor", "step_cpu", "floor_cpu")},
            }
        measured[str(code) if code else "installed"] = {"signflow": _signflow_location(envs[code]), "steps": results}
    return measured


def markdown_table(steps: dict) -> str:
    rows = ["| step | median s | floor s | difference s | CPU s: step / floor | load (1 min) |"]
    rows.append("|---|---|---|---|---|---|")
    for step, result in steps.items():
        load = statistics.median(result["load_1min"])
        rows.append(
            f"| {step} | {result['median_s']:.2f} | {result['floor_s']:.2f} | {result['difference_s']:.2f} | "
            f"{result['median_cpu_s']:.2f} / {result['floor_cpu_s']:.2f} | {load:.2f} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="a project where `dvc repro` has run")
    parser.add_argument("--runs", type=int, default=5, help="runs of each step and of its floor (median)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument(
        "--code",
        type=Path,
        nargs="+",
        help="checkouts to run the steps from (each on PYTHONPATH in turn, run after run: before/after under "
        "the same load); default: the signflow this environment imports",
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here (e.g. bench/floors.json)")
    args = parser.parse_args()
    source = args.project.resolve()
    missing = [p for p in ("params.yaml", "data/source", "data/raw", "models/model.pt") if not (source / p).exists()]
    if missing:
        raise SystemExit(f"{source}: no {', '.join(missing)}; run `dvc repro` there first")
    codes = [code.resolve() for code in args.code] if args.code else [None]
    with tempfile.TemporaryDirectory(prefix="signflow-floors-") as scratch:
        project = Path(scratch) / "project"
        shutil.copytree(source, project, ignore=lambda folder, names: [n for n in names if n in SKIPPED])
        print(f"{len(args.steps)} steps x {args.runs} runs x {len(codes)} code(s) in a copy of {source}", flush=True)
        measured = measure(project, args.steps, args.runs, codes)
    report = {
        "project": str(source),
        "runs": args.runs,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "codes": measured,
    }
    for label, result in measured.items():
        print(f"\n{label} ({result['signflow']}):\n{markdown_table(result['steps'])}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
