"""A real headless Chromium for tests, driven over the DevTools protocol with `websockets` (no
Playwright download), with a fake camera that plays a Y4M video made from images.

Chromium's `--dump-dom` and `--screenshot` capture at page load, before a camera page has a frame,
so the tests evaluate JavaScript in the running page instead (`Chromium.eval`, `wait_for`).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

FLAGS = [
    "--headless",
    "--no-sandbox",  # needed as root (CI containers); harmless otherwise for a throwaway profile
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--use-fake-ui-for-media-stream",  # allow the camera without asking
    "--use-fake-device-for-media-stream",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--remote-debugging-port=0",
    "--window-size=1000,640",
]


def chromium_binary() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def rgb_to_i420(rgb: np.ndarray) -> bytes:
    """H x W x 3 uint8 RGB as planar I420 (BT.601 limited range, as Chromium reads Y4M)."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    h, w = y.shape

    def half(plane: np.ndarray) -> np.ndarray:
        return plane.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    return b"".join(np.clip(np.rint(p), 0, 255).astype(np.uint8).tobytes() for p in (y, half(u), half(v)))


def write_y4m(path: Path, frames: list[np.ndarray], fps: int = 10) -> Path:
    """A YUV4MPEG2 video of RGB frames (even width and height); Chromium loops it."""
    h, w, _ = frames[0].shape
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode("ascii"))
        for frame in frames:
            out.write(b"FRAME\n" + rgb_to_i420(frame))
    return path


def frames_from_images(paths: list[Path], size: tuple[int, int] = (320, 240), repeat: int = 10) -> list[np.ndarray]:
    """Each image resized to `size` (width, height), shown for `repeat` frames."""
    from PIL import Image

    frames = []
    for path in paths:
        with Image.open(path) as image:
            frames += [np.asarray(image.convert("RGB").resize(size))] * repeat
    return frames


CAMERAS = {
    "fake": [],
    "refused": ["--use-fake-ui-for-media-stream"],  # without it headless Chromium asks, and the flag below says no
    "missing": ["--use-fake-device-for-media-stream"],  # without it, the machine's cameras: none in a container
}
"""Which camera the page gets: the fake one, one the user refuses, or none (flags left out of FLAGS)."""


class Chromium:
    """One headless Chromium in its own process group, and a DevTools session on its page."""

    def __init__(self, video: Path | None = None, camera: str = "fake"):
        self.profile = tempfile.mkdtemp(prefix="signflow-chromium-")
        flags = [flag for flag in FLAGS if flag not in CAMERAS[camera]] + [f"--user-data-dir={self.profile}"]
        if camera == "refused":
            flags.append("--deny-permission-prompts")
        if video is not None:
            flags.append(f"--use-file-for-fake-video-capture={video}")
        self.stderr = open(Path(self.profile) / "stderr.log", "w+b")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [chromium_binary(), *flags, "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            start_new_session=True,
        )
        self.port = self._devtools_port()
        self._ids = itertools.count(1)
        self.socket = None

    def _devtools_port(self, timeout: float = 30) -> int:
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and "\n" in port_file.read_text()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stderr.seek(0)
                log = self.stderr.read().decode(errors="replace")[-2000:]
                self.kill()
                raise RuntimeError(f"chromium did not start: {log}")
            time.sleep(0.05)
        return int(port_file.read_text().splitlines()[0])

    async def connect(self) -> Chromium:
        import websockets

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as response:
            page = next(target for target in json.load(response) if target["type"] == "page")
        self.socket = await websockets.connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def send(self, method: str, **params) -> dict:
        message_id = next(self._ids)
        await self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:  # events arrive in between; wait for the reply to this message
            reply = json.loads(await self.socket.recv())
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def eval(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30):
        """The value of `expression` once it is truthy (JavaScript errors count as not yet)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = await self.eval(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still not true after {timeout} s")
            await asyncio.sleep(0.2)

    async def set_file_input(self, selector: str, path: Path) -> None:
        """Choose `path` in the page's file input, as a user would (fires its change event)."""
        root = await self.send("DOM.getDocument")
        node = await self.send("DOM.querySelector", nodeId=root["root"]["nodeId"], selector=selector)
        await self.send("DOM.setFileInputFiles", files=[str(path)], nodeId=node["nodeId"])

    async def screenshot(self, path: Path) -> Path:
        data = (await self.send("Page.captureScreenshot", format="png"))["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
        self.kill()

    def kill(self) -> None:
        """End this Chromium's process group (only its own processes) and remove its profile."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """An ASGI app served by uvicorn on a free 127.0.0.1 port in a thread of this process; its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (server.started and server.servers):
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(15)


SCREENSHOTS = "SIGNFLOW_SCREENSHOTS"
"""A folder (e.g. docs) where tests save the page's state screenshots as serving-<state>.png."""


async def save_screenshot(browser: Chromium, state: str, tmp_path: Path, height: int = 1000) -> Path:
    """The page in `state`, 1000 px wide, as a 128-colour PNG (docs-sized: well under 150 KB), into
    $SIGNFLOW_SCREENSHOTS (to regenerate docs/serving-*.png) or else `tmp_path`."""
    from PIL import Image

    await browser.send(
        "Emulation.setDeviceMetricsOverride", width=1000, height=height, deviceScaleFactor=1, mobile=False
    )
    folder = Path(os.environ.get(SCREENSHOTS) or tmp_path)
    path = await browser.screenshot(folder / f"serving-{state}.png")
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(128, dither=Image.Dither.NONE)
    small.save(path, optimize=True)
    return path
