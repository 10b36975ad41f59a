import json
import shutil

import pandas as pd
import pytest
import torch

from signflow.extract import extract_dataset
from signflow.split import split_dataset
from signflow.split_files import SplitError, read_class_names, read_manifest
from tests.helpers import CLASS_COLOURS, PER_CLASS, make_image, section

CFG = section("split", train=0.5, valid=0.25, test=0.25, seed=3)


def manifests(split_dir):
    return {name: read_manifest(split_dir, name) for name in ("train", "valid", "test")}


def test_split_is_stratified_disjoint_and_complete(class_folders, tmp_path):
    result = split_dataset(class_folders, tmp_path / "split", CFG)
    parts = manifests(tmp_path / "split")
    assert result.class_names == read_class_names(tmp_path / "split") == sorted(CLASS_COLOURS)
    all_paths = pd.concat(parts.values())["path"]
    assert all_paths.is_unique and len(all_paths) == 3 * PER_CLASS
    for name, frame in parts.items():
        counts = frame["label"].value_counts()
        assert set(counts.index) == set(CLASS_COLOURS), f"{name} misses a class"
        assert counts.max() - counts.min() <= 1
        assert (frame["label_index"] == frame["label"].map(result.class_names.index)).all()


def test_same_seed_same_split_other_seed_other_split(class_folders, tmp_path):
    split_dataset(class_folders, tmp_path / "a", CFG)
    split_dataset(class_folders, tmp_path / "b", CFG)
    split_dataset(class_folders, tmp_path / "c", CFG.model_copy(update={"seed": 4}))
    for name in ("train", "valid", "test"):
        assert (tmp_path / "a" / f"{name}.csv").read_bytes() == (tmp_path / "b" / f"{name}.csv").read_bytes()
    assert (tmp_path / "a" / "test.csv").read_bytes() != (tmp_path / "c" / "test.csv").read_bytes()


def test_bad_files_are_reported_and_left_out(class_folders, tmp_path):
    good = class_folders / "alpha" / "IMG_000.JPG"
    (class_folders / "alpha" / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    (class_folders / "beta" / "notes.txt").write_text("not an image")
    (class_folders / "beta" / "empty.jpg").write_bytes(b"")
    (class_folders / "beta" / "text_named.png").write_text("not an image at all")
    shutil.copy(good, class_folders / "alpha" / "copy_of_0.jpg")
    shutil.copy(class_folders / "beta" / "IMG_003.JPG", class_folders / "beta" / "copy_of_3.jpg")
    shutil.copy(good, class_folders / "gamma ü" / "same_bytes_other_class.jpg")
    make_image(class_folders / "gamma ü" / "really_png.jpg", (40, 40, 200), seed=99, fmt="PNG")
    split_dataset(class_folders, tmp_path / "split", CFG)
    report = json.loads((tmp_path / "split" / "report.json").read_text())
    reasons = {item["path"]: item["reason"] for item in report["excluded"]}
    assert reasons["alpha/truncated.jpg"].startswith("unreadable")
    assert reasons["beta/notes.txt"].startswith("unreadable")
    assert reasons["beta/empty.jpg"].startswith("unreadable")
    assert reasons["beta/text_named.png"].startswith("unreadable")
    assert "identical file appears in classes" in reasons["alpha/IMG_000.JPG"]
    assert "identical file appears in classes" in reasons["gamma ü/same_bytes_other_class.jpg"]
    assert "identical file appears in classes" in reasons["alpha/copy_of_0.jpg"], "all three copies go"
    assert reasons["beta/copy_of_3.jpg"] == "duplicate of beta/IMG_003.JPG", "one copy within a class is kept"
    used = pd.concat(manifests(tmp_path / "split").values())
    assert "gamma ü/really_png.jpg" in set(used["path"]), "a PNG with a .jpg name is still a good image"
    assert not set(reasons) & set(used["path"])


def test_identical_files_in_one_class_stay_in_one_split(class_folders, tmp_path):
    for i in range(5):
        shutil.copy(class_folders / "beta" / "IMG_001.JPG", class_folders / "beta" / f"dup_{i}.jpg")
    split_dataset(class_folders, tmp_path / "split", CFG)
    used = pd.concat(manifests(tmp_path / "split").values())
    assert used["sha256"].is_unique


def test_too_few_images_in_a_class_names_the_class(class_folders, tmp_path):
    for file in sorted((class_folders / "beta").iterdir())[2:]:
        file.unlink()
    with pytest.raises(SplitError, match="class 'beta' has 2 usable image"):
        split_dataset(class_folders, tmp_path / "split", CFG)
    assert not (tmp_path / "split").exists()


def test_missing_raw_folder(tmp_path):
    with pytest.raises(SplitError, match="run the extract step first"):
        split_dataset(tmp_path / "nope", tmp_path / "split", CFG)


def test_images_of_every_kind_are_used_with_their_true_size(class_folders, tmp_path):
    """CMYK, grayscale, RGBA, palette, 16-bit, EXIF-rotated, huge, upper-case and wrong extensions:
    all decoded correctly and kept; every image reaches training as RGB at the model's size."""
    import numpy as np
    from PIL import Image

    from signflow._preprocessing import Preprocessing, load_images

    folder = class_folders / "beta"
    base = Image.open(folder / "IMG_000.JPG").convert("RGB").resize((60, 40))
    base.convert("CMYK").save(folder / "cmyk.jpg")
    base.convert("L").save(folder / "gray.PNG")
    base.convert("RGBA").save(folder / "rgba.png")
    base.convert("P").save(folder / "palette.gif")
    Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257).save(folder / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: stored 60x40, seen 40x60
    base.save(folder / "rotated.JPEG", exif=exif)
    base.resize((4000, 3000)).save(folder / "huge.jpg", quality=60)
    base.save(folder / "png_named.jpg", format="PNG")
    split_dataset(class_folders, tmp_path / "split", CFG)
    used = pd.concat(manifests(tmp_path / "split").values()).set_index("path")
    names = [
        "cmyk.jpg",
        "gray.PNG",
        "rgba.png",
        "palette.gif",
        "sixteen.png",
        "rotated.JPEG",
        "huge.jpg",
        "png_named.jpg",
    ]
    for name in names:
        assert f"beta/{name}" in used.index, name
    assert tuple(used.loc["beta/rotated.JPEG", ["width", "height"]]) == (40, 60)
    assert tuple(used.loc["beta/huge.jpg", ["width", "height"]]) == (4000, 3000)
    prep = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    tensors = load_images([folder / n for n in names], prep)
    assert tensors.shape == (len(names), 3, 32, 32) and tensors.dtype == torch.uint8
    gray = tensors[names.index("sixteen.png")]
    assert torch.equal(gray[0], gray[1]), "16-bit grayscale becomes equal RGB channels"
    assert gray.float().mean() > 20, "16-bit values are scaled down, not clipped to white or black"


def test_images_over_the_pixel_limit_or_of_absurd_shape_are_refused_with_the_reason(class_folders, tmp_path):
    from PIL import Image

    folder = class_folders / "beta"
    Image.new("RGB", (1, 100_000), (200, 40, 40)).save(folder / "strip.png")
    Image.new("RGB", (400, 300), (40, 200, 40)).save(folder / "big.png")
    Image.new("RGB", (40, 100), (40, 40, 200)).save(folder / "tall.png")
    assert (folder / "strip.png").stat().st_size < 2000, "a few hundred bytes"
    cfg = section("split", train=0.5, valid=0.25, test=0.25, seed=3, max_pixels=110_000, max_aspect_ratio=10)
    split_dataset(class_folders, tmp_path / "split", cfg)
    reasons = {r["path"]: r["reason"] for r in json.loads((tmp_path / "split" / "report.json").read_text())["excluded"]}
    assert reasons["beta/strip.png"].startswith("refused: 1x100000: one side is 100,000 times the other")
    assert "split.max_aspect_ratio (10)" in reasons["beta/strip.png"]
    assert reasons["beta/big.png"] == (
        "refused: 400x300 is 120,000 pixels, above split.max_pixels (110,000); raise it to use this image"
    )
    used = pd.concat(manifests(tmp_path / "split").values())
    assert "beta/tall.png" in set(used["path"]), "2.5 times taller than wide is kept"

    from signflow.extract import extract_dataset

    (class_folders / "delta").mkdir()
    (class_folders / "README.md").write_text("# about")
    (class_folders / "alpha" / "README.txt").write_text("notes")
    info = extract_dataset(class_folders, tmp_path / "raw", section("extract"))
    assert "delta" not in info.class_names
    assert any(line.startswith("delta/: class folder without images") for line in info.skipped)
    assert any(line.startswith("alpha/README.txt: not an image") for line in info.skipped)
    assert not (tmp_path / "raw" / "alpha" / "README.txt").exists()
    source = json.loads((tmp_path / "raw" / "SOURCE.json").read_text())
    assert source["skipped"] == info.skipped


def test_class_names_with_spaces_and_non_ascii_keep_their_index_everywhere(class_folders, tmp_path):
    result = split_dataset(class_folders, tmp_path / "split", CFG)
    assert "gamma ü" in result.class_names
    for frame in manifests(tmp_path / "split").values():
        assert (frame["label_index"] == frame["label"].map(result.class_names.index)).all()
    assert json.loads((tmp_path / "split" / "classes.json").read_text(encoding="utf-8")) == result.class_names


def test_class_folders_named_like_missing_values_are_labels(tmp_path):
    """pandas reads `None`, `NA`, `null` and `nan` as missing values by default; here they are class
    names, through the manifests, the test-set fingerprint and a trained model's evaluation."""
    from signflow._provenance import fingerprint_test_set
    from signflow.evaluate import evaluate
    from signflow.train import train_model

    names = ["None", "NA", "null", "nan"]
    for index, name in enumerate(names):
        for i in range(10):
            make_image(
                tmp_path / "src" / name / f"{i}.jpg", (60 * index + 20, 90, 200 - 50 * index), seed=index * 100 + i
            )
    extract_dataset(tmp_path / "src", tmp_path / "raw", section("extract"))
    split_dataset(tmp_path / "raw", tmp_path / "split", section("split"))
    for part in ("train", "valid", "test"):
        manifest = read_manifest(tmp_path / "split", part)
        assert set(manifest["label"]) == set(names) and manifest["label"].map(type).eq(str).all()
    assert len(fingerprint_test_set(tmp_path / "split")) == 64
    train_model(
        section("train", epochs=1), tmp_path / "raw", tmp_path / "split", tmp_path / "m.pt", tmp_path / "log.csv"
    )
    result = evaluate(
        section("evaluate"), tmp_path / "m.pt", tmp_path / "raw", tmp_path / "split", tmp_path / "reports"
    )
    assert result.test_images == len(read_manifest(tmp_path / "split", "test"))
