"""Property-based test of the split: for any class sizes, duplicates and fractions it is
stratified, deterministic for a seed, disjoint, complete, and keeps identical files together."""

import hashlib

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signflow.split import SplitError, drop_duplicates, stratified_split
from tests.helpers import section


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
    test = draw(st.sampled_from([0.1, 0.15, 0.2, 0.25, 0.3]))
    valid = draw(st.sampled_from([0.0, 0.1, 0.15, 0.2]))
    cfg = section("split", train=round(1 - test - valid, 10), valid=valid, test=test, seed=draw(st.integers(0, 2**16)))
    return frame.sample(frac=1, random_state=draw(st.integers(0, 1000))).reset_index(drop=True), cfg


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets())
def test_split_properties(data):
    images, cfg = data
    usable, rejected = drop_duplicates(images)
    try:
        parts = stratified_split(usable, cfg)
    except SplitError:
        # Only when a class is too small for these fractions; the message says which.
        smallest = usable["label"].value_counts().min()
        assert smallest * min(cfg.test, cfg.valid or 1) < 2 or smallest < 4
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
        assert abs(in_test - cfg.test * len(group)) <= 1.5, (label, in_test, len(group))
    # deterministic for a seed, whatever the input order
    again = stratified_split(usable.sample(frac=1, random_state=1).reset_index(drop=True), cfg)
    for name in parts:
        assert sorted(parts[name]["path"]) == sorted(again[name]["path"])


def test_too_small_a_class_is_refused_with_a_message():
    frame = pd.DataFrame(
        {"path": ["a/1", "a/2", "b/1", "b/2", "b/3", "b/4"], "label": list("aabbbb"), "sha256": list("123456")}
    )
    with pytest.raises(SplitError, match="cannot split"):
        stratified_split(frame, section("split", train=0.4, valid=0.3, test=0.3, seed=0))
