"""`signflow` command line: one sub-command per pipeline step, as `dvc.yaml` runs them.

Each command reads its own section of params.yaml, calls the same library function the Prefect
tasks call, and exits non-zero with a one-paragraph message (no traceback) on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path

from signflow import layout
from signflow.config import ConfigError, Params, load_params
from signflow.errors import SignflowError

log = logging.getLogger("signflow")


def cmd_download(params: Params, args: argparse.Namespace):
    from signflow.download import download_dataset

    return download_dataset(params.download, args.raw)


def cmd_split(params: Params, args: argparse.Namespace):
    from signflow.split import split_dataset

    return split_dataset(args.raw, args.split, params.split)


def cmd_train(params: Params, args: argparse.Namespace):
    from signflow.train import fine_tune

    return fine_tune(params.train, args.raw, args.split, args.model, args.train_log)


def cmd_evaluate(params: Params, args: argparse.Namespace):
    from signflow.evaluate import evaluate

    return evaluate(params.evaluate, args.model, args.raw, args.split, args.reports)


def cmd_register(params: Params, args: argparse.Namespace):
    from signflow.registry import register_run

    return register_run(params, args.model, args.reports, args.receipt, args.project_dir)


def _add_paths(parser: argparse.ArgumentParser, *names: str) -> None:
    options = {
        "raw": ("--raw", layout.RAW_DIR, "raw dataset folder (<class>/<images>)"),
        "split": ("--split", layout.SPLIT_DIR, "folder of split manifests"),
        "model": ("--model", layout.MODEL_PATH, "model file"),
        "train_log": ("--train-log", layout.TRAIN_LOG, "per-epoch metrics CSV"),
        "reports": ("--reports", layout.REPORTS_DIR, "folder for metrics, tables and plots"),
        "receipt": ("--receipt", layout.RECEIPT_PATH, "JSON record of the registered version"),
        "project_dir": (
            "--project-dir",
            Path("."),
            "project root: its dvc.lock gives the data version, git the commit",
        ),
    }
    for name in names:
        flag, default, help_text = options[name]
        parser.add_argument(flag, dest=name, type=Path, default=default, help=f"{help_text} (default: {default})")


COMMANDS: dict[str, tuple[Callable, str, tuple[str, ...]]] = {
    "download": (cmd_download, "fetch download.url, verify and extract it into the raw dataset folder", ("raw",)),
    "split": (cmd_split, "check every image and write stratified train/valid/test manifests", ("raw", "split")),
    "train": (
        cmd_train,
        "fine-tune train.model and keep the checkpoint best on validation",
        ("raw", "split", "model", "train_log"),
    ),
    "evaluate": (
        cmd_evaluate,
        "score the model on the test split: metrics, per-class table, confusion matrix",
        ("model", "raw", "split", "reports"),
    ),
    "register": (
        cmd_register,
        "register the model in MLflow and move the champion alias if it is better",
        ("model", "reports", "receipt", "project_dir"),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signflow",
        description="Reproducible transfer learning for folder-per-class image datasets. Each command is one "
        "pipeline step; `dvc repro` runs them all in order, `python -m flows.pipeline` runs them as a Prefect flow.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text, paths) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--params", type=Path, default=layout.PARAMS, help="params file (default: params.yaml)")
        _add_paths(sub, *paths)
    return parser


def _print_result(result: object) -> None:
    if is_dataclass(result):
        print(json.dumps(asdict(result), indent=2, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handler = COMMANDS[args.command][0]
    try:
        params = load_params(args.params)
        result = handler(params, args)
    except SignflowError as error:
        print(f"signflow {args.command}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    _print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
