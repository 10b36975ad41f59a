"""The model file: weights plus everything needed to use them correctly (classes, preprocessing)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from signflow._preprocessing import Preprocessing
from signflow.errors import SignflowError
from signflow.fileio import write_atomic

FORMAT_VERSION = 1


class CheckpointError(SignflowError, ValueError):
    """A model file that is missing, foreign, or does not match the data it is used with."""


@dataclass
class ModelBundle:
    model_name: str
    class_names: list[str]
    preprocessing: Preprocessing
    state_dict: dict[str, torch.Tensor]
    train_params: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    """Softmax temperature fitted on the validation split (signflow._calibration): probabilities are
    softmax(logits / temperature). Model files from before calibration have none: 1.0."""

    def fingerprint(self) -> str:
        """sha256 of the weights, class list and temperature: equal models (same probabilities) get
        equal fingerprints. A temperature of 1.0 is left out, so uncalibrated models keep theirs."""
        digest = hashlib.sha256()
        digest.update(self.model_name.encode())
        digest.update("\n".join(self.class_names).encode())
        if self.temperature != 1.0:
            digest.update(f"temperature={self.temperature!r}".encode())
        for name in sorted(self.state_dict):
            tensor = self.state_dict[name].detach().cpu().contiguous()
            digest.update(name.encode())
            digest.update(
                tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes()
            )
        return digest.hexdigest()

    @property
    def channels_last(self) -> bool:
        """Whether to run the model channels_last, as it was trained (train.channels_last; on by default)."""
        return bool(self.train_params.get("channels_last", True))

    def build_model(self) -> nn.Module:
        import timm

        model = timm.create_model(self.model_name, pretrained=False, num_classes=len(self.class_names))
        model.load_state_dict(self.state_dict)
        return model.eval()

    def check_classes(self, class_names: list[str], where: str) -> None:
        if list(class_names) != list(self.class_names):
            raise CheckpointError(
                f"class list mismatch: the model was trained on {self.class_names}, but {where} has {class_names}. "
                "Class indices would shift; retrain the model on this split."
            )

    def check_preprocessing(self, where: str) -> None:
        """Refuse preprocessing that is not what the model was trained with (a damaged or edited file)."""
        prep, trained_size = self.preprocessing, self.train_params.get("image_size")
        problems = []
        if trained_size is not None and prep.image_size != trained_size:
            problems.append(f"image size {prep.image_size} but trained at train.image_size {trained_size}")
        if len(prep.mean) != 3 or len(prep.std) != 3 or any(not (0 < v < 10) for v in prep.std):
            problems.append(f"mean {prep.mean} / std {prep.std} are not 3 channels with positive std")
        if problems:
            raise CheckpointError(f"{where}: preprocessing does not match the model: {'; '.join(problems)}")


def save_bundle(bundle: ModelBundle, path: str | Path) -> Path:
    """Write the model file, replacing `path` in one rename."""
    return write_atomic(path, lambda tmp: write_bundle(bundle, tmp))


def write_bundle(bundle: ModelBundle, path: str | Path) -> None:
    """Write the model file at `path` as it is (torch.save is not atomic): for a caller that stages it
    with other files and renames them together."""
    payload = {
        "format_version": FORMAT_VERSION,
        "model_name": bundle.model_name,
        "class_names": bundle.class_names,
        "preprocessing": bundle.preprocessing.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in bundle.state_dict.items()},
        "train_params": bundle.train_params,
        "summary": bundle.summary,
        "temperature": float(bundle.temperature),
    }
    torch.save(payload, path)


def load_bundle(path: str | Path) -> ModelBundle:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found; run the train step first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"{path}: not a readable signflow model file ({error})") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a signflow model file (format {FORMAT_VERSION} expected)")
    temperature = payload.get("temperature", 1.0)
    if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise CheckpointError(f"{path}: softmax temperature {temperature!r} is not a positive number; retrain")
    return ModelBundle(
        model_name=payload["model_name"],
        class_names=list(payload["class_names"]),
        preprocessing=Preprocessing.from_dict(payload["preprocessing"]),
        state_dict=payload["state_dict"],
        train_params=payload["train_params"],
        summary=payload.get("summary", {}),
        temperature=float(temperature),
    )
