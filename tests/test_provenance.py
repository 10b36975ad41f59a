"""Where a registered model came from: the commit is `-dirty` only when source code changed."""

import subprocess

from signflow._provenance import git_commit


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_commit_is_dirty_only_when_source_files_changed(tmp_path):
    for path, text in {
        "signflow/train.py": "x = 1\n",
        "dvc.lock": "stages: {}\n",
        "reports/metrics.json": "{}\n",
        "params.yaml": "a: 1\n",
    }.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "init")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()

    (tmp_path / "dvc.lock").write_text("stages: {train: {}}\n")  # what every pipeline run changes
    (tmp_path / "reports" / "metrics.json").write_text('{"accuracy": 1}\n')
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert git_commit(tmp_path) == head

    (tmp_path / "signflow" / "train.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == f"{head}-dirty"
    assert git_commit(tmp_path / "signflow" / "..") == f"{head}-dirty"


def test_outside_git_the_commit_is_none(tmp_path):
    assert git_commit(tmp_path) == "none"
