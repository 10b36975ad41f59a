"""How one training epoch runs: the whole network on freshly augmented images (`PlainRunner`), or
only the trainable tail on cached activations of the frozen prefix (`CachedRunner`, see
`_feature_cache`). Both share the epoch loop, the optimiser step and the validation metrics, and
both read their batches from cache files on disk (`_training_data`), so memory does not grow with
the dataset.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from signflow._augment import augment
from signflow._disk_cache import DiskArray, ensure_space
from signflow._feature_cache import CachedFeatures, CutModel, FeatureCache, cut_model
from signflow._forward import autocast_for, memory_format, predict_logits
from signflow._model import set_train_mode
from signflow._preprocessing import Preprocessing, normalize
from signflow._progress import progress
from signflow._training_data import EpochBatches, TrainingData, create_loader, read_chunks
from signflow.config import TrainConfig
from signflow.errors import SignflowError

log = logging.getLogger(__name__)


class TrainingError(SignflowError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN)."""


def memory_format_for(cfg: TrainConfig) -> torch.memory_format:
    return memory_format(cfg.channels_last)


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


def epoch_batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """`order` cut into batches of `batch_size`; a last batch of one image joins the one before it:
    BatchNorm layers in training mode cannot normalise a single image (PyTorch raises), and a train
    split of k x batch_size + 1 images (e.g. captured frames) would otherwise stop the run."""
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


class PlainRunner:
    """Every epoch runs the whole network on freshly augmented images, read from the decoded cache.

    Subclasses change only which module trains, which cached rows a batch reads and how they become
    inputs, and how the validation logits are computed; the epoch loop and the metrics are shared.
    Augmentation runs here, in the training process, drawing from the run's generator (the loader's
    workers only read), so a run repeats exactly.
    """

    prefix_runtime = "none"

    def __init__(self, model, data: TrainingData, prep: Preprocessing, cfg: TrainConfig, device):
        self.model, self.data, self.prep, self.cfg, self.device = model, data, prep, cfg, device
        self.memory_format = memory_format_for(cfg)
        self.train_labels, self.valid_labels = data.train.labels, data.valid.labels
        self._batches = EpochBatches()
        self._loader = None

    def trained_module(self) -> nn.Module:
        return self.model

    def train_rows(self) -> DiskArray:
        """The cache file the training batches are read from."""
        return self.data.images("train")

    def first_row(self, epoch: int) -> int:
        """Where this epoch's rows start in `train_rows` (the cached runner's views follow one another)."""
        return 0

    def batch_inputs(self, rows: torch.Tensor, generator: torch.Generator, epoch: int) -> torch.Tensor:
        batch = rows.to(self.device, non_blocking=True).float()
        if self.cfg.augment.enabled:
            batch = augment(batch, self.cfg.augment, generator)
        return normalize(batch, self.prep).contiguous(memory_format=self.memory_format)

    def valid_logits(self) -> torch.Tensor:
        """Logits of the model as it is now for every validation image, in manifest order."""
        cfg = self.cfg
        chunks = read_chunks(self.data.images("valid"), cfg.inference_batch_size)
        logits = [
            predict_logits(
                self.model, images, self.prep, cfg.inference_batch_size, self.device, cfg.channels_last, cfg.amp
            )
            for images in chunks
        ]
        return torch.cat(logits) if logits else torch.empty((0, 0))

    def loader(self):
        if self._loader is None:
            pin_memory = self.device.type == "cuda"
            self._loader = create_loader(self.train_rows(), self._batches, self.cfg.loader_workers, pin_memory)
        return self._loader

    def train_epoch(self, optimizer, generator: torch.Generator, epoch: int) -> tuple[float, float]:
        """One pass over the shuffled train split; returns (mean loss, accuracy)."""
        set_train_mode(self.model)
        labels, batch_size = self.train_labels, self.cfg.batch_size
        order = torch.randperm(len(labels), generator=generator)
        batches = epoch_batches(order, batch_size)
        first = self.first_row(epoch)
        self._batches.batches = [(index + first).numpy() for index in batches]
        total_loss, correct = 0.0, 0
        loaded = zip(batches, self.loader(), strict=True)
        for index, rows in progress(loaded, total=len(batches), desc=f"epoch {epoch}", unit="batch", leave=False):
            inputs = self.batch_inputs(rows, generator, epoch)
            targets = labels[index].to(self.device, non_blocking=True)
            loss, hits = train_step(self.trained_module(), inputs, targets, self.cfg, optimizer, epoch)
            total_loss, correct = total_loss + loss, correct + hits
        return total_loss / len(order), correct / len(order)

    def validate(self) -> tuple[float, float]:
        """(loss, accuracy) on the valid split; NaN when there is none."""
        if len(self.valid_labels) == 0:
            return float("nan"), float("nan")
        logits = self.valid_logits()
        loss = nn.functional.cross_entropy(logits, self.valid_labels).item()
        return loss, (logits.argmax(1) == self.valid_labels).float().mean().item()

    def close(self) -> None:
        """Stop the loader's worker processes and close the cache files."""
        self._loader = None
        self.data.close()


class CachedRunner(PlainRunner):
    """The frozen prefix runs once per image view (see _feature_cache); epochs train only the tail.

    The views are drawn from `generator` here, before any epoch (or, when they are already cached,
    the generator is moved to where drawing them leaves it): a resumed run, which restores the
    generator afterwards, trains on exactly the views of the uninterrupted one.
    """

    def __init__(self, cut: CutModel, model, data: TrainingData, prep, cfg: TrainConfig, device, generator):
        super().__init__(model, data, prep, cfg, device)
        self.cut = cut
        cache = FeatureCache(cut, data, cfg, device, generator)
        ensure_space(data.folder, cache.needed_entries(), advice=space_advice(cfg, features=True))
        self.train_features: CachedFeatures = cache.open("train")
        self.valid_features: CachedFeatures = cache.open("valid")
        self.views = cache.views
        self.prefix_runtime = self.train_features.runtime
        log.info(
            "frozen features before %s (%s, %s): %d view(s) of %d images, in %s",
            cut.cut_name,
            self.prefix_runtime,
            cfg.cache_dtype,
            self.views,
            len(self.train_labels),
            data.folder,
        )

    def trained_module(self) -> nn.Module:
        return self.cut.tail

    def train_rows(self) -> DiskArray:
        return self.train_features.array

    def first_row(self, epoch: int) -> int:
        return ((epoch - 1) % self.views) * len(self.train_labels)

    def batch_inputs(self, rows: torch.Tensor, generator: torch.Generator, epoch: int) -> torch.Tensor:
        # float() before the channels-last view: converting a permuted float16 tensor took 100x longer
        return self.train_features.layout.to_tensor(rows.to(self.device, non_blocking=True).float())

    def close(self) -> None:
        super().close()
        self.train_features.array.close()
        self.valid_features.array.close()

    @torch.inference_mode()
    def valid_logits(self) -> torch.Tensor:
        self.cut.tail.eval()
        features = self.valid_features
        logits = []
        for rows in read_chunks(features.array, self.cfg.inference_batch_size):
            batch = features.layout.to_tensor(rows.to(self.device, non_blocking=True).float())
            with autocast_for(self.device, self.cfg.amp):
                logits.append(self.cut.tail(batch).float().cpu())
        return torch.cat(logits) if logits else torch.empty((0, 0))


def space_advice(cfg: TrainConfig, features: bool) -> str:
    """Which params shrink the cache, for the message when the disk is too small."""
    if not features:
        return "lower train.image_size (the decoded images grow with its square)"
    advice = "lower train.cached_views (the features grow with it) or train.image_size (all grows with its square)"
    if cfg.cache_dtype != "float16":
        advice += ", or set train.cache_dtype: float16 (half the features' size)"
    return advice


def create_runner(
    model, data: TrainingData, prep: Preprocessing, cfg: TrainConfig, device, generator: torch.Generator
) -> PlainRunner:
    """The cached runner when enabled and exact for this model and freeze depth, else the plain one."""
    if cfg.cache_frozen_features:
        example = normalize(data.example(2).to(device), prep)
        cut = cut_model(model, example.contiguous(memory_format=memory_format_for(cfg)))
        if cut is not None:
            return CachedRunner(cut, model, data, prep, cfg, device, generator)
    ensure_space(data.folder, list(data.entries.values()), advice=space_advice(cfg, features=False))
    return PlainRunner(model, data, prep, cfg, device)
