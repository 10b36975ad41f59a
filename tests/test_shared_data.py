"""Checks on the real Sign Language Digits archive; skipped when ../shared is absent."""

import json
import zipfile

import pandas as pd
import pytest

from signflow.cli import main
from signflow.config import parse_params
from signflow.evaluate import evaluate
from signflow.extract import extract_dataset
from signflow.split import split_dataset
from signflow.split_files import read_manifest
from signflow.train import train_model
from tests.helpers import section, tiny_params

UPSTREAM_COUNTS = [205, 206, 206, 206, 207, 207, 207, 206, 208, 204]


def test_real_archive_downloads_and_splits_stratified(shared_dir, tmp_path):
    info = extract_dataset(shared_dir / "datasets" / "sign-language-digits.zip", tmp_path / "raw", section("extract"))
    assert info.class_names == [str(d) for d in range(10)]
    assert [info.counts[c] for c in info.class_names] == UPSTREAM_COUNTS
    assert not list((tmp_path / "raw").rglob("example_*"))
    cfg = section("split", train=0.7, valid=0.15, test=0.15, seed=42)
    result = split_dataset(tmp_path / "raw", tmp_path / "split", cfg)
    assert sum(result.counts.values()) + result.excluded == 2062
    # Distinct photos of similar hands: a few small near-duplicate clusters (28 of 61 images when measured),
    # each within one class and one split, and no test image with a near-duplicate in train.
    near = json.loads((tmp_path / "split" / "report.json").read_text())["near_duplicates"]
    assert 10 <= len(near["clusters"]) <= 60 and max(len(c["images"]) for c in near["clusters"]) <= 6
    assert all(len({p.split("/")[0] for p in c["images"]}) == 1 and len(c["splits"]) == 1 for c in near["clusters"])
    assert near["test_images_with_train_near_duplicate"] == [] and "0 of 309 test images" in result.description
    train = pd.read_csv(tmp_path / "split" / "train.csv")
    sideways = train[train["path"].str.contains("IMG_5874|IMG_5935|IMG_5978")]
    assert (sideways["width"] == sideways["height"]).all()


@pytest.mark.slow
def test_real_report_is_consistent_and_predict_reads_the_examples(shared_dir, tmp_path, capsys):
    """A short real fine-tune (last 4 blocks, 3 epochs at 96 px); its report must agree with the test manifest and
    predict must name the digit of most of the archive's 10 Examples/ photos."""
    archive = shared_dir / "datasets" / "sign-language-digits.zip"
    raw = tiny_params(model="mobilenetv2_100", pretrained=True, trainable_blocks=4, image_size=96)
    raw["train"].update(weights_file=str(shared_dir / "weights" / "mobilenetv2_100.tv_in1k.safetensors"), epochs=3)
    raw["train"].update(batch_size=64, lr=3e-3)
    params = parse_params(raw)
    extract_dataset(archive, tmp_path / "raw", params.extract)
    split_dataset(tmp_path / "raw", tmp_path / "split", params.split)
    train_model(params.train, tmp_path / "raw", tmp_path / "split", tmp_path / "model.pt", tmp_path / "log.csv")
    result = evaluate(
        section("evaluate"),
        tmp_path / "model.pt",
        tmp_path / "raw",
        tmp_path / "split",
        tmp_path / "reports",
        tmp_path / "log.csv",
    )
    test = read_manifest(tmp_path / "split", "test")
    predictions = pd.read_csv(tmp_path / "reports" / "predictions.csv", dtype=str)
    assert (
        pd.crosstab(predictions["actual"], predictions["predicted"]).to_numpy().sum() == len(test) == result.test_images
    )
    assert abs(len(test) - 0.15 * 2062) < 10, "about 15% of the images, whole near-duplicate clusters included"
    per_class = pd.read_csv(tmp_path / "reports" / "per_class.csv", dtype={"class": str})
    support = dict(zip(per_class["class"], per_class["support"], strict=True))
    assert support == test["label"].astype(str).value_counts().to_dict()
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["accuracy"] == result.accuracy

    examples = tmp_path / "examples"
    with zipfile.ZipFile(archive) as bundle:
        for name in bundle.namelist():
            if "/Examples/" in name and name.lower().endswith(".jpg"):
                (examples / name.rsplit("/", 1)[1]).parent.mkdir(exist_ok=True)
                (examples / name.rsplit("/", 1)[1]).write_bytes(bundle.read(name))
    assert main(["predict", str(examples), "--model", str(tmp_path / "model.pt")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10
    right = sum(line.split(": ")[1].split()[0] == line.split("example_")[1].split(".")[0] for line in lines)
    in_top3 = sum(line.split("example_")[1].split(".")[0] in line.split(": ")[1].split()[::2] for line in lines)
    assert right >= 8 and in_top3 >= 9, lines
