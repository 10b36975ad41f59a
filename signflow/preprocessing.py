"""The preprocessing a model was trained with; stored in the model file. Light on purpose (no timm)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn an image into the tensor the model was trained on; stored with the model."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Preprocessing:
        return cls(int(raw["image_size"]), tuple(raw["mean"]), tuple(raw["std"]), str(raw["interpolation"]))
