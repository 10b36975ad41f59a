"""Training-time augmentation on uint8-decoded batches: random resized crop, optional flip,
brightness/contrast jitter, all drawn from one seeded generator so runs (and resumed runs) repeat.
"""

from __future__ import annotations

import math

import torch

from signflow.config import AugmentConfig


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
