"""What the benchmark scripts share: the pipeline's stages, a timed `dvc repro`, percentiles."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from signflow.layout import STAGES


@dataclass
class ReproTiming:
    """When `dvc repro` started, how long it took, and when DVC printed each "Running stage" line
    (a step's seconds run from its line to the next: DVC's start-up and hashing count towards the
    step they precede or follow)."""

    start: float
    total: float = 0.0
    marks: list[tuple[str, float]] = field(default_factory=list)

    def step_seconds(self) -> dict[str, float]:
        ends = [at for _, at in self.marks[1:]] + [self.start + self.total]
        begins = [self.start] + [at for _, at in self.marks[1:]]
        return {name: round(end - begin, 1) for (name, _), begin, end in zip(self.marks, begins, ends, strict=True)}


def timed_repro(
    project: Path,
    on_start: Callable[[subprocess.Popen], None] = lambda process: None,
    on_stage: Callable[[str, float], None] = lambda name, at: None,
) -> ReproTiming:
    """Run `dvc repro` in `project`; exit with the end of its stderr if it fails or runs other stages."""
    errors = project / "repro-stderr.log"
    timing = ReproTiming(time.perf_counter())
    with (
        errors.open("w") as stderr,
        subprocess.Popen(["dvc", "repro"], cwd=project, stdout=subprocess.PIPE, stderr=stderr, text=True) as process,
    ):
        on_start(process)
        for line in process.stdout:
            if match := re.match(r"Running stage '([\w-]+)'", line):
                timing.marks.append((match.group(1), time.perf_counter()))
                on_stage(match.group(1), time.perf_counter() - timing.start)
    timing.total = time.perf_counter() - timing.start
    if process.returncode != 0:
        tail = "".join(errors.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"dvc repro failed (exit {process.returncode}); the end of its stderr:\n{tail}")
    ran = [name for name, _ in timing.marks]
    if sorted(ran) != sorted(STAGES):
        raise SystemExit(f"dvc repro ran stages {ran}, expected {list(STAGES)}")
    return timing


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]
