"""`signflow ci` on a team's repository: git with a DVC remote (a local folder), the base commit
reproduced, pushed and committed with its results, and pull requests that each change one param, each
checked in a fresh clone as CI checks it. Plus the gates on their own, on made-up figures."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess

import pytest
import yaml

from signflow.ci import Comparison, Revision, check_gates, default_base, stale_results
from signflow.config import CiConfig
from tests.helpers import (
    add_near_duplicates,
    build_class_folders,
    make_project,
    pack_upstream_zip,
    tiny_params,
    venv_path,
)

BASE_TRAIN = {"epochs": 10, "lr": 0.003}
"""Enough for the tiny model to learn the three colours of the tiny dataset (accuracy 1.0 on its 9 test images
at 9 to 12 epochs; 0.67 to 0.89 at 6 to 8)."""
GATES = {"max_accuracy_drop": 0.25, "max_test_near_duplicate_fraction": 0.0}
"""Two of 9 test images may flip; a model that learns nothing (one class in three) may not pass."""
PULL_REQUESTS = {
    "pr-epochs": ("train", "epochs", 11),
    "pr-worse": ("train", "lr", 1.0e-7),
    "pr-leak": ("split", "near_duplicates", "report"),
}


def _run(command: list[str], cwd, env) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{command}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _edit_params(project, section: str, key: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def team_repo(tmp_path_factory):
    """A team's repository: `main` reproduced, pushed to the DVC remote and committed with dvc.lock and its
    results; one branch per pull request, each changing one param."""
    tmp = tmp_path_factory.mktemp("team")
    env = {**os.environ, "PATH": venv_path()}
    dataset = add_near_duplicates(build_class_folders(tmp / "dataset"), per_class=6)
    project = make_project(tmp, pack_upstream_zip(dataset, tmp / "dataset.zip"), **BASE_TRAIN)
    for key, value in GATES.items():
        _edit_params(project, "ci", key, value)
    _run(["git", "branch", "-M", "main"], project, env)
    _run(["dvc", "remote", "add", "-d", "store", str(tmp / "dvc-remote")], project, env)
    _run(["dvc", "repro"], project, env)
    _run(["dvc", "push"], project, env)
    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-qm", "main: reproduced and pushed"], project, env)
    for branch, (section, key, value) in PULL_REQUESTS.items():
        _run(["git", "checkout", "-qb", branch, "main"], project, env)
        _edit_params(project, section, key, value)
        _run(["git", "commit", "-qam", f"{section}.{key}: {value}"], project, env)
    # A pull request reproduced and committed with its dvc.lock and results, but never pushed.
    _run(["git", "checkout", "-qb", "pr-unpushed", "main"], project, env)
    _edit_params(project, "train", "epochs", 12)
    _run(["dvc", "repro"], project, env)
    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-qm", "train.epochs: 12, reproduced, not pushed"], project, env)
    _run(["git", "checkout", "-q", "-f", "main"], project, env)
    return project


def _ci(team_repo, branch: str, tmp_path, remote_url: str | None = None, pulled: tuple[str, ...] = ()):
    """Clone `branch` as CI does and run `signflow ci` there (base: the default, the merge-base with
    origin/HEAD, i.e. main); returns the clone and the finished process."""
    env = {**os.environ, "PATH": venv_path(), "GITHUB_STEP_SUMMARY": str(tmp_path / "job-summary.md")}
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", "--branch", branch, str(team_repo), str(clone)], tmp_path, env)
    if remote_url:
        _run(["dvc", "remote", "modify", "--local", "store", "url", remote_url], clone, env)
    if pulled:  # what a CI cache kept from earlier runs: the base's outputs are here already
        _run(["dvc", "pull", *pulled], clone, env)
    done = subprocess.run(["signflow", "ci"], cwd=clone, env=env, capture_output=True, text=True)
    return clone, done


def _last_line(done: subprocess.CompletedProcess) -> str:
    return done.stdout.rstrip().splitlines()[-1]


def _git_show(project, path: str) -> bytes:
    return subprocess.run(["git", "show", f"main:{path}"], cwd=project, capture_output=True, check=True).stdout


@pytest.mark.slow
def test_a_param_change_reruns_only_its_stages_and_is_reported_against_the_base(team_repo, tmp_path):
    clone, done = _ci(team_repo, "pr-epochs", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert set(re.findall(r"Running stage '(\w+)'", done.stdout)) == {"train", "evaluate", "export", "register"}
    pulled = set(re.findall(r"Pulling data for stage: '([\w.]+)'", done.stdout))
    assert {"data.dvc", "extract", "split"} <= pulled, "the rest came from the remote"
    assert "Importing" not in done.stdout, "the source was not fetched again"

    report = (clone / "ci-report" / "report.md").read_text()
    assert "| split | pulled from the remote |" in report and "| train | ran |" in report
    assert "| train.epochs | 10 | 11 |" in report, "the params diff"
    base_sha = _run(["git", "rev-parse", "--short=7", "origin/main"], clone, None).strip()
    base_accuracy = json.loads(_git_show(team_repo, "reports/metrics.json"))["accuracy"]
    accuracy = json.loads((clone / "reports" / "metrics.json").read_text())["accuracy"]
    compared = f"Test accuracy: {base_accuracy:.4f} (base {base_sha}) against {accuracy:.4f} (this change ("
    assert compared in report and "), on the same test split (data/split unchanged)." in report, "both accuracies"
    files = clone / "ci-report" / "report_files"
    for figure in ("confusion.png", "learning_curves.png"):
        for side, expected in (("base", _git_show(team_repo, f"reports/{figure}")), ("head", None)):
            assert f"](report_files/{side}/reports/{figure})" in report, "the image, inline"
            expected = expected or (clone / "reports" / figure).read_bytes()
            assert (files / side / "reports" / figure).read_bytes() == expected
    assert "### Model card" in report and "Model card: sign-language-digits" in report
    assert _last_line(done).startswith("signflow ci: passed") and report.rstrip().endswith(_last_line(done))

    summary = (tmp_path / "job-summary.md").read_text()
    assert "| train.epochs | 10 | 11 |" in summary and "![" not in summary, "the job summary: no image it cannot show"


@pytest.mark.slow
def test_a_change_that_drops_accuracy_past_the_margin_fails_saying_so(team_repo, tmp_path):
    clone, done = _ci(team_repo, "pr-worse", tmp_path)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert _last_line(done).startswith("signflow ci: failed: test accuracy fell by ")
    assert "more than ci.max_accuracy_drop 0.25" in _last_line(done)
    assert "| train.lr | 0.003 | 1e-07 |" in (clone / "ci-report" / "report.md").read_text()


@pytest.mark.slow
def test_a_change_that_leaks_near_duplicates_into_test_fails_saying_so(team_repo, tmp_path):
    clone, done = _ci(team_repo, "pr-leak", tmp_path)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the split is not honest: " in _last_line(done)
    assert "have a near-duplicate in train, more than ci.max_test_near_duplicate_fraction 0" in _last_line(done)
    report = (clone / "ci-report" / "report.md").read_text()
    rescored = r"\), on the \d+ new test images \(of 9\) that base \w+'s model never trained on"
    assert re.search(rescored, report), "both models scored on the test images the base never trained on"
    assert "the test split changed, so the committed accuracies are on different images" in report


@pytest.mark.slow
def test_an_unreachable_remote_fails_before_anything_is_rebuilt(team_repo, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    clone, done = _ci(team_repo, "pr-epochs", tmp_path, remote_url=f"http://127.0.0.1:{port}/dvc-remote")
    assert done.returncode == 4, done.stdout[-3000:] + done.stderr[-3000:]
    assert _last_line(done).startswith("signflow ci: failed: could not compare with base ")
    assert f"DVC remote 'store' (http://127.0.0.1:{port}/dvc-remote) cannot be reached" in _last_line(done)
    assert "Running stage" not in done.stdout, "nothing was trained from scratch"
    report = (clone / "ci-report" / "report.md").read_text()
    assert "| train.epochs | 10 | 11 |" in report and "Not known: the pipeline was not reproduced" in report


GATE = CiConfig(max_accuracy_drop=0.01, max_test_near_duplicate_fraction=0.05)
CLEAN = {"test_images": 310, "test_near_duplicates_in_train": 0}


@pytest.mark.parametrize(
    ("base", "head", "fails"),
    [(0.9968, 0.9903, False), (0.9968, 0.9839, True), (1.0, 0.99, False), (0.95, 0.99, False)],
)
def test_the_accuracy_gate_allows_the_margin_and_no_more(base, head, fails):
    failures = check_gates(GATE, Comparison(base, head, 310, "the same test split"), CLEAN)
    assert bool(failures) == fails, failures
    if fails:
        assert failures[0].startswith(f"test accuracy fell by {base - head:.4f} ({base:.4f} -> {head:.4f} on 310")


def test_accuracies_on_different_test_images_are_not_gated():
    assert check_gates(GATE, Comparison(None, 0.5, 0, "classes differ"), CLEAN) == []


@pytest.mark.parametrize(("near", "fails"), [(0, False), (15, False), (16, True)])
def test_the_near_duplicate_gate_counts_test_images_with_a_near_duplicate_in_train(near, fails):
    failures = check_gates(GATE, None, {"test_images": 310, "test_near_duplicates_in_train": near})
    assert bool(failures) == fails, failures
    if fails:
        assert failures[0].startswith(f"the split is not honest: {near} of 310 test images (5.2%)")


def test_a_split_that_did_not_look_for_near_duplicates_fails_the_honesty_gate():
    (failure,) = check_gates(GATE, None, {"test_images": 310})
    assert "was not checked for near-duplicates" in failure and "split.near_duplicates" in failure


def test_a_base_whose_results_were_made_with_other_params_is_noted(tmp_path):
    """A change merged without its dvc.lock leaves main's results older than its params: the report says so.
    PyYAML's `3e-3` (a string) and DVC's 0.003 are the same value, not a difference."""
    lock = {"stages": {"train": {"params": {"params.yaml": {"train": {"epochs": 12, "lr": 0.003}}}}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 8\n  lr: 3e-3\n")
    (note,) = stale_results(Revision("0" * 40, "base 0000000", tmp_path))
    assert "base 0000000's committed results were made with other params than its params.yaml holds" in note
    assert "train.epochs 12 (params.yaml: 8)" in note and "train.lr" not in note
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 12\n  lr: 3e-3\n")
    assert stale_results(Revision("0" * 40, "base 0000000", tmp_path)) == []


def test_the_default_base_is_where_the_branch_left_main_even_in_a_clone_of_the_branch(tmp_path):
    """A clone of a branch has origin/HEAD on that branch: the base is then where it left origin/main."""
    origin = tmp_path / "origin"
    origin.mkdir()
    for command in (["git", "init", "-q", "-b", "main"], ["git", "commit", "-q", "--allow-empty", "-m", "base"]):
        _run(command, origin, None)
    base = _run(["git", "rev-parse", "HEAD"], origin, None).strip()
    _run(["git", "checkout", "-qb", "pr"], origin, None)
    _run(["git", "commit", "-q", "--allow-empty", "-m", "change"], origin, None)
    _run(["git", "clone", "-q", str(origin), str(tmp_path / "clone")], tmp_path, None)
    assert _run(["git", "rev-parse", "origin/HEAD"], tmp_path / "clone", None).strip() != base
    assert default_base(tmp_path / "clone") == base


def test_an_unknown_base_revision_is_exit_4_with_what_to_do(tmp_path, capsys):
    from signflow.cli import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "params"]):
        _run(command, tmp_path, None)
    assert main(["ci", "--project-dir", str(tmp_path), "--base", "nope", "--report", str(tmp_path / "r.md")]) == 4
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith("signflow ci: failed: could not compare: base revision 'nope' is not a commit of")
    assert "fetch-depth: 0" in last


@pytest.mark.slow
def test_a_change_committed_without_dvc_push_is_rebuilt_not_called_unreachable(team_repo, tmp_path):
    """The base's outputs are here (a CI cache) and in the remote; the change's own are in neither: the
    remote is fine, and the stages whose outputs it lacks are rebuilt."""
    clone, done = _ci(team_repo, "pr-unpushed", tmp_path, pulled=("data.dvc", "extract", "split"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert set(re.findall(r"Running stage '(\w+)'", done.stdout)) == {"train", "evaluate", "export", "register"}
    assert "cannot be reached" not in done.stdout
