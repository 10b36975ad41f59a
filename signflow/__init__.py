"""signflow: reproducible transfer learning for small image-classification datasets.

The package holds the plain library functions (no Prefect import). `tasks/` wraps them as
Prefect tasks, `flows/` composes those, and `signflow.cli` exposes them to `dvc.yaml`.

Public modules: one per pipeline step, named like its DVC stage, command, Prefect task and params
section (`extract`, `split`, `train`, `evaluate`, `export`, `register`: `layout.STAGES`); the readers
of the split step's files for later steps (`split_files`); `predict`, `serve`, `source`, `sweep`;
and the plumbing `config`, `layout`, `project`, `dvc_state`, `fileio`, `errors`, `cli`. Each lists its
API in `__all__` (`cli` and `__main__` are entry points). Modules whose names start with `_` are
helpers used only inside this package and may change without notice.
"""

__version__ = "0.1.0"
