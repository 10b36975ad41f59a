"""Decompression bombs: an image's pixel count is checked from its header, against split.max_pixels,
before it is decoded, by every step that decodes images (issue 17)."""

import base64
import json
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from signflow._images import DEFAULT_MAX_PIXELS, PILLOW_PIXEL_LIMIT, ImageRefused, check_image, load_rgb
from signflow._preprocessing import ImageReadError, Preprocessing, decode_chunks
from signflow.predict import predict_images
from signflow.split import split_dataset
from signflow.split_files import read_max_pixels
from tests.helpers import section


def _declared_png(path, width: int, height: int):
    """A one-colour 1-bit PNG: a few KB on disk, width x height pixels (3 bytes each once decoded)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("1", (width, height)).save(path)
    return path


def _record_decodes(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image Pillow decodes from now on: a refusal from the header decodes none."""
    decoded, load = [], ImageFile.ImageFile.load

    def recording_load(image):
        decoded.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    return decoded


class FixedPredictor:
    """predict_images' view of a model: classes, preprocessing and probabilities."""

    class_names = ["a", "b"]

    def __init__(self, prep: Preprocessing):
        self.preprocessing = prep

    def probabilities(self, images):
        return np.full((len(images), 2), 0.5)


def test_split_refuses_a_small_png_declaring_many_pixels_and_records_its_limit(class_folders, tmp_path):
    bomb = _declared_png(class_folders / "alpha" / "bomb.png", 8000, 8000)
    assert bomb.stat().st_size < 100_000
    split_dataset(class_folders, tmp_path / "split", section("split"))
    report = json.loads((tmp_path / "split" / "report.json").read_text())
    reasons = {item["path"]: item["reason"] for item in report["excluded"]}
    assert reasons["alpha/bomb.png"].startswith("refused: 8000x8000 is 64,000,000 pixels, above split.max_pixels")
    assert report["max_pixels"] == read_max_pixels(tmp_path / "split") == 50_000_000
    assert read_max_pixels(tmp_path / "no-split") == DEFAULT_MAX_PIXELS == 50_000_000


def test_pillows_bomb_warning_is_a_refusal_not_a_crash(tmp_path):
    png = _declared_png(tmp_path / "warns.png", 10_000, 9_000)  # 90 MP: Pillow only warns at open
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageRefused, match="decompression bomb"):
            load_rgb(png, max_pixels=PILLOW_PIXEL_LIMIT)
        with pytest.raises(ImageRefused, match="decompression bomb"):
            check_image(png, PILLOW_PIXEL_LIMIT, 10)


def test_training_decode_and_predict_refuse_above_the_models_limit_before_decoding(tmp_path, monkeypatch):
    wide = _declared_png(tmp_path / "wide.png", 2000, 1000)
    prep = Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bilinear", max_pixels=1_000_000)
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    decoded = _record_decodes(monkeypatch)
    load_rgb(_declared_png(tmp_path / "fits.png", 1000, 1000), max_pixels=1_000_000)
    assert (1000, 1000) in decoded, "an image within the limit is decoded (and recorded)"
    decoded.clear()
    with pytest.raises(ImageReadError, match="2000x1000 pixels is above the limit of 1,000,000 pixels"):
        list(decode_chunks([wide], prep))
    [prediction] = predict_images(FixedPredictor(prep), [wide])
    assert prediction.error.startswith("cannot read image: 2000x1000 pixels is above the limit of 1,000,000")
    old = {k: v for k, v in prep.to_dict().items() if k != "max_pixels"}  # a model file from before the limit
    assert Preprocessing.from_dict(old).max_pixels == DEFAULT_MAX_PIXELS
    big = _declared_png(tmp_path / "big.png", 8000, 8000)  # 64 MP: under Pillow's limits, 192 MB decoded
    [prediction] = predict_images(FixedPredictor(Preprocessing.from_dict(old)), [big])
    assert prediction.error.startswith("cannot read image: 8000x8000 pixels is above the limit of 50,000,000")
    assert decoded == [], "refused from the header, before decoding"


def test_the_served_model_refuses_above_its_limit_before_decoding(tmp_path, monkeypatch):
    from signflow._served_model import SignflowOnnxModel

    served = SignflowOnnxModel()
    served.class_names, served.size, served.resample = ["a", "b"], 32, Image.Resampling.BILINEAR
    served.max_pixels = 1_000_000
    decoded = _record_decodes(monkeypatch)
    served.to_uint8(_declared_png(tmp_path / "fits.png", 1000, 1000).read_bytes())
    assert (1000, 1000) in decoded, "an image within the limit is decoded (and recorded)"
    decoded.clear()
    png = _declared_png(tmp_path / "wide.png", 2000, 1000).read_bytes()
    answer = served.predict(None, pd.DataFrame({"image": [png]}))
    assert answer["error"][0] == "cannot read image: 2000x1000 pixels is above the limit of 1,000,000 pixels"
    assert decoded == [], "refused from the header, before decoding"


def test_a_trained_model_carries_split_max_pixels_to_predict_and_the_served_model(tiny_zip, tmp_path):
    from signflow._mlflow_model import load_mlflow_model, save_mlflow_model
    from signflow._model_file import load_bundle
    from signflow.config import parse_params
    from signflow.export import export_onnx
    from signflow.extract import extract_dataset
    from signflow.predict import OnnxPredictor
    from signflow.train import train_model
    from tests.helpers import tiny_params

    params = parse_params(tiny_params(epochs=1))
    raw, split, model = tmp_path / "raw", tmp_path / "split", tmp_path / "model.pt"
    extract_dataset(tiny_zip, raw, params.extract)
    split_dataset(raw, split, section("split", max_pixels=10_000))  # the tiny images are 40x40
    train_model(params.train, raw, split, model, tmp_path / "train_log.csv")
    assert load_bundle(model).preprocessing.max_pixels == 10_000
    export_onnx(params.export, model, tmp_path / "model.onnx")
    assert OnnxPredictor(tmp_path / "model.onnx").preprocessing.max_pixels == 10_000
    pyfunc = load_mlflow_model(save_mlflow_model(tmp_path / "model.onnx", 32, tmp_path / "mlflow-model"))
    png = base64.b64encode(_declared_png(tmp_path / "wide.png", 200, 100).read_bytes()).decode()
    answer = pyfunc.predict(pd.DataFrame({"image": [png]}))
    assert answer["error"][0] == "cannot read image: 200x100 pixels is above the limit of 10,000 pixels"
