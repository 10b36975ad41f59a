"""Image → tensor, identically for training, evaluation and prediction.

Each image is decoded once, EXIF-rotated, its shorter side resized to `image_size` with the
model's interpolation and centre-cropped, and kept as uint8. Normalisation happens on batches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from signflow.config import AugmentConfig
from signflow.images import load_rgb
from signflow.preprocessing import Preprocessing

_PIL_INTERPOLATION = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


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


def load_images(paths: Sequence[Path], prep: Preprocessing, desc: str = "decode") -> torch.Tensor:
    """Decode `paths` once into an (N, 3, S, S) uint8 tensor (threads: decoding releases the GIL)."""
    out = torch.empty((len(paths), 3, prep.image_size, prep.image_size), dtype=torch.uint8)

    def decode(path: Path) -> torch.Tensor:
        return image_to_uint8(load_rgb(path, max_side=2 * prep.image_size), prep)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = pool.map(decode, paths)
        for index, image in enumerate(tqdm(decoded, total=len(paths), desc=desc, unit="img", leave=False)):
            out[index] = image
    return out


def normalize(batch: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 (N,3,S,S) → float normalised with the model's mean/std."""
    mean = torch.tensor(prep.mean, device=batch.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(prep.std, device=batch.device).view(1, 3, 1, 1) * 255.0
    return (batch.float() - mean) / std


def augment(batch: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (area in [scale_min, 1], aspect in [3/4, 4/3]), optional flip and
    brightness/contrast jitter, on a float batch in [0, 255]; one bilinear resampling per batch.
    """
    n, _, height, width = batch.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    area = cfg.scale_min + (1 - cfg.scale_min) * rand(n)
    log_ratio = (rand(n) * 2 - 1) * math.log(4 / 3)
    ratio = torch.exp(log_ratio)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (rand(n) * 2 - 1) * (1 - sx)
    ty = (rand(n) * 2 - 1) * (1 - sy)
    flip = torch.where(rand(n) < cfg.hflip, -1.0, 1.0)
    # Scale, shift and mirror only: the sampling grid is separable, so it is built by broadcasting
    # (what affine_grid computes for this theta, at a fraction of its cost). Pixel centres, as
    # align_corners=False places them.
    xs = (torch.arange(width, dtype=torch.float32) * 2 + 1) / width - 1
    ys = (torch.arange(height, dtype=torch.float32) * 2 + 1) / height - 1
    grid_x = (sx * flip).view(n, 1, 1) * xs.view(1, 1, width) + tx.view(n, 1, 1)
    grid_y = sy.view(n, 1, 1) * ys.view(1, height, 1) + ty.view(n, 1, 1)
    grid = torch.stack(torch.broadcast_tensors(grid_x, grid_y), dim=-1).to(batch.device)
    out = torch.nn.functional.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if cfg.color_jitter > 0:
        brightness = 1 + (rand(n, 1, 1, 1) * 2 - 1) * cfg.color_jitter
        contrast = 1 + (rand(n, 1, 1, 1) * 2 - 1) * cfg.color_jitter
        brightness, contrast = brightness.to(out.device), contrast.to(out.device)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        # ((x - mean) * contrast + mean) * brightness, as one in-place multiply-add
        out.mul_(contrast * brightness).add_(mean * brightness * (1 - contrast)).clamp_(0, 255)
    return out
