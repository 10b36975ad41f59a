"""The model `signflow serve` answers with, swapped for the new version when a registry alias moves.

`signflow serve --model champion` follows the alias: every `poll_s` seconds it asks the registry
which version `champion` names. When that changes, the new version is downloaded and loaded whole,
and must classify a test image, before one assignment makes it the live model: a request reads the
live model once, so requests in flight finish on the old one. A version that fails any of that
never goes live; it is not tried again until the alias moves once more, and /info says why it was
refused. A worse model never gets here: the register step moves `champion` only to a better one.
(`mlflow models serve` serves one fixed version: MLflow issue 4039.)
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["LiveModel"]

DEFAULT_POLL_S = 5.0


class LiveModel:
    """The served model (`current`), and the follower thread that replaces it.

    `open_version(spec)` is a context manager yielding a loaded ServedModel (signflow.serve's
    `open_served_model` bound to the params file); its exit removes the version's downloaded files."""

    def __init__(
        self,
        opener: Callable[[str], AbstractContextManager[Any]] | None,
        spec: str,
        follow_alias: str | None,
        poll_s: float = DEFAULT_POLL_S,
        served: Any = None,
        registry: tuple[str, str] | None = None,
        wait_on: tuple[type[Exception], ...] = (),
    ):
        """`registry` is (model name, tracking URI) of a followed alias. When opening the first model
        raises one of `wait_on` (the alias names no version yet), nothing is served until it does."""
        self._opener, self.follows, self.poll_s = opener, follow_alias, poll_s
        self.name, self.tracking_uri = registry or (getattr(served, "name", spec), None)
        self._stack = ExitStack()
        self.swap_error: str | None = None
        try:
            self.current = served if served is not None else self._stack.enter_context(opener(spec))
        except wait_on as error:
            if not follow_alias:
                raise
            log.warning("%s", error)
            self.current = None
            self.swap_error = f"no model served yet: the registry has no {follow_alias!r} version; capture and train"
        self._refused: str | None = None
        self._last_warning: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.follows and self._thread is None:
            self._thread = threading.Thread(target=self._follow, name="signflow-follow", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self._stack.close()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as error:  # noqa: BLE001 - a registry hiccup must not end the follower
                if str(error) != self._last_warning:  # once, not every poll
                    log.warning("cannot follow %s: %s", self.follows, error)
                self._last_warning = str(error)
            else:
                self._last_warning = None

    def check(self) -> bool:
        """Swap to the version the alias names if it changed and loads; True when it swapped."""
        from signflow._mlflow import find_version, mlflow_client

        served, tracking_uri = self.current, self.tracking_uri
        version = str(find_version(mlflow_client(tracking_uri), self.name, self.follows, tracking_uri).version)
        if version in (served and served.version, self._refused):
            return False
        stack = ExitStack()
        try:
            candidate = stack.enter_context(self._opener(version))
            smoke_test(candidate)
        except Exception as error:  # noqa: BLE001 - whatever a broken version raises, it stays out
            stack.close()
            self._refused = version
            self.swap_error = f"version {version} ({self.follows}) was not served: {error}"
            log.warning("%s; still serving version %s", self.swap_error, served and served.version)
            return False
        old, self._stack = self._stack, stack
        self.current, self.swap_error, self._refused = candidate, None, None
        log.info("%s moved: now serving %s (was version %s)", self.follows, candidate.source, served and served.version)
        old.close()  # its files only: requests still holding the old model keep it in memory
        return True


def smoke_test(served: Any) -> None:
    """The version must classify a plain test image before it goes live."""
    import base64

    import pandas as pd
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 100, 90)).save(buffer, "JPEG")
    frame = pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode("ascii")]})
    row = served.model.predict(frame, params={"top_k": 1}).iloc[0]
    if row["error"] or not list(row["classes"]):
        raise RuntimeError(f"it cannot classify a test image ({row['error']})")
