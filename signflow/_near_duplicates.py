"""Near-duplicate images: a perceptual hash per image, the pairs within a Hamming distance, clusters.

The hash is the 256-bit DCT perceptual hash: the image in grayscale, shrunk to 64x64 (LANCZOS), its
2-D DCT, and one bit per coefficient of the 16x16 lowest frequencies (above their median or not).
It is `imagehash.phash(image, hash_size=16)` bit for bit (checked on all 2062 Sign Language Digits
photos), written with scipy's DCT instead of depending on that package: the rest of it (and its
PyWavelets dependency) is not needed, and the pair search needs the bits packed into integers.

Each image gets two hashes: of the whole picture and of its central 90%. A pair is near when the
whole-image hashes, or one image's centre and the other's whole, are within the distance: the second
catches a centred zoom-in (a 90% crop scaled back up), which moves the whole-image hash as far as two
different photos are apart. Shifts of more than about 2% of the image, off-centre crops, flips and
rotations are not caught.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.fft
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

HASH_BITS = 256
_SIDE = 64
_LOW = 16
_CENTRE = 0.9
_WORDS = HASH_BITS // 64
_BLOCK_ELEMENTS = 1 << 21
"""Hash pairs compared at once in the pair search (about 16 MB of temporaries per comparison)."""


def _phash(gray: Image.Image, box: tuple[float, float, float, float] | None) -> np.ndarray:
    pixels = np.asarray(gray.resize((_SIDE, _SIDE), Image.Resampling.LANCZOS, box=box), dtype=np.float64)
    low = scipy.fft.dctn(pixels, type=2)[:_LOW, :_LOW]
    bits = low > np.median(low)
    return np.packbits(bits.ravel()).view(">u8").astype(np.uint64)


def image_hashes(image: Image.Image) -> np.ndarray:
    """(2, 4) uint64: the 256-bit perceptual hash of the whole image and of its central 90%."""
    gray = image.convert("L")
    width, height = gray.size
    margin_x, margin_y = width * (1 - _CENTRE) / 2, height * (1 - _CENTRE) / 2
    centre = (margin_x, margin_y, width - margin_x, height - margin_y)
    return np.stack([_phash(gray, None), _phash(gray, centre)])


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances (uint16) between every row of `a` (r, words) and every row of `b` (m, words)."""
    total = np.zeros((len(a), len(b)), np.uint16)
    for word in range(a.shape[1]):
        total += np.bitwise_count(a[:, word, None] ^ b[None, :, word])
    return total


def _pairs_among(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All i < j of `hashes` (n, 2, words) within `max_distance`: brute force in row blocks."""
    whole, centre = hashes[:, 0], hashes[:, 1]
    n = len(hashes)
    rows = max(1, _BLOCK_ELEMENTS // max(n, 1))
    found_i, found_j, found_d = [], [], []
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        distance = _distances(whole[start:stop], whole[start:])
        np.minimum(distance, _distances(centre[start:stop], whole[start:]), out=distance)
        np.minimum(distance, _distances(whole[start:stop], centre[start:]), out=distance)
        i, j = np.nonzero(distance <= max_distance)
        later = j > i  # column j of this block is image start + j, row i is image start + i
        found_i.append(i[later] + start)
        found_j.append(j[later] + start)
        found_d.append(distance[i[later], j[later]])
    if not found_i:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint16)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


def near_pairs(hashes: np.ndarray, classes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (P, 2) of row indices (first < second) of images of the same class within `max_distance`
    bits, and their distances (P,).

    Only pairs within a class are searched: a near-duplicate with another label cannot make a test
    accuracy look better than it is, and the search is cheaper by about the number of classes."""
    pairs, distances = [np.empty((0, 2), np.int64)], [np.empty(0, np.uint16)]
    for label in np.unique(classes):
        rows = np.flatnonzero(classes == label)
        i, j, d = _pairs_among(hashes[rows], max_distance)
        pairs.append(np.stack([rows[i], rows[j]], axis=1))
        distances.append(d)
    return np.concatenate(pairs), np.concatenate(distances)


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected-component label (0..k-1, numbered in row order) of each of `n` rows linked by `edges` (E, 2)."""
    edges = np.asarray(edges, np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


@dataclass(frozen=True)
class NearDuplicates:
    """Pairs (P, 2) of row indices (first < second) of same-class images within the distance, their
    distances, and how long the search took."""

    pairs: np.ndarray
    distances: np.ndarray
    seconds: float


def find_near_pairs(hashes: np.ndarray, classes: np.ndarray, max_distance: int) -> NearDuplicates:
    start = time.perf_counter()
    pairs, distances = near_pairs(hashes, classes, max_distance)
    return NearDuplicates(pairs, distances, time.perf_counter() - start)
