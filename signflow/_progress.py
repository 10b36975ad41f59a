"""Progress bars for terminals only.

A tqdm bar written to a file or a CI log becomes hundreds of lines per epoch, so every bar in
signflow goes through `progress`, which draws it only when stderr is a terminal (tqdm's
`disable=None`); elsewhere the steps log one line per epoch, per cached view or per step instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress"]


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """tqdm(iterable, **kwargs), shown on a terminal only (unless `disable` is given)."""
    kwargs.setdefault("disable", None)
    return tqdm(iterable, **kwargs)
