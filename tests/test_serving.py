"""The registered champion in use: its MLflow model (`mlflow.pyfunc.load_model`, `mlflow models
serve`), the calibrated probabilities every way of using it agrees on, and `signflow serve`'s
webcam page in a real headless Chromium with a fake camera."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from signflow._mlflow import mlflow_client
from signflow._preprocessing import Preprocessing, read_image
from signflow.config import Params, load_params
from signflow.layout import ModelOutputs
from signflow.predict import OnnxPredictor, TorchPredictor, predict_images
from tests.browser import Chromium, chromium_binary, frames_from_images, save_screenshot, write_y4m
from tests.helpers import MALFORMED_TIFFS, ROOT, build_class_folders, make_image, tiny_params, venv_path


@dataclass(frozen=True)
class Registry:
    root: Path
    params: Params
    raw: Path
    version: str

    @property
    def tracking_uri(self) -> str:
        return self.params.register.tracking_uri

    @property
    def name(self) -> str:
        return self.params.register.model_name

    def image(self, label: str, index: int = 0) -> Path:
        return sorted((self.raw / label).iterdir())[index]


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    """A tiny model trained, evaluated, exported and registered as champion in its own registry."""
    from signflow.evaluate import evaluate
    from signflow.export import export_onnx
    from signflow.extract import extract_dataset
    from signflow.register import register_run
    from signflow.split import split_dataset
    from signflow.train import train_model

    root = tmp_path_factory.mktemp("serving")
    dataset = build_class_folders(root / "dataset")
    raw_params = tiny_params(epochs=4)
    raw_params["register"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    (root / "params.yaml").write_text(yaml.safe_dump(raw_params))
    params = load_params(root / "params.yaml")
    raw, split, model = root / "raw", root / "split", root / "model.pt"
    extract_dataset(dataset, raw, params.extract)
    split_dataset(raw, split, params.split)
    train_model(params.train, raw, split, model, root / "train_log.csv")
    outputs = ModelOutputs(root / "reports", root / "model.onnx", root / "model_card.md", root / "registered.json")
    evaluate(params.evaluate, model, raw, split, outputs.reports, root / "train_log.csv")
    export_onnx(params.export, model, outputs.onnx)
    registration = register_run(params, model, outputs, project_dir=root, split_dir=split)
    assert registration.is_champion
    return Registry(root, params, raw, registration.version)


def download(registry: Registry, relative: str, dst: Path) -> Path:
    from mlflow.artifacts import download_artifacts

    version = mlflow_client(registry.tracking_uri).get_model_version(registry.name, registry.version)
    uri = f"{version.source}/{relative}"
    return Path(download_artifacts(uri, dst_path=str(dst), tracking_uri=registry.tracking_uri))


def signflow_top(registry: Registry, image: Path, top_k: int = 3) -> list[tuple[str, float]]:
    """What `signflow predict` says for the image with the PyTorch model file."""
    return next(predict_images(TorchPredictor(registry.root / "model.pt"), [image], top_k=top_k)).top


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_json(url: str, body: dict | str) -> dict:
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    pytest.fail(f"{url} did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def start_server(command: list[str], env: dict, log: Path, ready_url: str) -> subprocess.Popen:
    """A server in its own process group (ended with everything it started by `stop_server`)."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(ready_url, process, log)
    except BaseException:
        stop_server(process)
        raise
    return process


def stop_server(process: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def assert_ranked(classes: list[str], probabilities: list[float], class_names: list[str], k: int) -> None:
    assert len(classes) == len(probabilities) == k and set(classes) <= set(class_names)
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-9


@pytest.mark.slow
def test_mlflow_models_serve_answers_the_stored_serving_example_and_a_real_image(registry, tmp_path):
    port = free_port()
    env = {**os.environ, "PATH": venv_path(), "MLFLOW_TRACKING_URI": registry.tracking_uri}
    command = [
        *("mlflow", "models", "serve", "-m", f"models:/{registry.name}@champion"),
        *("--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)),
    ]
    server = start_server(command, env, tmp_path / "serve.log", f"http://127.0.0.1:{port}/ping")
    try:
        invocations = f"http://127.0.0.1:{port}/invocations"
        example = download(registry, "serving_input_example.json", tmp_path).read_text()
        answer = post_json(invocations, example)["predictions"]
        class_names = TorchPredictor(registry.root / "model.pt").class_names
        assert len(answer) == 1 and answer[0]["error"] is None
        assert_ranked(answer[0]["classes"], answer[0]["probabilities"], class_names, 3)

        image, broken = registry.image("gamma ü"), tmp_path / "broken.jpg"
        broken.write_bytes(image.read_bytes()[:100])
        rows = {"columns": ["image"], "data": [[b64(image)], [b64(broken)]]}
        body = {"dataframe_split": rows, "params": {"top_k": 2}}
        served, unreadable = post_json(invocations, body)["predictions"]
        expected = signflow_top(registry, image, top_k=2)
        assert served["classes"] == [name for name, _ in expected] and served["label"] == "gamma ü"
        assert served["probabilities"] == pytest.approx([p for _, p in expected], abs=1e-5)
        assert unreadable["classes"] == [] and unreadable["error"].startswith("cannot read image")
    finally:
        stop_server(server)


FRESH_PROCESS_LOAD = """
import builtins, json, pickle, sys
import cloudpickle

def refuse(*args, **kwargs):
    raise RuntimeError("something was unpickled")

pickle.load = pickle.loads = cloudpickle.load = cloudpickle.loads = refuse
torch_imports, real_import = [], builtins.__import__

def watch(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
        torch_imports.append(name)
    return real_import(name, *args, **kwargs)

builtins.__import__ = watch
import mlflow.pyfunc, pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[1])
with open(sys.argv[2], "rb") as f:
    answer = model.predict(pd.DataFrame({"image": [f.read()]}), params={"top_k": 3}).iloc[0]
print(json.dumps({"classes": list(answer["classes"]), "probabilities": list(answer["probabilities"]),
                  "torch": "torch" in sys.modules or bool(torch_imports)}))
"""


def test_a_registered_version_loads_with_pyfunc_in_a_fresh_process_without_pickle_or_torch(registry):
    image = registry.image("beta")
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.tracking_uri}
    uri = f"models:/{registry.name}/{registry.version}"
    run = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_LOAD, uri, str(image)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert answer["torch"] is False, "the served model must not need PyTorch"
    expected = signflow_top(registry, image)
    assert answer["classes"] == [name for name, _ in expected]
    assert answer["probabilities"] == pytest.approx([p for _, p in expected], abs=1e-5)


@pytest.fixture(scope="module")
def pyfunc(registry, tmp_path_factory):
    """The champion's MLflow model, loaded in this process from a downloaded copy."""
    from signflow._mlflow_model import load_mlflow_model

    return load_mlflow_model(download(registry, "", tmp_path_factory.mktemp("downloaded")))


def odd_images(folder: Path) -> list[Path]:
    """Images as users have them: sizes and aspect ratios, modes, EXIF rotation, wrong extensions."""
    folder.mkdir()
    base = Image.open(make_image(folder / "plain.jpg", (40, 200, 40), seed=3, size=64)).convert("RGB")
    base.resize((640, 480)).save(folder / "wide.jpg", quality=90)
    base.resize((333, 517)).save(folder / "tall.png")
    base.resize((1000, 90)).save(folder / "strip.jpg")
    base.resize((17, 23)).save(folder / "tiny.png")
    base.convert("RGBA").save(folder / "rgba.png")
    base.convert("L").save(folder / "gray.png")
    base.convert("P").save(folder / "palette.gif")
    Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257).save(folder / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    base.resize((1600, 1200)).save(folder / "rotated.JPG", exif=exif)
    base.save(folder / "actually_png.jpg", format="PNG")
    return sorted(folder.iterdir())


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "lanczos"])
def test_the_served_model_preprocesses_exactly_like_signflow(pyfunc, tmp_path, interpolation):
    served = type(pyfunc.unwrap_python_model())()  # the class as MLflow loaded it, set to other settings
    prep = Preprocessing(48, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), interpolation)
    served.size, served.resample = prep.image_size, Image.Resampling[interpolation.upper()]
    for path in odd_images(tmp_path / "images"):
        expected = read_image(path, prep).numpy()
        assert np.array_equal(served.to_uint8(path.read_bytes()), expected), path.name


def test_predict_onnx_and_the_mlflow_model_give_the_same_calibrated_probabilities(registry, pyfunc):
    import pandas as pd
    import torch

    torch_predictor = TorchPredictor(registry.root / "model.pt")
    onnx_predictor = OnnxPredictor(registry.root / "model.onnx")
    assert torch_predictor.temperature != 1.0, "the model was calibrated"
    paths = sorted(registry.raw.rglob("*.JPG"))[:12]
    images = torch.stack([read_image(p, torch_predictor.preprocessing) for p in paths])
    by_torch = torch_predictor.probabilities(images)
    by_onnx = onnx_predictor.probabilities(images)
    answers = pyfunc.predict(pd.DataFrame({"image": [b64(p) for p in paths]}), params={"top_k": 3})
    names = torch_predictor.class_names
    by_mlflow = np.zeros_like(by_torch)
    for row, answer in enumerate(answers.itertuples()):
        by_mlflow[row, [names.index(c) for c in answer.classes]] = answer.probabilities
    assert np.abs(by_onnx - by_torch).max() <= 1e-5
    top3 = np.sort(by_torch, axis=1)[:, ::-1][:, :3]
    assert np.abs(np.sort(by_mlflow, axis=1)[:, ::-1][:, :3] - top3).max() <= 1e-5
    from signflow._model_file import load_bundle
    from signflow.evaluate import logits_for

    logits = torch.from_numpy(logits_for(load_bundle(registry.root / "model.pt"), paths, 8)).double()
    calibrated = torch.softmax(logits / torch_predictor.temperature, 1).numpy()
    uncalibrated = torch.softmax(logits, 1).numpy()
    assert np.abs(calibrated - by_torch).max() <= 1e-5, "the predictors divide the logits by the temperature"
    assert np.abs(uncalibrated - by_torch).max() > 1e-3, "calibration changes the numbers"
    assert (uncalibrated.argmax(1) == by_torch.argmax(1)).all(), "but never the predicted class"


def test_the_mlflow_model_answers_each_row_even_when_some_are_unreadable(pyfunc, registry):
    import pandas as pd

    unreadable = ["not base64!", b64(registry.root / "params.yaml"), *map(b64, MALFORMED_TIFFS)]
    rows = pd.DataFrame({"image": [b64(registry.image("alpha")), *unreadable, b64(registry.image("beta"))]})
    answers = pyfunc.predict(rows, params={"top_k": 1})
    assert answers["label"].iloc[0] == "alpha" and answers["label"].iloc[-1] == "beta"
    assert list(answers["classes"]) == [["alpha"], *[[]] * len(unreadable), ["beta"]]
    assert "cannot read image" in answers["error"].iloc[1] and answers["classes"].iloc[1] == []
    assert answers["error"].iloc[2] == "cannot read image: not a readable image file"
    for error in answers["error"].iloc[3:-1]:  # Pillow raises TypeError and OverflowError on these TIFFs
        assert error.startswith("cannot read image: damaged or unsupported image file ("), error


def test_the_mlflow_model_runs_a_long_request_in_fixed_size_batches(pyfunc, registry, monkeypatch):
    """1000 rows in one request once took 2.5 GB as one ONNX batch: batches are capped, answers unchanged."""
    import pandas as pd

    from signflow._served_model import BATCH_SIZE

    model = pyfunc.unwrap_python_model()
    images = [b64(registry.image(label)) for label in ("alpha", "beta", "gamma ü")]
    alone = [pyfunc.predict(pd.DataFrame({"image": [image]}))["label"].iloc[0] for image in images]
    batch_sizes, probabilities = [], model.probabilities

    def recording(batch: np.ndarray) -> np.ndarray:
        batch_sizes.append(len(batch))
        return probabilities(batch)

    monkeypatch.setattr(model, "probabilities", recording)
    rows = 3 * BATCH_SIZE + 2
    answers = pyfunc.predict(pd.DataFrame({"image": [images[i % 3] for i in range(rows)]}))
    assert list(answers["label"]) == [alone[i % 3] for i in range(rows)]
    assert sum(batch_sizes) == rows and max(batch_sizes) == BATCH_SIZE


def test_serve_app_describes_the_model_and_classifies_uploads(registry):
    from fastapi.testclient import TestClient

    from signflow.serve import MAX_IMAGE_BYTES, create_app, open_served_model

    with open_served_model("champion", registry.root / "params.yaml") as served:
        client = TestClient(create_app(served))
        info = client.get("/info").json()
        assert info["name"] == registry.name and info["version"] == registry.version
        assert info["classes"] == ["alpha", "beta", "gamma ü"]
        assert "getUserMedia" in client.get("/").text
        image = registry.image("beta")
        answer = client.post("/predict", content=image.read_bytes()).json()
        expected = signflow_top(registry, image)
        assert [t["class"] for t in answer["top"]] == [name for name, _ in expected]
        assert [t["probability"] for t in answer["top"]] == pytest.approx([p for _, p in expected], abs=1e-5)
        assert len(client.post("/predict?top_k=1", content=image.read_bytes()).json()["top"]) == 1
        assert client.post("/predict", content=b"").status_code == 400
        assert client.post("/predict", content=b"not an image").status_code == 422
        for tiff in MALFORMED_TIFFS:  # Pillow raises TypeError and OverflowError on these: still a 422
            assert client.post("/predict", content=tiff.read_bytes()).status_code == 422, tiff.name
        assert client.post("/predict", content=b"x" * (MAX_IMAGE_BYTES + 1)).status_code == 413
        assert client.post("/predict?top_k=0", content=image.read_bytes()).status_code == 422


class AnsweringModel:
    """A stand-in for the served pyfunc model: every image is class "a"; `predict` runs `on_predict` first."""

    def __init__(self, on_predict=lambda: None):
        self.on_predict = on_predict

    def predict(self, frame, params=None):
        import pandas as pd

        self.on_predict()
        return pd.DataFrame([{"classes": ["a"], "probabilities": [1.0], "error": None}] * len(frame))


def answering_app(on_predict=lambda: None):
    from signflow.serve import ServedModel, create_app

    return create_app(ServedModel(AnsweringModel(on_predict), "stand-in", None, ["a"], "stand-in"))


def small_png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buffer, "PNG")
    return buffer.getvalue()


async def post_chunked(app, chunks) -> tuple[int, int]:
    """POST /predict with a chunked body (no Content-Length), straight to the ASGI app, as uvicorn
    passes it on; (status, bytes the app read before answering)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    chunks, read, status = iter(chunks), 0, []

    async def receive() -> dict:
        nonlocal read
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0], read


def test_serve_stops_reading_a_chunked_upload_at_the_size_limit():
    """A chunked upload declares no length: the server must stop reading at the limit, not buffer
    all of it first (a 300 MB upload raised its memory by 300 MB before the 413)."""
    from signflow.serve import MAX_IMAGE_BYTES

    app, mebibyte = answering_app(), b"x" * 2**20
    status, read = asyncio.run(post_chunked(app, [mebibyte] * (4 * MAX_IMAGE_BYTES // 2**20)))
    assert status == 413
    assert read <= MAX_IMAGE_BYTES + len(mebibyte), f"read {read / 2**20:.0f} MB of a 40 MB upload"
    image = small_png()
    assert asyncio.run(post_chunked(app, [image[:100], image[100:]])) == (200, len(image))


def test_serve_decodes_at_most_decode_slots_images_at_once():
    """DECODE_SLOTS + 1 requests at once: the barrier below opens only if all of them decode at the
    same time, which the server must never allow (each decode can take 16 bytes a pixel)."""
    import threading

    import httpx

    from signflow.serve import DECODE_SLOTS

    barrier, crowded = threading.Barrier(DECODE_SLOTS + 1, timeout=2), []

    def decode() -> None:
        try:
            barrier.wait()
            crowded.append(True)
        except threading.BrokenBarrierError:  # fewer arrived: the extra one was waiting its turn
            pass

    async def post_all() -> list[int]:
        transport = httpx.ASGITransport(app=answering_app(decode))
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            posts = [client.post("/predict", content=small_png()) for _ in range(DECODE_SLOTS + 1)]
            return [response.status_code for response in await asyncio.gather(*posts)]

    assert asyncio.run(post_all()) == [200] * (DECODE_SLOTS + 1)
    assert not crowded, f"{DECODE_SLOTS + 1} images were decoded at once; the limit is {DECODE_SLOTS}"


def test_serve_caps_the_open_connections(monkeypatch, registry):
    """Waiting requests hold their body: uvicorn answers 503 past MAX_CONNECTIONS, so they cost at
    most MAX_CONNECTIONS x MAX_IMAGE_BYTES."""
    import uvicorn

    from signflow.serve import MAX_CONNECTIONS, serve

    settings = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: settings.update(kwargs))
    serve(str(registry.root / "model.onnx"), registry.root / "params.yaml", "127.0.0.1", 8000)
    assert settings["limit_concurrency"] == MAX_CONNECTIONS


def test_serve_loads_an_onnx_file_and_names_what_it_cannot_load(registry, tmp_path):
    from signflow.serve import ServeError, open_served_model

    with open_served_model(str(registry.root / "model.onnx"), registry.root / "params.yaml") as served:
        assert served.class_names == ["alpha", "beta", "gamma ü"] and served.version is None
    with pytest.raises(ServeError, match="no version or alias '9'"):
        with open_served_model("9", registry.root / "params.yaml"):
            pass
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ServeError, match="not a registry alias or version, an MLflow model folder or an .onnx"):
        with open_served_model(str(tmp_path / "notes.txt"), registry.root / "params.yaml"):
            pass


def test_the_model_card_says_how_to_use_the_version_and_how_calibrated_it_is(registry):
    card = (registry.root / "model_card.md").read_text()
    metrics = json.loads((registry.root / "reports" / "metrics.json").read_text())
    assert f'mlflow.pyfunc.load_model("models:/{registry.name}/{registry.version}")' in card
    assert f"signflow serve --model {registry.version}" in card
    assert f"| expected calibration error before temperature scaling | {metrics['ece_uncalibrated']:.4f} |" in card
    assert f"temperature of {metrics['temperature']:.4f}" in card


def test_serve_command_explains_itself_and_fails_with_a_message(registry, capsys):
    from signflow.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "camera" in capsys.readouterr().out
    assert main(["serve", "--model", "9", "--params", str(registry.root / "params.yaml")]) == 1
    assert "signflow serve: error: " in capsys.readouterr().err


TOP = "[...document.querySelectorAll('#top li')].map(li => [li.dataset.class, +li.dataset.probability])"


@pytest.mark.slow
@pytest.mark.skipif(chromium_binary() is None, reason="no chromium (apt-get install -y chromium)")
def test_webcam_page_in_chromium_shows_the_class_the_camera_sees(registry, tmp_path):
    """`signflow serve` for the champion; Chromium's fake camera plays 2 s of test images of one
    class, then 2 s of another, looping; the page must follow it. Then the upload fallback."""
    video = write_y4m(
        tmp_path / "signs.y4m",
        frames_from_images([registry.image("alpha", 1), registry.image("gamma ü", 1)], repeat=20),
    )
    port = free_port()
    command = [sys.executable, "-m", "signflow", "serve", "--params", str(registry.root / "params.yaml")]
    command += ["--port", str(port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    server = start_server(command, env, tmp_path / "serve.log", f"http://127.0.0.1:{port}/info")
    try:
        asyncio.run(_drive_the_page(f"http://127.0.0.1:{port}/", video, registry, tmp_path))
    finally:
        stop_server(server)


async def _drive_the_page(url: str, video: Path, registry: Registry, tmp_path: Path) -> None:
    browser = Chromium(video)
    try:
        await browser.connect()
        await browser.goto(url)
        title = await browser.wait_for(
            f"document.getElementById('model').textContent.includes('{registry.name}') && "
            "document.getElementById('model').textContent"
        )
        assert title == f"{registry.name} version {registry.version}"
        assert "alpha, beta, gamma ü" in await browser.eval("document.getElementById('classes').textContent")
        await browser.wait_for("+(document.body.dataset.answered || 0) >= 2")
        top = await browser.eval(TOP)
        assert len(top) == 3 and [p for _, p in top] == sorted((p for _, p in top), reverse=True), top
        seen, started, answered = [], time.monotonic(), int(await browser.eval("document.body.dataset.answered"))
        while time.monotonic() - started < 6:  # the video switches class every 2 s
            seen.append((await browser.eval(TOP))[0][0])
            await asyncio.sleep(0.25)
        rate = (int(await browser.eval("document.body.dataset.answered")) - answered) / (time.monotonic() - started)
        print(f"top-1 over time: {seen}; {rate:.1f} frames classified per second")
        assert {"alpha", "gamma ü"} <= set(seen) <= {"alpha", "gamma ü"}, seen
        await browser.screenshot(tmp_path / "webcam.png")

        await browser.set_file_input("#file", registry.image("beta"))
        await browser.wait_for("document.body.dataset.source === 'upload'")
        assert (await browser.eval(TOP))[0][0] == "beta"
        await browser.screenshot(tmp_path / "upload.png")
    finally:
        await browser.close()


def registry_copy(registry: Registry, tmp_path: Path) -> Path:
    """A params file for a copy of the registry's database (same artifacts): a test may move its aliases."""
    import shutil

    shutil.copy(registry.root / "mlflow.db", tmp_path / "mlflow.db")
    raw = yaml.safe_load((registry.root / "params.yaml").read_text())
    raw["register"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "params.yaml"


def new_version(registry: Registry, tracking_uri: str, source: str, accuracy: str) -> str:
    """A version registered by hand from `source`, made the champion."""
    client = mlflow_client(tracking_uri)
    first = client.get_model_version(registry.name, registry.version)
    tags = {**first.tags, "signflow.test_accuracy": accuracy}
    version = client.create_model_version(registry.name, source, run_id=first.run_id, tags=tags).version
    client.set_registered_model_alias(registry.name, "champion", version)
    return str(version)


def wait_for_info(client, condition, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while not condition(info := client.get("/info").json()):
        assert time.monotonic() < deadline, info
        time.sleep(0.1)
    return info


def test_serve_follows_the_champion_alias_without_a_restart_and_never_serves_a_broken_version(registry, tmp_path):
    from fastapi.testclient import TestClient

    from signflow.serve import create_app, open_live_model

    params = registry_copy(registry, tmp_path)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = mlflow_client(tracking_uri).get_model_version(registry.name, registry.version)
    image = registry.image("beta").read_bytes()
    with TestClient(create_app(open_live_model("champion", params, poll_s=0.2))) as client:
        info = client.get("/info").json()
        assert info["version"] == registry.version and info["follows"] == "champion"
        assert info["test_accuracy"] == pytest.approx(float(first.tags["signflow.test_accuracy"]))
        assert info["split"] == first.tags["signflow.split"] and info["split"]
        two = new_version(registry, tracking_uri, first.source, "0.97")
        info = wait_for_info(client, lambda i: i["version"] == two)
        assert info["test_accuracy"] == 0.97 and info["swap_error"] is None
        assert client.post("/predict", content=image).json()["version"] == two

        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "MLmodel").write_text("not: an MLflow model\n")
        three = new_version(registry, tracking_uri, str(broken), "0.99")
        info = wait_for_info(client, lambda i: i["swap_error"] is not None)
        assert info["version"] == two and info["swap_error"].startswith(f"version {three} (champion) was not served")
        answer = client.post("/predict", content=image)
        assert answer.status_code == 200 and answer.json()["version"] == two

        mlflow_client(tracking_uri).set_registered_model_alias(registry.name, "champion", registry.version)
        info = wait_for_info(client, lambda i: i["version"] == registry.version)
        assert info["swap_error"] is None


def test_serve_swaps_the_model_for_new_requests_only(registry, tmp_path):
    """A request that read the live model before the swap finishes on it; the next one gets the new one."""
    from signflow.serve import open_live_model

    params = registry_copy(registry, tmp_path)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    live = open_live_model("champion", params)
    try:
        in_flight = live.current
        assert live.check() is False, "nothing moved"
        first = mlflow_client(tracking_uri).get_model_version(registry.name, registry.version)
        two = new_version(registry, tracking_uri, first.source, "0.9")
        assert live.check() is True and live.current.version == two
        from signflow.serve import top_classes

        assert top_classes(in_flight, registry.image("alpha").read_bytes(), 1)["top"][0]["class"] == "alpha"
    finally:
        live.close()


def test_capture_mode_serves_the_page_before_any_version_and_the_first_champion_goes_live(registry, tmp_path):
    from fastapi.testclient import TestClient

    from signflow.serve import ServeError, create_app, open_live_model

    params = registry_copy(registry, tmp_path)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_client(tracking_uri).delete_registered_model_alias(registry.name, "champion")
    with pytest.raises(ServeError, match="no version or alias 'champion'"):
        open_live_model("champion", params)
    with TestClient(create_app(open_live_model("champion", params, poll_s=0.2, wait_for_first=True))) as client:
        info = client.get("/info").json()
        assert info["version"] is None and info["classes"] == [] and "no model served yet" in info["swap_error"]
        answer = client.post("/predict", content=registry.image("beta").read_bytes())
        assert answer.status_code == 503 and "no model is served yet" in answer.json()["detail"]
        mlflow_client(tracking_uri).set_registered_model_alias(registry.name, "champion", registry.version)
        info = wait_for_info(client, lambda i: i["version"] == registry.version)
        assert info["classes"] == ["alpha", "beta", "gamma ü"] and info["swap_error"] is None


SIGNS = {"fist": "disc", "palm": "bar", "peace": "cross"}
"""Three synthetic signs a fake camera shows: a shape on a noisy background that moves a little."""


def sign_frames(shape: str, count: int = 30, seed: int = 0) -> list[np.ndarray]:
    from PIL import ImageDraw

    rng, frames = np.random.default_rng(seed), []
    colour = {"disc": (210, 60, 50), "bar": (50, 190, 70), "cross": (60, 80, 210)}[shape]
    for _ in range(count):
        background = np.clip(rng.normal(120, 20, (240, 320, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(background)
        draw, (x, y) = ImageDraw.Draw(image), rng.integers(-20, 21, 2) + (160, 120)
        if shape == "disc":
            draw.ellipse((x - 60, y - 60, x + 60, y + 60), fill=colour)
        elif shape == "bar":
            draw.rectangle((x - 25, y - 90, x + 25, y + 90), fill=colour)
        else:
            draw.rectangle((x - 80, y - 18, x + 80, y + 18), fill=colour)
            draw.rectangle((x - 18, y - 80, x + 18, y + 80), fill=colour)
        frames.append(np.asarray(image))
    return frames


@pytest.mark.slow
@pytest.mark.skipif(chromium_binary() is None, reason="no chromium (apt-get install -y chromium)")
def test_capture_train_and_go_live_from_the_page_in_chromium(tmp_path):
    """A fresh project and `signflow serve --capture-dir`: Chromium's fake camera shows each sign in
    turn; the page records bursts of each; Train with one burst of the last sign fails at the split
    saying why; with 5 bursts a sign it trains (`dvc repro`), and the new champion goes live without a
    restart and names each sign, classified on the server and then in the browser (ONNX Runtime Web).
    With SIGNFLOW_SCREENSHOTS=docs it writes the page's screenshots there (docs/serving.md)."""
    from signflow._capture import BURST_PATTERN
    from signflow.serve import ort_web_folder
    from tests.helpers import make_project

    captures = tmp_path / "captures"
    captures.mkdir()
    project = make_project(tmp_path, captures, epochs=8)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["split"].update(  # a burst must fit in a split's share: 5 bursts a class make 3/1/1
        train=0.6, valid=0.2, test=0.2, strategy="group", group_pattern=BURST_PATTERN, near_duplicates="report"
    )
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    videos = {
        name: write_y4m(tmp_path / f"{name}.y4m", sign_frames(shape, seed=i))
        for i, (name, shape) in enumerate(SIGNS.items())
    }
    port = free_port()
    command = [sys.executable, "-m", "signflow", "serve", "--capture-dir", str(captures), "--follow-every", "1"]
    command += ["--port", str(port)]
    env = {**os.environ, "PATH": venv_path()}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    log = tmp_path / "serve.log"
    in_browser = ort_web_folder() is not None
    with log.open("wb") as out:
        server = subprocess.Popen(
            command, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/info", server, log)
        url = f"http://127.0.0.1:{port}/"
        asyncio.run(_capture_and_train(url, videos, tmp_path))
        asyncio.run(_classify_each_sign(url, videos, tmp_path, in_browser))
    finally:
        stop_server(server)
    assert sorted(p.name for p in captures.iterdir()) == sorted(SIGNS)
    if not in_browser:
        pytest.skip("server inference checked; in-browser inference needs ONNX Runtime Web: npm ci --prefix web")


async def _open_page(url: str, video: Path) -> Chromium:
    browser = Chromium(video)
    await browser.connect()
    await browser.goto(url)
    await browser.wait_for(
        "!document.getElementById('capture').hidden && document.getElementById('video').videoWidth > 0"
    )
    return browser


async def _record_bursts(browser: Chromium, name: str, until: int) -> None:
    """Press record burst (6 frames at 8 a second) until the page has saved `until` bursts."""
    await browser.eval(
        f"document.getElementById('class-name').value = {json.dumps(name)};"
        "document.getElementById('burst-frames').value = 6; document.getElementById('burst-rate').value = 8;"
    )
    while (count := int(await browser.eval("+(document.body.dataset.bursts || 0)"))) < until:
        await browser.eval("document.getElementById('record').click()")
        await browser.wait_for(
            f"+(document.body.dataset.bursts || 0) > {count} || "
            "document.getElementById('capture-status').className === 'error'"
        )
        status = await browser.eval("document.getElementById('capture-status').textContent")
        assert status.startswith("saved a burst of 6 frames"), status


async def _train(browser: Chromium, tmp_path: Path) -> tuple[str, str, set[str]]:
    """Press Train and follow it: its end state, the last status and every status seen."""
    await browser.eval("document.body.dataset.train = ''; document.getElementById('train').click()")
    await browser.wait_for("document.body.dataset.train")  # the page sets it from this run's first status
    steps, shot = set(), False
    while (state := await browser.eval("document.body.dataset.train")) in (None, "running"):
        steps.add(text := await browser.eval("document.getElementById('train-status').textContent"))
        if not shot and "epoch" in text:
            shot = await save_screenshot(browser, "training", tmp_path, height=860)
        await asyncio.sleep(0.5)
    return state, await browser.eval("document.getElementById('train-status').textContent"), steps


async def _capture_and_train(url: str, videos: dict[str, Path], tmp_path: Path) -> None:
    *first, last = videos
    for name in first:
        browser = await _open_page(url, videos[name])
        try:
            await _record_bursts(browser, name, 5)
        finally:
            await browser.close()
    browser = await _open_page(url, videos[last])
    try:
        await _record_bursts(browser, last, 1)
        await save_screenshot(browser, "capture", tmp_path, height=860)
        state, text, _ = await _train(browser, tmp_path)
        assert state == "failed" and text.startswith(f"training failed at step split: class '{last}' has 6 usable"), (
            text
        )
        assert "in 1 group(s)" in text and "honest test" in text, text
        await _record_bursts(browser, last, 5)
        state, text, steps = await _train(browser, tmp_path)
        assert state == "done", text
        print("train status seen:", sorted(steps))
        assert any("step train, epoch" in step for step in steps), steps
        await browser.wait_for("document.body.dataset.version === '1'", timeout=30)
        live = await browser.eval("document.getElementById('live').textContent")
        assert "version 1" in live and "Test accuracy" in live and "Split:" in live, live
        answered = int(await browser.eval("document.body.dataset.answered || 0"))
        await browser.wait_for(f"+(document.body.dataset.answered || 0) > {answered}", timeout=15)
        await save_screenshot(browser, "live", tmp_path, height=860)
    finally:
        await browser.close()


async def _top_class_seen(browser: Chromium, answered_by: str) -> str:
    """The class on top most often over 2 s, every answer given by `answered_by` (server or browser)."""
    answered = int(await browser.eval("+(document.body.dataset.answered || 0)"))
    await browser.wait_for(f"+(document.body.dataset.answered || 0) >= {answered + 2}", timeout=60)
    seen = []
    for _ in range(8):
        assert await browser.eval("document.body.dataset.answeredBy") == answered_by
        seen.append((await browser.eval(TOP))[0][0])
        await asyncio.sleep(0.25)
    return max(set(seen), key=seen.count)


async def _classify_each_sign(url: str, videos: dict[str, Path], tmp_path: Path, in_browser: bool) -> None:
    for name, video in videos.items():
        browser = await _open_page(url, video)
        try:
            await browser.wait_for("+(document.body.dataset.answered || 0) >= 2")
            assert await _top_class_seen(browser, "server") == name
            if not in_browser:
                continue
            await browser.eval("document.getElementById('in-browser').click()")
            await browser.wait_for(
                "document.body.dataset.mode === 'browser' || document.getElementById('mode').className", timeout=60
            )
            mode = await browser.eval("document.getElementById('mode').textContent")
            assert "float32 model of version 1" in mode, mode
            assert await _top_class_seen(browser, "browser") == name
            if name == list(videos)[-1]:
                await save_screenshot(browser, "live-in-browser", tmp_path, height=860)
        finally:
            await browser.close()
