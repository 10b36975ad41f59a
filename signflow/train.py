"""Train step: a timm model with a new head, trained on the train split, selected on valid.

`train_model` reads as the list of steps it takes: seed, build the model and data, resume from an
epoch checkpoint if there is one, run the epochs, write the epoch log and the best model. The
model with the best validation accuracy (ties: lower validation loss) is written to `model_path`
with its class list, preprocessing and the softmax temperature fitted on its validation logits
(signflow._calibration); per-epoch metrics go to `log_path` (CSV). The two are replaced together,
once both are written: a failed run leaves the previous model with its own log. Without validation
images (split.valid: 0) the last epoch is kept, no temperature is fitted (1.0) and early stopping is
refused.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from signflow._calibration import fit_temperature, negative_log_likelihood
from signflow._model import (
    apply_freeze_policy,
    check_image_size,
    count_parameters,
    create_model,
    preprocessing_for,
    resolve_device,
)
from signflow._model_file import ModelBundle, write_bundle
from signflow._preprocessing import Preprocessing
from signflow._progress import progress
from signflow._runners import PlainRunner, TrainingError, create_runner, memory_format_for
from signflow._training_data import SplitFiles, TrainingData
from signflow._training_state import TrainingState, restore_checkpoint, resume_key, resume_path, save_checkpoint
from signflow.config import TrainConfig
from signflow.fileio import atomic_paths
from signflow.split_files import read_class_names, read_manifest, read_max_pixels

__all__ = ["TrainResult", "TrainingError", "train_model"]

log = logging.getLogger(__name__)


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

    def summary_line(self) -> str:
        if math.isnan(self.best_valid_accuracy):
            return f"last epoch {self.best_epoch} kept (no validation split)"
        return f"best epoch {self.best_epoch}, valid accuracy {self.best_valid_accuracy:.4f}"


@dataclass
class TrainingRun:
    """Everything one fine-tune works with, built once by `prepare_training`."""

    cfg: TrainConfig
    class_names: list[str]
    model: nn.Module
    prep: Preprocessing
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    runner: PlainRunner
    train_images: int


def train_model(
    cfg: TrainConfig,
    raw_dir: str | Path,
    split_dir: str | Path,
    model_path: str | Path,
    log_path: str | Path,
    cache_dir: str | Path | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train as `cfg` says and write the best model to `model_path`, the epoch log to `log_path`.

    Decoded images and frozen features go to `cache_dir` (the workspace's `.signflow-cache/` from
    the CLI and the flows), where a rerun with the same inputs finds them; None uses a temporary
    folder removed afterwards. After each epoch the full training state goes to
    `<model_path>.resume`; a rerun with the same params and data continues from there (see
    signflow._training_state) and removes it when done. If the loss becomes NaN or infinite,
    training stops with a TrainingError and `model_path` and `log_path` keep whatever they held
    before; so do they when writing them fails (a full disk).

    `on_epoch`, when given, is called with each epoch's row of the train log (`epoch`,
    `valid_accuracy`, ...) once the epoch is recorded; an exception it raises stops training there and
    propagates, with nothing saved (a sweep prunes a hopeless trial this way).
    """
    with ExitStack() as cleanup:
        if cache_dir is None:
            cache_dir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="signflow-cache-"))
        run = prepare_training(cfg, Path(raw_dir), Path(split_dir), Path(cache_dir))
        cleanup.callback(run.runner.close)
        return train_and_save(run, cfg, split_dir, model_path, log_path, on_epoch)


def train_and_save(
    run: TrainingRun,
    cfg: TrainConfig,
    split_dir: str | Path,
    model_path: str | Path,
    log_path: str | Path,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Resume or start, run the epochs, write the epoch log and the best model (see `train_model`)."""
    checkpoint, key = resume_path(model_path), resume_key(cfg, split_dir, run.class_names)
    state = resume_or_start(run, checkpoint, key)
    started = time.perf_counter()
    try:
        run_epochs(run, state, checkpoint, key, on_epoch)
    except TrainingError as error:
        checkpoint.unlink(missing_ok=True)  # resuming would only meet the same NaN again
        raise TrainingError(f"{error}. Nothing was saved: {model_path} keeps what it held before this run") from None
    save_model_and_log(run, state, model_path, log_path, calibrate(run, state))
    checkpoint.unlink(missing_ok=True)
    trainable, total = count_parameters(run.model)
    return TrainResult(
        str(model_path),
        state.best_epoch,
        float(state.best_accuracy),
        len(state.history),
        time.perf_counter() - started,
        images_per_second(run, state),
        trainable,
        total,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_training(cfg: TrainConfig, raw_dir: Path, split_dir: Path, cache_dir: Path) -> TrainingRun:
    """Seed, build the model, and create the optimiser, the schedule and the runner, which decodes
    the train and valid splits into `cache_dir` and caches frozen features there (drawing its views
    from the generator), unless an earlier run with the same inputs already did."""
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    class_names = read_class_names(split_dir)
    train, valid = (read_split(raw_dir, split_dir, name) for name in ("train", "valid"))
    check_validation(cfg, valid, split_dir)
    model, prep = build_model(cfg, len(class_names), device)
    prep = replace(prep, max_pixels=read_max_pixels(split_dir))
    data = TrainingData(cache_dir, prep, train, valid)
    optimizer = create_optimizer(cfg, model)
    scheduler = create_scheduler(cfg, optimizer)
    generator = torch.Generator().manual_seed(cfg.seed)
    runner = create_runner(model, data, prep, cfg, device, generator)
    return TrainingRun(cfg, class_names, model, prep, optimizer, scheduler, generator, runner, len(data.train))


def build_model(cfg: TrainConfig, num_classes: int, device: torch.device) -> tuple[nn.Module, Preprocessing]:
    """`cfg.model` with its weights, a new head and the freeze policy, on `device`; refuses an image
    size the architecture cannot take before any data is decoded."""
    model = create_model(cfg, num_classes, Path(cfg.weights_file) if cfg.weights_file else None)
    apply_freeze_policy(model, cfg.trainable_blocks)
    trainable, total = count_parameters(model)
    log.info(
        "%s: %d of %d parameters trainable (trainable_blocks=%s)", cfg.model, trainable, total, cfg.trainable_blocks
    )
    prep = preprocessing_for(model, cfg.image_size)
    model.to(device, memory_format=memory_format_for(cfg))
    check_image_size(model, cfg, device)
    return model, prep


def read_split(raw_dir: Path, split_dir: Path, name: str) -> SplitFiles:
    manifest = read_manifest(split_dir, name)
    return SplitFiles(
        name,
        [raw_dir / p for p in manifest["path"]],
        manifest["sha256"].tolist(),
        # an empty manifest (split.valid: 0) reads as object columns, which torch.tensor refuses
        torch.tensor(manifest["label_index"].to_numpy(dtype=np.int64), dtype=torch.long),
    )


def check_validation(cfg: TrainConfig, valid: SplitFiles, split_dir: Path) -> None:
    """Without validation images (split.valid: 0) training keeps the last epoch and fits no
    temperature; early stopping, which needs a validation accuracy, is refused rather than ignored."""
    if len(valid):
        return
    if cfg.early_stopping_patience:
        raise TrainingError(
            f"{split_dir}/valid.csv has no images (split.valid: 0), but train.early_stopping_patience is "
            f"{cfg.early_stopping_patience}: early stopping needs a validation accuracy. Set "
            "train.early_stopping_patience: 0, or split.valid above 0"
        )
    log.warning("no validation split: the last epoch is kept and probabilities are not calibrated")


def create_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def create_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def resume_or_start(run: TrainingRun, checkpoint: Path, key: str) -> TrainingState:
    """The state saved in `checkpoint` (model, optimiser, schedule and generators restored) when
    `train.resume` is on and it belongs to these params and data; else a fresh start."""
    state = restore_checkpoint(checkpoint, key, run.class_names, run) if run.cfg.resume else None
    if state is None:
        return TrainingState()
    log.info("resuming from %s after epoch %d of %d", checkpoint, state.epoch, run.cfg.epochs)
    return state


def run_epochs(
    run: TrainingRun, state: TrainingState, checkpoint: Path, key: str, on_epoch: Callable[[dict], None] | None = None
) -> None:
    """The remaining epochs: train, validate, keep the best weights, checkpoint, maybe stop early.

    No checkpoint is written after the last epoch or an early stop: a rerun then has nothing to
    resume and trains again (the finished model is already saved).
    """
    cfg = run.cfg
    epochs = range(state.epoch + 1, cfg.epochs + 1)
    for epoch in progress(epochs, desc="fine-tune", unit="epoch", initial=state.epoch, total=cfg.epochs):
        row = run_epoch(run, state, epoch)
        state.record_epoch(row, run.model)
        log.info(
            "epoch %d: train loss %.4f acc %.4f | valid loss %.4f acc %.4f",
            *(row[k] for k in ("epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy")),
        )
        if on_epoch is not None:
            on_epoch(row)
        stops = state.stops_early(cfg.early_stopping_patience)
        if cfg.resume and epoch < cfg.epochs and not stops:
            save_checkpoint(checkpoint, key, run.class_names, state, run)
        if stops:
            log.info("early stop: no better validation accuracy for %d epochs", cfg.early_stopping_patience)
            break


def run_epoch(run: TrainingRun, state: TrainingState, epoch: int) -> dict:
    """One epoch of training (its time added to `state.train_seconds`), the schedule step and the
    validation; returns the epoch's row of the train log."""
    tick = time.perf_counter()
    train_loss, train_accuracy = run.runner.train_epoch(run.optimizer, run.generator, epoch)
    state.train_seconds += time.perf_counter() - tick
    run.scheduler.step()
    valid_loss, valid_accuracy = run.runner.validate()
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "valid_loss": valid_loss,
        "valid_accuracy": valid_accuracy,
        "lr": run.optimizer.param_groups[0]["lr"],
        "seconds": time.perf_counter() - tick,
    }


def images_per_second(run: TrainingRun, state: TrainingState) -> float:
    """Training images through the epochs per second of epoch time (decoding and caching excluded)."""
    return len(state.history) * run.train_images / max(state.train_seconds, 1e-9)


def calibrate(run: TrainingRun, state: TrainingState) -> dict:
    """Fit the softmax temperature on the validation logits of the kept (best) weights, which are
    loaded into the model for it. Returns the temperature and the validation NLL before and after;
    temperature 1.0 (no change) without a validation split."""
    if len(run.runner.valid_labels) == 0 or state.best_weights is None:
        log.info("no validation split: probabilities are not calibrated (temperature 1.0)")
        return {"temperature": 1.0}
    run.model.load_state_dict(state.best_weights)
    logits = run.runner.valid_logits().numpy()
    labels = run.runner.valid_labels.numpy()
    temperature = fit_temperature(logits, labels)
    before, after = (negative_log_likelihood(logits, labels, t) for t in (1.0, temperature))
    log.info("temperature %.4f fitted on validation: NLL %.4f -> %.4f", temperature, before, after)
    return {"temperature": temperature, "valid_nll_uncalibrated": before, "valid_nll": after}


def save_model_and_log(
    run: TrainingRun, state: TrainingState, model_path: str | Path, log_path: str | Path, calibration: dict
) -> None:
    """The model and the epoch log, which change together or not at all: both are written beside their
    targets and renamed into place only once both are written (a full disk leaves the previous pair)."""
    with atomic_paths(model_path, log_path) as (model_tmp, log_tmp):
        pd.DataFrame(state.history).to_csv(log_tmp, index=False)
        write_bundle(model_bundle(run, state, calibration), model_tmp)


def model_bundle(run: TrainingRun, state: TrainingState, calibration: dict) -> ModelBundle:
    """The best epoch's weights with the class list, preprocessing, temperature and train params."""
    return ModelBundle(
        model_name=run.cfg.model,
        class_names=run.class_names,
        preprocessing=run.prep,
        state_dict=state.best_weights,
        train_params=run.cfg.model_dump(mode="json"),
        summary={
            "best_epoch": state.best_epoch,
            "valid_accuracy": state.best_accuracy,
            "valid_loss": state.best_loss,
            "epochs_run": len(state.history),
            "train_images_per_second": images_per_second(run, state),
            "train_seconds": state.train_seconds,
            **calibration,
        },
        temperature=calibration["temperature"],
    )
