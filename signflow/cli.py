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
from signflow._capture import CLIENT_BUCKET_SECONDS, CLIENT_BURST_FRAMES, CLIENT_FRAMES_PER_SECOND
from signflow._capture import DEFAULT_MAX_BYTES as DEFAULT_CAPTURE_BYTES
from signflow._stack_cli import add_stack_parser, run_stack
from signflow.config import ConfigError, Params, load_params
from signflow.errors import SignflowError
from signflow.project import hold_run_lock

log = logging.getLogger("signflow")


def cmd_extract(params: Params, args: argparse.Namespace):
    from signflow.extract import extract_dataset

    return extract_dataset(args.source, args.raw, params.extract)


def cmd_split(params: Params, args: argparse.Namespace):
    from signflow.split import split_dataset

    return split_dataset(args.raw, args.split, params.split)


def cmd_train(params: Params, args: argparse.Namespace):
    from signflow.train import train_model

    return train_model(params.train, args.raw, args.split, args.model, args.train_log, args.cache)


def cmd_evaluate(params: Params, args: argparse.Namespace):
    from signflow.evaluate import evaluate

    return evaluate(params.evaluate, args.model, args.raw, args.split, args.reports, args.train_log)


def cmd_export(params: Params, args: argparse.Namespace):
    from signflow.export import export_onnx

    return export_onnx(params.export, args.model, args.onnx, args.raw, args.split, args.export_figures)


def cmd_register(params: Params, args: argparse.Namespace):
    from signflow.layout import ModelOutputs
    from signflow.register import register_run

    outputs = ModelOutputs(reports=args.reports, onnx=args.onnx, model_card=args.card, receipt=args.receipt)
    return register_run(params, args.model, outputs, project_dir=args.project_dir, split_dir=args.split)


def cmd_sweep(params: Params, args: argparse.Namespace):
    from signflow.sweep import sweep

    return sweep(args.params, args.raw, args.split, args.sweep_dir, args.project_dir, args.cache)


def _add_paths(parser: argparse.ArgumentParser, *names: str) -> None:
    here, outputs = layout.Workspace(), layout.Workspace().outputs
    options = {
        "source": ("--source", here.source, "the fetched source data.dvc records (an archive or a folder)"),
        "raw": ("--raw", here.raw, "raw dataset folder (<class>/<images>)"),
        "split": ("--split", here.split, "folder of split manifests"),
        "model": ("--model", here.model, "model file"),
        "train_log": ("--train-log", here.train_log, "per-epoch metrics CSV"),
        "reports": ("--reports", outputs.reports, "folder for metrics, tables and plots"),
        "receipt": ("--receipt", outputs.receipt, "JSON record of the registered version"),
        "onnx": ("--onnx", outputs.onnx, "ONNX model file"),
        "export_figures": (
            "--export-figures",
            outputs.onnx.with_name("export.json"),
            "JSON of the float and int8 models' size, latency and test accuracy",
        ),
        "card": ("--card", outputs.model_card, "model card (markdown)"),
        "sweep_dir": ("--sweep-dir", here.sweep, "folder for trials, comparison table and the winner"),
        "cache": (
            "--cache-dir",
            here.cache,
            f"folder for decoded images and frozen features kept between runs (${layout.CACHE_ENV} sets it too)",
        ),
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
    "extract": (
        cmd_extract,
        "extract the fetched source (data/source, see data.dvc) safely into the raw dataset folder: class "
        "folders found, junk left out",
        ("source", "raw"),
    ),
    "split": (
        cmd_split,
        "check every image, find near-duplicates and write train/valid/test manifests (split.strategy: the "
        "dataset's own split folders, stratified random, or by a group key from the file paths)",
        ("raw", "split"),
    ),
    "train": (
        cmd_train,
        "fine-tune train.model and keep the checkpoint best on validation",
        ("raw", "split", "model", "train_log", "cache"),
    ),
    "evaluate": (
        cmd_evaluate,
        "score the model on the test split and write the report: metrics, per-class table, confusion "
        "matrix, learning curves, most confident mistakes, calibration",
        ("model", "raw", "split", "reports", "train_log"),
    ),
    "export": (
        cmd_export,
        "write the model as ONNX (checked against PyTorch to export.tolerance) and, with export.int8, its int8 "
        "model beside it, kept only when its test accuracy is within export.int8_max_accuracy_drop",
        ("model", "onnx", "raw", "split", "export_figures"),
    ),
    "register": (
        cmd_register,
        "register the model (and its ONNX file) in MLflow, write its model card, and move the champion "
        "alias if it is better",
        ("model", "reports", "receipt", "project_dir", "split", "onnx", "card"),
    ),
    "sweep": (
        cmd_sweep,
        "train every combination of sweep.grid (or, with sweep.method: optuna, the trials an Optuna search "
        "draws from sweep.space) on the split, compare them, and evaluate and register the winner (best "
        "validation accuracy); finished trials are skipped on a rerun",
        ("raw", "split", "sweep_dir", "project_dir", "cache"),
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
    add_serve_parser(commands)
    add_source_parser(commands)
    add_ci_parser(commands)
    add_stack_parser(commands)
    add_work_pool_parsers(commands)
    return parser


WORK_POOL_COMMANDS = {
    "deploy": "deploy the pipeline to the Prefect work pool schedule.work_pool with params.yaml's schedule "
    "(flows/deploy.py; --help for its options)",
    "worker": "run the work pool's pipeline runs in this checkout (flows/worker.py; --help for its options)",
}


def add_work_pool_parsers(commands) -> None:
    """`signflow deploy` and `signflow worker` hand their arguments to flows/deploy.py and flows/worker.py,
    which parse them (flows/ is not installed: it is imported from --project-dir, default .)."""
    for name, help_text in WORK_POOL_COMMANDS.items():
        commands.add_parser(name, help=help_text, description=help_text, add_help=False)


def run_work_pool_command(command: str, argv: list[str]) -> int:
    import importlib

    project = Path(".")
    for index, arg in enumerate(argv):
        if arg == "--project-dir" and index + 1 < len(argv):
            project = Path(argv[index + 1])
        elif arg.startswith("--project-dir="):
            project = Path(arg.split("=", 1)[1])
    if not (project / "flows" / f"{command}.py").is_file():
        print(
            f"signflow {command}: error: no flows/{command}.py in {project.resolve()}: run it in a checkout of "
            "the project (or give --project-dir)",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(project.resolve()))
    return importlib.import_module(f"flows.{command}").main(argv, prog=f"signflow {command}")


def _add_model_arguments(sub: argparse.ArgumentParser, paths_help: str) -> None:
    """--model (a registry alias or version, or a path) and --params (where the registry settings are)."""
    sub.add_argument(
        "--model",
        default="champion",
        help=f"a registry alias or version number of register.model_name (default: champion), or {paths_help}",
    )
    sub.add_argument(
        "--params",
        type=Path,
        default=layout.PARAMS,
        help="params file for the registry settings (default: params.yaml)",
    )


def add_predict_parser(commands) -> None:
    help_text = "print the top-k classes of images (files or folders) with a trained or registered model"
    sub = commands.add_parser(
        "predict",
        help=help_text,
        description=help_text + ". The preprocessing and class list come from the model file itself. "
        "Exits 1 when some file could not be read (the others are still predicted).",
    )
    sub.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders (recursive)")
    _add_model_arguments(sub, "a path to a .pt / .onnx model file or a folder holding model.pt / model.onnx")
    sub.add_argument("--top-k", type=int, default=3, help="classes per image (default: 3)")
    sub.add_argument(
        "--backend",
        choices=("auto", "torch", "onnx"),
        default="auto",
        help="auto (default) = ONNX Runtime when an .onnx of the same weights is there, else PyTorch",
    )
    sub.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward pass (default: 32)")
    sub.add_argument("--csv", type=Path, help="also write path,rank,class,probability,error rows to this CSV")


def _positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1; anything else is argparse's one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_serve_parser(commands) -> None:
    help_text = "open a web page that classifies camera frames (or an uploaded photo) with a registered model"
    sub = commands.add_parser(
        "serve",
        help=help_text,
        description=help_text + ". Open the address it prints, allow the camera and hold up a sign: the top 3 "
        "classes update a few times a second. The model runs with ONNX Runtime from the version's MLflow model. "
        "Stop with Ctrl-C.",
    )
    _add_model_arguments(sub, "an MLflow model folder, or an exported .onnx file (or a folder holding model.onnx)")
    sub.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1; browsers allow the camera only on localhost or HTTPS)",
    )
    sub.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sub.add_argument(
        "--capture-dir",
        type=Path,
        default=None,
        help="turn on capture mode: the page records bursts of frames into DIR/<class>/ and its Train button runs "
        "`dvc repro` on them in the project of --params (off unless given)",
    )
    max_mb = DEFAULT_CAPTURE_BYTES // 2**20
    sub.add_argument(
        "--capture-max-mb",
        type=int,
        default=max_mb,
        help=f"largest total size of the capture folder (default: {max_mb})",
    )
    sub.add_argument(
        "--capture-client-fps",
        type=_positive_int,
        default=int(CLIENT_FRAMES_PER_SECOND),
        metavar="FRAMES",
        help=f"frames a second one client address may save, sustained; it may send {CLIENT_BURST_FRAMES} at once, "
        f"or {CLIENT_BUCKET_SECONDS} seconds' worth if more (default: {CLIENT_FRAMES_PER_SECOND:g}, the page's top "
        "recording rate; behind a reverse proxy all clients share one address)",
    )
    sub.add_argument(
        "--follow-every",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often to ask the registry which version the --model alias names; a new one goes live without a "
        "restart (default: 5)",
    )


def run_serve(args: argparse.Namespace) -> int:
    from signflow.serve import serve

    capture_bytes = args.capture_max_mb * 2**20
    serve(
        args.model,
        args.params,
        args.host,
        args.port,
        args.capture_dir,
        capture_bytes,
        args.follow_every,
        capture_client_fps=args.capture_client_fps,
    )
    return 0


def add_source_parser(commands) -> None:
    help_text = "show, check or change where the raw dataset comes from (data.dvc)"
    sub = commands.add_parser(
        "source",
        help=help_text,
        description=help_text + ". data.dvc is DVC's record of the source: a URL or path, and the hash of "
        "what was fetched. `dvc repro` fetches it again only when it changed.",
    )
    actions = sub.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="say whether the source has new data, without downloading it",
        description="Print the source, the version fetched, and whether the source changed since (a HEAD "
        "request for https; nothing is downloaded). Exits 1 when the source cannot be reached.",
    )
    change = actions.add_parser(
        "set",
        help="point data.dvc at another URL or path and fetch it",
        description="Write URL_OR_PATH into data.dvc and fetch it (`dvc update data.dvc`); then `dvc repro` "
        "reruns what depends on the data. URL_OR_PATH: an archive (zip, tar, tar.gz/bz2/xz) at an https:// "
        "URL (one file, not a folder), or any URL DVC can import (s3://, gs://, ... with the matching "
        "dvc plugin); or a local archive or folder of class folders (a path outside the project is kept "
        "absolute, one inside it relative). If the fetch fails, data.dvc is left as it was.",
    )
    change.add_argument("url", metavar="URL_OR_PATH")
    change.add_argument("--no-fetch", action="store_true", help="only write data.dvc; the next `dvc repro` fetches")
    for parser in (check, change):
        parser.add_argument("--project-dir", type=Path, default=Path("."), help="project root holding data.dvc")


def run_source(args: argparse.Namespace) -> int:
    from signflow import source

    if args.action == "set":
        with hold_run_lock(args.project_dir):
            result = source.set_source(args.project_dir, args.url, fetch=not args.no_fetch)
        print(result.note)
        print("Next: `git add data.dvc && git commit`, then `dvc repro`.")
        return 0
    record, state = source.check_source(args.project_dir)
    print(f"source: {source.redact_url(record.url)}\nfetched: {record.version or 'not yet'}\nstate: {state}")
    if state == source.CHANGED:
        print("`dvc repro` fetches the new data and reruns what depends on it.")
    return 1 if state == source.UNREACHABLE else 0


def add_ci_parser(commands) -> None:
    help_text = "reproduce a change as CI does, compare it with its base revision and say whether it may merge"
    sub = commands.add_parser(
        "ci",
        help=help_text,
        description=help_text + ". Runs `dvc repro --pull` (what the DVC remote holds is pulled, only the stages "
        "whose inputs changed run), then writes one Markdown report: the params, data and code that changed, "
        "what each stage did, `dvc metrics diff` and the confusion matrix and learning curves of both revisions, "
        "the model card. Exit status: 0 passed; 1 a gate of the base revision's ci: params failed (accuracy "
        "fell too far, or test images have near-duplicates in train); 2 bad params; 3 the pipeline failed; 4 "
        "the DVC remote or the base revision's files could not be read. The last line says why.",
    )
    sub.add_argument(
        "--base",
        metavar="REV",
        help="the revision to compare with (default: the merge-base of HEAD with origin/HEAD, origin/main, "
        "origin/master, main or master, the first that exists)",
    )
    sub.add_argument(
        "--report",
        type=Path,
        default=Path("ci-report/report.md"),
        help="the report to write; the figures go into REPORT_files/ beside it, and a copy without images "
        "into REPORT_summary.md (appended to $GITHUB_STEP_SUMMARY too when that is set) (default: ci-report/report.md)",
    )
    sub.add_argument("--project-dir", type=Path, default=Path("."), help="project root (default: .)")


def run_ci_command(args: argparse.Namespace) -> int:
    import os

    from signflow._ci_report import render_report
    from signflow.ci import EXIT_NOT_COMPARED, run_ci
    from signflow.fileio import write_text_atomic

    report = args.report.resolve()
    files = report.parent / f"{report.stem}_files"
    try:
        result = run_ci(args.project_dir, args.base, files)
    except ConfigError:
        raise
    except SignflowError as error:  # an unknown base revision, not a git repository: nothing to compare with
        print(f"signflow ci: failed: could not compare: {error}", flush=True)
        return EXIT_NOT_COMPARED
    summary = render_report(result, files.name, images=False)
    write_text_atomic(report, render_report(result, files.name, images=True))
    write_text_atomic(report.parent / f"{report.stem}_summary.md", summary)
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as job_summary:
            job_summary.write(summary)
    print(f"report: {report}", file=sys.stderr, flush=True)
    print(result.verdict, flush=True)
    return result.exit_code


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
    args, rest = build_parser().parse_known_args(argv)
    if args.command in WORK_POOL_COMMANDS:
        return run_work_pool_command(args.command, rest)
    if rest:
        build_parser().parse_args(argv)  # argparse's own message for the unrecognised arguments
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        # urllib3 logs each retry of a failing HTTP call; the outcome is what signflow reports, in one line
        logging.getLogger("urllib3").setLevel(logging.ERROR)
    try:
        if args.command == "predict":
            return run_predict(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "source":
            return run_source(args)
        if args.command == "ci":
            return run_ci_command(args)
        if args.command == "stack":
            return run_stack(args)
        with hold_run_lock(Path(args.params).parent):
            params = load_params(args.params)  # read once the lock is ours: the previous holder may have changed it
            result = COMMANDS[args.command][0](params, args)
    except SignflowError as error:
        print(f"signflow {args.command}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    _print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
