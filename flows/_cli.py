"""Command-line plumbing the flows share: the project options and one way to report errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import yaml

from signflow.config import ConfigError
from signflow.errors import SignflowError


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def add_project_arguments(parser: argparse.ArgumentParser, overrides_help: str | None) -> None:
    """--params, --project-dir and (unless `overrides_help` is None) --set KEY=VALUE."""
    parser.add_argument("--params", default="params.yaml", help="params file, relative to --project-dir")
    parser.add_argument("--project-dir", default=".", help="project root holding dvc.yaml (default: .)")
    if overrides_help is None:
        return
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=_parse_override,
        default=[],
        metavar="KEY=VALUE",
        help=overrides_help,
    )


def run_reporting_errors(prog: str, call: Callable[[], Any]) -> int:
    """Run a flow for a command line: exit 0, or one message and 2 (bad params) / 1 (other errors)."""
    try:
        call()
    except SignflowError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    except Exception as error:
        problem = describe_prefect_failure(error)
        if problem is None:
            raise
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 1
    return 0


def describe_prefect_failure(error: BaseException) -> str | None:
    """One line for a Prefect server that refuses the credentials or cannot be reached; None for
    any other error (which keeps its traceback)."""
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value() or "(PREFECT_API_URL is not set)"
    if isinstance(error, PrefectHTTPStatusError) and error.response.status_code in (401, 403):
        return (
            f"the Prefect server at {url} refused the credentials (HTTP {error.response.status_code}): set "
            "PREFECT_API_AUTH_STRING to its user:password (the team stack's is in stack.env)"
        )
    text = str(error)
    if "Failed to reach API" in text or "ConnectError" in type(error).__name__ or "Connection refused" in text:
        return f"the Prefect server at {url} cannot be reached: is it running, and is PREFECT_API_URL right?"
    return None
