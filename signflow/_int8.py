"""The int8 model beside model.onnx: static quantization with ONNX Runtime, kept only when it scores as well.

Format: QDQ (QuantizeLinear/DequantizeLinear pairs around each quantized tensor), the format ONNX
Runtime recommends for CPU. The graph stays a plain ONNX graph that other runtimes (TensorRT,
OpenVINO, ONNX Runtime Web, mobile) read and fuse into their own integer kernels; ONNX Runtime fuses
the pairs into QLinearConv/MatMulInteger at load. Weights are int8 per output channel (depthwise
convolutions, as in MobileNets, lose most to per-tensor scales), activations uint8 with MinMax ranges
from the calibration images.

Calibration uses validation images, decoded and normalised exactly as training and evaluation do
(`read_image` + `normalize`): never test images, which only score the result.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from signflow._onnx import INPUT_NAME, OUTPUT_NAME, onnx_session
from signflow._preprocessing import Preprocessing, decode_chunks, normalize
from signflow.fileio import atomic_path

LATENCY_RUNS = 30
"""Single-image runs timed per model (after 3 warm-up runs); the median is reported."""


def int8_path_for(onnx_path: str | Path) -> Path:
    """Where the int8 model of `onnx_path` goes: models/model.onnx -> models/model.int8.onnx."""
    path = Path(onnx_path)
    return path.with_name(f"{path.stem}.int8{path.suffix}")


@dataclass(frozen=True)
class ModelFigures:
    """One ONNX model's size, single-image CPU latency and accuracy on the test split."""

    path: str
    bytes: int
    latency_ms: float
    test_accuracy: float


def split_images(raw_dir: Path, split_dir: Path, name: str, limit: int | None = None) -> tuple[list[Path], np.ndarray]:
    """The image paths and label indices of one split (the first `limit` in manifest order, which is shuffled)."""
    from signflow.split_files import read_manifest  # pandas: only when int8 is on

    manifest = read_manifest(split_dir, name)
    if limit is not None:
        manifest = manifest.iloc[:limit]
    return [raw_dir / path for path in manifest["path"]], manifest["label_index"].to_numpy()


def normalised_batches(paths: list[Path], prep: Preprocessing, batch_size: int = 64):
    """`paths` as float32 (n, 3, S, S) arrays, preprocessed as training and evaluation do."""
    for chunk in decode_chunks(paths, prep, chunk_size=batch_size, desc="int8"):
        yield normalize(chunk, prep).numpy().astype(np.float32)


class _CalibrationReader:
    """onnxruntime.quantization's CalibrationDataReader: one image per call (ranges are per tensor)."""

    def __init__(self, paths: list[Path], prep: Preprocessing):
        self.batches = (image[None] for batch in normalised_batches(paths, prep) for image in batch)

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self.batches, None)
        return None if image is None else {INPUT_NAME: image}


def quantize_int8(onnx_path: Path, int8_path: Path, calibration: list[Path], prep: Preprocessing) -> None:
    """Write the QDQ int8 model of `onnx_path` to `int8_path` (atomically), calibrated on `calibration`.
    The float model's metadata (classes, preprocessing, temperature) is copied, so the file stands alone."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with atomic_path(int8_path) as tmp:
        quantize_static(
            str(onnx_path),
            str(tmp),
            _CalibrationReader(calibration, prep),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        source, proto = onnx.load(str(onnx_path)), onnx.load(str(tmp))
        del proto.metadata_props[:]
        proto.metadata_props.extend(source.metadata_props)
        entry = proto.metadata_props.add()
        entry.key, entry.value = "signflow.quantization", "int8 QDQ, per-channel weights, static (MinMax)"
        onnx.save(proto, str(tmp))


def measure(onnx_path: Path, test_paths: list[Path], labels: np.ndarray, prep: Preprocessing) -> ModelFigures:
    """Size, median single-image CPU latency and test accuracy of one ONNX model."""
    session = onnx_session(onnx_path)
    predicted = [
        session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0].argmax(axis=1)
        for batch in normalised_batches(test_paths, prep)
    ]
    accuracy = float((np.concatenate(predicted) == labels).mean()) if len(labels) else float("nan")
    single = normalize(torch.zeros((1, 3, prep.image_size, prep.image_size), dtype=torch.uint8), prep).numpy()
    times = []
    for run in range(LATENCY_RUNS + 3):
        started = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: single})
        if run >= 3:
            times.append((time.perf_counter() - started) * 1000)
    return ModelFigures(str(onnx_path), os.path.getsize(onnx_path), float(np.median(times)), accuracy)


@dataclass(frozen=True)
class Int8Outcome:
    """The float and int8 models' figures, and whether the int8 file was kept (and why not)."""

    float_model: ModelFigures
    int8_model: ModelFigures | None
    kept: bool
    reason: str

    def to_dict(self) -> dict:
        return {
            "float": asdict(self.float_model),
            "int8": asdict(self.int8_model) if self.int8_model else None,
            "int8_kept": self.kept,
            "reason": self.reason,
        }

    def table(self) -> str:
        """A markdown table of both models, for people."""
        rows = [("float32", self.float_model), ("int8", self.int8_model)]
        lines = ["| model | file | size | CPU latency / image | test accuracy |", "|---|---|---|---|---|"]
        for label, figures in rows:
            if figures is not None:
                lines.append(
                    f"| {label} | {Path(figures.path).name} | {figures.bytes / 2**20:.2f} MiB | "
                    f"{figures.latency_ms:.2f} ms | {100 * figures.test_accuracy:.2f} % |"
                )
        return "\n".join(lines)


def export_int8(
    onnx_path: Path, raw_dir: Path, split_dir: Path, prep: Preprocessing, calibration_images: int, max_drop: float
) -> Int8Outcome:
    """Quantize `onnx_path`, score both models on the test split, and keep `int8_path_for(onnx_path)`
    only if its test accuracy is at most `max_drop` below the float model's; otherwise remove it
    (a stale int8 file from earlier weights must not outlive them either)."""
    int8_path = int8_path_for(onnx_path)
    calibration, _ = split_images(raw_dir, split_dir, "valid", calibration_images)
    test_paths, labels = split_images(raw_dir, split_dir, "test")
    float_figures = measure(onnx_path, test_paths, labels, prep)
    if not calibration or not test_paths:
        int8_path.unlink(missing_ok=True)
        return Int8Outcome(float_figures, None, False, "no int8 model: the split has no valid or no test images")
    quantize_int8(onnx_path, int8_path, calibration, prep)
    int8_figures = measure(int8_path, test_paths, labels, prep)
    drop = float_figures.test_accuracy - int8_figures.test_accuracy
    if drop > max_drop + 1e-12:
        int8_path.unlink()
        reason = (
            f"int8 removed: its test accuracy {100 * int8_figures.test_accuracy:.2f} % is {100 * drop:.2f} points "
            f"below the float model's {100 * float_figures.test_accuracy:.2f} % "
            f"(export.int8_max_accuracy_drop allows {100 * max_drop:.2f})"
        )
        return Int8Outcome(float_figures, int8_figures, False, reason)
    reason = (
        f"int8 kept: test accuracy {100 * int8_figures.test_accuracy:.2f} % against the float model's "
        f"{100 * float_figures.test_accuracy:.2f} % (export.int8_max_accuracy_drop allows "
        f"{100 * max_drop:.2f} points less)"
    )
    return Int8Outcome(float_figures, int8_figures, True, reason)
