"""ONNX export and ONNX Runtime sessions, shared by the export step, the frozen-feature cache and predict."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

INPUT_NAME, OUTPUT_NAME = "image", "logits"
# The metadata keys of an exported model.onnx: the export step writes them, predict and register read
# them (the served MLflow model keeps its own copy: it runs without signflow installed).
META_MODEL_NAME = "signflow.model_name"
META_CLASS_NAMES = "signflow.class_names"
META_PREPROCESSING = "signflow.preprocessing"
META_TEMPERATURE = "signflow.temperature"
META_OUTPUT = "signflow.output"
META_FINGERPRINT = "signflow.fingerprint"


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
