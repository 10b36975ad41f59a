"""Bad input on `signflow serve`'s capture page, in a real headless Chromium: a refused or missing
camera, a burst of black frames, a full disk, a client over its rate, a Train while a run is going.
Each must be a clear message on the page, and nothing already captured or running may be lost.

The server runs in a thread of this process with a stand-in model (every frame is class "a") and a
stand-in Train command (tests/test_capture.py's FAKE_RUN), so no test here trains a model."""

from __future__ import annotations

import asyncio
import errno
import json
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from signflow._capture import CaptureStore, ClientRates
from tests.browser import Chromium, chromium_binary, save_screenshot, serve_in_thread, write_y4m
from tests.test_capture import FAKE_RUN, frame, training_project

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium_binary() is None, reason="no chromium (apt-get install -y chromium)"),
]
CAPTURE_STATUS = "document.getElementById('capture-status')"
ROWS = "[...document.querySelectorAll('#counts tbody tr')].map(r => [r.dataset.class, +r.dataset.frames])"


@contextmanager
def capture_page(tmp_path: Path, store: CaptureStore) -> Iterator[str]:
    """The capture page on a free port: the stand-in model, `store`, and a Train whose run stops at
    epoch 2 of 7 until the file `tmp_path/release` exists, then fails with a disk-full error."""
    from signflow._page_training import PageTraining
    from signflow.serve import ServedModel, create_app
    from tests.test_serving import AnsweringModel

    training = PageTraining(
        training_project(tmp_path), store.root, [sys.executable, "-c", FAKE_RUN, str(tmp_path / "release")]
    )
    served = ServedModel(AnsweringModel(), "stand-in", None, ["a"], "stand-in")
    with serve_in_thread(create_app(served, capture=store, training=training)) as url:
        yield url


def seeded_store(tmp_path: Path, **options) -> CaptureStore:
    """A capture folder holding one burst of 3 frames of class "a" already."""
    store = CaptureStore(tmp_path / "captures", **options)
    store.save_burst("a", [frame(i) for i in range(3)])
    return store


def video(tmp_path: Path, black: bool = False) -> Path:
    rng = np.random.default_rng(0)
    frames = [np.zeros((240, 320, 3), np.uint8) if black else rng.integers(0, 256, (240, 320, 3), np.uint8)] * 10
    return write_y4m(tmp_path / ("black.y4m" if black else "noise.y4m"), frames)


async def open_page(url: str, video_path: Path | None = None, camera: str = "fake") -> Chromium:
    browser = Chromium(video_path, camera)
    await browser.connect()
    await browser.goto(url)
    await browser.wait_for("!document.getElementById('capture').hidden && document.body.dataset.train")
    return browser


async def record(browser: Chromium, frames: int = 4) -> str:
    """Press record burst for class "a"; the capture status once the burst was saved or refused."""
    before = await browser.eval("+(document.body.dataset.bursts || 0)")
    await browser.eval(
        "document.getElementById('class-name').value = 'a'; "
        f"document.getElementById('burst-frames').value = {frames}; document.getElementById('burst-rate').value = 10;"
        f"{CAPTURE_STATUS}.textContent = ''; {CAPTURE_STATUS}.className = ''; document.getElementById('record').click()"
    )
    await browser.wait_for(f"+(document.body.dataset.bursts || 0) > {before} || {CAPTURE_STATUS}.className === 'error'")
    return await browser.eval(f"{CAPTURE_STATUS}.textContent")


@pytest.mark.parametrize("camera", ["refused", "missing"])
def test_a_refused_or_missing_camera_says_so_and_what_to_do(tmp_path, camera):
    async def run() -> None:
        with capture_page(tmp_path, seeded_store(tmp_path)) as url:
            browser = await open_page(url, camera=camera)
            try:
                name = await browser.wait_for("document.body.dataset.camera")
                status = await browser.eval("document.getElementById('status').textContent")
                expected = {
                    "refused": ("NotAllowedError", "The camera was refused: allow it for this page in the browser's"),
                    "missing": ("NotFoundError", "No camera found: plug one in and reload"),
                }[camera]
                assert name == expected[0] and status.startswith(expected[1]), (name, status)
                assert status.endswith("or classify a photo with the file picker.")
                assert await browser.eval("document.getElementById('status').className") == "error"
                capture_status = await browser.eval(f"{CAPTURE_STATUS}.textContent")
                assert capture_status.endswith("recording bursts needs a camera."), capture_status
                if camera == "refused":
                    await save_screenshot(browser, "camera-refused", tmp_path, height=640)
                assert (await record(browser)).startswith("no camera picture to record")
                assert await browser.eval(ROWS) == [["a", 3]], "the burst captured before is still listed"
            finally:
                await browser.close()

    asyncio.run(run())


def test_a_black_burst_is_refused_on_the_page_and_nothing_is_lost(tmp_path):
    async def run() -> None:
        with capture_page(tmp_path, seeded_store(tmp_path)) as url:
            browser = await open_page(url, video(tmp_path, black=True))
            try:
                await browser.wait_for("document.getElementById('video').videoWidth > 0")
                status = await record(browser)
                assert status.startswith("not saved: 4 of 4 frames are blank (black or one flat colour)"), status
                assert "record the burst again" in status
                assert await browser.eval(ROWS) == [["a", 3]]
            finally:
                await browser.close()

    asyncio.run(run())
    assert len(list((tmp_path / "captures" / "a").iterdir())) == 3


def test_a_full_disk_and_a_client_over_its_rate_are_messages_on_the_page(tmp_path, monkeypatch):
    import signflow._capture as capture

    def full_disk(target, writer):
        raise OSError(errno.ENOSPC, "No space left on device")

    store = seeded_store(tmp_path, client_rates=ClientRates(rate=0.01, burst=4))
    monkeypatch.setattr(capture, "write_atomic", full_disk)

    async def run() -> None:
        with capture_page(tmp_path, store) as url:
            browser = await open_page(url, video(tmp_path))
            try:
                await browser.wait_for("document.getElementById('video').videoWidth > 0")
                status = await record(browser)
                assert status.startswith("not saved: cannot save the burst in ") and "No space left on device" in status
                status = await record(browser)  # the refused burst spent the client's 4 frames
                assert status.startswith("not saved: too many frames from 127.0.0.1: at most 0.01 a second"), status
                assert await browser.eval(ROWS) == [["a", 3]]
            finally:
                await browser.close()

    asyncio.run(run())
    assert len(list((tmp_path / "captures" / "a").iterdir())) == 3


def test_train_while_a_run_is_going_says_so_and_follows_that_run(tmp_path):
    async def run() -> None:
        with capture_page(tmp_path, seeded_store(tmp_path)) as url:
            browser = await open_page(url, video(tmp_path))
            try:
                assert await browser.eval("document.body.dataset.train") == "idle"
                with urllib.request.urlopen(urllib.request.Request(url + "train", method="POST")) as answer:
                    assert json.load(answer)["state"] == "running", "another page started a run"
                await browser.eval("document.getElementById('train').click()")
                text = await browser.wait_for(
                    "document.getElementById('train-status').textContent.includes('epoch 2') && "
                    "document.getElementById('train-status').textContent"
                )
                assert text.startswith("Train refused: a training run is going already ("), text
                assert "; wait for it to finish. Now training: step train" in text, text
                assert "Now training: step train, epoch 2 of 7" in text, text
                (tmp_path / "release").touch()
                await browser.wait_for("document.body.dataset.train === 'failed'")
                text = await browser.eval("document.getElementById('train-status').textContent")
                assert text == "training failed at step train: the disk is full (models/model.pt)", text
            finally:
                await browser.close()

    asyncio.run(run())
