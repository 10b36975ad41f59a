"""Epoch checkpoints that let an interrupted fine-tune continue where it stopped.

After every epoch the train step writes `<model file>.resume` (atomically): model, optimizer and
scheduler state, every random generator's state, the epoch, the best weights so far, the epoch
log, the class list and a key. The key is a hash of the train params (except `resume` itself) and
of the split manifests, so a checkpoint made with other params or other data is never resumed.
Continuing from it gives the same weights as an uninterrupted run (same machine and threads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from signflow.config import TrainConfig
from signflow.fileio import write_atomic

log = logging.getLogger(__name__)

FORMAT = "signflow-resume-1"


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


@dataclass
class TrainingState:
    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    generator: torch.Tensor
    best: tuple[float, float] | None
    best_state: dict[str, torch.Tensor] | None
    best_epoch: int
    history: list[dict[str, Any]]
    train_seconds: float


def save_state(path: Path, key: str, class_names: list[str], state: TrainingState) -> None:
    payload = {
        "format": FORMAT,
        "key": key,
        "class_names": class_names,
        "epoch": state.epoch,
        "model": state.model,
        "optimizer": state.optimizer,
        "scheduler": state.scheduler,
        "generator": state.generator,
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "best": state.best,
        "best_state": state.best_state,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "train_seconds": state.train_seconds,
    }
    write_atomic(path, lambda tmp: torch.save(payload, tmp))


def load_state(path: Path, key: str, class_names: list[str]) -> TrainingState | None:
    """The saved state if it exists and was made by these params on this data; else None (and why)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - a damaged checkpoint is ignored, not fatal
        log.warning("%s is unreadable (%s): training starts from the beginning", path, error)
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        log.warning("%s is not a signflow resume checkpoint: training starts from the beginning", path)
        return None
    if payload["key"] != key or payload["class_names"] != class_names:
        log.warning("%s was made with other train params or data: not resumed, training starts over", path)
        return None
    torch.set_rng_state(payload["torch_rng"])
    np.random.set_state(payload["numpy_rng"])
    random.setstate(payload["python_rng"])
    return TrainingState(
        epoch=payload["epoch"],
        model=payload["model"],
        optimizer=payload["optimizer"],
        scheduler=payload["scheduler"],
        generator=payload["generator"],
        best=tuple(payload["best"]) if payload["best"] is not None else None,
        best_state=payload["best_state"],
        best_epoch=payload["best_epoch"],
        history=payload["history"],
        train_seconds=payload["train_seconds"],
    )
