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

    return evaluate(params.evaluate, args.model, args.raw, args.split, args.reports, args.train_log)


def cmd_export(params: Params, args: argparse.Namespace):
    from signflow.export import export_onnx

    return export_onnx(params.export, args.model, args.onnx)


def cmd_register(params: Params, args: argparse.Namespace):
    from signflow.layout import ModelOutputs
    from signflow.register import register_run

    outputs = ModelOutputs(reports=args.reports, onnx=args.onnx, model_card=args.card, receipt=args.receipt)
    return register_run(params, args.model, outputs, project_dir=args.project_dir, split_dir=args.split)


def cmd_sweep(params: Params, args: argparse.Namespace):
    from signflow.sweep import sweep

    return sweep(args.params, args.raw, args.split, args.sweep_dir, args.project_dir)


def _add_paths(parser: argparse.ArgumentParser, *names: str) -> None:
    here, outputs = layout.Workspace(), layout.Workspace().outputs
    options = {
        "raw": ("--raw", here.raw, "raw dataset folder (<class>/<images>)"),
        "split": ("--split", here.split, "folder of split manifests"),
        "model": ("--model", here.model, "model file"),
        "train_log": ("--train-log", here.train_log, "per-epoch metrics CSV"),
        "reports": ("--reports", outputs.reports, "folder for metrics, tables and plots"),
        "receipt": ("--receipt", outputs.receipt, "JSON record of the registered version"),
        "onnx": ("--onnx", outputs.onnx, "ONNX model file"),
        "card": ("--card", outputs.model_card, "model card (markdown)"),
        "sweep_dir": ("--sweep-dir", here.sweep, "folder for trials, comparison table and the winner"),
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
    "split": (
        cmd_split,
        "check every image, find near-duplicates and write train/valid/test manifests (split.strategy: the "
        "dataset's own split folders, stratified random, or by a group key from the file paths)",
        ("raw", "split"),
    ),
    "train": (
        cmd_train,
        "fine-tune train.model and keep the checkpoint best on validation",
        ("raw", "split", "model", "train_log"),
    ),
    "evaluate": (
        cmd_evaluate,
        "score the model on the test split and write the report: metrics, per-class table, confusion "
        "matrix, learning curves, most confident mistakes, calibration",
        ("model", "raw", "split", "reports", "train_log"),
    ),
    "export": (
        cmd_export,
        "write the model as ONNX (checked against PyTorch to export.tolerance)",
        ("model", "onnx"),
    ),
    "register": (
        cmd_register,
        "register the model (and its ONNX file) in MLflow, write its model card, and move the champion "
        "alias if it is better",
        ("model", "reports", "receipt", "project_dir", "split", "onnx", "card"),
    ),
    "sweep": (
        cmd_sweep,
        "train every combination of sweep.grid on the split, compare them, and evaluate and register the "
        "winner (best validation accuracy); finished trials are skipped on a rerun",
        ("raw", "split", "sweep_dir", "project_dir"),
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
    add_predict_parser(commands)
    return parser


def add_predict_parser(commands) -> None:
    help_text = "print the top-k classes of images (files or folders) with a trained or registered model"
    sub = commands.add_parser(
        "predict",
        help=help_text,
        description=help_text + ". The preprocessing and class list come from the model file itself. "
        "Exits 1 when some file could not be read (the others are still predicted).",
    )
    sub.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders (recursive)")
    sub.add_argument(
        "--model",
        default="champion",
        help="a registry alias or version number of register.model_name (default: champion), or a path to "
        "a .pt / .onnx model file or a folder holding model.pt / model.onnx",
    )
    sub.add_argument("--top-k", type=int, default=3, help="classes per image (default: 3)")
    sub.add_argument(
        "--backend",
        choices=("auto", "torch", "onnx"),
        default="auto",
        help="auto (default) = ONNX Runtime when an .onnx of the same weights is there, else PyTorch",
    )
    sub.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    sub.add_argument("--csv", type=Path, help="also write path,rank,class,probability,error rows to this CSV")
    sub.add_argument(
        "--params",
        type=Path,
        default=layout.PARAMS,
        help="params file for the registry settings (default: params.yaml)",
    )


def run_predict(args: argparse.Namespace) -> int:
    from signflow.predict import choose_predictor, model_files, predict_images, write_predictions_csv

    predictions = []
    with model_files(args.model, args.params) as (model_file, onnx_file, label):
        predictor = choose_predictor(model_file, onnx_file, args.backend)
        print(f"model: {label} ({predictor.backend} backend, {predictor.source})", file=sys.stderr)
        for prediction in predict_images(predictor, args.inputs, args.top_k, args.batch_size):
            if prediction.error:
                print(f"signflow predict: {prediction.path}: {prediction.error}", file=sys.stderr)
            else:
                print(prediction.line(), flush=True)
            predictions.append(prediction)
    if args.csv:
        write_predictions_csv(predictions, args.csv)
    failures = sum(p.error is not None for p in predictions)
    if failures:
        print(f"signflow predict: {failures} file(s) could not be read", file=sys.stderr)
    return 1 if failures else 0


def _print_result(result: object) -> None:
    if is_dataclass(result):
        print(json.dumps(asdict(result), indent=2, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "predict":
            return run_predict(args)
        params = load_params(args.params)
        result = COMMANDS[args.command][0](params, args)
    except SignflowError as error:
        print(f"signflow {args.command}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    _print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
