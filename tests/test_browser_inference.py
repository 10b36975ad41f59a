"""In-browser inference: `signflow serve`'s page runs the model with ONNX Runtime Web in a real
headless Chromium (fake camera), sends no frame to the server, and falls back to the server when
ONNX Runtime Web is not installed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from signflow._preprocessing import Preprocessing, image_to_uint8, normalize
from signflow.export import export_onnx
from signflow.serve import create_app, open_served_model, ort_web_folder
from tests.browser import Chromium, chromium_binary, frames_from_images, serve_in_thread, write_y4m
from tests.helpers import build_class_folders, section, tiny_params

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium_binary() is None, reason="no chromium (apt-get install -y chromium)"),
]
needs_ort_web = pytest.mark.skipif(
    ort_web_folder() is None,
    reason="ONNX Runtime Web is not vendored into signflow/_web/: run `npm ci --prefix web` (needs npm)",
)
TOP1 = "document.querySelector('#top li') && document.querySelector('#top li').dataset.class"


@pytest.fixture(scope="module")
def trained_colours(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny model trained 8 epochs on the colour classes (3 epochs confuse beta and gamma through a
    camera), exported as model.onnx with its int8 twin beside it (the gate opened wide)."""
    from signflow.config import parse_params
    from signflow.extract import extract_dataset
    from signflow.split import split_dataset
    from signflow.train import train_model

    root = tmp_path_factory.mktemp("browser")
    params = parse_params(tiny_params(epochs=8))
    raw, split = root / "raw", root / "split"
    extract_dataset(build_class_folders(root / "dataset"), raw, params.extract)
    split_dataset(raw, split, params.split)
    train_model(params.train, raw, split, root / "model.pt", root / "train_log.csv")
    onnx_path = root / "export" / "model.onnx"
    onnx_path.parent.mkdir()
    export_onnx(section("export", int8_max_accuracy_drop=1.0), root / "model.pt", onnx_path, raw, split)
    assert onnx_path.with_name("model.int8.onnx").is_file()
    return raw, onnx_path


class RecordingApp:
    """The ASGI app, with the path of every HTTP request it was sent recorded."""

    def __init__(self, app):
        self.app, self.paths = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.paths.append(f"{scope['method']} {scope['path']}")
        await self.app(scope, receive, send)


@contextmanager
def serving(onnx_path: Path, ort_web_dir: Path | None = None) -> Iterator[tuple[str, RecordingApp]]:
    """`signflow serve`'s app for `onnx_path` on a free 127.0.0.1 port, in a thread of this process."""
    with open_served_model(str(onnx_path), onnx_path.parent / "params.yaml") as served:
        app = RecordingApp(create_app(served, ort_web_dir=ort_web_dir))
        with serve_in_thread(app) as url:
            yield url, app


def clip(raw: Path, label: str, tmp_path: Path) -> Path:
    """A fake-camera video of the class's images (3 of them, 10 frames each, looping)."""
    images = sorted((raw / label).iterdir())[:3]
    return write_y4m(tmp_path / f"{label.split()[0]}.y4m", frames_from_images(images, repeat=10))


async def top_classes_seen(url: str, video: Path, expect_mode: str, samples: int = 8) -> tuple[list[str], dict]:
    browser = Chromium(video)
    try:
        await browser.connect()
        await browser.goto(url)
        await browser.wait_for("+(document.body.dataset.answered || 0) >= 3", timeout=60)
        mode = await browser.eval(
            "({mode: document.body.dataset.mode, text: document.getElementById('mode').textContent,"
            " by: document.body.dataset.answeredBy, latency: +document.body.dataset.latency,"
            " int8_offered: !document.getElementById('precision-choice').hidden})"
        )
        assert mode["mode"] == expect_mode and mode["by"] == expect_mode, mode
        seen = []
        for _ in range(samples):
            seen.append(await browser.eval(TOP1))
            await asyncio.sleep(0.25)
        return seen, mode
    finally:
        await browser.close()


@needs_ort_web
def test_in_browser_mode_names_each_clip_and_sends_no_frame_to_the_server(trained_colours, tmp_path):
    """The float model by default (faster than int8 in WebAssembly), the int8 twin when chosen."""
    raw, exported = trained_colours
    with serving(exported) as (url, app):
        for label, precision in (("alpha", "float32"), ("beta", "float32"), ("gamma ü", "int8")):
            query = "?inference=browser" + ("&precision=int8" if precision == "int8" else "")
            seen, mode = asyncio.run(top_classes_seen(url + query, clip(raw, label, tmp_path), "browser"))
            print(label, seen, mode)
            assert f"{precision} model" in mode["text"] and "frames stay on this device" in mode["text"], mode
            assert mode["int8_offered"], "the int8 twin is offered beside the float default"
            assert max(set(seen), key=seen.count) == label, (label, seen)
        assert not [path for path in app.paths if "/predict" in path], app.paths
        assert "GET /model.onnx" in app.paths and "GET /ort/ort-wasm-simd-threaded.wasm" in app.paths


@needs_ort_web
def test_the_page_preprocesses_exactly_as_the_server(trained_colours):
    """The page's resize, crop and normalisation in JavaScript give the server's numbers (Pillow's)
    for odd-sized frames, portrait and landscape."""
    prep = Preprocessing(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
    page_prep = {"image_size": 32, "mean": list(prep.mean), "std": list(prep.std), "interpolation": "bilinear"}
    rng = np.random.default_rng(3)
    frames = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for h, w in ((37, 50), (90, 41), (32, 32), (20, 25), (77, 33), (90, 20), (200, 60), (240, 320))
    ]
    with serving(trained_colours[1]) as (url, _app):
        browser = Chromium()

        async def run() -> list[list[float]]:
            try:
                await browser.connect()
                await browser.goto(f"{url}?inference=browser")
                await browser.wait_for("document.body.dataset.mode === 'browser' || window.ort", timeout=60)
                results = []
                for frame in frames:
                    h, w, _ = frame.shape
                    rgba = np.concatenate([frame, np.full((h, w, 1), 255, np.uint8)], axis=2)
                    pixels = json.dumps(rgba.ravel().tolist())
                    call = f"modelInput(new Uint8ClampedArray({pixels}), {w}, {h}, {json.dumps(page_prep)})"
                    results.append(await browser.eval(f"Array.from({call}.data)"))
                return results
            finally:
                await browser.close()

        results = asyncio.run(run())
    for frame, result in zip(frames, results, strict=True):
        expected = normalize(image_to_uint8(Image.fromarray(frame), prep)[None], prep).numpy().ravel()
        assert np.abs(np.asarray(result, np.float32) - expected).max() < 1e-5, frame.shape


def test_without_onnx_runtime_web_the_page_says_so_and_classifies_on_the_server(trained_colours, tmp_path):
    raw, exported = trained_colours
    empty = tmp_path / "no-ort"
    empty.mkdir()
    with serving(exported, ort_web_dir=empty) as (url, app):
        seen, mode = asyncio.run(top_classes_seen(f"{url}?inference=browser", clip(raw, "beta", tmp_path), "server"))
    assert "In-browser inference is unavailable" in mode["text"] and "npm ci --prefix web" in mode["text"], mode
    assert max(set(seen), key=seen.count) == "beta", seen
    assert any("/predict" in path for path in app.paths)
    assert "GET /model.onnx" not in app.paths
