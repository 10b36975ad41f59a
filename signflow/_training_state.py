"""Where a fine-tune stands, and the epoch checkpoints that let an interrupted one continue.

`TrainingState` is what the epoch loop updates: epochs done, the best epoch and its weights, the
epoch log, training time. After every epoch the train step writes `<model file>.resume`
(atomically) with that state plus the model, optimizer, scheduler and every random generator's
state, the class list and a key. The key is a hash of the train params (except `resume` itself)
and of the split manifests, so a checkpoint made with other params or other data is never
resumed. Continuing from it gives the same weights as an uninterrupted run (same machine and
threads).

The checkpoint holds only tensors, numbers, strings, lists and dicts, and is read with
`torch.load(weights_only=True)`: a checkpoint file cannot run code when it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from signflow.config import TrainConfig
from signflow.fileio import write_atomic

log = logging.getLogger(__name__)

FORMAT = "signflow-resume-2"


class TrainingObjects(Protocol):
    """What, besides `TrainingState`, an epoch checkpoint saves and restores."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator


@dataclass
class TrainingState:
    """Progress of one fine-tune: updated after every epoch, saved in every epoch checkpoint."""

    epoch: int = 0
    """The last finished epoch (0 before the first)."""
    best_accuracy: float | None = None
    best_loss: float | None = None
    best_epoch: int = 0
    best_weights: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0

    def record_epoch(self, row: dict[str, Any], model: torch.nn.Module) -> None:
        """Log an epoch and keep the model's weights if they are the best on validation so far
        (higher accuracy; ties: lower loss; without a validation split, the last epoch)."""
        self.history.append(row)
        self.epoch = row["epoch"]
        accuracy, loss = row["valid_accuracy"], row["valid_loss"]
        better = (
            self.best_accuracy is None
            or math.isnan(accuracy)
            or accuracy > self.best_accuracy
            or (accuracy == self.best_accuracy and loss < self.best_loss)
        )
        if better:
            self.best_accuracy, self.best_loss, self.best_epoch = accuracy, loss, self.epoch
            self.best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def stops_early(self, patience: int) -> bool:
        """True when `patience` (> 0) epochs passed without a better validation accuracy."""
        return bool(patience) and self.epoch - self.best_epoch >= patience


def resume_path(model_path: str | Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".resume")


def resume_key(cfg: TrainConfig, split_dir: str | Path, class_names: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(cfg.model_dump(mode="json", exclude={"resume"}), sort_keys=True).encode())
    digest.update(json.dumps(class_names).encode())
    for name in ("train.csv", "valid.csv"):
        path = Path(split_dir) / name
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()


def _global_rng_states() -> dict[str, Any]:
    """torch's, numpy's and Python's global generators, as tensors and plain values."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "python": [version, list(python_state), gauss_next],
    }


def _restore_global_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, python_state, gauss_next = states["python"]
    random.setstate((version, tuple(python_state), gauss_next))


def save_checkpoint(
    path: Path, key: str, class_names: list[str], state: TrainingState, objects: TrainingObjects
) -> None:
    payload = {
        "format": FORMAT,
        "key": key,
        "class_names": class_names,
        "state": {name: getattr(state, name) for name in TrainingState.__dataclass_fields__},
        "model": {k: v.detach().cpu() for k, v in objects.model.state_dict().items()},
        "optimizer": objects.optimizer.state_dict(),
        "scheduler": objects.scheduler.state_dict(),
        "generator": objects.generator.get_state(),
        "rng": _global_rng_states(),
    }
    write_atomic(path, lambda tmp: torch.save(payload, tmp))


def restore_checkpoint(path: Path, key: str, class_names: list[str], objects: TrainingObjects) -> TrainingState | None:
    """Restore `objects` and the global generators from the checkpoint at `path` and return its state,
    if it exists and was made by these params on this data; else None (and the log says why)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged or foreign checkpoint is ignored, not fatal
        log.warning(
            "%s is unreadable or not a signflow checkpoint (%s): training starts from the beginning", path, error
        )
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        log.warning("%s is not a signflow resume checkpoint: training starts from the beginning", path)
        return None
    if payload["key"] != key or payload["class_names"] != class_names:
        log.warning("%s was made with other train params or data: not resumed, training starts over", path)
        return None
    objects.model.load_state_dict(payload["model"])
    objects.optimizer.load_state_dict(payload["optimizer"])
    objects.scheduler.load_state_dict(payload["scheduler"])
    objects.generator.set_state(payload["generator"])
    _restore_global_rng_states(payload["rng"])
    return TrainingState(**payload["state"])
