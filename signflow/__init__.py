"""signflow: reproducible transfer learning for small image-classification datasets.

The package holds the plain library functions (no Prefect import). `tasks/` wraps them as
Prefect tasks, `flows/` composes those, and `signflow.cli` exposes them to `dvc.yaml`.
"""

__version__ = "0.1.0"
