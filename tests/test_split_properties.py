"""Property-based tests of the split: for any class sizes, duplicates, groups and fractions it is
stratified, deterministic for a seed, disjoint, complete, keeps identical files together, and never
lets a group (same key or near-duplicate cluster) cross splits."""

import hashlib

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signflow.split import SplitError, drop_duplicates, stratified_split


def _fractions(draw) -> tuple[dict[str, float], int]:
    test = draw(st.sampled_from([0.1, 0.15, 0.2, 0.25, 0.3]))
    valid = draw(st.sampled_from([0.0, 0.1, 0.15, 0.2]))
    return {"train": round(1 - test - valid, 10), "valid": valid, "test": test}, draw(st.integers(0, 2**16))


@st.composite
def datasets(draw):
    classes = draw(st.integers(min_value=2, max_value=5))
    rows = []
    for c in range(classes):
        size = draw(st.integers(min_value=3, max_value=40))
        duplicates = draw(st.integers(min_value=0, max_value=3))
        for i in range(size):
            content = f"class{c}-image{i}" if i >= duplicates else f"class{c}-image0"  # the first few are identical
            rows.append(
                {"path": f"c{c}/img{i}.jpg", "label": f"c{c}", "sha256": hashlib.sha256(content.encode()).hexdigest()}
            )
    frame = pd.DataFrame(rows)
    frame["width"] = frame["height"] = 100
    fractions, seed = _fractions(draw)
    return frame.sample(frac=1, random_state=draw(st.integers(0, 1000))).reset_index(drop=True), fractions, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets())
def test_split_properties(data):
    images, fractions, seed = data
    usable, rejected = drop_duplicates(images)
    try:
        parts = stratified_split(usable, fractions, seed)
    except SplitError:
        # Only when a class is too small for these fractions; the message says which.
        smallest = usable["label"].value_counts().min()
        assert smallest * min(fractions["test"], fractions["valid"] or 1) < 2 or smallest < 4
        return
    together = pd.concat(parts.values())
    # complete and disjoint: every usable image exactly once
    assert sorted(together["path"]) == sorted(usable["path"])
    # identical files never in two splits (only one copy is kept at all)
    assert together["sha256"].is_unique
    assert {r["path"] for r in rejected} == set(images["path"]) - set(usable["path"])
    # stratified: each class's share of the test split is within one image of the asked fraction
    for label, group in usable.groupby("label"):
        in_test = (parts["test"]["label"] == label).sum()
        assert abs(in_test - fractions["test"] * len(group)) <= 1.5, (label, in_test, len(group))
    # deterministic for a seed, whatever the input order
    again = stratified_split(usable.sample(frac=1, random_state=1).reset_index(drop=True), fractions, seed)
    for name in parts:
        assert sorted(parts[name]["path"]) == sorted(again[name]["path"])


@st.composite
def grouped_datasets(draw):
    """Classes of singletons plus groups of 2-6 images within a class (near-duplicate clusters), at least
    three singletons for each image of the largest group, so the groups allow an exact split;
    and sometimes groups spanning classes (a signer or clip key)."""
    rows, group = [], 0
    for c in range(draw(st.integers(min_value=2, max_value=4))):
        sizes = draw(st.lists(st.integers(min_value=2, max_value=6), min_size=1, max_size=5))
        singles = draw(st.integers(min_value=3 * max(sizes), max_value=3 * max(sizes) + 40))
        for size in [*sizes, *[1] * singles]:
            rows += [{"label": f"c{c}", "group": group} for _ in range(size)]
            group += 1
    frame = pd.DataFrame(rows)
    frame["path"] = [f"{label}/img{i}.jpg" for i, label in enumerate(frame["label"])]
    frame["sha256"] = [hashlib.sha256(p.encode()).hexdigest() for p in frame["path"]]
    cross = draw(st.booleans())
    if cross:  # merge a few groups of different classes into one key
        frame.loc[frame.sample(n=4, random_state=draw(st.integers(0, 99))).index, "group"] = -7
    fractions, seed = _fractions(draw)
    return frame.sample(frac=1, random_state=draw(st.integers(0, 1000))).reset_index(drop=True), fractions, seed, cross


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grouped_datasets())
def test_grouped_split_keeps_groups_whole_and_classes_within_one_of_target(data):
    images, fractions, seed, cross = data
    parts = stratified_split(images, fractions, seed, groups=images["group"])
    together = pd.concat(parts.values())
    assert sorted(together["path"]) == sorted(images["path"])
    split_of = {path: name for name, part in parts.items() for path in part["path"]}
    assert images.assign(split=images["path"].map(split_of)).groupby("group")["split"].nunique().max() == 1
    if not cross:
        for name, part in parts.items():
            for label, group in images.groupby("label"):
                target = fractions[name] * len(group)
                assert abs((part["label"] == label).sum() - target) < 1, (name, label, target)
    shuffled = images.sample(frac=1, random_state=3).reset_index(drop=True)
    again = stratified_split(shuffled, fractions, seed, groups=shuffled["group"])
    for name in parts:
        assert sorted(parts[name]["path"]) == sorted(again[name]["path"])


def test_too_small_a_class_is_refused_with_a_message():
    frame = pd.DataFrame(
        {"path": ["a/1", "a/2", "b/1", "b/2", "b/3", "b/4"], "label": list("aabbbb"), "sha256": list("123456")}
    )
    with pytest.raises(SplitError, match="class 'a' has 2 usable image"):
        stratified_split(frame, {"train": 0.4, "valid": 0.3, "test": 0.3}, 0)


def test_the_advice_to_drop_validation_says_what_it_costs_and_is_given_only_when_it_helps():
    frame = pd.DataFrame({"path": ["a/1", "a/2", "b/1", "b/2", "b/3"], "label": list("aabbb"), "sha256": list("12345")})
    with pytest.raises(SplitError, match=r"or set split.valid to 0 \(then training keeps its last epoch, fits no"):
        stratified_split(frame, {"train": 0.4, "valid": 0.3, "test": 0.3}, 0)
    with pytest.raises(SplitError, match="class 'a' has 1 usable image") as refused:
        stratified_split(frame.iloc[1:], {"train": 0.6, "valid": 0.0, "test": 0.4}, 0)
    assert "split.valid" not in str(refused.value), "valid is already 0"


def test_a_class_in_too_few_groups_is_refused_naming_it():
    frame = pd.DataFrame({"path": [f"p{i}" for i in range(12)], "label": ["a"] * 6 + ["b"] * 6})
    frame["sha256"] = frame["path"]
    groups = pd.Series([0, 0, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7])
    with pytest.raises(SplitError, match=r"class 'a' has 6 usable image\(s\) in 2 group\(s\)"):
        stratified_split(frame, {"train": 0.7, "valid": 0.15, "test": 0.15}, 0, groups=groups)
    assert np.array_equal(groups, [0, 0, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7])


def test_groups_reach_every_split_in_proportion_not_only_train():
    """Like a random split, a group lands in test about as often as test's share: the large groups do
    not all fill train first (which would leave the test split without any image that has a near-duplicate)."""
    rows = [(f"c{c}", f"c{c}-pair{k}") for c in range(3) for k in range(20) for _ in range(2)]
    rows += [(f"c{c}", f"c{c}-single{k}") for c in range(3) for k in range(40)]
    frame = pd.DataFrame(rows, columns=["label", "group"])
    frame["path"] = [f"{label}/{i}.jpg" for i, label in enumerate(frame["label"])]
    frame["sha256"] = frame["path"]
    fractions = {"train": 0.7, "valid": 0.15, "test": 0.15}
    in_pairs = frame["group"].str.contains("pair")
    shares = []
    for seed in range(10):
        test = stratified_split(frame, fractions, seed, groups=frame["group"])["test"]
        shares.append(in_pairs[test.index].sum() / in_pairs.sum())
    assert 0.08 < np.mean(shares) < 0.25 and min(shares) > 0, shares
