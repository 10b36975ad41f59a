"""The GitHub workflows pass actionlint (syntax, expressions, runner and action versions) and zizmor,
offline (actions pinned to a commit, least permissions, no credentials left in the checkout, no
template injection). Both tools are in the dev extra; the tests skip only where they are missing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

WORKFLOWS = sorted(str(path) for path in (ROOT / ".github" / "workflows").glob("*.yml"))


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return found


def test_there_are_workflows_to_check():
    assert {Path(path).name for path in WORKFLOWS} >= {"ci.yml", "train.yml"}


def test_the_workflows_pass_actionlint():
    done = subprocess.run([_tool("actionlint"), *WORKFLOWS], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_workflows_pass_zizmor():
    done = subprocess.run([_tool("zizmor"), "--offline", *WORKFLOWS], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed to parse" not in done.stderr, done.stderr
