"""What a user looks at: the evaluation report, the ONNX export, the model card and `signflow predict`."""

import csv
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from signflow import _report as report
from signflow._model_file import load_bundle
from signflow._preprocessing import load_images
from signflow.cli import main
from signflow.evaluate import evaluate
from signflow.export import ExportError, export_onnx
from signflow.layout import ModelOutputs
from signflow.predict import OnnxPredictor, TorchPredictor, predict_images
from signflow.register import register_run
from signflow.split_files import read_manifest
from tests.helpers import CLASS_COLOURS, MALFORMED_TIFFS, make_image, section

PNG = b"\x89PNG"


@pytest.fixture
def evaluated(trained, tmp_path):
    params, raw, split, _ = trained
    result = evaluate(
        section("evaluate"), tmp_path / "model.pt", raw, split, tmp_path / "reports", tmp_path / "train_log.csv"
    )
    return params, raw, split, result


def test_report_files_are_consistent_with_the_test_split(evaluated, tmp_path):
    params, raw, split, result = evaluated
    reports = tmp_path / "reports"
    test = read_manifest(split, "test")
    metrics = json.loads((reports / "metrics.json").read_text())
    predictions = pd.read_csv(reports / "predictions.csv")
    # Confusion matrix (from the predictions dvc plots reads) sums to the test-set size.
    confusion = pd.crosstab(predictions["actual"], predictions["predicted"])
    assert confusion.to_numpy().sum() == len(test) == metrics["test_images"]
    assert metrics["mistakes"] == (predictions["actual"] != predictions["predicted"]).sum() == result.mistakes
    per_class = pd.read_csv(reports / "per_class.csv")
    assert dict(zip(per_class["class"], per_class["support"], strict=True)) == test["label"].value_counts().to_dict()
    calibration = pd.read_csv(reports / "calibration.csv")
    assert calibration["images"].sum() == len(test)
    assert 0.0 <= metrics["ece"] <= 1.0
    for name in ("confusion.png", "learning_curves.png", "mistakes.png", "reliability.png"):
        assert (reports / name).read_bytes()[:4] == PNG, name
    text = (reports / "report.md").read_text()
    assert f"| test accuracy | {metrics['accuracy']:.4f} |" in text
    assert f"| test images | {len(test)} |" in text
    description = json.loads((split / "report.json").read_text())["description"]
    assert "## How the test split was made" in text and description[1:] in text
    assert f"; 0 of {len(test)} test images have a near-duplicate in train." in text
    assert metrics["test_near_duplicates_in_train"] == 0 and result.split == description


def test_worst_mistakes_are_the_most_confident_wrong_predictions():
    predictions = pd.DataFrame(
        {
            "path": ["a", "b", "c", "d"],
            "actual": ["x", "x", "y", "y"],
            "predicted": ["y", "x", "x", "x"],
            "probability": [0.6, 0.99, 0.9, 0.7],
        }
    )
    assert list(report.worst_mistakes(predictions, 2)["path"]) == ["c", "d"]


def test_near_certain_mistakes_are_flagged_as_labels_to_check():
    predictions = pd.DataFrame(
        {
            "path": ["3/a.jpg", "2/b.jpg", "7/c.jpg"],
            "actual": ["3", "2", "7"],
            "predicted": ["7", "3", "8"],
            "probability": [0.999, 0.995, 0.71],
        }
    )
    note = " ".join(report.label_check_note(report.worst_mistakes(predictions, 12))).strip()
    assert note.startswith("2 of these mistakes") and "`3/a.jpg`, `2/b.jpg`" in note and "7/c.jpg" not in note
    assert report.label_check_note(predictions.iloc[[2]]) == [], "a hesitant mistake is the model's own"


def test_onnx_export_matches_pytorch_on_real_images(trained, tmp_path):
    params, raw, split, _ = trained
    result = export_onnx(section("export"), tmp_path / "model.pt", tmp_path / "model.onnx")
    assert result.max_abs_difference <= 1e-4
    bundle = load_bundle(tmp_path / "model.pt")
    images = load_images([raw / p for p in read_manifest(split, "test")["path"]], bundle.preprocessing)
    torch_probs = TorchPredictor(tmp_path / "model.pt")
    onnx_probs = OnnxPredictor(tmp_path / "model.onnx")
    assert onnx_probs.class_names == bundle.class_names and onnx_probs.preprocessing == bundle.preprocessing
    assert onnx_probs.fingerprint == bundle.fingerprint()
    model = bundle.build_model()
    from signflow._preprocessing import normalize

    with torch.inference_mode():
        expected = model(normalize(images, bundle.preprocessing)).numpy() / bundle.temperature
    actual = onnx_probs.session.run(None, {"image": normalize(images, bundle.preprocessing).numpy()})[0]
    assert np.abs(actual - expected).max() * bundle.temperature <= 1e-4, "the graph divides by the temperature"
    assert np.abs(onnx_probs.probabilities(images) - torch_probs.probabilities(images)).max() <= 1e-4


def test_onnx_export_that_disagrees_keeps_the_previous_file(trained, tmp_path, monkeypatch):
    export_onnx(section("export"), tmp_path / "model.pt", tmp_path / "model.onnx")
    before = (tmp_path / "model.onnx").read_bytes()

    class Wrong:
        def run(self, names, feeds):
            return [np.zeros((len(next(iter(feeds.values()))), 3), dtype=np.float32) + 5]

    monkeypatch.setattr("signflow.export.onnx_session", lambda path: Wrong())
    with pytest.raises(ExportError, match="disagree"):
        export_onnx(section("export"), tmp_path / "model.pt", tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.onnx")]


def _odd_images(folder):
    """Images as users have them: RGBA, grayscale, palette, EXIF-rotated, large, wrong extension, broken."""
    colour = CLASS_COLOURS["beta"]
    base = make_image(folder / "plain.jpg", colour, seed=1)
    rgb = Image.open(base).convert("RGB")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("P").save(folder / "palette.gif")
    big = rgb.resize((1600, 1200))
    exif = Image.Exif()
    exif[0x0112] = 6
    big.save(folder / "rotated.JPG", exif=exif)
    rgb.save(folder / "actually_png.jpg", format="PNG")
    (folder / "broken.jpg").write_bytes(base.read_bytes()[:200])
    (folder / "empty.png").write_bytes(b"")
    for tiff in MALFORMED_TIFFS:  # Pillow's decoder raises TypeError (and more) on these
        (folder / f"{tiff.stem}.tif").write_bytes(tiff.read_bytes())
    (folder / ".DS_Store").write_bytes(b"junk")
    return folder


def test_predict_cli_prints_top_k_and_goes_on_past_bad_files(trained, tmp_path, capsys):
    images = _odd_images(tmp_path / "incoming")
    out = tmp_path / "predictions.csv"
    code = main(["predict", str(images), "--model", str(tmp_path / "model.pt"), "--top-k", "2", "--csv", str(out)])
    captured = capsys.readouterr()
    assert code == 1, "some files could not be read"
    assert "broken.jpg: cannot read image" in captured.err and "empty.png: cannot read image" in captured.err
    for tiff in MALFORMED_TIFFS:
        assert f"{tiff.stem}.tif: cannot read image: " in captured.err
    assert "crash_TIFF_TypeError.tif: cannot read image: damaged or unsupported image file (TypeError: " in captured.err
    assert ".DS_Store" not in captured.out + captured.err
    printed = [line for line in captured.out.splitlines() if line.startswith(str(images))]
    assert len(printed) == 6
    for line in printed:
        assert line.count("%") == 2
    rows = list(csv.DictReader(out.open()))
    ok = [r for r in rows if not r["error"]]
    assert len(ok) == 6 * 2 and {r["rank"] for r in ok} == {"1", "2"}
    unreadable = {"broken.jpg", "empty.png", *(f"{tiff.stem}.tif" for tiff in MALFORMED_TIFFS)}
    assert {r["path"].rsplit("/", 1)[1] for r in rows if r["error"]} == unreadable


def test_predict_reports_a_decompression_bomb_and_predicts_a_thin_strip(trained, tmp_path, monkeypatch):
    """Pillow's decompression-bomb refusal is one more unreadable file, never a crash; a 1x100000 strip
    is predicted from its centre square."""
    folder = tmp_path / "incoming"
    make_image(folder / "fine.jpg", (200, 40, 40), seed=1)
    make_image(folder / "bomb.png", (200, 40, 40), seed=2, size=100, fmt="PNG")
    Image.new("RGB", (1, 100_000), (200, 40, 40)).save(folder / "strip.png")
    predictor = TorchPredictor(tmp_path / "model.pt")
    predictions = {p.path.rsplit("/", 1)[1]: p for p in predict_images(predictor, [folder])}
    assert not any(p.error for p in predictions.values()) and len(predictions["strip.png"].top) == 3
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 100x100 is above twice this: Pillow refuses it
    predictions = {p.path.rsplit("/", 1)[1]: p for p in predict_images(predictor, [folder])}
    assert "decompression bomb" in predictions["bomb.png"].error
    assert predictions["fine.jpg"].error is None


def test_a_thin_strip_costs_no_more_memory_than_its_pixels(tmp_path, venv_env):
    """Resizing the shorter side of a 1x100000 strip to 160 px first would make a 160 x 16,000,000
    image (7.7 GB); the centre square is cut first. Measured in a fresh process (peak RSS)."""
    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 100_000), (200, 40, 40)).save(strip)
    code = (
        "import resource, sys\n"
        "from signflow._preprocessing import Preprocessing, read_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
        "image = read_image(sys.argv[1], Preprocessing(160, (0.5,) * 3, (0.5,) * 3, 'bicubic'))\n"
        "print(*image.shape, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(strip)], env=venv_env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    *shape, imported_mb, peak_mb = map(int, result.stdout.split())
    assert shape == [3, 160, 160]
    assert peak_mb - imported_mb < 500, f"peak RSS {peak_mb} MB, {imported_mb} MB after the imports"


def test_predict_backends_agree_and_auto_uses_onnx_of_the_same_weights(trained, tmp_path):
    params, raw, split, _ = trained
    export_onnx(section("export"), tmp_path / "model.pt", tmp_path / "model.onnx")
    folder = raw / next(iter(CLASS_COLOURS))
    by_torch = list(predict_images(TorchPredictor(tmp_path / "model.pt"), [folder], top_k=3))
    by_onnx = list(predict_images(OnnxPredictor(tmp_path / "model.onnx"), [folder], top_k=3))
    assert [p.top[0][0] for p in by_torch] == [p.top[0][0] for p in by_onnx]
    for a, b in zip(by_torch, by_onnx, strict=True):
        assert a.top[0][1] == pytest.approx(b.top[0][1], abs=1e-4)
    from signflow.predict import choose_predictor

    assert choose_predictor(tmp_path / "model.pt", tmp_path / "model.onnx", "auto").backend == "onnx"
    bundle = load_bundle(tmp_path / "model.pt")
    bundle.state_dict = {k: v + 1 if v.is_floating_point() else v for k, v in bundle.state_dict.items()}
    from signflow._model_file import save_bundle

    save_bundle(bundle, tmp_path / "other.pt")
    assert choose_predictor(tmp_path / "other.pt", tmp_path / "model.onnx", "auto").backend == "torch"


def _evaluate_and_export(raw, split, tmp_path):
    """The evaluate and export steps on tmp_path/model.pt, writing into tmp_path."""
    evaluate(section("evaluate"), tmp_path / "model.pt", raw, split, tmp_path / "reports", tmp_path / "train_log.csv")
    export_onnx(section("export"), tmp_path / "model.pt", tmp_path / "model.onnx")


def _register(params, model_path, split, tmp_path):
    """The register step for `model_path` with the report, ONNX file and card in tmp_path."""
    outputs = ModelOutputs(
        reports=tmp_path / "reports",
        onnx=tmp_path / "model.onnx",
        model_card=tmp_path / "model_card.md",
        receipt=tmp_path / "registered.json",
    )
    return register_run(params, model_path, outputs, project_dir=tmp_path, split_dir=split)


def test_register_writes_model_card_and_predict_loads_the_champion(trained, tmp_path, monkeypatch, capsys):
    params, raw, split, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _evaluate_and_export(raw, split, tmp_path)
    result = _register(params, tmp_path / "model.pt", split, tmp_path)
    assert result.is_champion
    card = (tmp_path / "model_card.md").read_text()
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert f"version {result.version}" in card
    assert f"| test images | {metrics['test_images']} |" in card
    assert "`gamma ü`" in card and "Intended use" in card and "Known limits" in card
    from mlflow import MlflowClient

    version = MlflowClient().get_model_version(params.register.model_name, result.version)
    assert version.description.startswith("# Model card")
    assert "- Split: Stratified random split 0.7/0.15/0.15 (train/valid/test, seed 42)" in card
    assert "| test images with a near-duplicate in train | 0 |" in card
    assert version.tags["signflow.split_strategy"] == "random"
    assert version.tags["signflow.test_near_duplicates_in_train"] == "0"
    assert version.tags["signflow.split"].endswith("have a near-duplicate in train.")

    import yaml

    from tests.helpers import tiny_params

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    image = raw / "beta" / "IMG_000.JPG"
    code = main(["predict", str(image), "--model", "champion", "--params", str(tmp_path / "params.yaml")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith(f"{image}: ")
    assert f"model: {params.register.model_name} version {result.version} (onnx backend" in captured.err

    code = main(["predict", str(image), "--model", "7", "--params", str(tmp_path / "params.yaml")])
    assert code == 1 and "no version or alias '7'" in capsys.readouterr().err


def test_register_refuses_an_onnx_file_from_other_weights(trained, tmp_path, monkeypatch):
    from signflow._model_file import save_bundle
    from signflow.register import RegistryError

    params, raw, split, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _evaluate_and_export(raw, split, tmp_path)
    bundle = load_bundle(tmp_path / "model.pt")
    bundle.state_dict = {k: v + 1 if v.is_floating_point() else v for k, v in bundle.state_dict.items()}
    save_bundle(bundle, tmp_path / "retrained.pt")
    with pytest.raises(RegistryError, match="exported from other weights"):
        _register(params, tmp_path / "retrained.pt", split, tmp_path)
    assert not (tmp_path / "registered.json").exists()


def test_onnx_files_exported_with_the_old_preprocessing_key_still_load(trained, tmp_path):
    import onnx

    export_onnx(section("export"), tmp_path / "model.pt", tmp_path / "model.onnx")
    proto = onnx.load(str(tmp_path / "model.onnx"))
    for entry in proto.metadata_props:
        if entry.key == "signflow.preprocessing":
            entry.key = "signflow._preprocessing"  # as written at commit d8aea16
    onnx.save(proto, str(tmp_path / "old.onnx"))
    assert OnnxPredictor(tmp_path / "old.onnx").preprocessing == load_bundle(tmp_path / "model.pt").preprocessing


def test_with_near_duplicates_reported_every_report_gives_the_accuracy_with_and_without_them(tmp_path, monkeypatch):
    """split.near_duplicates: report leaves near-duplicates of train images in the test split; the evaluation
    report, the model card and the registry then give the accuracy on all test images and without those."""
    from mlflow import MlflowClient

    from signflow.config import parse_params
    from signflow.split import split_dataset
    from signflow.train import train_model
    from tests.helpers import photo, reencoded, tiny_params

    rng = np.random.default_rng(8)
    raw = tmp_path / "raw"
    for label in ("one", "two", "three"):
        (raw / label).mkdir(parents=True)
        for index in range(14):
            image = photo(rng)
            image.save(raw / label / f"p{index:02d}.png")
            if index < 7:
                reencoded(image, 70).save(raw / label / f"p{index:02d}_copy.jpg")
    params = parse_params(tiny_params(epochs=2) | {"split": {**tiny_params()["split"], "near_duplicates": "report"}})
    split = tmp_path / "split"
    split_dataset(raw, split, params.split)
    train_model(params.train, raw, split, tmp_path / "model.pt", tmp_path / "train_log.csv")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _evaluate_and_export(raw, split, tmp_path)
    registration = _register(params, tmp_path / "model.pt", split, tmp_path)

    test = read_manifest(split, "test").fillna("")
    near = test["train_near_duplicate"] != ""
    assert near.sum() > 0, "this seed leaves some copies' originals in train"
    predictions = pd.read_csv(tmp_path / "reports" / "predictions.csv")
    right = (predictions["actual"] == predictions["predicted"]).to_numpy()
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["test_near_duplicates_in_train"] == near.sum()
    assert metrics["accuracy_without_near_duplicates"] == pytest.approx(right[~near.to_numpy()].mean())
    text = (tmp_path / "reports" / "report.md").read_text()
    assert f"| test images with a near-duplicate in train | {near.sum()} |" in text
    without = right[~near.to_numpy()].mean()
    assert f"| accuracy without those {near.sum()} (on {(~near).sum()} images) | {without:.4f} |" in text
    assert "not kept together (split.near_duplicates: report)" in text
    card = (tmp_path / "model_card.md").read_text()
    assert f"| test images with a near-duplicate in train | {near.sum()} |" in card
    assert f"| accuracy without those {near.sum()} (on {(~near).sum()} images) |" in card
    tags = MlflowClient().get_model_version(params.register.model_name, registration.version).tags
    assert tags["signflow.test_near_duplicates_in_train"] == str(near.sum())
