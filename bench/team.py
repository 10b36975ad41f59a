"""Benchmark team mode: the stack's start time and memory, the reference pipeline as a Prefect flow
on the team stack vs locally, and the sweep on 1 vs 2 workers.

    python bench/team.py --archive ../shared/datasets/sign-language-digits.zip \\
        --weights ../shared/weights/mobilenetv2_100.tv_in1k.safetensors --seeds 1 --out bench/team.json

1. Stack: `signflow stack up` in a new folder (first start: initdb, both servers' migrations), then
   `down` and `up` again (a restart), each timed; the resident memory of all its processes, idle.
2. Pipeline: for each seed, two fresh projects (bench/pipeline.py's make_project); one runs
   `python -m flows.pipeline` locally (a temporary Prefect server, MLflow in SQLite), the other on the
   stack (Prefect server and MLflow server on PostgreSQL, artifacts and `dvc push` to S3), in turn.
   The overhead is the team run's extra wall time as a share of the local run's.
3. Sweep (`--sweep-trials N`, 0 skips): `python -m flows.sweep` on the stack with sweep.workers 1,
   then 2, on the same N-trial grid (train.lr values) at `--sweep-epochs`; wall time of each.
Timings on a shared 2-core machine are noisy: the load average is recorded before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from pipeline import make_project  # bench/pipeline.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from signflow import stack  # noqa: E402
from signflow._processes import free_port_base  # noqa: E402


def _stack_rss_mb(folder: Path) -> float:
    import psutil

    pids = json.loads((folder / "pids.json").read_text())
    total = 0
    for entry in pids.values():
        parent = psutil.Process(entry["pid"])
        for process in [parent, *parent.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                pass
    return round(total / 2**20)


def measure_stack(folder: Path) -> dict:
    began = time.perf_counter()
    states = stack.stack_up(folder, port_base=free_port_base(), progress=lambda _: None)
    first = time.perf_counter() - began
    time.sleep(10)  # let the servers settle before reading their memory
    rss = _stack_rss_mb(folder)
    stack.stack_down(folder, progress=lambda _: None)
    began = time.perf_counter()
    restart_states = stack.stack_up(folder, progress=lambda _: None)
    restart = time.perf_counter() - began
    return {
        "first_start_seconds": round(first, 1),
        "first_start_by_service": {s.name: round(s.start_s or 0, 1) for s in states},
        "restart_seconds": round(restart, 1),
        "restart_by_service": {s.name: round(s.start_s or 0, 1) for s in restart_states},
        "idle_rss_mb": rss,
    }


def _env(extra: dict[str, str], prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    return {**env, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", **extra}  # fmt: skip


def timed_flow(project: Path, env: dict[str, str], module: str = "flows.pipeline") -> float:
    log = project / f"{module}.log"
    load = os.getloadavg()[0]
    began = time.perf_counter()
    with log.open("w") as output:
        result = subprocess.run([sys.executable, "-m", module], cwd=project, env=env, stdout=output, stderr=output)
    seconds = time.perf_counter() - began
    if result.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise SystemExit(f"{module} failed in {project}:\n{tail}")
    return round(seconds, 1), round(load, 2)


def _git_init(project: Path) -> None:
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True)


def measure_pipeline(workdir: Path, args, team_env: dict[str, str]) -> dict:
    runs = {}
    for seed in args.seeds:
        local = make_project(workdir, args.archive, args.weights, seed, {}, name=f"local-{seed}")
        team = make_project(workdir, args.archive, args.weights, seed, {}, name=f"team-{seed}")
        stack.connect_project(team, team_env)
        local_s, local_load = timed_flow(local, _env({}, workdir / f"prefect-local-{seed}"))
        team_s, team_load = timed_flow(team, _env(team_env, workdir / f"prefect-team-{seed}"))
        accuracy = {name: json.loads((p / "reports" / "metrics.json").read_text())["accuracy"]
                    for name, p in (("local", local), ("team", team))}  # fmt: skip
        runs[seed] = {"local_seconds": local_s, "team_seconds": team_s, "load_before_local": local_load,
                      "load_before_team": team_load, "test_accuracy": accuracy,
                      "overhead_percent": round(100 * (team_s - local_s) / local_s, 1)}  # fmt: skip
        print(f"seed {seed}: local {local_s} s, team {team_s} s ({runs[seed]['overhead_percent']:+.1f}%)", flush=True)
    overheads = [run["overhead_percent"] for run in runs.values()]
    return {"runs": runs, "median_overhead_percent": statistics.median(overheads)}


def measure_sweep(workdir: Path, args, team_env: dict[str, str]) -> dict:
    grid = {"train.lr": [1e-3, 5e-4, 2e-3, 3e-4, 1.5e-3, 7e-4][: args.sweep_trials]}
    results = {}
    for workers in (1, 2):
        overrides = {"train.epochs": args.sweep_epochs, "sweep.workers": workers, "sweep.max_trials": len(grid[
            "train.lr"]), "sweep.max_minutes": 600}  # fmt: skip
        project = make_project(workdir, args.archive, args.weights, 1, overrides, name=f"sweep-{workers}")
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["sweep"]["grid"] = grid
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        stack.connect_project(project, team_env)
        # the sweep needs a split: the pipeline up to split first (not timed)
        subprocess.run(["dvc", "repro", "split"], cwd=project, check=True, capture_output=True)
        seconds, load = timed_flow(project, _env(team_env, workdir / f"prefect-sweep-{workers}"), "flows.sweep")
        results[workers] = {"seconds": seconds, "load_before": load, "trials": len(grid["train.lr"])}
        print(f"sweep on {workers} worker(s): {seconds} s for {len(grid['train.lr'])} trials", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, required=True, help="dataset archive (or folder)")
    parser.add_argument("--weights", type=Path, help="local ImageNet weights for train.model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="split/train seeds of the pipeline runs")
    parser.add_argument("--sweep-trials", type=int, default=4, help="trials of the 1- vs 2-worker sweep (0 skips)")
    parser.add_argument("--sweep-epochs", type=int, default=3, help="epochs per sweep trial")
    parser.add_argument("--out", type=Path, default=Path("bench/team.json"), help="JSON results file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="signflow-team-bench-") as tmp:
        workdir = Path(tmp)
        folder = workdir / "stack"
        try:
            results = {"machine": {"cpus": os.cpu_count(), "load_at_start": os.getloadavg()[0]},
                       "stack": measure_stack(folder)}  # fmt: skip
            print(f"stack: {json.dumps(results['stack'])}", flush=True)
            team_env = stack.read_stack_env(folder)
            results["pipeline"] = measure_pipeline(workdir, args, team_env)
            if args.sweep_trials:
                results["sweep"] = measure_sweep(workdir, args, team_env)
        finally:
            stack.stack_down(folder, progress=lambda _: None)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
