"""Image → tensor, identically for training, evaluation and prediction, and the record of how.

`Preprocessing` is stored in the model file (and the ONNX metadata), so every later use of a model
applies exactly what it was trained with. Each image is decoded once, EXIF-rotated, its shorter
side resized to `image_size` with the model's interpolation and centre-cropped, and kept as uint8;
normalisation happens on batches (`normalize`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from signflow._images import DEFAULT_MAX_PIXELS, load_rgb
from signflow._progress import progress
from signflow.errors import SignflowError


class ImageReadError(SignflowError, OSError):
    """An image of a split that can no longer be read; the message names the file."""


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
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels are refused from their header, before decoding: split.max_pixels of
    the split the model was trained on, so predict and serve refuse what training never saw."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Preprocessing:
        max_pixels = int(raw.get("max_pixels", DEFAULT_MAX_PIXELS))  # model files from before it: the default
        return cls(int(raw["image_size"]), tuple(raw["mean"]), tuple(raw["std"]), str(raw["interpolation"]), max_pixels)


def resize_center_crop(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """The image's centre square, resized to `image_size`: what resizing the shorter side and then
    centre-cropping gives, computed without the intermediate image (which, for a 1x100000 strip,
    would be 160 x 16,000,000 pixels)."""
    size, side = prep.image_size, min(image.size)
    left, top = (image.width - side) / 2, (image.height - side) / 2
    resample = _PIL_INTERPOLATION.get(prep.interpolation, Image.Resampling.BILINEAR)
    return image.resize((size, size), resample, box=(left, top, left + side, top + side))


def image_to_uint8(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    array = np.asarray(resize_center_crop(image.convert("RGB"), prep), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def read_image(path: str | Path, prep: Preprocessing) -> torch.Tensor:
    """One image file as the (3, S, S) uint8 tensor the model sees (before normalisation)."""
    return image_to_uint8(load_rgb(path, max_side=2 * prep.image_size, max_pixels=prep.max_pixels), prep)


def decode_chunks(
    paths: Sequence[Path], prep: Preprocessing, chunk_size: int = 256, desc: str = "decode"
) -> Iterator[torch.Tensor]:
    """`paths` decoded in order, as (n, 3, S, S) uint8 chunks of `chunk_size` images.

    A pool of one thread per core decodes (decoding releases the GIL); at most two chunks are in
    flight, so memory does not grow with the number of images. A file that cannot be read stops
    with an error naming it.
    """
    with (
        ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool,
        progress(total=len(paths), desc=desc, unit="img", leave=False) as bar,
    ):

        def submit(start: int) -> list[Future]:
            return [pool.submit(_read_named, path, prep) for path in paths[start : start + chunk_size]]

        pending = submit(0)
        for start in range(0, len(paths), chunk_size):
            current, pending = pending, submit(start + chunk_size)
            chunk = torch.stack([future.result() for future in current])
            bar.update(len(chunk))
            yield chunk


def _read_named(path: Path, prep: Preprocessing) -> torch.Tensor:
    try:
        return read_image(path, prep)
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises all three for bad files
        raise ImageReadError(f"{path}: cannot read image ({error}); rerun the split step to leave it out") from None


def load_images(paths: Sequence[Path], prep: Preprocessing, desc: str = "decode") -> torch.Tensor:
    """Decode `paths` into one (N, 3, S, S) uint8 tensor: for a few images (the whole split never
    needs to be in memory: see `decode_chunks`)."""
    chunks = list(decode_chunks(paths, prep, desc=desc))
    if not chunks:
        return torch.empty((0, 3, prep.image_size, prep.image_size), dtype=torch.uint8)
    return torch.cat(chunks)


def normalize(batch: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 (N,3,S,S) → float normalised with the model's mean/std."""
    mean = torch.tensor(prep.mean, device=batch.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(prep.std, device=batch.device).view(1, 3, 1, 1) * 255.0
    return (batch.float() - mean) / std
