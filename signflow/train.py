"""Fine-tune step: a timm model with a new head, trained on the train split, selected on valid.

The checkpoint with the best validation accuracy (ties: lower validation loss) is written to
`model_path` with its class list and preprocessing; per-epoch metrics go to `log_path` (CSV).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from signflow.checkpoint import ModelBundle, save_bundle
from signflow.config import ConfigError, TrainConfig
from signflow.errors import SignflowError
from signflow.feature_cache import SplitModel, compute_features, onnx_prefix, split_model
from signflow.fileio import write_atomic
from signflow.inference import autocast_for, predict_logits
from signflow.model import (
    apply_freeze_policy,
    count_parameters,
    create_model,
    preprocessing_for,
    resolve_device,
    set_train_mode,
)
from signflow.preprocess import augment, load_images, normalize
from signflow.resume import TrainingState, load_state, resume_key, resume_path, save_state
from signflow.split import read_class_names, read_manifest

log = logging.getLogger(__name__)


class TrainingError(SignflowError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the best checkpoint so far is kept."""


@dataclass(frozen=True)
class TrainResult:
    model_path: str
    best_epoch: int
    best_valid_accuracy: float
    epochs_run: int
    seconds: float
    train_images_per_second: float
    trainable_parameters: int
    total_parameters: int


@dataclass
class SplitTensors:
    images: torch.Tensor
    labels: torch.Tensor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_split(raw_dir: Path, split_dir: Path, name: str, prep) -> SplitTensors:
    manifest = read_manifest(split_dir, name)
    images = load_images([raw_dir / p for p in manifest["path"]], prep, desc=f"decode {name}")
    return SplitTensors(images, torch.tensor(manifest["label_index"].to_numpy(), dtype=torch.long))


def create_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _step(model, inputs, targets, cfg: TrainConfig, optimizer, device, epoch: int) -> tuple[float, int]:
    """One optimiser step; returns (summed loss, correct predictions) of the batch."""
    with autocast_for(device, cfg.amp):
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
    if not torch.isfinite(loss):
        raise TrainingError(
            f"epoch {epoch}: loss became {loss.item()}; lower train.lr or check the data. "
            "The best checkpoint so far was kept."
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item() * len(targets), (logits.argmax(1) == targets).sum().item()


class PlainRunner:
    """Every epoch runs the whole network on freshly augmented images.

    Subclasses change only which module trains, where a batch's inputs come from and how the
    validation logits are computed; the epoch loop and the metrics are shared.
    """

    def __init__(self, model, train_data: SplitTensors, valid_data: SplitTensors, prep, cfg: TrainConfig, device):
        self.model, self.train_data, self.valid_data = model, train_data, valid_data
        self.prep, self.cfg, self.device = prep, cfg, device
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

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
            self.model, self.valid_data.images, self.prep, cfg.batch_size * 2, self.device, cfg.channels_last, cfg.amp
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
            loss, hits = _step(self.trained_module(), inputs, targets, self.cfg, optimizer, self.device, epoch)
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
    """The frozen prefix runs once per image view (see feature_cache); epochs train only the tail."""

    def __init__(self, split: SplitModel, model, train_data, valid_data, prep, cfg: TrainConfig, device, generator):
        super().__init__(model, train_data, valid_data, prep, cfg, device)
        self.split = split
        views = cfg.cached_views if cfg.augment.enabled else 1
        augment_cfg = cfg.augment if cfg.augment.enabled else None
        prefix = split.prefix
        if cfg.cache_runtime == "onnxruntime" or (cfg.cache_runtime == "auto" and device.type == "cpu"):
            example = normalize(train_data.images[:2].float(), prep)
            prefix = onnx_prefix(split.prefix, example, torch.get_num_threads()) or split.prefix
        self.prefix_runtime = "torch" if prefix is split.prefix else "onnxruntime"
        features = partial(
            compute_features,
            prefix,
            prep=prep,
            batch_size=cfg.batch_size * 2,
            device=device,
            memory_format=self.memory_format,
        )
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

    def trained_module(self) -> nn.Module:
        return self.split.tail

    def batch_inputs(self, index: torch.Tensor, generator: torch.Generator, epoch: int) -> torch.Tensor:
        return self.train_views[(epoch - 1) % len(self.train_views)][index.to(self.device)]

    @torch.inference_mode()
    def valid_logits(self) -> torch.Tensor:
        self.split.tail.eval()
        step = self.cfg.batch_size * 2
        return torch.cat(
            [
                self.split.tail(self.valid_features[i : i + step]).float().cpu()
                for i in range(0, len(self.valid_features), step)
            ]
        )


def create_runner(model, train_data, valid_data, prep, cfg: TrainConfig, device, generator) -> PlainRunner:
    """The cached runner when enabled and exact for this model and freeze depth, else the plain one."""
    if cfg.cache_frozen_features:
        example = normalize(train_data.images[:2].float(), prep).to(device)
        split = split_model(
            model,
            example.contiguous(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format),
        )
        if split is not None:
            return CachedRunner(split, model, train_data, valid_data, prep, cfg, device, generator)
    return PlainRunner(model, train_data, valid_data, prep, cfg, device)


def _is_better(accuracy: float, loss: float, best: tuple[float, float] | None) -> bool:
    if best is None:
        return True
    if np.isnan(accuracy):
        return True  # no validation split: keep the last epoch
    return accuracy > best[0] or (accuracy == best[0] and loss < best[1])


def check_image_size(model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """Refuse an image size the architecture cannot take (e.g. a ViT's fixed patch grid), before any work."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device))
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ConfigError(
            f"train.image_size: {cfg.image_size} px is not supported by {cfg.model} ({str(error).splitlines()[0]}); "
            "use the size the model was made for or another model"
        ) from None
    finally:
        model.train(was_training)


def fine_tune(
    cfg: TrainConfig, raw_dir: str | Path, split_dir: str | Path, model_path: str | Path, log_path: str | Path
) -> TrainResult:
    """Train as `cfg` says and write the best model to `model_path`, the epoch log to `log_path`.

    After each epoch the full training state goes to `<model_path>.resume`; a rerun with the same
    params and data continues from there (see signflow.resume) and removes it when done.
    """
    raw_dir, split_dir = Path(raw_dir), Path(split_dir)
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    class_names = read_class_names(split_dir)
    weights = Path(cfg.weights_file) if cfg.weights_file else None
    model = create_model(cfg, len(class_names), weights)
    apply_freeze_policy(model, cfg.trainable_blocks)
    trainable, total = count_parameters(model)
    log.info(
        "%s: %d of %d parameters trainable (trainable_blocks=%s)", cfg.model, trainable, total, cfg.trainable_blocks
    )
    prep = preprocessing_for(model, cfg.image_size)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    check_image_size(model, cfg, device)
    train_data = load_split(raw_dir, split_dir, "train", prep)
    valid_data = load_split(raw_dir, split_dir, "valid", prep)
    optimizer = create_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    generator = torch.Generator().manual_seed(cfg.seed)
    # The runner draws its cached augmented views from `generator` first: the same on a resumed run.
    runner = create_runner(model, train_data, valid_data, prep, cfg, device, generator)
    checkpoint, key = resume_path(model_path), resume_key(cfg, split_dir, class_names)
    state = load_state(checkpoint, key, class_names) if cfg.resume else None
    history, best, best_state, best_epoch, train_seconds, first_epoch = [], None, None, 0, 0.0, 1
    if state is not None:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        generator.set_state(state.generator)
        history, best, best_state, best_epoch = state.history, state.best, state.best_state, state.best_epoch
        train_seconds, first_epoch = state.train_seconds, state.epoch + 1
        log.info("resuming from %s after epoch %d of %d", checkpoint, state.epoch, cfg.epochs)
    started = time.perf_counter()
    # A checkpoint is never written after the last epoch or an early stop, so there is work left.
    epochs = range(first_epoch, cfg.epochs + 1)
    progress = tqdm(epochs, desc="fine-tune", unit="epoch", initial=first_epoch - 1, total=cfg.epochs)
    for epoch in progress:
        tick = time.perf_counter()
        try:
            train_loss, train_acc = runner.train_epoch(optimizer, generator, epoch)
        except TrainingError:
            if best_state is not None:
                _save(model_path, cfg, class_names, prep, best_state, best_epoch, best, history)
            checkpoint.unlink(missing_ok=True)  # resuming would only meet the same NaN again
            raise
        train_seconds += time.perf_counter() - tick
        scheduler.step()
        valid_loss, valid_acc = runner.validate()
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "valid_loss": valid_loss,
                "valid_accuracy": valid_acc,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - tick,
            }
        )
        log.info(
            "epoch %d: train loss %.4f acc %.4f | valid loss %.4f acc %.4f",
            epoch,
            train_loss,
            train_acc,
            valid_loss,
            valid_acc,
        )
        if _is_better(valid_acc, valid_loss, best):
            best, best_epoch = (valid_acc, valid_loss), epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        stopped_early = _early_stop(cfg, epoch, best_epoch)
        if cfg.resume and epoch < cfg.epochs and not stopped_early:
            snapshot = TrainingState(
                epoch,
                {k: v.detach().cpu() for k, v in model.state_dict().items()},
                optimizer.state_dict(),
                scheduler.state_dict(),
                generator.get_state(),
                best,
                best_state,
                best_epoch,
                history,
                train_seconds,
            )
            save_state(checkpoint, key, class_names, snapshot)
        if stopped_early:
            log.info("early stop: no better validation accuracy for %d epochs", cfg.early_stopping_patience)
            break
    write_atomic(log_path, lambda tmp: pd.DataFrame(history).to_csv(tmp, index=False))
    images_per_second = len(history) * len(train_data.labels) / max(train_seconds, 1e-9)
    extra = {"train_images_per_second": images_per_second, "train_seconds": train_seconds}
    _save(model_path, cfg, class_names, prep, best_state, best_epoch, best, history, extra)
    checkpoint.unlink(missing_ok=True)
    return TrainResult(
        str(model_path),
        best_epoch,
        float(best[0]),
        len(history),
        time.perf_counter() - started,
        images_per_second,
        trainable,
        total,
    )


def _early_stop(cfg: TrainConfig, epoch: int, best_epoch: int) -> bool:
    return bool(cfg.early_stopping_patience) and epoch - best_epoch >= cfg.early_stopping_patience


def _save(model_path, cfg, class_names, prep, state, best_epoch, best, history, extra=None) -> None:
    bundle = ModelBundle(
        model_name=cfg.model,
        class_names=class_names,
        preprocessing=prep,
        state_dict=state,
        train_params=cfg.model_dump(mode="json"),
        summary={
            "best_epoch": best_epoch,
            "valid_accuracy": best[0],
            "valid_loss": best[1],
            "epochs_run": len(history),
            **(extra or {}),
        },
    )
    save_bundle(bundle, model_path)
