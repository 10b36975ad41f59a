"""Stratified assignment of groups of images to splits: every group lands in one split, and each
class's image count in each split is as close to its target (fraction x class size) as the groups allow.

scikit-learn's StratifiedGroupKFold makes k equal folds; train/valid/test fractions such as
0.70/0.15/0.15 would need several folds merged, each adding its own rounding. This greedy does the
same job for unequal fractions directly: groups are placed largest first (they are the hardest to
fit; equal sizes in a seeded random order), each into the split where it most reduces the squared
distance of the per-class counts from their targets. When every group is one image, each goes to the
split whose class is furthest below target, which leaves every class within one image of its target.
"""

from __future__ import annotations

import numpy as np


def assign_groups(labels: np.ndarray, groups: np.ndarray, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Split name (one of the `fractions` keys with a positive fraction) for each image.

    `labels` are class indices and `groups` group ids (any integers) per image; the result depends only
    on them, the fractions and the seed, not on the order of equal-size groups in the input."""
    names = [name for name, fraction in fractions.items() if fraction > 0]
    shares = np.array([fractions[name] for name in names]) / sum(fractions[name] for name in names)
    totals = np.bincount(labels)
    target = shares[:, None] * totals[None, :]
    group_ids, member_group = np.unique(groups, return_inverse=True)
    group_of_pair, pair_class, pair_count = _composition(member_group, labels, totals.size)
    sizes = np.bincount(member_group)
    shuffled = np.random.default_rng(seed).permutation(len(group_ids))
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    starts = np.searchsorted(group_of_pair, np.arange(len(group_ids) + 1))
    counts = np.zeros_like(target)
    chosen = np.empty(len(group_ids), np.int64)
    for group in order:
        cls = pair_class[starts[group] : starts[group + 1]]
        count = pair_count[starts[group] : starts[group + 1]]
        cost = (count * (2 * (counts[:, cls] - target[:, cls]) + count)).sum(axis=1)
        best = int(np.argmin(cost))
        counts[best, cls] += count
        chosen[group] = best
    return np.array(names)[chosen[member_group]]


def _composition(member_group: np.ndarray, labels: np.ndarray, classes: int):
    """(group, class, images) triples, sorted by group: how many images of each class each group holds."""
    keys, count = np.unique(member_group.astype(np.int64) * classes + labels, return_counts=True)
    return keys // classes, keys % classes, count.astype(np.float64)
