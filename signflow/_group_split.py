"""Stratified assignment of groups of images to splits: every group lands in one split, and each
class's image count in each split is as close to its target (fraction x class size) as the groups allow.

scikit-learn's StratifiedGroupKFold makes k equal folds; train/valid/test fractions such as
0.70/0.15/0.15 would need several folds merged, each adding its own rounding. This greedy does the
job for unequal fractions directly. Groups are placed largest first (they are the hardest to fit;
equal sizes in a seeded random order), each into one of the splits where it fits (no class above its
target), drawn at random (seeded) with probability proportional to the images those splits still
lack: so a group of any size lands in test about as often as test's share, as in a random split,
rather than the large ones all filling train first. A group that fits nowhere goes where it adds
least to the squared distance of the counts from their targets. A single image fits somewhere until
the last of its class, which leaves every class within one image of its target when the groups
before them fit.
"""

from __future__ import annotations

import numpy as np


def assign_groups(labels: np.ndarray, groups: np.ndarray, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Split name (one of the `fractions` keys with a positive fraction) for each image.

    `labels` are class indices and `groups` group ids (any integers) per image; the result depends only
    on them, the fractions and the seed, not on the order of equal-size groups in the input."""
    names = [name for name, fraction in fractions.items() if fraction > 0]
    shares = np.array([fractions[name] for name in names]) / sum(fractions[name] for name in names)
    target = shares[:, None] * np.bincount(labels)[None, :]
    group_ids, member_group = np.unique(groups, return_inverse=True)
    group_of_pair, pair_class, pair_count = _composition(member_group, labels, target.shape[1])
    sizes = np.bincount(member_group)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(group_ids))
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    draws = rng.random((len(group_ids), len(names) + 1))
    starts = np.searchsorted(group_of_pair, np.arange(len(group_ids) + 1))
    counts = np.zeros_like(target)
    chosen = np.empty(len(group_ids), np.int64)
    for group in order:
        cls = pair_class[starts[group] : starts[group + 1]]
        count = pair_count[starts[group] : starts[group + 1]]
        best = _best_split(counts[:, cls], target[:, cls], count, draws[group])
        counts[best, cls] += count
        chosen[group] = best
    return np.array(names)[chosen[member_group]]


def _best_split(counts: np.ndarray, target: np.ndarray, count: np.ndarray, draw: np.ndarray) -> int:
    """The split for a group with `count` images of some classes, given the splits' current `counts`
    and `target`s of those classes (splits x classes); `draw` holds uniform random numbers."""
    deficit = target - counts
    fits = (deficit >= count - 1e-9).all(axis=1)
    if fits.any():
        weight = np.cumsum(np.where(fits, (count * deficit).sum(axis=1), 0.0))
        return int(min(np.searchsorted(weight, draw[0] * weight[-1], side="right"), len(weight) - 1))
    added_error = (count * (2 * (counts - target) + count)).sum(axis=1)
    return int(np.lexsort((draw[1:], added_error))[0])


def _composition(member_group: np.ndarray, labels: np.ndarray, classes: int):
    """(group, class, images) triples, sorted by group: how many images of each class each group holds."""
    keys, count = np.unique(member_group.astype(np.int64) * classes + labels, return_counts=True)
    return keys // classes, keys % classes, count.astype(np.float64)
