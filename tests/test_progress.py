"""Progress bars: drawn on a terminal, silent in files and CI logs (one log line per step there)."""

import io
import re

from signflow._progress import progress
from tests.helpers import ROOT


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_are_drawn_only_on_a_terminal():
    log_file = io.StringIO()
    assert list(progress(range(5), desc="epoch 1", file=log_file)) == [0, 1, 2, 3, 4]
    assert log_file.getvalue() == ""
    terminal = Terminal()
    list(progress(range(5), desc="epoch 1", file=terminal))
    assert "epoch 1" in terminal.getvalue() and "5/5" in terminal.getvalue()


def test_every_bar_goes_through_progress():
    direct = [
        path.relative_to(ROOT).as_posix()
        for folder in ("signflow", "tasks", "flows")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "_progress.py" and re.search(r"^\s*(from tqdm|import tqdm)", path.read_text(), re.M)
    ]
    assert direct == [], f"use signflow._progress.progress instead of tqdm in {direct}"
