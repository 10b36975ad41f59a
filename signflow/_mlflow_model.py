"""The MLflow model stored with every registered version, and loading it back.

The register step saves `signflow/_served_model.py` (MLflow models-from-code: no pickle) with the
version's ONNX file as its artifact, a signature and an input example into the version's `model/`
folder, beside `model.pt` and the model card. That folder is then what
`mlflow.pyfunc.load_model("models:/<name>@champion")` loads and `mlflow models serve` serves, and
MLflow writes `serving_input_example.json`, a request body `/invocations` answers.

Saving goes through `mlflow.pyfunc.save_model` into a temporary folder and `client.log_artifacts`:
nothing touches MLflow's global tracking URI or active run.
"""

from __future__ import annotations

import base64
import io
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

MODEL_CODE = Path(__file__).with_name("_served_model.py")
ONNX_ARTIFACT = "onnx"
"""Name of the ONNX file among the MLflow model's artifacts (stored as `artifacts/model.onnx`)."""
SERVING_PACKAGES = ("mlflow", "onnxruntime", "numpy", "pandas", "pillow")
"""What the served model imports: its pip requirements, pinned to the versions registering it."""
DEFAULT_TOP_K = 3


def signature():
    """Input: a string column `image` (base64 image file bytes); output: top-k classes and
    probabilities per image; param `top_k`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    outputs = [
        ColSpec(Array(DataType.string), "classes"),
        ColSpec(Array(DataType.double), "probabilities"),
        ColSpec(DataType.string, "label", required=False),
        ColSpec(DataType.double, "probability", required=False),
        ColSpec(DataType.string, "error", required=False),
    ]
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "image")]),
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("top_k", DataType.long, DEFAULT_TOP_K)]),
    )


def input_example(image_size: int):
    """One image of the model's input size as base64 JPEG (a grey-blue gradient: small, and any
    model answers it); MLflow stores it and writes `serving_input_example.json` from it."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    ramp = np.linspace(64, 192, image_size, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.full((1, 1), 160, np.uint8)), axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, "JPEG", quality=85)
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def pip_requirements() -> list[str]:
    pins = []
    for package in SERVING_PACKAGES:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def save_mlflow_model(onnx_path: str | Path, image_size: int, folder: str | Path) -> Path:
    """Write the MLflow model of `onnx_path` to `folder` (which must not exist yet), with an input
    example `image_size` pixels square."""
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(
        path=str(folder),
        python_model=str(MODEL_CODE),
        artifacts={ONNX_ARTIFACT: str(onnx_path)},
        signature=signature(),
        input_example=input_example(image_size),
        pip_requirements=pip_requirements(),
    )
    return Path(folder)


def log_mlflow_model(client, run_id: str, onnx_path: str | Path, image_size: int, artifact_path: str) -> None:
    """Save the MLflow model of `onnx_path` and upload it into the run's `artifact_path` folder."""
    with tempfile.TemporaryDirectory(prefix="signflow-mlflow-model-") as tmp:
        folder = save_mlflow_model(onnx_path, image_size, Path(tmp) / "model")
        client.log_artifacts(run_id, str(folder), artifact_path=artifact_path)


def load_mlflow_model(folder: str | Path):
    """The pyfunc model in a local MLflow model folder (a downloaded version)."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(folder))
