"""How one training epoch runs: the whole network on freshly augmented images (`PlainRunner`), or
only the trainable tail on cached activations of the frozen prefix (`CachedRunner`, see
`_feature_cache`). Both share the epoch loop, the optimiser step and the validation metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from signflow._augment import augment
from signflow._feature_cache import SplitModel, compute_features, onnx_prefix, split_model
from signflow._forward import autocast_for, predict_logits
from signflow._model import set_train_mode
from signflow._preprocessing import Preprocessing, normalize
from signflow.config import TrainConfig
from signflow.errors import SignflowError

log = logging.getLogger(__name__)


class TrainingError(SignflowError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN)."""


@dataclass
class SplitTensors:
    """One split decoded for training: uint8 images (N, 3, S, S) and their label indices."""

    images: torch.Tensor
    labels: torch.Tensor


def memory_format_for(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def train_step(
    module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig, optimizer, epoch: int
) -> tuple[float, int]:
    """One optimiser step; returns (summed loss, correct predictions) of the batch."""
    with autocast_for(inputs.device, cfg.amp):
        logits = module(inputs)
        loss = nn.functional.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
    if not torch.isfinite(loss):
        raise TrainingError(f"epoch {epoch}: loss became {loss.item()}; lower train.lr or check the data")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item() * len(targets), (logits.argmax(1) == targets).sum().item()


class PlainRunner:
    """Every epoch runs the whole network on freshly augmented images.

    Subclasses change only which module trains, where a batch's inputs come from and how the
    validation logits are computed; the epoch loop and the metrics are shared.
    """

    prefix_runtime = "none"

    def __init__(self, model, train_data: SplitTensors, valid_data: SplitTensors, prep, cfg: TrainConfig, device):
        self.model, self.train_data, self.valid_data = model, train_data, valid_data
        self.prep, self.cfg, self.device = prep, cfg, device
        self.memory_format = memory_format_for(cfg)

    def trained_module(self) -> nn.Module:
        return self.model

    def batch_inputs(self, index: torch.Tensor, generator: torch.Generator, epoch: int) -> torch.Tensor:
        batch = self.train_data.images[index].float()
        if self.cfg.augment.enabled:
            batch = augment(batch, self.cfg.augment, generator)
        return normalize(batch.to(self.device), self.prep).contiguous(memory_format=self.memory_format)

    def valid_logits(self) -> torch.Tensor:
        cfg = self.cfg
        return predict_logits(
            self.model,
            self.valid_data.images,
            self.prep,
            cfg.inference_batch_size,
            self.device,
            cfg.channels_last,
            cfg.amp,
        )

    def train_epoch(self, optimizer, generator: torch.Generator, epoch: int) -> tuple[float, float]:
        """One pass over the shuffled train split; returns (mean loss, accuracy)."""
        set_train_mode(self.model)
        labels, batch_size = self.train_data.labels, self.cfg.batch_size
        order = torch.randperm(len(labels), generator=generator)
        total_loss, correct = 0.0, 0
        for start in tqdm(range(0, len(order), batch_size), desc=f"epoch {epoch}", unit="batch", leave=False):
            index = order[start : start + batch_size]
            inputs = self.batch_inputs(index, generator, epoch)
            targets = labels[index].to(self.device)
            loss, hits = train_step(self.trained_module(), inputs, targets, self.cfg, optimizer, epoch)
            total_loss, correct = total_loss + loss, correct + hits
        return total_loss / len(order), correct / len(order)

    def validate(self) -> tuple[float, float]:
        """(loss, accuracy) on the valid split; NaN when there is none."""
        if len(self.valid_data.labels) == 0:
            return float("nan"), float("nan")
        logits = self.valid_logits()
        loss = nn.functional.cross_entropy(logits, self.valid_data.labels).item()
        return loss, (logits.argmax(1) == self.valid_data.labels).float().mean().item()


class CachedRunner(PlainRunner):
    """The frozen prefix runs once per image view (see _feature_cache); epochs train only the tail.

    The views are drawn from `generator` here, before any epoch: a resumed run (which restores the
    generator afterwards) caches exactly the views of the uninterrupted one.
    """

    def __init__(self, split: SplitModel, model, train_data, valid_data, prep, cfg: TrainConfig, device, generator):
        super().__init__(model, train_data, valid_data, prep, cfg, device)
        self.split = split
        prefix = self._prefix_for_caching()
        self.prefix_runtime = "torch" if prefix is split.prefix else "onnxruntime"
        features = partial(
            compute_features,
            prefix,
            prep=prep,
            batch_size=cfg.inference_batch_size,
            device=device,
            memory_format=self.memory_format,
        )
        views = cfg.cached_views if cfg.augment.enabled else 1
        augment_cfg = cfg.augment if cfg.augment.enabled else None
        self.train_views = [
            features(
                train_data.images, augment_cfg=augment_cfg, generator=generator, desc=f"frozen features {v + 1}/{views}"
            )
            for v in range(views)
        ]
        self.valid_features = features(valid_data.images)
        log.info(
            "cached frozen features before %s (%s): %d view(s) of %d images",
            split.cut_name,
            self.prefix_runtime,
            views,
            len(train_data.labels),
        )

    def _prefix_for_caching(self):
        """The frozen prefix as ONNX Runtime runs it when `train.cache_runtime` asks for that and it
        reproduces PyTorch; else the PyTorch module."""
        runtime = self.cfg.cache_runtime
        if runtime == "onnxruntime" or (runtime == "auto" and self.device.type == "cpu"):
            example = normalize(self.train_data.images[:2].float(), self.prep)
            return onnx_prefix(self.split.prefix, example, torch.get_num_threads()) or self.split.prefix
        return self.split.prefix

    def trained_module(self) -> nn.Module:
        return self.split.tail

    def batch_inputs(self, index: torch.Tensor, generator: torch.Generator, epoch: int) -> torch.Tensor:
        return self.train_views[(epoch - 1) % len(self.train_views)][index.to(self.device)]

    @torch.inference_mode()
    def valid_logits(self) -> torch.Tensor:
        self.split.tail.eval()
        step = self.cfg.inference_batch_size
        return torch.cat(
            [
                self.split.tail(self.valid_features[i : i + step]).float().cpu()
                for i in range(0, len(self.valid_features), step)
            ]
        )


def create_runner(
    model, train_data: SplitTensors, valid_data: SplitTensors, prep: Preprocessing, cfg: TrainConfig, device, generator
) -> PlainRunner:
    """The cached runner when enabled and exact for this model and freeze depth, else the plain one."""
    if cfg.cache_frozen_features:
        example = normalize(train_data.images[:2].float(), prep).to(device)
        split = split_model(model, example.contiguous(memory_format=memory_format_for(cfg)))
        if split is not None:
            return CachedRunner(split, model, train_data, valid_data, prep, cfg, device, generator)
    return PlainRunner(model, train_data, valid_data, prep, cfg, device)
