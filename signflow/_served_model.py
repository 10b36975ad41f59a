"""The MLflow model of a registered signflow version: its ONNX file run by ONNX Runtime.

This is an MLflow "models-from-code" file. The register step saves it with `python_model=<this
file>`; MLflow copies it into the model folder and *runs* it when the model is loaded (nothing is
unpickled). It is self-contained on purpose: it imports only mlflow, numpy, pandas, Pillow and
onnxruntime, never signflow or torch, so a registered version keeps serving exactly as it was
registered whatever signflow becomes, and `mlflow models serve` can run it in any environment with
those packages (`--env-manager virtualenv` installs only them). Its image steps repeat
`signflow._images.load_rgb` and `signflow._preprocessing.read_image` (a test checks they give the
same pixels); the class list, preprocessing and temperature come from the ONNX file's metadata.

Input: a DataFrame with a column `image` holding the encoded bytes of an image file (JPEG, PNG,
...), as bytes or as a base64 string (a JSON request to /invocations sends base64).
Output: one row per image: `classes` and `probabilities` (top-k, best first), `label` and
`probability` (the best), `error` (why an image could not be read, whatever the decoder raised; the
other rows still get an answer). Rows are run BATCH_SIZE at a time. Param: `top_k` (3 unless given).
"""

from __future__ import annotations

import base64
import binascii
import io
import json

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from PIL import Image, ImageOps, UnidentifiedImageError

COLUMNS = ["classes", "probabilities", "label", "probability", "error"]
RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
DEFAULT_MAX_PIXELS = 50_000_000
"""As signflow._images.DEFAULT_MAX_PIXELS: the limit of a model whose metadata does not record the
split.max_pixels it was trained with."""
BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
READ_ERRORS = (binascii.Error, OSError, ValueError, SyntaxError, *BOMB_ERRORS)
"""What an unreadable file usually raises; a damaged one can make Pillow raise anything else too."""
BATCH_SIZE = 32
"""Rows decoded and run through ONNX Runtime at once, so a request of any length costs one batch's
memory: 1000 small JPEGs for mobilenetv2_100 at 160 px took the peak RSS from 0.3 to 5.3 GB as one
batch, to 0.49 GB in batches of 32 (and ran faster)."""


def decode_rgb(data: bytes, max_side: int, max_pixels: int = DEFAULT_MAX_PIXELS):
    """As signflow._images.load_rgb: an image over `max_pixels` refused from its header, before
    decoding; JPEG draft mode, EXIF rotation, 16-bit and alpha flattened on white, then 8-bit RGB.
    Each step drops the previous image: a 50-megapixel RGBA PNG peaks at 3 full copies, not 5."""
    image = open_decoded(data, max_side, max_pixels)
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value * (1 / 256)).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        del image
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def open_decoded(data: bytes, max_side: int, max_pixels: int):
    """The image decoded as stored (large JPEGs in draft mode), refused from its header when too large."""
    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > max_pixels:
            raise ValueError(f"{image.width}x{image.height} pixels is above the limit of {max_pixels:,} pixels")
        if image.format == "JPEG":
            image.draft("RGB", (max_side, max_side))
        image.load()
    return image


def image_bytes(value) -> bytes:
    """The cell's image file bytes: bytes as they are, a string as base64."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return base64.b64decode(value, validate=True)
    raise ValueError(f"expected image bytes or a base64 string, got {type(value).__name__}")


class SignflowOnnxModel(PythonModel):
    max_pixels = DEFAULT_MAX_PIXELS
    """Images with more pixels are refused from their header; load_context sets the model's own limit."""

    def load_context(self, context) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(context.artifacts["onnx"], options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.class_names = list(json.loads(meta["signflow.class_names"]))
        prep = json.loads(meta.get("signflow.preprocessing") or meta["signflow._preprocessing"])
        self.temperature = float(meta.get("signflow.temperature", "1.0"))  # already applied by the graph
        self.size = int(prep["image_size"])
        self.max_pixels = int(prep.get("max_pixels", DEFAULT_MAX_PIXELS))
        self.resample = RESAMPLING.get(prep["interpolation"], RESAMPLING["bilinear"])
        self.mean = np.asarray(prep["mean"], np.float32).reshape(1, 3, 1, 1) * 255.0
        self.std = np.asarray(prep["std"], np.float32).reshape(1, 3, 1, 1) * 255.0
        self.input_name = self.session.get_inputs()[0].name

    def to_uint8(self, data: bytes) -> np.ndarray:
        """As signflow._preprocessing.read_image: the centre square resized to the model's size
        (no intermediate image: a 1x100000 strip costs its own pixels), (3, S, S) uint8."""
        size = self.size
        image = decode_rgb(data, 2 * size, self.max_pixels)
        side = min(image.size)
        left, top = (image.width - side) / 2, (image.height - side) / 2
        image = image.resize((size, size), self.resample, box=(left, top, left + side, top + side))
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of a (N, 3, S, S) uint8 batch: the graph divides by the temperature."""
        batch = (images.astype(np.float32) - self.mean) / self.std
        logits = self.session.run(None, {self.input_name: batch})[0].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        top_k = max(1, min(int((params or {}).get("top_k", 3)), len(self.class_names)))
        images = list(model_input["image"])
        rows = []
        for start in range(0, len(images), BATCH_SIZE):
            rows += self.answer(images[start : start + BATCH_SIZE], top_k)
        return pd.DataFrame(rows, columns=COLUMNS)

    def answer(self, images: list, top_k: int) -> list[dict]:
        """One row per image of a batch: its top-k classes, or why it could not be read."""
        rows = [{**dict.fromkeys(COLUMNS), "classes": [], "probabilities": []} for _ in images]
        arrays, readable = [], []
        for index, value in enumerate(images):
            try:
                arrays.append(self.to_uint8(image_bytes(value)))
                readable.append(index)
            except Exception as error:  # noqa: BLE001 - any decoder failure is this row's error, never the batch's
                rows[index]["error"] = f"cannot read image: {unreadable_reason(error)}"
        if arrays:
            for index, row in zip(readable, self.probabilities(np.stack(arrays)), strict=True):
                order = np.argsort(-row, kind="stable")[:top_k]
                rows[index].update(
                    classes=[self.class_names[i] for i in order],
                    probabilities=[float(row[i]) for i in order],
                    label=self.class_names[order[0]],
                    probability=float(row[order[0]]),
                )
        return rows


def unreadable_reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not a readable image file"
    if isinstance(error, READ_ERRORS):
        return str(error) or type(error).__name__
    return f"damaged or unsupported image file ({type(error).__name__}: {error})"


set_model(SignflowOnnxModel())
