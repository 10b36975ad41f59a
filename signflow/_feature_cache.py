"""Train only the trainable tail on activations of the frozen prefix, computed once per image view.

When the first blocks of a network are frozen (and their BatchNorm layers are in eval mode, as
`set_train_mode` keeps them), their output for a given input image never changes during training.
Computing it once and training the tail on it gives the same gradients as the plain loop for the
same inputs, at a fraction of the cost. Augmentation changes the input, so `views` augmented copies
of each training image are passed through the prefix up front and the epochs cycle through them.

This needs the model to be a plain chain of modules; `cut_model` checks that on a real batch and
returns None when it is not (the plain loop is then used).

On the CPU the frozen prefix is by default run by ONNX Runtime (`train.cache_runtime`): its fused
convolutions ran the MobileNetV2 prefix 4-5x faster than PyTorch's CPU kernels on 2 cores, and its
outputs differ from PyTorch's by ~1e-5 (checked on every run, see `onnx_prefix`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from signflow._augment import augment
from signflow._disk_cache import ArraySpec, CacheEntry, DiskArray, RowWriter, content_key
from signflow._forward import autocast_for, memory_format
from signflow._onnx import INPUT_NAME, export_module, onnx_session
from signflow._preprocessing import Preprocessing, normalize
from signflow._progress import progress
from signflow._training_data import TrainingData, read_chunks
from signflow.config import AugmentConfig, TrainConfig
from signflow.errors import SignflowError

log = logging.getLogger(__name__)


@dataclass
class CutModel:
    prefix: nn.Sequential
    tail: nn.Sequential
    cut_name: str
    feature_shape: tuple[int, ...]
    """The prefix's output shape for one image (C, H, W) or (C,), as `cut_model` saw it."""


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
def cut_model(model: nn.Module, example: torch.Tensor) -> CutModel | None:
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
        features = prefix(example)
        chained = tail(features)
        exact = chained.shape == expected.shape and torch.allclose(chained, expected, atol=1e-4, rtol=1e-4)
    except Exception as error:  # noqa: BLE001 - any failure means "not a plain chain"
        log.info("frozen-feature cache unavailable (%s); using the plain training loop", error)
        return None
    finally:
        model.train(was_training)
    if not exact:
        log.info("model is not a plain chain of modules; using the plain training loop")
        return None
    return CutModel(prefix.eval(), tail, chain[cut][0], tuple(features.shape[1:]))


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


def prefix_fingerprint(prefix: nn.Module) -> str:
    """A hash of the prefix's weights and buffers: the "weights" part of a feature entry's key
    (whatever file, hub version or seed they came from)."""
    digest = hashlib.sha256()
    for name, tensor in prefix.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def compute_features(
    prefix: nn.Module | OnnxPrefix,
    chunks: Iterable[torch.Tensor],
    prep: Preprocessing,
    device: torch.device,
    memory_format: torch.memory_format,
    augment_cfg: AugmentConfig | None = None,
    generator: torch.Generator | None = None,
    amp: bool = False,
) -> Iterator[torch.Tensor]:
    """Prefix activations of each uint8 chunk of images (optionally augmented first, drawing from
    `generator`), one tensor per chunk, on `device`. On CUDA the chunk goes through pinned memory
    and the prefix runs under bfloat16 autocast when `amp`."""
    for chunk in chunks:
        if device.type == "cuda":
            chunk = chunk.pin_memory()
        batch = chunk.to(device, non_blocking=True).float()
        if augment_cfg is not None:
            batch = augment(batch, augment_cfg, generator)
        batch = normalize(batch, prep)
        if not isinstance(prefix, OnnxPrefix):  # ONNX Runtime takes plain NCHW
            batch = batch.contiguous(memory_format=memory_format)
        with autocast_for(device, amp):
            features = prefix(batch).to(device)
        yield features  # outside autocast: the caller's code between chunks runs as it would anyway


@dataclass(frozen=True)
class FeatureLayout:
    """How one image's features are stored in a cache entry: its shape (C, H, W) or (C,), channel
    last on disk when the model runs channels_last (so a batch read back has the strides the
    in-memory features had), in `dtype`."""

    shape: tuple[int, ...]
    channels_last: bool
    dtype: str

    @property
    def nhwc(self) -> bool:
        return self.channels_last and len(self.shape) == 3

    @property
    def row_shape(self) -> tuple[int, ...]:
        return (*self.shape[1:], self.shape[0]) if self.nhwc else self.shape

    def to_rows(self, features: torch.Tensor) -> np.ndarray:
        """(B, *shape) features as rows of the entry (on the CPU, in the entry's dtype)."""
        features = features.detach()
        if self.nhwc:
            features = features.permute(0, 2, 3, 1)
        rows = features.to(getattr(torch, self.dtype)).cpu().contiguous()
        if not torch.isfinite(rows).all() and torch.isfinite(features).all():
            largest = features.abs().max().item()
            raise FeatureRangeError(
                f"frozen features reach {largest:.3g}, beyond {self.dtype}'s range; set train.cache_dtype: float32"
            )
        return rows.numpy()

    def to_tensor(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows read back as the (B, *shape) batch, channels_last strided when stored so (convert
        the number format before: `.float()` of the permuted view is many times slower)."""
        return rows.permute(0, 3, 1, 2) if self.nhwc else rows


class FeatureRangeError(SignflowError, ValueError):
    """Features that the cache's number format cannot hold; the message names the param to change."""


def cached_view_count(cfg: TrainConfig) -> int:
    """Augmented views to cache: `train.cached_views`, but no more than the epochs that use them
    (epoch e trains on view (e - 1) mod views); one when augmentation is off."""
    if not cfg.augment.enabled:
        return 1
    if cfg.epochs < cfg.cached_views:
        log.info(
            "train.cached_views is %d but %d epoch(s) use only %d: caching %d",
            cfg.cached_views,
            cfg.epochs,
            cfg.epochs,
            cfg.epochs,
        )
    return min(cfg.cached_views, cfg.epochs)


@dataclass(frozen=True)
class CachedFeatures:
    """A feature entry opened for reading: one row per image and view (the views follow one
    another: view v of image i is row v * images + i), stored as `layout` says, computed by `runtime`."""

    array: DiskArray
    layout: FeatureLayout
    runtime: str


class FeatureCache:
    """The frozen-feature entries of one run: the train split's `views` augmented views and the
    valid split's plain view, keyed by everything the features depend on (see `_key_fields`)."""

    def __init__(self, cut: CutModel, data: TrainingData, cfg: TrainConfig, device: torch.device, generator):
        self.cut, self.data, self.cfg, self.device, self.generator = cut, data, cfg, device, generator
        self.memory_format = memory_format(cfg.channels_last)
        self.layout = FeatureLayout(cut.feature_shape, cfg.channels_last, cfg.cache_dtype)
        self.views = cached_view_count(cfg)
        self.runtime = wanted_runtime(cfg, device)
        fields = self._key_fields()
        augmented = {"views": self.views, "augment": cfg.augment.model_dump() if cfg.augment.enabled else None}
        if cfg.augment.enabled:
            augmented["generator"] = hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()
        self.entries = {
            "train": self._entry(data.train, {**fields, **augmented}, self.views),
            "valid": self._entry(data.valid, {**fields, "views": 1, "augment": None}, 1),
        }
        self._prefix = None

    def _key_fields(self) -> dict:
        cfg = self.cfg
        return {
            "kind": "features",
            "model": cfg.model,
            "prefix_weights": prefix_fingerprint(self.cut.prefix),
            "cut": self.cut.cut_name,
            "runtime": self.runtime,
            "device": self.device.type,
            "amp": cfg.amp and self.device.type == "cuda",
            "layout": [list(self.layout.shape), self.layout.channels_last, self.layout.dtype],
            "batch_size": cfg.inference_batch_size,  # augmentation is drawn per batch
            "versions": [torch.__version__, _onnxruntime_version()],
        }

    def _entry(self, split_files, fields: dict, views: int) -> CacheEntry:
        images = self.data.entries[split_files.name]
        key = content_key({**fields, "images": images.key})
        spec = ArraySpec(views * len(split_files), self.layout.row_shape, self.layout.dtype)
        views_text = f"{views} views of " if views > 1 else ""
        description = (
            f"frozen features ({self.layout.dtype}) of {views_text}{len(split_files):,} {split_files.name} images"
        )
        return CacheEntry(self.data.folder, "features", key, spec, description)

    def needed_entries(self) -> list[CacheEntry]:
        """The feature entries, and the decoded images that the missing ones are computed from."""
        needed = list(self.entries.values())
        for name, entry in self.entries.items():
            if not entry.is_complete():
                needed.append(self.data.entries[name])
        return needed

    def open(self, name: str) -> CachedFeatures:
        """The entry `name` ('train' or 'valid'), computed first unless it exists. Either way the
        generator ends where computing the train views leaves it, so the epochs draw the same."""
        augment_cfg = self.cfg.augment if name == "train" and self.cfg.augment.enabled else None
        views = self.views if name == "train" else 1
        array, record = self.entries[name].build(lambda writer: self._compute(writer, name, views, augment_cfg))
        if record.get("generator_after"):
            state = bytes.fromhex(record["generator_after"])
            self.generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        return CachedFeatures(array, self.layout, record["runtime"])

    def _compute(self, writer: RowWriter, name: str, views: int, augment_cfg: AugmentConfig | None) -> dict:
        """Write `views` passes of the split's decoded images through the prefix (augmented, drawing
        from the generator, when `augment_cfg` is given); return what the entry's record adds."""
        images, batch_size = self.data.images(name), self.cfg.inference_batch_size
        for view in range(views):
            chunks = progress(
                read_chunks(images, batch_size),
                total=math.ceil(len(images) / batch_size),
                desc=f"frozen features {name} {view + 1}/{views}",
                unit="batch",
                leave=False,
            )
            features = compute_features(
                self.prefix(),
                chunks,
                self.data.prep,
                self.device,
                self.memory_format,
                augment_cfg,
                self.generator,
                self.cfg.amp,
            )
            for batch in features:
                writer.write(self.layout.to_rows(batch))
            log.info("frozen features of %s: view %d of %d done (%d images)", name, view + 1, views, len(images))
        state = self.generator.get_state().numpy().tobytes().hex() if augment_cfg else None
        return {"runtime": self.prefix_runtime(), "generator_after": state}

    def prefix(self) -> nn.Module | OnnxPrefix:
        """What computes the features: built on first use only (a run that finds its features cached
        never exports the prefix)."""
        if self._prefix is None:
            self._prefix = self.cut.prefix
            if self.runtime == "onnxruntime":
                example = normalize(self.data.example(2).float(), self.data.prep)
                self._prefix = onnx_prefix(self.cut.prefix, example, torch.get_num_threads()) or self.cut.prefix
        return self._prefix

    def prefix_runtime(self) -> str:
        return "torch" if self.prefix() is self.cut.prefix else "onnxruntime"


def wanted_runtime(cfg: TrainConfig, device: torch.device) -> str:
    """`train.cache_runtime` resolved: auto = ONNX Runtime on the CPU, PyTorch on CUDA."""
    if cfg.cache_runtime == "onnxruntime" or (cfg.cache_runtime == "auto" and device.type == "cpu"):
        return "onnxruntime"
    return "torch"


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
