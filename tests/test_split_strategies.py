"""split.strategy on datasets as users have them: their own split folders, group keys in file names,
near-duplicate clusters; and the errors for layouts that cannot be honoured."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from signflow.config import ConfigError, parse_params
from signflow.split import SplitError, split_dataset
from signflow.split_files import read_manifest
from tests.helpers import CLASS_COLOURS, build_split_folders, photo, section, tiny_params, video

TRAIN_TEST = {"train": "train", "test": "test"}


def manifests(split_dir):
    return {name: read_manifest(split_dir, name) for name in ("train", "valid", "test")}


def report(split_dir) -> dict:
    return json.loads((split_dir / "report.json").read_text())


def test_folders_keep_the_shipped_test_fixed_and_carve_valid_out_of_train(tmp_path):
    raw = build_split_folders(tmp_path / "raw", TRAIN_TEST, per_class=8)
    first = split_dataset(raw, tmp_path / "a", section("split", seed=1))
    split_dataset(raw, tmp_path / "b", section("split", seed=2))
    a, b = manifests(tmp_path / "a"), manifests(tmp_path / "b")
    assert first.strategy == "folders" and report(tmp_path / "a")["strategy_asked"] == "auto"
    assert sorted(a["test"]["path"]) == sorted(p.relative_to(raw).as_posix() for p in (raw / "test").rglob("*.JPG"))
    assert (tmp_path / "a" / "test.csv").read_bytes() == (tmp_path / "b" / "test.csv").read_bytes(), "seed-proof"
    assert set(a["valid"]["path"]) != set(b["valid"]["path"]), "the seed only moves the train/valid carve"
    assert all(p.startswith("train/") for p in pd.concat([a["train"], a["valid"]])["path"])
    # valid is 0.15 / (0.70 + 0.15) of each class's train-folder images, stratified
    for name in CLASS_COLOURS:
        assert abs((a["valid"]["label"] == name).sum() - 8 * 0.15 / 0.85) < 1, name
    assert "carved out of train/" in first.description and "test/" in first.description


def test_folders_with_train_valid_and_test_use_each_as_shipped(tmp_path):
    names = {"train": "Training", "valid": "val", "test": "Testing"}
    raw = build_split_folders(tmp_path / "raw", names, per_class=3)
    result = split_dataset(raw, tmp_path / "split", section("split"))
    parts = manifests(tmp_path / "split")
    for split, folder in names.items():
        assert parts[split]["path"].str.startswith(f"{folder}/").all() and len(parts[split]) == 3 * len(CLASS_COLOURS)
    assert result.description.startswith("the dataset's own split folders (Training/, val/, Testing/), kept as shipped")


def test_random_strategy_merges_the_split_folders_and_splits_again(tmp_path):
    raw = build_split_folders(tmp_path / "raw", TRAIN_TEST, per_class=8)
    result = split_dataset(raw, tmp_path / "split", section("split", strategy="random"))
    test = manifests(tmp_path / "split")["test"]
    assert result.strategy == "random" and test["path"].str.startswith("train/").any()
    assert sum(result.counts.values()) == 16 * len(CLASS_COLOURS)


def test_a_class_missing_from_the_test_folder_is_named_with_the_folder(tmp_path):
    raw = build_split_folders(tmp_path / "raw", TRAIN_TEST, per_class=4)
    shutil.rmtree(raw / "test" / "beta")
    with pytest.raises(SplitError, match=r"class 'beta' has no usable images in the test/ folder"):
        split_dataset(raw, tmp_path / "split", section("split"))
    assert not (tmp_path / "split").exists()
    assert split_dataset(raw, tmp_path / "split", section("split", strategy="random")).strategy == "random"


def test_a_valid_folder_without_train_is_refused(tmp_path):
    raw = build_split_folders(tmp_path / "raw", {"valid": "valid", "test": "test"}, per_class=4)
    with pytest.raises(SplitError, match=r"split folder\(s\) valid/, test/ but no train folder"):
        split_dataset(raw, tmp_path / "split", section("split"))


def test_folders_asked_for_a_dataset_without_split_folders(class_folders, tmp_path):
    with pytest.raises(SplitError, match="split.strategy is folders, but .* holds class folders"):
        split_dataset(class_folders, tmp_path / "split", section("split", strategy="folders"))


def test_an_identical_file_in_train_and_test_folders_stays_in_test(tmp_path):
    raw = build_split_folders(tmp_path / "raw", TRAIN_TEST, per_class=8)
    shutil.copy(raw / "test" / "alpha" / "IMG_000.JPG", raw / "train" / "alpha" / "copy.jpg")
    split_dataset(raw, tmp_path / "split", section("split"))
    reasons = {item["path"]: item["reason"] for item in report(tmp_path / "split")["excluded"]}
    assert reasons == {"train/alpha/copy.jpg": "duplicate of test/alpha/IMG_000.JPG"}


@pytest.fixture
def signer_folders(tmp_path):
    """Per class 8 signers x 3 photos, named `<class>/signer<k>_<n>.png`; signer 0 of alpha has 6."""
    rng = np.random.default_rng(3)
    raw = tmp_path / "raw"
    for label in CLASS_COLOURS:
        (raw / label).mkdir(parents=True)
        for signer in range(8):
            for shot in range(6 if (label, signer) == ("alpha", 0) else 3):
                photo(rng).resize((48, 48)).save(raw / label / f"signer{signer}_{shot}.png")
    return raw


def test_group_strategy_keeps_each_key_in_one_split_and_says_how_far_classes_moved(signer_folders, tmp_path):
    cfg = section("split", strategy="group", group_pattern=r"/(signer\d+)_", near_duplicates="off")
    result = split_dataset(signer_folders, tmp_path / "split", cfg)
    parts = manifests(tmp_path / "split")
    keys = pd.concat(frame.assign(split=name) for name, frame in parts.items())
    keys["key"] = keys["label"] + keys["path"].str.extract(r"/(signer\d+)_", expand=False)
    assert keys.groupby("key")["split"].nunique().max() == 1
    assert keys.groupby("group")["split"].nunique().max() == 1 and (keys["group"] >= 0).all()
    balance = report(tmp_path / "split")["class_balance"]
    assert set(balance["largest_deviation"]) == {"train", "valid", "test"}
    assert "8 keys of split.group_pattern" in result.description and "points of their targets" in result.description


def test_a_group_pattern_matching_nothing_or_only_some_files_names_the_pattern_and_a_path(signer_folders, tmp_path):
    with pytest.raises(
        SplitError, match=r"group_pattern '\(clip\\\\d\+\)' matches none of the 75 image paths, e\.g\. "
    ):
        split_dataset(signer_folders, tmp_path / "s", section("split", strategy="group", group_pattern=r"(clip\d+)"))
    (signer_folders / "beta" / "signer3_1.png").rename(signer_folders / "beta" / "unnamed.png")
    with pytest.raises(SplitError, match=r"no group key for 1 of 75 image paths, e\.g\. 'beta/unnamed\.png'"):
        split_dataset(signer_folders, tmp_path / "s", section("split", strategy="group", group_pattern=r"(signer\d)"))
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "group", "group_pattern": None}, "strategy group needs split.group_pattern"),
        ({"strategy": "group", "group_pattern": r"signer\d+"}, "has 0 capture groups"),
        ({"strategy": "group", "group_pattern": r"(s)(\d+)"}, "has 2 capture groups"),
        ({"group_pattern": "(unclosed"}, "not a valid regular expression"),
        ({"strategy": "shuffle"}, "split.strategy"),
        ({"near_duplicates": "maybe"}, "split.near_duplicates"),
    ],
)
def test_bad_split_settings_are_refused_naming_the_key(changes, message):
    raw = tiny_params()
    raw["split"].update(changes)
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


def test_a_cluster_swallowing_its_class_stops_a_grouped_split_and_points_to_group_pattern(tmp_path):
    rng = np.random.default_rng(4)
    raw = tmp_path / "raw"
    for label in ("a", "b"):
        (raw / label).mkdir(parents=True)
        for frame, image in enumerate(video(rng, frames=12)):
            image.save(raw / label / f"webcam_{frame:02d}.jpg")
        for index in range(6):
            photo(rng).save(raw / label / f"photo_{index}.png")
    with pytest.raises(SplitError, match=r"cluster of 12 near-duplicate images holds 67% of class 'a'.*group_pattern"):
        split_dataset(raw, tmp_path / "split", section("split"))
    result = split_dataset(raw, tmp_path / "split", section("split", near_duplicates="report"))
    near = report(tmp_path / "split")["near_duplicates"]["test_images_with_train_near_duplicate"]
    assert f"{len(near)} of {result.counts['test']} test images have a near-duplicate in train" in result.description
    assert len(near) > 0 and all(t["train_path"].split("/")[1].startswith("webcam") for t in near)
    test = manifests(tmp_path / "split")["test"].fillna("")
    assert (test["train_near_duplicate"] != "").sum() == len(near)
