"""Train only the trainable tail on activations of the frozen prefix, computed once per image view.

When the first blocks of a network are frozen (and their BatchNorm layers are in eval mode, as
`set_train_mode` keeps them), their output for a given input image never changes during training.
Computing it once and training the tail on it gives the same gradients as the plain loop for the
same inputs, at a fraction of the cost. Augmentation changes the input, so `views` augmented copies
of each training image are passed through the prefix up front and the epochs cycle through them.

This needs the model to be a plain chain of modules; `split_model` checks that on a real batch and
returns None when it is not (the plain loop is then used).

On the CPU the frozen prefix is by default run by ONNX Runtime (`train.cache_runtime`): its fused
convolutions ran the MobileNetV2 prefix 4-5x faster than PyTorch's CPU kernels on 2 cores, and its
outputs differ from PyTorch's by ~1e-5 (checked on every run, see `onnx_prefix`).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from signflow._augment import augment
from signflow._onnx import INPUT_NAME, export_module, onnx_session
from signflow._preprocessing import Preprocessing, normalize
from signflow.config import AugmentConfig

log = logging.getLogger(__name__)


@dataclass
class SplitModel:
    prefix: nn.Sequential
    tail: nn.Sequential
    cut_name: str


def module_chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's top-level children in order, with nn.Sequential containers opened up."""
    chain: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, nn.Sequential):
                visit(f"{full}.", child)
            else:
                chain.append((full, child))

    visit("", model)
    return chain


@torch.no_grad()
def split_model(model: nn.Module, example: torch.Tensor) -> SplitModel | None:
    """Cut the model before its first trainable module; None if that is not possible or not exact."""
    chain = module_chain(model)
    cut = next((i for i, (_, m) in enumerate(chain) if any(p.requires_grad for p in m.parameters())), None)
    if cut is None or cut == 0:
        return None
    prefix, tail = nn.Sequential(*[m for _, m in chain[:cut]]), nn.Sequential(*[m for _, m in chain[cut:]])
    was_training = model.training
    model.eval()
    try:
        expected = model(example)
        chained = tail(prefix(example))
        exact = chained.shape == expected.shape and torch.allclose(chained, expected, atol=1e-4, rtol=1e-4)
    except Exception as error:  # noqa: BLE001 - any failure means "not a plain chain"
        log.info("frozen-feature cache unavailable (%s); using the plain training loop", error)
        return None
    finally:
        model.train(was_training)
    if not exact:
        log.info("model is not a plain chain of modules; using the plain training loop")
        return None
    return SplitModel(prefix.eval(), tail, chain[cut][0])


class OnnxPrefix:
    """The frozen prefix as an ONNX Runtime session: a callable from an NCHW batch to its features."""

    def __init__(self, session, input_name: str):
        self.session, self.input_name = session, input_name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


# The prefix graph never leaves memory: any opset the installed ONNX Runtime runs will do.
PREFIX_OPSET = 17


def onnx_prefix(prefix: nn.Module, example: torch.Tensor, threads: int) -> OnnxPrefix | None:
    """`prefix` exported to ONNX Runtime, or None (logged) if that fails or does not match PyTorch."""
    try:
        buffer = io.BytesIO()
        example = example.detach().float().cpu().contiguous()
        export_module(prefix, example, buffer, opset=PREFIX_OPSET)
        runner = OnnxPrefix(onnx_session(buffer.getvalue(), threads=threads), INPUT_NAME)
        with torch.inference_mode():
            expected = prefix(example)
        actual = runner(example)
    except Exception as error:  # noqa: BLE001 - any failure means "use PyTorch for the prefix"
        log.warning("ONNX Runtime cannot run the frozen layers (%s); using PyTorch for them", error)
        return None
    if actual.shape != expected.shape or not torch.allclose(actual, expected.float(), atol=1e-3, rtol=1e-3):
        difference = (actual - expected).abs().max().item() if actual.shape == expected.shape else float("nan")
        log.warning("ONNX Runtime's frozen-layer output differs from PyTorch's (%.2e); using PyTorch", difference)
        return None
    return runner


@torch.inference_mode()
def compute_features(
    prefix: nn.Module | OnnxPrefix,
    images: torch.Tensor,
    prep: Preprocessing,
    batch_size: int,
    device: torch.device,
    memory_format: torch.memory_format,
    augment_cfg: AugmentConfig | None = None,
    generator: torch.Generator | None = None,
    desc: str = "frozen features",
) -> torch.Tensor:
    """Prefix activations for every image (optionally augmented first), kept on `device`."""
    outputs = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, unit="batch", leave=False):
        batch = images[start : start + batch_size].float()
        if augment_cfg is not None:
            batch = augment(batch, augment_cfg, generator)
        batch = normalize(batch.to(device), prep)
        if not isinstance(prefix, OnnxPrefix):  # ONNX Runtime takes plain NCHW
            batch = batch.contiguous(memory_format=memory_format)
        outputs.append(prefix(batch).to(device))
    features = torch.cat(outputs)
    # A cut after global pooling (head-only training) gives (N, C) features: no memory format to apply.
    return features.contiguous(memory_format=memory_format) if features.dim() == 4 else features
