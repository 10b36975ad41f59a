"""signflow: reproducible transfer learning for small image-classification datasets.

The package holds the plain library functions (no Prefect import). `tasks/` wraps them as
Prefect tasks, `flows/` composes those, and `signflow.cli` exposes them to `dvc.yaml`.

Public modules are named after what they do: one per pipeline step (`download`, `split`, `train`,
`evaluate`, `export`, `register`), plus `predict`, `sweep`, `config`, `layout`, `errors` and `cli`;
each lists its API in `__all__`. Modules whose names start with `_` are helpers of these and may
change without notice.
"""

__version__ = "0.1.0"
