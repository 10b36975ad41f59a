"""Export step: the trained model as ONNX, checked against PyTorch before it is written.

The ONNX file carries what a user of it needs, in its metadata: the class list, the preprocessing
the model was trained with, the timm model name, the softmax temperature and the fingerprint of the
PyTorch weights it came from. `signflow predict` and the MLflow model read them from there, so an
.onnx file is usable on its own.

With `export.int8` and the split at hand, the step also writes `model.int8.onnx` beside it (static
int8 quantization calibrated on validation images: signflow._int8), kept only when its test accuracy
is at most `export.int8_max_accuracy_drop` below the float model's, and `export.json` beside them
with both models' size, CPU latency per image and test accuracy.

The temperature is baked into the graph: its output `logits` are the model's logits divided by
`signflow.temperature`, so a plain softmax of them gives the calibrated probabilities, the same
numbers `signflow predict` prints with the PyTorch model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from signflow._int8 import Int8Outcome, export_int8, int8_path_for
from signflow._model_file import ModelBundle, load_bundle
from signflow._onnx import (
    INPUT_NAME,
    META_CLASS_NAMES,
    META_FINGERPRINT,
    META_MODEL_NAME,
    META_OUTPUT,
    META_PREPROCESSING,
    META_TEMPERATURE,
    OUTPUT_NAME,
    export_module,
    onnx_session,
)
from signflow._preprocessing import normalize
from signflow.config import ExportConfig
from signflow.errors import SignflowError
from signflow.fileio import atomic_path, json_text

__all__ = ["ExportError", "ExportResult", "export_onnx"]

log = logging.getLogger(__name__)


class ExportError(SignflowError, RuntimeError):
    """The exported model does not reproduce the PyTorch model, or export is impossible."""


@dataclass(frozen=True)
class ExportResult:
    onnx_path: str
    max_abs_difference: float
    opset: int
    fingerprint: str
    int8: Int8Outcome | None = None
    """The int8 model's figures beside the float one's; None when export.int8 is off or no split was given."""

    def summary_line(self) -> str:
        line = f"max |ONNX - PyTorch| {self.max_abs_difference:.1e}"
        return line if self.int8 is None else f"{line}; {self.int8.reason}\n{self.int8.table()}"


OUTPUT_DESCRIPTION = "logits divided by signflow.temperature: their softmax gives the calibrated probabilities"


def metadata_for(bundle: ModelBundle, fingerprint: str) -> dict[str, str]:
    return {
        META_MODEL_NAME: bundle.model_name,
        META_CLASS_NAMES: json.dumps(bundle.class_names),
        META_PREPROCESSING: json.dumps(bundle.preprocessing.to_dict()),
        META_TEMPERATURE: repr(float(bundle.temperature)),
        META_OUTPUT: OUTPUT_DESCRIPTION,
        META_FINGERPRINT: fingerprint,
    }


class TemperatureScaled(nn.Module):
    """The model with its logits divided by the softmax temperature (one Div node in ONNX)."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model, self.temperature = model, float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images) / self.temperature


def parity_inputs(bundle: ModelBundle, count: int = 8, seed: int = 0) -> torch.Tensor:
    """Normalised inputs for the parity check: random uint8 images, as preprocessing makes them."""
    size = bundle.preprocessing.image_size
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, size, size), generator=generator, dtype=torch.uint8)
    return normalize(images, bundle.preprocessing)


def export_figures_path(onnx_path: str | Path) -> Path:
    """The export step's report beside the ONNX file: models/model.onnx -> models/export.json."""
    return Path(onnx_path).with_name("export.json")


def export_onnx(
    cfg: ExportConfig,
    model_path: str | Path,
    onnx_path: str | Path,
    raw_dir: str | Path | None = None,
    split_dir: str | Path | None = None,
    figures_path: str | Path | None = None,
) -> ExportResult:
    """Write `model_path` as ONNX to `onnx_path` (dynamic batch size, the temperature applied); fail,
    keeping any previous file, if ONNX Runtime's logits differ from PyTorch's by more than
    `cfg.tolerance` (measured before the division by the temperature, in the model's own logits).
    With `cfg.int8` and the split (`raw_dir`, `split_dir`), also the gated int8 model; the figures go to
    `figures_path` (default: export.json beside the ONNX file)."""
    import onnx

    bundle = load_bundle(model_path)
    fingerprint = bundle.fingerprint()
    model = TemperatureScaled(bundle.build_model(), bundle.temperature).eval()
    inputs = parity_inputs(bundle)
    with torch.inference_mode():
        expected = model(inputs).numpy()
    with atomic_path(onnx_path) as tmp:
        export_module(model, inputs[:1], tmp, cfg.opset)
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        for key, value in metadata_for(bundle, fingerprint).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
        actual = onnx_session(tmp).run([OUTPUT_NAME], {INPUT_NAME: inputs.numpy()})[0]
        difference = float(np.abs(actual - expected).max()) * bundle.temperature
        if not difference <= cfg.tolerance:
            raise ExportError(
                f"ONNX Runtime and PyTorch disagree by {difference:.2e} (> export.tolerance {cfg.tolerance:.0e}) "
                f"for {bundle.model_name}; {onnx_path} was not written. Try another export.opset."
            )
    log.info("exported %s (max |ONNX - PyTorch| = %.2e)", onnx_path, difference)
    int8 = None
    if cfg.int8 and raw_dir is not None and split_dir is not None:
        int8 = export_int8(
            Path(onnx_path),
            Path(raw_dir),
            Path(split_dir),
            bundle.preprocessing,
            cfg.int8_calibration_images,
            cfg.int8_max_accuracy_drop,
        )
        log.info("%s", int8.reason)
    else:
        int8_path_for(onnx_path).unlink(missing_ok=True)  # never an int8 file of other weights beside it
    figures = {"onnx": str(onnx_path), "max_abs_difference": difference, **(int8.to_dict() if int8 else {})}
    with atomic_path(figures_path or export_figures_path(onnx_path)) as tmp:
        tmp.write_text(json_text(figures), encoding="utf-8")
    return ExportResult(str(onnx_path), difference, cfg.opset, fingerprint, int8)
