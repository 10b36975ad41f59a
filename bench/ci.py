"""The report `signflow ci` writes for a pull request, on the reference dataset, as docs/ci.md shows it.

    python bench/ci.py --archive ../shared/datasets/sign-language-digits.zip \\
        --weights ../shared/weights/mobilenetv2_100.tv_in1k.safetensors --set train.epochs=8 --out docs/ci

Makes a team's repository in a scratch folder: this repository's dvc.yaml and the signflow code its
stages depend on, a data.dvc pointing at the archive, params.yaml at the defaults (with the local
weights), and a local-folder DVC remote. On `main` it runs one whole `dvc repro`, pushes to the remote
and commits dvc.lock and the results, as a team does. A branch `pr` then changes the params given with
`--set`, and a fresh clone of that branch runs `signflow ci` as CI would. Prints the seconds of each
and the verdict; writes the report, its job-summary form and its figures into `--out`.
Nothing here asserts on time: timings on a shared 2-core machine are noisy; the load is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from signflow.config import apply_overrides
from signflow.source import normalise_source, render_data_dvc

ROOT = Path(__file__).resolve().parents[1]
IDENTITY = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid"}


def run(command: list[str], cwd: Path, log: Path | None = None) -> float:
    """Run `command`; its output goes to `log` (or nowhere). Exits with the log's end if it fails."""
    started = time.perf_counter()
    with open(log or os.devnull, "a") as output:
        done = subprocess.run(command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}):\n{tail}")
    return time.perf_counter() - started


def write_params(project: Path, overrides: dict) -> None:
    params = apply_overrides(yaml.safe_load((project / "params.yaml").read_text()), overrides)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_team_repo(scratch: Path, archive: Path, weights: Path) -> Path:
    """`scratch/project`: a git + DVC repository at the defaults, with a local-folder default remote."""
    project = scratch / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project)
    shutil.copy(ROOT / ".gitignore", project)
    shutil.copy(ROOT / "params.yaml", project)
    shutil.copytree(ROOT / "signflow", project / "signflow", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "data.dvc").write_text(render_data_dvc(*normalise_source(str(archive.resolve()), project)))
    write_params(project, {"train.weights_file": str(weights.resolve()), "train.pretrained": True})
    for command in (
        ["git", "init", "-q", "-b", "main"],
        ["dvc", "init", "-q"],
        ["dvc", "remote", "add", "-d", "store", str(scratch / "dvc-remote")],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "a signflow project"],
    ):
        run(command, project)
    return project


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, required=True, help="dataset archive (or folder)")
    parser.add_argument("--weights", type=Path, required=True, help="local ImageNet weights for train.model")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="what the pull request changes, e.g. train.epochs=8 (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/ci"), help="folder for the report and its figures")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", **{k: os.environ.get(k, v) for k, v in IDENTITY.items()})
    os.environ.update(
        GIT_COMMITTER_NAME=os.environ["GIT_AUTHOR_NAME"], GIT_COMMITTER_EMAIL=os.environ["GIT_AUTHOR_EMAIL"]
    )
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # each clone registers into its own sqlite file
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    with tempfile.TemporaryDirectory(prefix="signflow-bench-ci-") as scratch_name:
        scratch = Path(scratch_name)
        project = make_team_repo(scratch, args.archive, args.weights)
        load = os.getloadavg()[0]
        base_seconds = run(["dvc", "repro"], project, scratch / "base.log")
        print(f"main: dvc repro {base_seconds:.0f} s (load {load:.2f})", flush=True)
        for command in (["dvc", "push"], ["git", "add", "-A"], ["git", "commit", "-qm", "main: reproduced"]):
            run(command, project)
        run(["git", "checkout", "-qb", "pr"], project)
        write_params(project, overrides)
        run(["git", "commit", "-qam", "pr: " + ", ".join(args.overrides)], project)
        run(["git", "checkout", "-q", "main"], project)
        clone = scratch / "clone"
        run(["git", "clone", "-q", "--branch", "pr", str(project), str(clone)], scratch)
        report = clone / "ci-report" / "report.md"
        load = os.getloadavg()[0]
        started = time.perf_counter()
        with open(scratch / "ci.log", "w") as log:
            command = ["signflow", "ci", "--base", "origin/main", "--report", str(report)]
            done = subprocess.run(command, cwd=clone, stdout=log, stderr=log)
        ci_seconds = time.perf_counter() - started
        verdict = (scratch / "ci.log").read_text().rstrip().splitlines()[-1]
        change = ", ".join(args.overrides)
        print(f"pr ({change}): signflow ci {ci_seconds:.0f} s (load {load:.2f}), exit {done.returncode}")
        print(verdict)
        copy_report(report, args.out)
        figures = {"base_repro_seconds": round(base_seconds, 1), "ci_seconds": round(ci_seconds, 1)}
        print(json.dumps({**figures, "exit": done.returncode, "overrides": overrides, "cpu_count": os.cpu_count()}))
    return 0


def copy_report(report: Path, out: Path) -> None:
    """The report, its job-summary form and the figures it shows (not the rest of the revisions' files)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in (report.name, f"{report.stem}_summary.md"):
        shutil.copy(report.parent / name, out / name)
    files = report.parent / f"{report.stem}_files"
    for figure in files.rglob("*.png"):
        target = out / files.name / figure.relative_to(files)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(figure, target)
    print(f"report and figures in {out}")


if __name__ == "__main__":
    sys.exit(main())
