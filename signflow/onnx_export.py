"""Export step: the trained model as ONNX, checked against PyTorch before it is written.

The ONNX file carries what a user of it needs, in its metadata: the class list, the preprocessing
the model was trained with, the timm model name and the fingerprint of the PyTorch weights it came
from. `signflow predict` reads them from there, so an .onnx file is usable on its own.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from signflow.checkpoint import ModelBundle, load_bundle
from signflow.config import ExportConfig
from signflow.errors import SignflowError
from signflow.fileio import atomic_path
from signflow.preprocess import normalize

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "logits"


class ExportError(SignflowError, RuntimeError):
    """The exported model does not reproduce the PyTorch model, or export is impossible."""


@dataclass(frozen=True)
class ExportResult:
    onnx_path: str
    max_abs_difference: float
    opset: int
    fingerprint: str


def metadata_for(bundle: ModelBundle, fingerprint: str) -> dict[str, str]:
    return {
        "signflow.model_name": bundle.model_name,
        "signflow.class_names": json.dumps(bundle.class_names),
        "signflow.preprocessing": json.dumps(bundle.preprocessing.to_dict()),
        "signflow.fingerprint": fingerprint,
    }


def parity_inputs(bundle: ModelBundle, count: int = 8, seed: int = 0) -> torch.Tensor:
    """Normalised inputs for the parity check: random uint8 images, as preprocessing makes them."""
    size = bundle.preprocessing.image_size
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, size, size), generator=generator, dtype=torch.uint8)
    return normalize(images, bundle.preprocessing)


def onnx_session(model: str | Path | bytes, threads: int | None = None):
    """A CPU ONNX Runtime session for a model file or serialized model; `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def export_module(module: torch.nn.Module, example: torch.Tensor, target: str | Path | io.BytesIO, opset: int) -> None:
    """Export `module` (one image batch in, one tensor out) with a dynamic batch size."""
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but exports these CNNs in ~1 s; the torch.export
        # one needs onnxscript and takes ~15 s for the same graph on 2 cores.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            target if isinstance(target, io.BytesIO) else str(target),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
        )


def export_onnx(cfg: ExportConfig, model_path: str | Path, onnx_path: str | Path) -> ExportResult:
    """Write `model_path` as ONNX to `onnx_path` (dynamic batch size); fail, keeping any previous
    file, if ONNX Runtime's logits differ from PyTorch's by more than `cfg.tolerance`."""
    import onnx

    bundle = load_bundle(model_path)
    fingerprint = bundle.fingerprint()
    model = bundle.build_model()
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
        difference = float(np.abs(actual - expected).max())
        if not difference <= cfg.tolerance:
            raise ExportError(
                f"ONNX Runtime and PyTorch disagree by {difference:.2e} (> export.tolerance {cfg.tolerance:.0e}) "
                f"for {bundle.model_name}; {onnx_path} was not written. Try another export.opset."
            )
    log.info("exported %s (max |ONNX - PyTorch| = %.2e)", onnx_path, difference)
    return ExportResult(str(onnx_path), difference, cfg.opset, fingerprint)
