"""What training reads, and from where: each split's images decoded once into the disk cache
(`signflow._disk_cache`), and batches of cached rows read by a DataLoader.

Memory does not grow with the dataset: images are decoded in bounded chunks straight into a cache
file, and an epoch reads one batch of rows at a time (whole index arrays per read, in worker
processes when `train.loader_workers` > 0, into pinned memory when training on CUDA).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from signflow._disk_cache import ArraySpec, CacheEntry, DiskArray, content_key
from signflow._preprocessing import Preprocessing, decode_chunks, load_images

DECODER = 2
"""Bumped whenever decoding changes what an image becomes (2: centre square cut before resizing)."""


@dataclass(frozen=True)
class SplitFiles:
    """One split as the manifests give it: image files, their sha256 (what the cache keys on) and
    label indices."""

    name: str
    paths: list[Path]
    hashes: list[str]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.paths)

    def content_hash(self) -> str:
        return hashlib.sha256("\n".join(self.hashes).encode()).hexdigest()


def images_entry(folder: Path, split: SplitFiles, prep: Preprocessing) -> CacheEntry:
    """The cache entry of `split` decoded at `prep`'s size: (N, 3, S, S) uint8, in manifest order."""
    size = prep.image_size
    key = content_key(
        {
            "kind": "images",
            "decoder": DECODER,
            "pillow": PIL.__version__,
            "image_size": size,
            "interpolation": prep.interpolation,
            "images": split.content_hash(),
        }
    )
    spec = ArraySpec(len(split), (3, size, size), "uint8")
    return CacheEntry(folder, "images", key, spec, f"{len(split):,} {split.name} images decoded at {size} px")


class TrainingData:
    """The train and valid splits of one run, decoded into the cache folder when first needed."""

    def __init__(self, folder: Path, prep: Preprocessing, train: SplitFiles, valid: SplitFiles):
        self.folder, self.prep = Path(folder), prep
        self.splits = {"train": train, "valid": valid}
        self.entries = {name: images_entry(self.folder, split, prep) for name, split in self.splits.items()}
        self._arrays: dict[str, DiskArray] = {}
        self._example: torch.Tensor | None = None

    @property
    def train(self) -> SplitFiles:
        return self.splits["train"]

    @property
    def valid(self) -> SplitFiles:
        return self.splits["valid"]

    def example(self, count: int = 2) -> torch.Tensor:
        """The first `count` (at most 2) training images as uint8, decoded directly (before any
        cache exists): what the model is checked and the prefix exported with."""
        if self._example is None:
            self._example = load_images(self.train.paths[:2], self.prep, desc="decode example")
        return self._example[:count]

    def images(self, name: str) -> DiskArray:
        """The split `name` ('train' or 'valid') as decoded rows, decoding it into the cache first
        unless a run with the same images and size already did."""
        if name not in self._arrays:
            split = self.splits[name]

            def fill(writer) -> dict:
                for chunk in decode_chunks(split.paths, self.prep, desc=f"decode {name}"):
                    writer.write(chunk.numpy())
                return {}

            self._arrays[name], _ = self.entries[name].build(fill)
        return self._arrays[name]

    def close(self) -> None:
        for array in self._arrays.values():
            array.close()


def read_chunks(array: DiskArray, chunk_size: int) -> Iterator[torch.Tensor]:
    """All rows of `array` in order, as tensors of `chunk_size` rows (one read each)."""
    for start in range(0, len(array), chunk_size):
        yield torch.from_numpy(array.read_range(start, start + chunk_size))


class RowBatches(Dataset):
    """Items are whole batches: indexed by an array of row numbers, it returns those rows as one
    tensor (no per-sample Python work, no collation)."""

    def __init__(self, array: DiskArray):
        self.array = array

    def __getitem__(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.array.read_rows(rows))


class EpochBatches(Sampler):
    """The current epoch's batches of row numbers, set before each epoch; the loader's worker
    processes outlive the epoch, so the batches are handed over here rather than at creation."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def create_loader(array: DiskArray, sampler: EpochBatches, workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader reading `sampler`'s batches of `array` rows in `workers` processes (0: in this one)."""
    return DataLoader(
        RowBatches(array),
        sampler=sampler,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers else None,
        # The loader draws its workers' base seed from this generator; without one it would draw
        # from torch's global generator and change the run's random stream.
        generator=torch.Generator(),
    )
