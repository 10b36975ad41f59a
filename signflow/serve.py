"""`signflow serve`: a web page that classifies what the camera sees, with a registered model.

The page (signflow/_webcam.html) asks for the camera, sends a few frames a second as JPEG to
`POST /predict` (one request in flight at a time) and shows the top 3 classes; a file picker
classifies a photo instead when there is no camera. It shows the model's name, version and class
list from `GET /info`. The model is the version's MLflow model (signflow._mlflow_model): ONNX
Runtime, the preprocessing and temperature it was registered with, no PyTorch. FastAPI and uvicorn
serve it, on 127.0.0.1 unless told otherwise (browsers allow the camera only on localhost or HTTPS).

In-browser inference: the page can instead run the model itself with ONNX Runtime Web, so frames
never leave the device. The server hands it `GET /model.onnx` (the version's float ONNX file; with
`?precision=int8` its int8 twin, when an .onnx file is served with one beside it: selectable, not the
default, as ONNX Runtime Web's WebAssembly runs the QDQ int8 graph slower than the float one,
bench/browser_latency.json) and ONNX Runtime Web's own files
under `/ort/`, vendored into signflow/_web/ at install time (`npm ci --prefix web`, see README):
nothing is fetched from the internet when the page runs. Without those files the page says so and
classifies on the server.

Memory is bounded whatever clients send: a server needs its idle size (0.3 GB with mobilenetv2_100
at 160 px) + DECODE_SLOTS x 16 bytes x the model's max_pixels (split.max_pixels: 0.8 GB a slot at
the default 50 MP) + MAX_CONNECTIONS x 2 x MAX_IMAGE_BYTES (bodies being read: 0.64 GB). That is
2.6 GB on 2 cores and 4.2 GB on 4 or more; bench/serve_memory.py measures the decoding part.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

# FastAPI resolves the endpoints' (string) annotations in this module's globals: imported here
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from signflow._capture import CLIENT_FRAMES_PER_SECOND, CaptureError, CaptureStore, ClientRates, split_frames
from signflow._capture import DEFAULT_MAX_BYTES as DEFAULT_CAPTURE_BYTES
from signflow._hot_swap import DEFAULT_POLL_S, LiveModel
from signflow._mlflow import VersionNotFound, downloaded_version, is_registry_reference, registry_settings
from signflow._mlflow_model import load_mlflow_model, save_mlflow_model
from signflow._page_training import PageTraining
from signflow.errors import SignflowError

__all__ = ["ServeError", "ServedModel", "create_app", "open_served_model", "serve"]

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 10 * 2**20
"""Largest photo or frame accepted by POST /predict (a 12-megapixel JPEG is about 5 MB). A body is
read only up to this, declared length or not (a chunked upload declares none)."""
DECODE_SLOTS = min(4, os.cpu_count() or 1)
"""Images decoded and classified at once (one a core, at most 4, so the memory bound does not grow
with the machine); other requests wait their turn holding only their body. Decoding one image at
the model's pixel limit takes up to about 16 bytes a pixel (bench/serve_memory.py at 50 MP: a
lossless WebP 0.76 GB, an RGBA PNG 0.57 GB, a 1-bit PNG 0.24 GB)."""
MAX_CONNECTIONS = 32
"""Open connections uvicorn serves before answering 503: each holds at most one body."""
MAX_TOP_K = 20
EXAMPLE_SIZE = 64
"""Pixels of the input example stored when an .onnx file is wrapped on the fly (any size works)."""
ORT_WEB_FILES = {
    "ort.wasm.min.js": "text/javascript",
    "ort-wasm-simd-threaded.mjs": "text/javascript",
    "ort-wasm-simd-threaded.wasm": "application/wasm",
}
"""ONNX Runtime Web's files the page loads (its WebAssembly build), vendored into signflow/_web/."""


class ServeError(SignflowError, ValueError):
    """The model to serve cannot be found or loaded."""


class NotRegisteredYet(ServeError):
    """The registry has no version of that number or alias (yet)."""


@dataclass(frozen=True)
class ServedModel:
    """The pyfunc model and what the page shows about it."""

    model: Any
    name: str
    version: str | None
    class_names: list[str]
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    """The registered version's tags (none for a model file): its test accuracy and how the split was made."""
    tracking_uri: str | None = None
    browser_model: BrowserModel | None = None
    """The ONNX file and preprocessing the page needs to classify in the browser."""

    def info(self) -> dict[str, Any]:
        accuracy = self.tags.get("signflow.test_accuracy")
        browser = self.browser_model
        return {
            "browser_model": None if browser is None else {"precisions": browser.precisions, **browser.preprocessing},
            "name": self.name,
            "version": self.version,
            "classes": self.class_names,
            "source": self.source,
            "test_accuracy": float(accuracy) if accuracy else None,
            "split": self.tags.get("signflow.split"),
            "test_near_duplicates_in_train": self.tags.get("signflow.test_near_duplicates_in_train"),
        }


@dataclass(frozen=True)
class BrowserModel:
    """The ONNX model the page runs with ONNX Runtime Web, held in memory (a swap closes the version's files)."""

    onnx: bytes
    """The float32 model: the page's default (faster than int8 in ONNX Runtime Web's WebAssembly)."""
    int8: bytes | None
    """The export step's int8 twin, when there is one: a smaller download, chosen on the page."""
    preprocessing: dict[str, Any]
    """image_size, mean, std (0-1 scale), interpolation: exactly what the server applies."""

    @property
    def precisions(self) -> list[str]:
        return ["float32", "int8"] if self.int8 is not None else ["float32"]


def int8_beside(onnx_path: Path) -> Path:
    """The export step's int8 model beside `onnx_path` (model.onnx -> model.int8.onnx)."""
    return onnx_path.with_name(f"{onnx_path.stem}.int8{onnx_path.suffix}")


def browser_model_of(python_model: Any, onnx_path: Path) -> BrowserModel | None:
    """The page's copy of the served model (and its int8 twin when there is one), its preprocessing from
    the served model itself (so browser and server cannot drift)."""
    from PIL import Image

    if not onnx_path.is_file():
        return None
    int8 = int8_beside(onnx_path)
    interpolation = Image.Resampling(python_model.resample).name.lower()
    preprocessing = {
        "image_size": int(python_model.size),
        "mean": [float(v) / 255 for v in python_model.mean.ravel()],
        "std": [float(v) / 255 for v in python_model.std.ravel()],
        "interpolation": interpolation,
    }
    return BrowserModel(onnx_path.read_bytes(), int8.read_bytes() if int8.is_file() else None, preprocessing)


@contextmanager
def open_served_model(spec: str, params_path: str | Path) -> Iterator[ServedModel]:
    """The model `--model` names: a registry alias or version of `register.model_name` (from the
    params file; MLFLOW_TRACKING_URI wins), an MLflow model folder, or an exported `.onnx` file
    (or a folder holding `model.onnx`), wrapped in the same MLflow model on the fly."""
    if is_registry_reference(spec):
        name, tracking_uri = registry_settings(spec, params_path)
        try:
            with downloaded_version(name, spec, tracking_uri) as (folder, version):
                served = _load(folder, name, version, f"{name} version {version}")
                tags = _version_tags(name, version, tracking_uri)
                yield dataclasses.replace(served, tags=tags, tracking_uri=tracking_uri)
        except VersionNotFound as error:
            raise NotRegisteredYet(str(error)) from None
        return
    path = Path(spec)
    if (path / "MLmodel").is_file():
        yield _load(path, path.resolve().name, None, str(path))
        return
    onnx = path / "model.onnx" if path.is_dir() else path
    if not (onnx.is_file() and onnx.suffix == ".onnx"):
        raise ServeError(f"--model {spec}: not a registry alias or version, an MLflow model folder or an .onnx file")
    with tempfile.TemporaryDirectory(prefix="signflow-serve-") as tmp:
        folder = save_mlflow_model(onnx, EXAMPLE_SIZE, Path(tmp) / "model")
        served = _load(folder, onnx.stem, None, str(onnx))
        browser = browser_model_of(served.model.unwrap_python_model(), onnx)
        yield dataclasses.replace(served, browser_model=browser)


def _version_tags(name: str, version: str, tracking_uri: str) -> dict[str, str]:
    from signflow._mlflow import mlflow_client

    return dict(mlflow_client(tracking_uri).get_model_version(name, version).tags)


def _load(folder: Path, name: str, version: str | None, source: str) -> ServedModel:
    if not (folder / "MLmodel").is_file():
        raise ServeError(
            f"{source} has no MLflow model (MLmodel); it was registered before signflow stored one: "
            "run `signflow register` again, or serve its model.onnx"
        )
    try:
        model = load_mlflow_model(folder)
        class_names = list(model.unwrap_python_model().class_names)
        browser = browser_model_of(model.unwrap_python_model(), folder / "artifacts" / "model.onnx")
    except Exception as error:  # noqa: BLE001 - MLflow and ONNX Runtime raise many types
        raise ServeError(f"{source}: cannot load its MLflow model ({error})") from None
    return ServedModel(model, name, version, class_names, source, browser_model=browser)


def top_classes(served: ServedModel, image: bytes, top_k: int) -> dict[str, Any]:
    """The top-k (class, probability) of one encoded image, and the model's time for it."""
    import base64

    import pandas as pd

    started = time.perf_counter()
    frame = pd.DataFrame({"image": [base64.b64encode(image).decode("ascii")]})
    row = served.model.predict(frame, params={"top_k": top_k}).iloc[0]
    top = [{"class": c, "probability": float(p)} for c, p in zip(row["classes"], row["probabilities"], strict=True)]
    return {"top": top, "error": row["error"], "ms": round((time.perf_counter() - started) * 1000, 1)}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes: never buffered whole first."""
    too_large = HTTPException(413, f"image larger than {limit // 2**20} MB")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    served: ServedModel | LiveModel,
    capture: CaptureStore | None = None,
    training: PageTraining | None = None,
    ort_web_dir: Path | None = None,
) -> FastAPI:
    """The FastAPI app: the page, the model's description and the prediction endpoint; with `capture`,
    the capture endpoints, and with `training` the Train action. A LiveModel's follower runs while the
    app does (its lifespan). ONNX Runtime Web's files come from `ort_web_dir` (default: signflow/_web/)."""
    ort_web = ort_web_folder(ort_web_dir)
    live = served if isinstance(served, LiveModel) else LiveModel(None, "", None, served=served)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        live.start()
        try:
            yield
        finally:
            if training is not None:
                training.stop()
            live.close()

    app = FastAPI(title=f"signflow: {live.name}", docs_url=None, redoc_url=None, lifespan=lifespan)
    page = files("signflow").joinpath("_webcam.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/info")
    def info() -> dict[str, Any]:
        served = live.current
        nothing = {"name": live.name, "version": None, "classes": [], "source": None, "test_accuracy": None}
        return {
            **(
                served.info()
                if served is not None
                else {**nothing, "split": None, "test_near_duplicates_in_train": None}
            ),
            "follows": live.follows,
            "swap_error": live.swap_error,
            "capture": capture is not None,
            "train": training is not None,
            "ort_web": ort_web is not None,
        }

    @app.get("/model.onnx")
    def browser_onnx(precision: str = Query("float32", pattern="^(float32|int8)$")) -> Response:
        """The live version's ONNX model for in-browser inference: float32, or its int8 twin when asked."""
        served = live.current
        if served is None or served.browser_model is None:
            raise HTTPException(404, "no ONNX model to run in the browser: classify on the server")
        onnx = served.browser_model.int8 if precision == "int8" else served.browser_model.onnx
        if onnx is None:
            raise HTTPException(404, "this version has no int8 model: choose float32")
        headers = {"X-Signflow-Version": served.version or "", "X-Signflow-Precision": precision}
        headers["Cache-Control"] = "no-store"
        return Response(onnx, media_type="application/octet-stream", headers=headers)

    @app.get("/ort/{name}")
    def ort_web_file(name: str) -> FileResponse:
        """ONNX Runtime Web's files, vendored at install time (only these names: no path from the URL)."""
        if name not in ORT_WEB_FILES or ort_web is None:
            raise HTTPException(
                404, "ONNX Runtime Web is not installed here (npm ci --prefix web): classify on the server"
            )
        return FileResponse(ort_web / name, media_type=ORT_WEB_FILES[name], headers={"Cache-Control": "no-cache"})

    decode_slots = anyio.CapacityLimiter(DECODE_SLOTS)

    @app.post("/predict")
    async def predict(request: Request, top_k: int = Query(3, ge=1, le=MAX_TOP_K)) -> dict[str, Any]:
        """Top-k classes of the image file in the request body (JPEG, PNG, ...)."""
        body = await read_body(request, MAX_IMAGE_BYTES)
        if not body:
            raise HTTPException(400, "empty request: post the image file's bytes as the body")
        model = live.current  # read once: a swap meanwhile does not change the model of this request
        if model is None:
            raise HTTPException(503, "no model is served yet: capture bursts and train, or register a model")
        result = await anyio.to_thread.run_sync(top_classes, model, body, top_k, limiter=decode_slots)
        if result.pop("error"):
            raise HTTPException(422, "cannot read the image: send a JPEG, PNG or other image file")
        return {**result, "version": model.version}

    if capture is not None:
        add_capture_routes(app, capture, decode_slots)
    if training is not None:
        add_training_routes(app, training)
    return app


def ort_web_folder(folder: Path | None = None) -> Path | None:
    """`folder` (default signflow/_web/) when it holds every ONNX Runtime Web file the page needs, else None."""
    folder = folder or Path(str(files("signflow").joinpath("_web")))
    return folder if all((folder / name).is_file() for name in ORT_WEB_FILES) else None


@contextmanager
def capture_errors() -> Iterator[None]:
    try:
        yield
    except CaptureError as error:
        raise HTTPException(error.status, str(error)) from None


def client_address(request: Request) -> str:
    """The address a request came from (the proxy's, behind one: serve listens on localhost by default)."""
    return request.client.host if request.client else "unknown"


def add_capture_routes(app: FastAPI, capture: CaptureStore, decode_slots: anyio.CapacityLimiter) -> None:
    """POST a burst (JPEG frames back to back, `sizes` their byte counts), list the classes, delete a burst."""

    @app.get("/capture")
    def capture_summary() -> dict[str, Any]:
        return capture.summary()

    @app.post("/capture/{class_name}")
    async def save_burst(request: Request, class_name: str, sizes: str = Query("", max_length=1000)) -> dict[str, Any]:
        from signflow._capture import MAX_BURST_BYTES, MAX_FRAMES_PER_BURST

        with capture_errors():  # the client's rate first, from the frame count it declares: before the body
            capture.client_rates.take(client_address(request), min(sizes.count(",") + 1, MAX_FRAMES_PER_BURST))
        body = await read_body(request, MAX_BURST_BYTES)
        with capture_errors():
            frames = split_frames(body, sizes)
            saved = await anyio.to_thread.run_sync(capture.save_burst, class_name, frames, limiter=decode_slots)
        return {"class": saved.class_name, "burst": saved.burst, "frames": saved.frames, **capture.summary()}

    @app.delete("/capture/{class_name}/{burst}")
    def delete_burst(request: Request, class_name: str, burst: str) -> dict[str, Any]:
        with capture_errors():
            capture.client_rates.take(client_address(request), 1)
            removed = capture.delete_burst(class_name, burst)
        return {"removed": removed, **capture.summary()}


def add_training_routes(app: FastAPI, training: PageTraining) -> None:
    """POST /train starts the pipeline on the capture folder; GET /train says how it goes."""

    @app.post("/train")
    def start_training() -> dict[str, Any]:
        with capture_errors():
            return training.start()

    @app.get("/train")
    def training_status() -> dict[str, Any]:
        return training.status()


def open_live_model(
    spec: str, params_path: str | Path, poll_s: float = DEFAULT_POLL_S, wait_for_first: bool = False
) -> LiveModel:
    """The model `--model` names; an alias (not a version number or a path) is followed in the registry.
    With `wait_for_first` (capture mode), an alias that names no version yet serves nothing until it does."""
    follows = spec if is_registry_reference(spec) and not spec.isdigit() else None
    registry = registry_settings(spec, params_path) if follows else None
    return LiveModel(
        lambda version: open_served_model(version, params_path),
        spec,
        follows,
        poll_s,
        registry=registry,
        wait_on=(NotRegisteredYet,) if wait_for_first else (),
    )


def serve(
    spec: str,
    params_path: str | Path,
    host: str,
    port: int,
    capture_dir: str | Path | None = None,
    capture_max_bytes: int = DEFAULT_CAPTURE_BYTES,
    poll_s: float = DEFAULT_POLL_S,
    capture_client_fps: float = CLIENT_FRAMES_PER_SECOND,
) -> None:
    """Load the model and serve the page until interrupted (Ctrl-C). With `capture_dir`, the page can
    capture bursts into it and train the project of `params_path` on them, each client address saving
    at most `capture_client_fps` frames a second (ClientRates.sustaining)."""
    import uvicorn

    live = open_live_model(spec, params_path, poll_s, wait_for_first=capture_dir is not None)
    capture = training = None
    if capture_dir is not None:
        capture = CaptureStore(capture_dir, capture_max_bytes, ClientRates.sustaining(capture_client_fps))
        from signflow._prefect_run import PrefectServer

        prefect = PrefectServer.from_settings()
        training = PageTraining(Path(params_path).resolve().parent, capture_dir, prefect=prefect)
        where = (
            "`dvc repro`"
            if prefect is None
            else f"the Prefect deployment on {prefect.shown} if it has one, else `dvc repro`"
        )
        log.info("capture mode: bursts go to %s; Train runs %s in %s", capture.root, where, training.workspace.root)
    if live.current is None:
        log.warning("%s; serving the page at http://%s:%d/ to capture and train", live.swap_error, host, port)
    else:
        served = live.current
        log.info("serving %s (%d classes) at http://%s:%d/", served.source, len(served.class_names), host, port)
    if live.follows:
        log.info("following the registry alias %r: a new version goes live without a restart", live.follows)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("browsers allow the camera only on localhost or HTTPS; other machines can upload photos only")
    uvicorn.run(
        create_app(live, capture, training),
        host=host,
        port=port,
        access_log=False,
        log_level="info",
        limit_concurrency=MAX_CONNECTIONS,
    )
