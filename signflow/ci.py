"""`signflow ci`: what a change did to the model, compared with its base revision, and whether it may merge.

`run_ci` reproduces the pipeline as CI does (`dvc repro --pull`: what the DVC remote holds is pulled,
only the stages whose inputs changed run), compares the workspace with the base revision as git holds
it (params, data version, code; the metrics, confusion matrix and learning curves; the model card) and
holds the change to the gates of the base revision's `ci:` section. The command line only writes the
report `signflow._ci_report` renders from the `CiResult` and exits with `CiResult.exit_code`.

Test accuracies are compared only on the same test images. When the change made another test split,
the base model is scored again, with the same code, on the new test images it never trained on.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from signflow import layout
from signflow._provenance import fingerprint_test_set
from signflow._redact import redact_url
from signflow.config import CiConfig, Params, load_params
from signflow.errors import SignflowError
from signflow.fileio import write_atomic
from signflow.split_files import read_class_names, read_manifest, read_split_report

__all__ = [
    "CannotCompare",
    "CiResult",
    "Comparison",
    "EXIT_GATE_FAILED",
    "EXIT_NOT_COMPARED",
    "EXIT_PASSED",
    "EXIT_PIPELINE_FAILED",
    "Revision",
    "StageOutcome",
    "check_gates",
    "default_base",
    "run_ci",
    "stale_results",
]

EXIT_PASSED = 0
EXIT_GATE_FAILED = 1
"""A gate failed: accuracy fell past ci.max_accuracy_drop, or the test split is not honest."""
EXIT_PIPELINE_FAILED = 3
EXIT_NOT_COMPARED = 4
"""The DVC remote could not be reached, or what the base revision holds could not be read.
(2 keeps the meaning it has for every signflow command: bad params.)"""

LOCK = "dvc.lock"
_HERE = layout.Workspace(Path("."))
SPLIT, MODEL, RAW = _HERE.split.as_posix(), _HERE.model.as_posix(), _HERE.raw.as_posix()
METRICS = _HERE.outputs.metrics.as_posix()
FIGURES = {
    title: (_HERE.outputs.reports / layout.FIGURES[title]).as_posix()
    for title in ("confusion matrix", "learning curves")
}
"""The figures shown side by side, as paths in the project."""
SNAPSHOT = (
    str(layout.PARAMS),
    layout.DATA_DVC,
    LOCK,
    METRICS,
    *FIGURES.values(),
    _HERE.outputs.receipt.as_posix(),
    _HERE.outputs.model_card.as_posix(),
)
"""What the report reads of each revision: all of it is in git (reports/ and models/*.json, *.md are
`cache: false` outputs that users commit with dvc.lock)."""
RESULTS = ("dvc.lock", "data.dvc", "params.yaml", "reports/", "models/")
"""Changed files the report shows elsewhere than in the list of code changes."""
BASE_CANDIDATES = ("origin/HEAD", "origin/main", "origin/master", "main", "master")


class CannotCompare(SignflowError, RuntimeError):
    """Something the comparison needs could not be reached or read; the message says what and why."""


@dataclass(frozen=True)
class Revision:
    sha: str
    label: str
    """How the report names it: `base 1a2b3c4`, `this change (5d6e7f8)`."""
    files: Path
    """Its files from SNAPSHOT, under the report's folder (those it lacks are missing there)."""

    def read(self, name: str) -> str | None:
        path = self.files / name
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def metrics(self) -> dict[str, Any] | None:
        text = self.read(METRICS)
        return json.loads(text) if text else None

    def lock(self) -> dict[str, Any]:
        return yaml.safe_load(self.read(LOCK) or "") or {}


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    outcome: str
    """ran | ran, not in the remote | restored from the run cache | pulled from the remote | up to date | fetched"""


@dataclass(frozen=True)
class Comparison:
    base_accuracy: float | None
    """None when the two models cannot be compared (the reason is in `how`)."""
    accuracy: float | None
    test_images: int
    how: str
    """On which images both accuracies were measured, or why they were not compared."""


@dataclass
class CiResult:
    base: Revision
    head: Revision
    gates: CiConfig
    gates_from: str
    params_diff: dict[str, dict[str, Any]] = field(default_factory=dict)
    code_changes: list[str] = field(default_factory=list)
    stages: list[StageOutcome] = field(default_factory=list)
    metrics_diff: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparison: Comparison | None = None
    notes: list[str] = field(default_factory=list)
    """Warnings a reviewer should see (stale base results, stages rebuilt because the remote lacked them)."""
    failures: list[str] = field(default_factory=list)
    exit_code: int = EXIT_PASSED
    problem: str | None = None
    """Why the pipeline failed or nothing could be compared (exit codes 3 and 4)."""
    reproduced: bool = False
    """`dvc repro --pull` succeeded: the workspace holds this change's results."""
    output_tail: list[str] = field(default_factory=list)
    repro_seconds: float | None = None
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        """The last line of the command's output and of the report: passed, or the reason it failed."""
        if self.problem:
            return f"signflow ci: failed: {self.problem}"
        if self.failures:
            return "signflow ci: failed: " + "; ".join(self.failures)
        return f"signflow ci: passed: {_passed_summary(self)}"


def _passed_summary(result: CiResult) -> str:
    comparison, metrics = result.comparison, result.head.metrics() or {}
    if comparison is None or comparison.base_accuracy is None:
        compared = f"accuracy not compared ({comparison.how if comparison else 'no comparison'})"
    else:
        compared = (
            f"test accuracy {comparison.accuracy:.4f} against {comparison.base_accuracy:.4f} at {result.base.label} "
            f"on {comparison.test_images} test images"
        )
    near, images = metrics.get("test_near_duplicates_in_train"), metrics.get("test_images")
    return f"{compared}; {near} of {images} test images have a near-duplicate in train"


def run_ci(project_dir: str | Path, base_rev: str | None, files_dir: str | Path) -> CiResult:
    """Reproduce the workspace, compare it with `base_rev` (None: `default_base`) and apply the gates.
    Copies both revisions' figures and files into `files_dir` (emptied first). Raises SignflowError only
    for bad input (an unknown revision, bad params); every other outcome is in the result."""
    started, project, files = time.monotonic(), Path(project_dir).resolve(), Path(files_dir)
    head_params = load_params(project / layout.PARAMS)
    base_sha = _resolve(project, base_rev or default_base(project))
    shutil.rmtree(files, ignore_errors=True)
    base = Revision(base_sha, f"base {base_sha[:7]}", _snapshot_rev(project, base_sha, files / "base"))
    head = Revision(_git(project, "rev-parse", "HEAD"), f"this change ({_head_label(project)})", files / "head")
    _snapshot_workspace(project, head.files, (str(layout.PARAMS), layout.DATA_DVC))
    gates, gates_from = choose_gates(base, head_params)
    result = CiResult(base, head, gates, gates_from)
    result.code_changes = _code_changes(project, base_sha)
    result.notes += stale_results(base)
    try:
        result.params_diff = _params_diff(project, base_sha)
        result.notes += filter(None, [_check_remote(project, base)])
        _reproduce(project, result)
        _snapshot_workspace(project, head.files)
        if result.reproduced:
            _compare(project, head_params, result)
    except CannotCompare as error:
        result.problem, result.exit_code = f"could not compare with {base.label}: {error}", EXIT_NOT_COMPARED
    result.seconds = time.monotonic() - started
    return result


def _compare(project: Path, params: Params, result: CiResult) -> None:
    result.metrics_diff = _metrics_diff(project, result.base.sha)
    with tempfile.TemporaryDirectory(prefix="signflow-ci-") as scratch:
        result.comparison = compare_accuracy(project, result.base, result.head, params, Path(scratch))
    result.failures = check_gates(result.gates, result.comparison, result.head.metrics() or {})
    result.exit_code = EXIT_GATE_FAILED if result.failures else EXIT_PASSED


# Revisions: git and what each holds.


def _git(project: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    if done.returncode != 0:
        raise SignflowError(f"git {' '.join(args)} (in {project}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def _git_bytes(project: Path, rev: str, path: str) -> bytes | None:
    done = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=project, capture_output=True)
    return done.stdout if done.returncode == 0 else None


def default_base(project: Path) -> str:
    """The merge-base of HEAD with the first of origin/HEAD, origin/main, origin/master, main, master that
    exists and is not HEAD itself (a clone of a branch has origin/HEAD on that branch): the commit a pull
    request branched from."""
    head = _git(project, "rev-parse", "HEAD")
    for candidate in BASE_CANDIDATES:
        tip = subprocess.run(["git", "rev-parse", "--verify", "--quiet", candidate], cwd=project, capture_output=True)
        if tip.returncode != 0 or tip.stdout.decode().strip() == head:
            continue
        found = subprocess.run(["git", "merge-base", "HEAD", candidate], cwd=project, capture_output=True, text=True)
        if found.returncode == 0:
            return found.stdout.strip()
    raise SignflowError(
        f"{project}: no base revision found (none of {', '.join(BASE_CANDIDATES)} exists apart from HEAD); pass "
        "--base REV. In GitHub Actions check out with `fetch-depth: 0` so the base branch is there"
    )


def _resolve(project: Path, rev: str) -> str:
    try:
        return _git(project, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except SignflowError:
        raise SignflowError(
            f"base revision {rev!r} is not a commit of {project}: fetch it (`git fetch origin main`; in GitHub "
            "Actions check out with `fetch-depth: 0`) or pass another --base"
        ) from None


def _head_label(project: Path) -> str:
    dirty = _git(project, "status", "--porcelain", "--untracked-files=no")
    short = _git(project, "rev-parse", "--short=7", "HEAD")
    return f"{short} with uncommitted changes" if dirty else short


def _snapshot_rev(project: Path, sha: str, folder: Path) -> Path:
    for name in SNAPSHOT:
        content = _git_bytes(project, sha, name)
        if content is not None:
            _write_bytes(folder / name, content)
    return folder


def _snapshot_workspace(project: Path, folder: Path, names: tuple[str, ...] = SNAPSHOT) -> None:
    for name in names:
        if (project / name).is_file():
            _write_bytes(folder / name, (project / name).read_bytes())


def _write_bytes(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_bytes(content))


def choose_gates(base: Revision, head_params: Params) -> tuple[CiConfig, str]:
    """The base revision's `ci:` gates, so that a change cannot loosen its own; the change's own when the
    base has none (the change that adds them)."""
    section = (yaml.safe_load(base.read(str(layout.PARAMS)) or "") or {}).get("ci")
    if isinstance(section, dict):
        try:
            return CiConfig.model_validate(section), base.label
        except ValueError:
            pass
    return head_params.ci, f"this change ({base.label} has no valid ci: section)"


def stale_results(base: Revision) -> list[str]:
    """A warning when the base's committed results were made with other params than its params.yaml
    holds (a change merged without its dvc.lock and reports)."""
    if base.read(LOCK) is None:
        return [f"{base.label} has no dvc.lock: nothing was reproduced and committed there"]
    params = _flatten(yaml.safe_load(base.read(str(layout.PARAMS)) or "") or {})
    recorded: dict[str, Any] = {}
    for stage in (base.lock().get("stages") or {}).values():
        recorded.update(_flatten((stage.get("params") or {}).get(str(layout.PARAMS)) or {}))
    stale = sorted(key for key, value in recorded.items() if not _same(params.get(key, value), value))
    if not stale:
        return []
    shown = ", ".join(f"{key} {recorded[key]!r} (params.yaml: {params[key]!r})" for key in stale[:5])
    return [
        f"{base.label}'s committed results were made with other params than its params.yaml holds: {shown}. "
        "Commit dvc.lock and the results with each change (`dvc repro`, then `git add dvc.lock reports models`)"
    ]


def _same(value: Any, recorded: Any) -> bool:
    """Equal, or the same number: PyYAML reads `1e-4` as a string where DVC's YAML reads a float."""
    if value == recorded:
        return True
    try:
        return not isinstance(value, bool) and float(value) == float(recorded)
    except (TypeError, ValueError):
        return False


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# What changed: DVC's params and metrics diffs, and the code.


def _params_diff(project: Path, base_sha: str) -> dict[str, dict[str, Any]]:
    """`dvc params diff BASE`: per params file, each changed key's old and new value."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo, _dvc_errors("dvc params diff"):
        return repo.params.diff(a_rev=base_sha).get("diff", {})


def _metrics_diff(project: Path, base_sha: str) -> dict[str, dict[str, Any]]:
    """`dvc metrics diff BASE --all`: per metrics file, every metric's old, new and difference."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo, _dvc_errors("dvc metrics diff"):
        return repo.metrics.diff(a_rev=base_sha, all=True).get("diff", {})


@contextmanager
def _dvc_errors(what: str) -> Iterator[None]:
    """DVC's own errors (unparseable params or metrics at a revision, ...) as one line, not a traceback."""
    from dvc.exceptions import DvcException

    try:
        yield
    except DvcException as error:
        raise CannotCompare(f"{what}: {redact_url(str(error).strip().splitlines()[0])}") from None


def _code_changes(project: Path, base_sha: str) -> list[str]:
    """Files changed since the base (committed or not), apart from those the report shows elsewhere."""
    names = _git(project, "diff", "--name-only", base_sha, "--").splitlines()
    return [name for name in names if name and not name.startswith(RESULTS)]


# The remote and the reproduction.


def _check_remote(project: Path, base: Revision) -> str | None:
    """Raise CannotCompare when the default DVC remote gives none of the outputs the base revision
    recorded, this change kept and this machine lacks (`dvc status --cloud`): it cannot be reached, or
    nothing was pushed to it, and reproducing would rebuild every stage from scratch. Outputs this
    change made anew (a dvc.lock committed without `dvc push`) are simply rebuilt. Returns a note when
    there is no remote to pull from."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            return "no default DVC remote: nothing could be pulled, every stage whose outputs are not here ran"
        remote = f"DVC remote {name!r} ({redact_url(repo.config['remote'][name].get('url', '?'))})"
        try:
            status = repo.status(cloud=True)
        except Exception as error:  # every storage client raises its own errors
            detail = redact_url(f"{type(error).__name__}: {error}".strip().splitlines()[0])
            raise CannotCompare(f"{remote} cannot be reached ({detail}); {NOT_REBUILT}") from None
    kept = _kept_outputs(base, project)
    missing = [path for path, state in status.items() if state == "missing" and _under(path, kept)]
    if missing and "deleted" not in status.values():
        raise CannotCompare(
            f"{remote} cannot be reached, or was never pushed to (`dvc push` on the base branch): it holds none of "
            f"the {len(missing)} outputs the base revision recorded that are missing here; {NOT_REBUILT}"
        )
    return None


def _recorded_outputs(lock: dict[str, Any]) -> set[tuple[str, str | None]]:
    """(path, md5) of every stage output a dvc.lock records."""
    stages = (lock.get("stages") or {}).values()
    return {(out.get("path"), out.get("md5")) for stage in stages for out in stage.get("outs") or []}


def _kept_outputs(base: Revision, project: Path) -> set[str]:
    """The outputs the base revision's dvc.lock records with the same content as this change's."""
    here = yaml.safe_load((project / LOCK).read_text(encoding="utf-8")) if (project / LOCK).is_file() else {}
    return {path for path, _ in _recorded_outputs(base.lock()) & _recorded_outputs(here or {}) if path}


def _under(path: str, outputs: set[str]) -> bool:
    return any(path == out or path.startswith(f"{out}/") for out in outputs)


NOT_REBUILT = (
    "nothing was reproduced, rather than every stage rebuilt from scratch. Check the remote's credentials "
    "(repository secrets in CI) and network"
)


_RAN = re.compile(r"Running stage '([^']+)'")
_OUTCOMES = (
    (re.compile(r"Unable to pull data for stage: '([^']+)'"), "ran, not in the remote"),
    (re.compile(r"Stage '([^']+)' is cached - skipping run"), "restored from the run cache"),
    (re.compile(r"Pulling data for stage: '([^']+)'"), "pulled from the remote"),
    (re.compile(r"^(?:Stage )?'([^']+)' didn't change, skipping"), "up to date"),
    (re.compile(r"Importing '.*' -> '([^']+)'"), "fetched"),
)
_ERROR = re.compile(r"^(signflow \w+: error: |ERROR: )")


def _reproduce(project: Path, result: CiResult) -> None:
    """`dvc repro --pull`, its output passed through to ours; records each stage's outcome, and the
    failing step's message when it fails."""
    tail: deque[str] = deque(maxlen=40)
    outcomes: dict[str, str] = {}
    started = time.monotonic()
    command = [sys.executable, "-m", "dvc", "repro", "--pull"]  # this environment's DVC, activated or not
    with subprocess.Popen(
        command, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            tail.append(line.rstrip("\n"))
            _record_outcome(line.strip(), outcomes)
    result.repro_seconds = time.monotonic() - started
    result.stages = [StageOutcome(stage, outcome) for stage, outcome in outcomes.items()]
    rebuilt = [stage.stage for stage in result.stages if stage.outcome == "ran, not in the remote"]
    if rebuilt:
        result.notes.append(
            f"rebuilt because the DVC remote holds no copy of their outputs: {', '.join(rebuilt)} "
            "(push from the base branch, `dvc push`, to reuse them)"
        )
    result.reproduced = process.returncode == 0
    if process.returncode != 0:
        result.output_tail = [redact_url(line) for line in tail]
        result.problem = f"the pipeline failed ({' '.join(command)}, exit {process.returncode}): {_why(tail)}"
        result.exit_code = EXIT_PIPELINE_FAILED


def _record_outcome(line: str, outcomes: dict[str, str]) -> None:
    """DVC says, in order: pulling a stage's data, unable to (then it runs), running it; or up to date."""
    if ran := _RAN.search(line):
        if outcomes.get(ran.group(1)) != "ran, not in the remote":
            outcomes[ran.group(1)] = "ran"
        return
    for pattern, outcome in _OUTCOMES:
        if found := pattern.search(line):
            outcomes["data.dvc" if outcome == "fetched" else found.group(1)] = outcome
            return


def _why(tail: deque[str]) -> str:
    """The failing step's own message (`signflow train: error: ...`), else DVC's last error line."""
    errors = [line for line in tail if _ERROR.match(line)]
    mine = [line for line in errors if line.startswith("signflow ")]
    return redact_url((mine or errors or list(tail)[-1:] or ["no output"])[-1])


# Comparing the accuracies on the same test images.


def compare_accuracy(project: Path, base: Revision, head: Revision, params: Params, scratch: Path) -> Comparison:
    """Both test accuracies on the same images: the committed ones when the test split is the same, else
    both models scored on the new test images the base model never trained on."""
    base_metrics, head_metrics = base.metrics(), head.metrics() or {}
    accuracy = head_metrics.get("accuracy")
    if base_metrics is None:
        return Comparison(None, accuracy, 0, f"{base.label} holds no {METRICS}")
    images = int(head_metrics.get("test_images", 0))
    if _split_hash(base) is not None and _split_hash(base) == _split_hash(head):
        return Comparison(base_metrics["accuracy"], accuracy, images, "the same test split (data/split unchanged)")
    base_split = _read_base_split(project, base, scratch / "base-split")
    if fingerprint_test_set(base_split) == fingerprint_test_set(project / SPLIT):
        same = "the same test images (the split changed, its test images did not)"
        return Comparison(base_metrics["accuracy"], accuracy, images, same)
    return _rescore(project, base, base_split, params, scratch)


def _split_hash(revision: Revision) -> str | None:
    outs = ((revision.lock().get("stages") or {}).get("split") or {}).get("outs") or []
    return next((out.get("md5") for out in outs if out.get("path") == SPLIT), None)


def _read_at(project: Path, rev: str, path: str, label: str) -> bytes:
    """A DVC-tracked file as `rev` records it, from the local cache or the remote."""
    import dvc.api

    try:
        with dvc.api.open(path, repo=str(project), rev=rev, mode="rb") as handle:
            return handle.read()
    except Exception as error:  # not in the remote, unreachable, not tracked: all the same here
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CannotCompare(f"{path} as {label} recorded it could not be read ({redact_url(first)})") from None


def _read_base_split(project: Path, base: Revision, folder: Path) -> Path:
    for name in ("train", "valid", "test"):
        _write_bytes(folder / f"{name}.csv", _read_at(project, base.sha, f"{SPLIT}/{name}.csv", base.label))
    return folder


def _rescore(project: Path, base: Revision, base_split: Path, params: Params, scratch: Path) -> Comparison:
    seen = set(read_manifest(base_split, "train")["sha256"]) | set(read_manifest(base_split, "valid")["sha256"])
    common = _unseen_test_rows(project / SPLIT, seen)
    if common.empty:
        return Comparison(None, None, 0, f"every new test image was in {base.label}'s train or valid split")
    split = scratch / "split"
    split.mkdir(parents=True, exist_ok=True)
    common.to_csv(split / "test.csv", index=False)
    for name in ("classes.json", "report.json"):
        if (project / SPLIT / name).is_file():
            shutil.copy(project / SPLIT / name, split / name)
    model = scratch / "base-model.pt"
    _write_bytes(model, _read_at(project, base.sha, MODEL, base.label))
    try:
        base_accuracy = _score(params, model, project, split, scratch / "base")
    except SignflowError as error:
        return Comparison(None, None, len(common), f"{base.label}'s model cannot score the new test split: {error}")
    accuracy = _score(params, project / MODEL, project, split, scratch / "head")
    how = (
        f"the {len(common)} new test images (of {_count(project)}) that {base.label}'s model never trained on, both "
        "models scored by this change's evaluation code: the test split changed, so the committed accuracies are "
        "on different images"
    )
    return Comparison(base_accuracy, accuracy, len(common), how)


def _unseen_test_rows(split_dir: Path, seen: set[str]):
    """The test rows whose image, or a near-duplicate of it, was not in `seen` (content hashes)."""
    manifests = [read_manifest(split_dir, name) for name in ("train", "valid", "test")]
    hashes = {row.path: row.sha256 for manifest in manifests for row in manifest.itertuples()}
    excluded = {path for path, digest in hashes.items() if digest in seen}
    for cluster in read_split_report(split_dir).get("near_duplicates", {}).get("clusters", []):
        if excluded.intersection(cluster["images"]):
            excluded.update(cluster["images"])
    test = manifests[2]
    return test[~test["path"].isin(excluded)]


def _count(project: Path) -> int:
    return len(read_manifest(project / SPLIT, "test"))


def _score(params: Params, model: Path, project: Path, split: Path, reports: Path) -> float:
    from signflow.evaluate import evaluate

    read_class_names(split)  # a missing class list is the split's error, not the model's
    return evaluate(params.evaluate, model, project / RAW, split, reports, None).accuracy


# The gates.


def check_gates(gates: CiConfig, comparison: Comparison | None, metrics: dict[str, Any]) -> list[str]:
    """The reasons the change may not merge (empty: it may)."""
    failures = []
    if comparison is not None and comparison.base_accuracy is not None and comparison.accuracy is not None:
        drop = comparison.base_accuracy - comparison.accuracy
        if drop > gates.max_accuracy_drop + 1e-9:
            failures.append(
                f"test accuracy fell by {drop:.4f} ({comparison.base_accuracy:.4f} -> {comparison.accuracy:.4f} on "
                f"{comparison.test_images} test images), more than ci.max_accuracy_drop {gates.max_accuracy_drop:g}"
            )
    near, images = metrics.get("test_near_duplicates_in_train"), int(metrics.get("test_images") or 0)
    if near is None:
        failures.append(
            "the test split was not checked for near-duplicates of train images (split.near_duplicates: off), "
            "so its accuracy may measure memory: set split.near_duplicates to group"
        )
    elif images and near / images > gates.max_test_near_duplicate_fraction + 1e-9:
        failures.append(
            f"the split is not honest: {near} of {images} test images ({near / images:.1%}) have a near-duplicate in "
            f"train, more than ci.max_test_near_duplicate_fraction {gates.max_test_near_duplicate_fraction:g} "
            "(split.near_duplicates: group keeps each cluster in one split)"
        )
    return failures
