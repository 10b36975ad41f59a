"""Image → tensor, identically for training, evaluation and prediction, and the record of how.

`Preprocessing` is stored in the model file (and the ONNX metadata), so every later use of a model
applies exactly what it was trained with. Each image is decoded once, EXIF-rotated, its shorter
side resized to `image_size` with the model's interpolation and centre-cropped, and kept as uint8;
normalisation happens on batches (`normalize`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from signflow._images import load_rgb

_PIL_INTERPOLATION = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn an image into the tensor the model was trained on; stored with the model."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Preprocessing:
        return cls(int(raw["image_size"]), tuple(raw["mean"]), tuple(raw["std"]), str(raw["interpolation"]))


def resize_center_crop(image: Image.Image, prep: Preprocessing) -> Image.Image:
    size = prep.image_size
    scale = size / min(image.size)
    new_size = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    image = image.resize(new_size, _PIL_INTERPOLATION.get(prep.interpolation, Image.Resampling.BILINEAR))
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_to_uint8(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    array = np.asarray(resize_center_crop(image.convert("RGB"), prep), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def read_image(path: str | Path, prep: Preprocessing) -> torch.Tensor:
    """One image file as the (3, S, S) uint8 tensor the model sees (before normalisation)."""
    return image_to_uint8(load_rgb(path, max_side=2 * prep.image_size), prep)


def load_images(paths: Sequence[Path], prep: Preprocessing, desc: str = "decode") -> torch.Tensor:
    """Decode `paths` once into an (N, 3, S, S) uint8 tensor (threads: decoding releases the GIL)."""
    out = torch.empty((len(paths), 3, prep.image_size, prep.image_size), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = pool.map(lambda path: read_image(path, prep), paths)
        for index, image in enumerate(tqdm(decoded, total=len(paths), desc=desc, unit="img", leave=False)):
            out[index] = image
    return out


def normalize(batch: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 (N,3,S,S) → float normalised with the model's mean/std."""
    mean = torch.tensor(prep.mean, device=batch.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(prep.std, device=batch.device).view(1, 3, 1, 1) * 255.0
    return (batch.float() - mean) / std
