"""Building a timm model for fine-tuning: weights, a new head, the freeze policy, preprocessing."""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import timm
import torch
from timm.models import group_parameters
from torch import nn

from signflow._preprocessing import Preprocessing
from signflow.config import ConfigError, TrainConfig
from signflow.errors import SignflowError

log = logging.getLogger(__name__)


class ModelError(SignflowError, ValueError):
    """A model that cannot be built as configured; the message names the key to change."""


def check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models() for names."
    raise ModelError(f"train.model: {name!r} is not a timm model.{hint}")


def create_model(cfg: TrainConfig, num_classes: int, weights_file: Path | None = None) -> nn.Module:
    """Create `cfg.model` with a fresh `num_classes` head and ImageNet weights as configured.

    Weights come from `weights_file` (timm's local-file override) when given, else from the hub when
    `cfg.pretrained`, else none. Set HF_HUB_OFFLINE=1 to fail fast instead of waiting on the network.
    """
    check_model_name(cfg.model)
    kwargs: dict = {"num_classes": num_classes}
    if weights_file is not None:
        check_weights_file(weights_file)
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file)}
    pretrained = cfg.pretrained or weights_file is not None
    try:
        return timm.create_model(cfg.model, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as error:
        source = weights_file or "the model hub"
        raise ModelError(
            f"train.model {cfg.model!r}: could not load pretrained weights from {source}: {error}. "
            "Set train.weights_file to a local copy, or train.pretrained: false."
        ) from None


def check_weights_file(path: Path) -> None:
    """Refuse a weights file that could run code when loaded: only safetensors files and checkpoints
    that load with `torch.load(weights_only=True)` (tensors, numbers, strings, containers) are used."""
    if not path.is_file():
        raise ModelError(f"train.weights_file: {path} does not exist")
    if path.suffix.lower() == ".safetensors":
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any refusal by the safe unpickler means "not weights only"
        reason = str(error).splitlines()[0][:200]
        raise ModelError(
            f"train.weights_file: {path} is not a safetensors file or a weights-only PyTorch checkpoint "
            f"({reason}); a pickled file can run code when loaded, so it is refused. Convert it to "
            "safetensors (safetensors.torch.save_file(state_dict, 'weights.safetensors')) on a machine you trust."
        ) from None


def preprocessing_for(model: nn.Module, image_size: int) -> Preprocessing:
    """Normalisation and interpolation from timm's data config for this model, at `image_size`."""
    data_cfg = timm.data.resolve_data_config({}, model=model)
    return Preprocessing(
        image_size=image_size,
        mean=tuple(float(v) for v in data_cfg["mean"]),
        std=tuple(float(v) for v in data_cfg["std"]),
        interpolation=str(data_cfg.get("interpolation", "bilinear")),
    )


def parameter_blocks(model: nn.Module) -> list[list[str]]:
    """The model's parameter groups from stem to last block, head excluded (timm's group_matcher).

    These are the "layers" a notebook unfreezes by hand; their granularity is timm's fine one
    (one entry per block for MobileNet/EfficientNet, one per conv layer for VGG).
    """
    head = {f"{name}" for name, _ in _classifier_parameters(model)}
    groups = group_parameters(model, model.group_matcher(coarse=False))
    blocks = [[n for n in names if n not in head] for names in groups.values()]
    return [b for b in blocks if b]


def _classifier_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    classifier = model.get_classifier()
    ids = {id(p) for p in classifier.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def apply_freeze_policy(model: nn.Module, trainable_blocks: int | str) -> list[str]:
    """Freeze everything but the head and the last `trainable_blocks` blocks; return trainable names."""
    blocks = parameter_blocks(model)
    if trainable_blocks == "all":
        trainable = {n for n, _ in model.named_parameters()}
    else:
        count = int(trainable_blocks)
        if count > len(blocks):
            raise ModelError(
                f"train.trainable_blocks: {count} is more than the {len(blocks)} blocks of this model; "
                f"use at most {len(blocks)}, or 'all'"
            )
        trainable = {n for n, _ in _classifier_parameters(model)}
        for names in blocks[len(blocks) - count :]:
            trainable.update(names)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    return sorted(trainable)


def set_train_mode(model: nn.Module) -> None:
    """Train mode only for modules that have trainable parameters or follow them.

    Frozen BatchNorm layers stay in eval mode so their ImageNet statistics are used, as Keras does
    for frozen layers; updating them from small batches of one dataset hurts accuracy.
    """
    model.train()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and own and not any(p.requires_grad for p in own):
            module.eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("train.device: 'cuda' was asked for, but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
