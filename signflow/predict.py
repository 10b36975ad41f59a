"""Prediction: top-k classes for image files, with exactly the preprocessing the model was trained with.

A model is named by a path (a signflow `.pt` file, an exported `.onnx` file, or a folder holding
them) or by a registry alias or version number (`champion`, `3`), which is fetched from the MLflow
registry that the register step writes to. The class list and preprocessing always come from the
model file itself, never from the current params.

Two backends run the same model: PyTorch (`.pt`) and ONNX Runtime (`.onnx`). `auto` uses ONNX
Runtime when an `.onnx` file of the *same* weights is available (bench/predict_latency.py measures it
faster on the CPU), else PyTorch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from signflow._forward import memory_format
from signflow._images import is_image_name, is_junk, unreadable_reason
from signflow._mlflow import VersionNotFound, downloaded_version, is_registry_reference, registry_settings
from signflow._model_file import load_bundle
from signflow._onnx import INPUT_NAME, META_CLASS_NAMES, META_FINGERPRINT, META_PREPROCESSING, onnx_session
from signflow._preprocessing import Preprocessing, normalize, read_image
from signflow.errors import SignflowError
from signflow.fileio import write_atomic

__all__ = ["Prediction", "PredictError", "choose_predictor", "model_files", "predict_images", "write_predictions_csv"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
MODEL_FILE, ONNX_FILE = "model.pt", "model.onnx"


class PredictError(SignflowError, ValueError):
    """The model cannot be found or loaded as asked."""


class TorchPredictor:
    backend = "torch"

    def __init__(self, model_path: Path):
        bundle = load_bundle(model_path)
        self.class_names, self.preprocessing = bundle.class_names, bundle.preprocessing
        self.fingerprint, self.temperature = bundle.fingerprint(), bundle.temperature
        # channels_last (as trained): MobileNet-style CNNs ran about twice as fast with it on the CPU
        self.memory_format = memory_format(bundle.channels_last)
        self.model = bundle.build_model().to(memory_format=self.memory_format)
        self.source = str(model_path)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        logits = self.model(normalize(images, self.preprocessing).contiguous(memory_format=self.memory_format))
        return torch.softmax(logits.float() / self.temperature, dim=1).numpy()


class OnnxPredictor:
    backend = "onnx"

    def __init__(self, onnx_path: Path):
        try:
            self.session = onnx_session(onnx_path)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise PredictError(f"{onnx_path}: not a loadable ONNX model ({error})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.class_names = json.loads(meta[META_CLASS_NAMES])
            # "signflow._preprocessing": the key of files exported at commit d8aea16
            preprocessing = meta.get(META_PREPROCESSING) or meta["signflow._preprocessing"]
            self.preprocessing = Preprocessing.from_dict(json.loads(preprocessing))
        except KeyError:
            raise PredictError(
                f"{onnx_path}: no signflow metadata (class list, preprocessing); export it with `signflow export`"
            ) from None
        self.fingerprint = meta.get(META_FINGERPRINT, "")
        self.input_name = INPUT_NAME
        self.source = str(onnx_path)

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        # the exported graph already divides by the model's temperature (signflow.export)
        logits = self.session.run(None, {self.input_name: normalize(images, self.preprocessing).numpy()})[0]
        return torch.softmax(torch.from_numpy(logits).float(), dim=1).numpy()


CSV_COLUMNS = ["path", "rank", "class", "probability", "error"]


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def line(self) -> str:
        """`path: 3 97.1%, 2 1.9%, 8 0.4%`"""
        return f"{self.path}: " + ", ".join(f"{name} {probability:.1%}" for name, probability in self.top)

    def csv_rows(self) -> list[dict]:
        """One row per ranked class, or one row with the error."""
        if self.error:
            return [{"path": self.path, "rank": None, "class": None, "probability": None, "error": self.error}]
        return [
            {"path": self.path, "rank": rank, "class": name, "probability": round(probability, 6), "error": None}
            for rank, (name, probability) in enumerate(self.top, start=1)
        ]


def write_predictions_csv(predictions: Iterable[Prediction], path: str | Path) -> None:
    import pandas as pd

    frame = pd.DataFrame([row for p in predictions for row in p.csv_rows()], columns=CSV_COLUMNS)
    frame["rank"] = frame["rank"].astype("Int64")
    write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


def collect_images(inputs: Sequence[str | Path]) -> list[tuple[Path, str | None]]:
    """Files named on the command line as given (any extension), folders searched recursively for
    image files, in sorted order; missing paths come back with their error."""
    found: list[tuple[Path, str | None]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and is_image_name(p) and not is_junk(p))
            if not files:
                found.append((item, "folder holds no image files"))
            found.extend((p, None) for p in files)
        elif item.is_file():
            found.append((item, None))
        else:
            found.append((item, "no such file or folder"))
    return found


def choose_predictor(model_file: Path | None, onnx_file: Path | None, backend: str):
    """The predictor for the requested backend; `auto` prefers ONNX when it holds the same weights."""
    if backend not in BACKENDS:
        raise PredictError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "onnx" or (backend == "auto" and model_file is None):
        if onnx_file is None:
            raise PredictError("no ONNX model found; run `signflow export` or use --backend torch")
        return OnnxPredictor(onnx_file)
    if model_file is None:
        raise PredictError("no PyTorch model (.pt) found; use --backend onnx")
    torch_predictor = TorchPredictor(model_file)
    if backend == "auto" and onnx_file is not None:
        onnx_predictor = OnnxPredictor(onnx_file)
        if onnx_predictor.fingerprint == torch_predictor.fingerprint:
            return onnx_predictor
        log.warning("%s was exported from other weights than %s: using PyTorch", onnx_file, model_file)
    return torch_predictor


def _files_in(folder: Path) -> tuple[Path | None, Path | None]:
    """(.pt, .onnx) in a folder; the ONNX file of an MLflow model folder (a registered version) is
    in its `artifacts/`."""
    model_file = folder / MODEL_FILE
    onnx_file = next((p for p in (folder / ONNX_FILE, folder / "artifacts" / ONNX_FILE) if p.is_file()), None)
    return (model_file if model_file.is_file() else None, onnx_file)


def local_model_files(spec: Path) -> tuple[Path | None, Path | None]:
    """(.pt, .onnx) for a model path: a file (with its sibling of the other kind) or a folder."""
    if spec.is_dir():
        files = _files_in(spec)
        if files == (None, None):
            raise PredictError(f"{spec}: holds neither {MODEL_FILE} nor {ONNX_FILE}")
        return files
    if spec.suffix == ".onnx":
        return None, spec
    sibling = spec.with_suffix(".onnx")
    return spec, sibling if sibling.is_file() else None


def model_files(spec: str, params_path: Path) -> AbstractContextManager[tuple[Path | None, Path | None, str]]:
    """A context manager yielding (.pt, .onnx, label) for `--model`: a registry alias or version of
    the params file's `register.model_name` (downloaded to a temporary folder), or a local path."""
    if is_registry_reference(spec):
        return registry_model_files(spec, *registry_settings(spec, params_path))
    path = Path(spec)
    if not path.exists():
        raise PredictError(f"--model {spec}: no such file or folder")
    model_file, onnx_file = local_model_files(path)
    return nullcontext((model_file, onnx_file, str(path)))


@contextmanager
def registry_model_files(
    spec: str, model_name: str, tracking_uri: str
) -> Iterator[tuple[Path | None, Path | None, str]]:
    """Download a registered version's model folder to a temporary folder; yields (.pt, .onnx, label)."""
    try:
        with downloaded_version(model_name, spec, tracking_uri) as (folder, version):
            model_file, onnx_file = _files_in(folder)
            yield model_file, onnx_file, f"{model_name} version {version}"
    except VersionNotFound as error:
        raise PredictError(str(error)) from None


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_images(
    predictor, inputs: Sequence[str | Path], top_k: int = 3, batch_size: int = 32
) -> Iterator[Prediction]:
    """Top-k (class, probability) per image, in input order; an unreadable file gives a Prediction
    with its error and the others go on."""
    if top_k < 1:
        raise PredictError("--top-k must be at least 1")
    k = min(top_k, len(predictor.class_names))
    for batch in _batches(collect_images(inputs), batch_size):
        tensors, readable, results = [], [], []
        for path, error in batch:
            prediction = Prediction(str(path), error=error)
            if error is None:
                try:
                    tensors.append(read_image(path, predictor.preprocessing))
                    readable.append(prediction)
                except Exception as exc:  # noqa: BLE001 - any decoder failure is this file's error, never the run's
                    prediction.error = f"cannot read image: {unreadable_reason(exc)}"
            results.append(prediction)
        if tensors:
            probabilities = predictor.probabilities(torch.stack(tensors))
            for prediction, row in zip(readable, probabilities, strict=True):
                order = np.argsort(-row, kind="stable")[:k]
                prediction.top = [(predictor.class_names[i], float(row[i])) for i in order]
        yield from results
