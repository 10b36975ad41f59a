"""Where each step reads and writes: the one place that names the project's files.

`dvc.yaml` names the same paths (tests check that its stages' deps and outs are exactly these),
every CLI command takes an option to change each one, and the Prefect flows and the sweep build
theirs from the same `Workspace` and `ModelOutputs`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CACHE",
    "CACHE_ENV",
    "DATA_DVC",
    "FIGURES",
    "METRICS",
    "ModelOutputs",
    "PARAMS",
    "REPORT_FILES",
    "REPORT_MARKDOWN",
    "RUNS",
    "RUN_LOCK",
    "STAGES",
    "TABLES",
    "Workspace",
    "winner_outputs",
]

STAGES = ("extract", "split", "train", "evaluate", "export", "register")
"""The pipeline's steps in order. Each word names the step's module (`signflow/<step>.py`), its DVC stage
and `signflow <step>` command, its Prefect task and its params.yaml section."""
PARAMS = Path("params.yaml")
RUN_LOCK = ".signflow-run.lock"
DATA_DVC = "data.dvc"
"""DVC's record of the raw dataset: its source (URL or path) and the hash of what was fetched."""
RUNS = "runs"
"""Override runs (Prefect `overrides`, `--set`) each get a workspace `runs/<flow run id>/` under here."""
CACHE = ".signflow-cache"
CACHE_ENV = "SIGNFLOW_CACHE_DIR"
"""Environment variable that moves every workspace's cache folder (e.g. to a larger disk)."""

METRICS = "metrics.json"
"""The evaluate step's headline metrics (test accuracy, macro F1, ...), in the reports folder."""
REPORT_MARKDOWN = "report.md"
TABLES = ("per_class.csv", "predictions.csv", "calibration.csv")
FIGURES = {
    "confusion matrix": "confusion.png",
    "learning curves": "learning_curves.png",
    "most confident mistakes": "mistakes.png",
    "reliability diagram": "reliability.png",
}
REPORT_FILES = (REPORT_MARKDOWN, *TABLES, *FIGURES.values())
"""Everything the evaluate step writes into the reports folder besides `METRICS`."""


@dataclass(frozen=True)
class ModelOutputs:
    """What evaluate, export and register write for one trained model."""

    reports: Path
    onnx: Path
    model_card: Path
    receipt: Path

    @property
    def metrics(self) -> Path:
        return self.reports / METRICS

    @property
    def report_markdown(self) -> Path:
        return self.reports / REPORT_MARKDOWN

    def report_files(self) -> list[Path]:
        """Every report file (metrics first), in the order they are attached to a registered version."""
        return [self.metrics, *(self.reports / name for name in REPORT_FILES)]


@dataclass(frozen=True)
class Workspace:
    """A project's files under `root`: the layout `dvc repro` and the Prefect flow both use."""

    root: Path = Path(".")
    cache_root: Path | None = None
    """Where `cache` lives when not under `root`: override runs share their project's cache."""

    @property
    def params(self) -> Path:
        return self.root / PARAMS

    @property
    def data_dvc(self) -> Path:
        return self.root / DATA_DVC

    @property
    def source(self) -> Path:
        """The fetched source as DVC keeps it (an archive file or a folder); `data.dvc` owns it."""
        return self.root / "data" / "source"

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def split(self) -> Path:
        return self.root / "data" / "split"

    @property
    def model(self) -> Path:
        return self.root / "models" / "model.pt"

    @property
    def train_log(self) -> Path:
        return self.root / "reports" / "train_log.csv"

    @property
    def outputs(self) -> ModelOutputs:
        return ModelOutputs(
            reports=self.root / "reports",
            onnx=self.root / "models" / "model.onnx",
            model_card=self.root / "models" / "model_card.md",
            receipt=self.root / "models" / "registered.json",
        )

    @property
    def sweep(self) -> Path:
        return self.root / "sweep"

    @property
    def run_lock(self) -> Path:
        return self.root / RUN_LOCK

    @property
    def runs(self) -> Path:
        return self.root / RUNS

    def override_run(self, run_id: str) -> Workspace:
        """The workspace of one override run: its own data/raw, data/split, models/ and reports/; the
        content-keyed cache is the project's (an entry is only reused for identical inputs)."""
        return Workspace(self.runs / run_id, cache_root=self.cache)

    @property
    def cache(self) -> Path:
        """Decoded images and frozen features the train step keeps between runs (see
        signflow._disk_cache): ignored by git and DVC, safe to delete when no run is going.
        `SIGNFLOW_CACHE_DIR` puts it elsewhere."""
        return Path(os.environ.get(CACHE_ENV) or self.cache_root or self.root / CACHE)


def winner_outputs(sweep_dir: Path) -> ModelOutputs:
    """Where the sweep's winner gets its report, ONNX file, model card and receipt."""
    folder = Path(sweep_dir) / "winner"
    return ModelOutputs(
        reports=folder / "reports",
        onnx=folder / "model.onnx",
        model_card=folder / "model_card.md",
        receipt=folder / "registered.json",
    )
