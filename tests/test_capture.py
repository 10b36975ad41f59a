"""Capture mode of `signflow serve`: bursts of webcam frames saved as class folders (bounded, checked,
atomic, safe with two browsers at once), the split that keeps a burst whole, and the Train action."""

from __future__ import annotations

import asyncio
import io
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from signflow._capture import BURST_PATTERN, MAX_FRAMES_PER_BURST, CaptureStore
from tests.helpers import tiny_params

BURST_FILE = re.compile(r"[0-9a-f]{32}_\d{3}\.jpg")


def frame(seed: int = 0, colour=(120, 90, 60), blank: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    noise = 0 if blank else rng.normal(0, 30, (48, 64, 3))
    pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8) * np.ones((48, 64, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def burst(count: int, seed: int = 0) -> tuple[bytes, str]:
    frames = [frame(seed * 100 + i) for i in range(count)]
    return b"".join(frames), ",".join(str(len(f)) for f in frames)


def capture_app(folder: Path, **store_options):
    from signflow.serve import ServedModel, create_app
    from tests.test_serving import AnsweringModel

    store = CaptureStore(folder, **store_options)
    return create_app(ServedModel(AnsweringModel(), "stand-in", None, ["a"], "stand-in"), capture=store)


@pytest.fixture
def client(tmp_path):
    from fastapi.testclient import TestClient

    return TestClient(capture_app(tmp_path / "captures"))


def post_burst(client, name: str, count: int = 3, seed: int = 0):
    from urllib.parse import quote

    body, sizes = burst(count, seed)
    return client.post(f"/capture/{quote(name, safe='')}", params={"sizes": sizes}, content=body)


def test_a_burst_is_saved_as_jpeg_frames_in_its_class_folder(client, tmp_path):
    body, sizes = burst(3)
    answer = client.post("/capture/thumbs up", params={"sizes": sizes}, content=body)
    assert answer.status_code == 200, answer.text
    saved = answer.json()
    folder = tmp_path / "captures" / "thumbs up"
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"{saved['burst']}_{i:03d}.jpg" for i in range(3)]
    assert re.fullmatch(BURST_PATTERN, files[0][:33])
    assert b"".join((folder / name).read_bytes() for name in files) == body, "each frame as sent, whole"
    post_burst(client, "thumbs up", 2, seed=1)
    post_burst(client, "ok", 4, seed=2)
    summary = client.get("/capture").json()
    assert summary["classes"] == [
        {"class": "ok", "frames": 4, "bursts": 1},
        {"class": "thumbs up", "frames": 5, "bursts": 2},
    ]
    assert summary["bytes"] == sum(p.stat().st_size for p in (tmp_path / "captures").rglob("*.jpg"))
    assert not list((tmp_path / "captures").rglob("*.tmp")), "no scratch file left behind"


@pytest.mark.parametrize(
    "name", ["..", ".", ".hidden", "a\\b", "train", "Test", "__MACOSX", "tab\there", "x" * 65, " ", "._x"]
)
def test_class_names_are_checked_like_class_folders(tmp_path, name):
    from fastapi.testclient import TestClient

    client = TestClient(capture_app(tmp_path / "captures"))
    answer = post_burst(client, name)
    assert 400 <= answer.status_code < 500, answer.text
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "nothing written anywhere"
    if answer.status_code == 422:
        assert "class name" in answer.json()["detail"]


def test_a_path_in_the_class_name_writes_nothing_outside(client, tmp_path):
    for url in ("/capture/..%2Fescape", "/capture/a%2Fb", "/capture/%2E%2E"):
        body, sizes = burst(1)
        answer = client.post(url, params={"sizes": sizes}, content=body)
        assert 400 <= answer.status_code < 500, (url, answer.text)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_class_differing_only_in_case_is_refused(client):
    assert post_burst(client, "Alpha").status_code == 200
    answer = post_burst(client, "alpha")
    assert answer.status_code == 422 and "differs only in case from 'Alpha'" in answer.json()["detail"]


def test_burst_bounds_answer_4xx_with_a_message(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    import signflow._capture as capture

    client = TestClient(capture_app(tmp_path / "captures", max_bytes=60_000))
    body, sizes = burst(MAX_FRAMES_PER_BURST + 1)
    too_many = client.post("/capture/a", params={"sizes": sizes}, content=body)
    assert too_many.status_code == 413 and "at most 60" in too_many.json()["detail"]
    body, sizes = burst(2)
    assert client.post("/capture/a", params={"sizes": "5,5"}, content=body).status_code == 400
    assert client.post("/capture/a", params={"sizes": sizes}, content=b"x" * len(body)).status_code == 422
    huge = client.post("/capture/a", params={"sizes": "1"}, content=b"x" * (capture.MAX_BURST_BYTES + 1))
    assert huge.status_code == 413
    while (answer := post_burst(client, "a", 5)).status_code == 200:
        pass
    assert answer.status_code == 413 and "the capture folder is full" in answer.json()["detail"]
    assert client.get("/capture").json()["bytes"] <= 60_000
    monkeypatch.setattr(capture, "MAX_BURSTS_PER_MINUTE", 1)
    rated = TestClient(capture_app(tmp_path / "other"))
    assert post_burst(rated, "a").status_code == 200
    answer = post_burst(rated, "a")
    assert answer.status_code == 429 and "bursts a minute" in answer.json()["detail"]


def test_a_client_flooding_bursts_gets_429_and_another_client_still_captures(tmp_path):
    from fastapi.testclient import TestClient

    from signflow._capture import ClientRates

    app = capture_app(tmp_path / "captures", client_rates=ClientRates(clock=lambda: 0.0))  # time stands still
    flood, other = TestClient(app, client=("10.0.0.1", 5000)), TestClient(app, client=("10.0.0.2", 5000))
    answers = [post_burst(flood, "a", MAX_FRAMES_PER_BURST, seed=i) for i in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429], "two longest bursts at once pass, the third not"
    detail = answers[2].json()["detail"]
    assert detail.startswith("too many frames from 10.0.0.1: at most 15 a second (120 at once); wait "), detail
    first = answers[0].json()["burst"]
    deleted = flood.delete(f"/capture/a/{first}")
    assert deleted.status_code == 429 and "too many frames" in deleted.json()["detail"], "a delete costs a frame"
    assert len(list((tmp_path / "captures" / "a").glob("*.jpg"))) == 2 * MAX_FRAMES_PER_BURST, "nothing lost"
    assert post_burst(other, "a", MAX_FRAMES_PER_BURST).status_code == 200


def test_client_rates_let_the_page_record_at_its_top_speed_and_stay_bounded_in_memory():
    from signflow._capture import CaptureError, ClientRates

    now = [0.0]
    rates = ClientRates(clock=lambda: now[0])
    for _ in range(30):  # the page's top speed: 60 frames at 15 a second, sent, and again, for 2 minutes
        rates.take("page", MAX_FRAMES_PER_BURST)
        now[0] += MAX_FRAMES_PER_BURST / 15
    refused = 0
    for _ in range(30):  # a script: a longest burst every second
        try:
            rates.take("script", MAX_FRAMES_PER_BURST)
        except CaptureError as error:
            assert error.status == 429
            refused += 1
        now[0] += 1
    assert refused >= 20, refused
    small = ClientRates(max_clients=100, clock=lambda: now[0])
    for client in range(5000):
        small.take(f"10.0.{client // 256}.{client % 256}", 100)
    assert len(small) == 100
    with pytest.raises(CaptureError, match="too many frames from 10.0.19.135"):
        small.take("10.0.19.135", 100)  # the last client seen is still tracked: 20 frames left
    small.take("10.0.0.0", 100)  # the first was forgotten: it starts full, as a new client does


def test_a_blank_burst_is_refused_and_nothing_is_saved(client, tmp_path):
    black = [frame(i, colour=(0, 0, 0), blank=True) for i in range(4)]
    answer = client.post("/capture/a", params={"sizes": ",".join(map(str, map(len, black)))}, content=b"".join(black))
    assert answer.status_code == 422 and "4 of 4 frames are blank" in answer.json()["detail"]
    mixed = [frame(1), frame(2, colour=(200, 200, 200), blank=True)]
    answer = client.post("/capture/a", params={"sizes": ",".join(map(str, map(len, mixed)))}, content=b"".join(mixed))
    assert answer.status_code == 422 and "1 of 2 frames are blank" in answer.json()["detail"]
    assert not list((tmp_path / "captures").rglob("*.jpg"))


def test_a_failed_write_leaves_no_part_of_the_burst(client, tmp_path, monkeypatch):
    import errno

    import signflow._capture as capture

    written, real_write = [], capture.write_atomic

    def full_disk(target, writer):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(target)
        return real_write(target, writer)

    monkeypatch.setattr(capture, "write_atomic", full_disk)
    answer = post_burst(client, "a", 3)
    assert answer.status_code == 507 and "No space left on device" in answer.json()["detail"]
    assert not [p for p in (tmp_path / "captures").rglob("*") if p.is_file()]


def test_two_browsers_capturing_at_once_never_clobber_each_other(tmp_path):
    import httpx

    app = capture_app(tmp_path / "captures")
    bodies = {seed: burst(5, seed) for seed in range(16)}

    async def post_all() -> list[dict]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as client:
            posts = [client.post("/capture/a", params={"sizes": s}, content=b) for b, s in bodies.values()]
            return [response.json() for response in await asyncio.gather(*posts)]

    answers = asyncio.run(post_all())
    ids = [answer["burst"] for answer in answers]
    assert len(set(ids)) == 16
    folder = tmp_path / "captures" / "a"
    assert len(list(folder.iterdir())) == 80
    for (body, _), burst_id in zip(bodies.values(), ids, strict=True):
        assert b"".join((folder / f"{burst_id}_{i:03d}.jpg").read_bytes() for i in range(5)) == body


def test_delete_a_burst(client, tmp_path):
    first = post_burst(client, "a", 3).json()["burst"]
    post_burst(client, "a", 2, seed=1)
    answer = client.delete(f"/capture/a/{first}")
    assert answer.status_code == 200 and answer.json()["removed"] == 3
    assert answer.json()["classes"] == [{"class": "a", "frames": 2, "bursts": 1}]
    assert not list((tmp_path / "captures" / "a").glob(f"{first}_*"))
    assert client.delete(f"/capture/a/{first}").status_code == 404
    assert client.delete("/capture/a/..").status_code in (404, 405, 422)
    assert client.delete("/capture/a/not-a-burst").status_code == 422


def captured_dataset(root: Path, bursts: dict[str, int], frames: int = 6) -> Path:
    """Class folders of captured bursts: `bursts[class]` bursts of `frames` distinct frames each."""
    store = CaptureStore(root)
    for index, (name, count) in enumerate(bursts.items()):
        colour = [(200, 40, 40), (40, 200, 40), (40, 40, 200)][index]
        for b in range(count):
            store.save_burst(name, [frame(1000 * index + 50 * b + i, colour) for i in range(frames)])
    return root


def split_config(**changes):
    from signflow.config import SplitConfig

    section = {**tiny_params()["split"], "strategy": "group", "group_pattern": BURST_PATTERN, **changes}
    return SplitConfig(**section)


def test_the_group_split_keeps_each_burst_in_one_split(tmp_path):
    import pandas as pd

    from signflow.split import split_dataset

    raw = captured_dataset(tmp_path / "raw", {"a": 8, "b": 8, "c": 8})
    split_dataset(raw, tmp_path / "split", split_config(near_duplicates="off"))
    rows = pd.concat(
        pd.read_csv(tmp_path / "split" / f"{name}.csv").assign(split=name) for name in ("train", "valid", "test")
    )
    rows["burst"] = rows["path"].str.extract(BURST_PATTERN, expand=False)
    assert rows["burst"].notna().all() and rows.groupby("burst")["split"].nunique().max() == 1
    assert set(rows["split"]) == {"train", "valid", "test"}


def test_a_class_with_one_burst_gets_a_split_message_saying_why(tmp_path):
    from signflow.split import SplitError, split_dataset

    raw = captured_dataset(tmp_path / "raw", {"a": 4, "b": 1, "c": 4})
    with pytest.raises(SplitError) as error:
        split_dataset(raw, tmp_path / "split", split_config(near_duplicates="off"))
    message = str(error.value)
    assert "class 'b' has 6 usable image(s) in 1 group(s)" in message
    assert "frames of one group are near-copies" in message and "honest test" in message


# The Train action: the real pipeline is the slow browser test's; here a stand-in command writes
# the lines `dvc repro` and `signflow train` write, and waits for the test to let it finish.
FAKE_RUN = """
import pathlib, sys, time
print("Running stage 'split':", flush=True)
print("Running stage 'train':", flush=True)
print("2026-12-07 07:00:00,000 INFO signflow.train: epoch 1: train loss 1.0 acc 0.5 | valid loss 1 acc 0.5", flush=True)
print("2026-12-07 07:00:01,000 INFO signflow.train: epoch 2: train loss 0.9 acc 0.6 | valid loss 1 acc 0.6", flush=True)
while not pathlib.Path(sys.argv[1]).exists():
    time.sleep(0.05)
print("signflow train: error: the disk is full (models/model.pt)", flush=True)
print("ERROR: failed to reproduce 'train': failed to run: signflow train, exited with 1", flush=True)
sys.exit(1)
"""


def training_project(tmp_path: Path, **split) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    params = tiny_params(epochs=7)
    params["split"].update({"strategy": "group", "group_pattern": BURST_PATTERN, **split})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project


def wait_for(client, condition, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while not condition(status := client.get("/train").json()):
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return status


def training_client(tmp_path, project: Path, command: list[str]):
    from fastapi.testclient import TestClient

    from signflow._page_training import PageTraining
    from signflow.serve import ServedModel, create_app
    from tests.test_serving import AnsweringModel

    store = CaptureStore(tmp_path / "captures")
    training = PageTraining(project, store.root, command)
    served = ServedModel(AnsweringModel(), "stand-in", None, ["a"], "stand-in")
    return TestClient(create_app(served, capture=store, training=training))


def test_train_shows_step_and_epoch_refuses_a_second_run_and_says_why_it_failed(tmp_path):
    from signflow.source import read_source

    project, release = training_project(tmp_path), tmp_path / "release"
    with training_client(tmp_path, project, [sys.executable, "-c", FAKE_RUN, str(release)]) as client:
        assert client.get("/train").json()["state"] == "idle"
        assert client.post("/train").status_code == 200
        status = wait_for(client, lambda s: s["epoch"] == 2)
        assert status["state"] == "running" and status["step"] == "train" and status["epochs"] == 7
        second = client.post("/train")
        assert second.status_code == 409 and "a training run is going already (train)" in second.json()["detail"]
        assert read_source(project).url == str(tmp_path / "captures"), "data.dvc points at the capture folder"
        release.touch()
        status = wait_for(client, lambda s: s["state"] != "running")
        assert status["state"] == "failed" and status["error"] == "the disk is full (models/model.pt)"
        assert client.post("/train").status_code == 200, "a new run once the last one ended"


def test_train_is_refused_while_another_signflow_run_holds_the_project(tmp_path):
    from signflow.fileio import held_lock
    from signflow.layout import Workspace

    project = training_project(tmp_path)
    with training_client(tmp_path, project, [sys.executable, "-c", "pass"]) as client:
        with held_lock(Workspace(project).run_lock, 0, ""):
            answer = client.post("/train")
        assert answer.status_code == 409 and "another signflow run holds" in answer.json()["detail"]
        assert client.get("/train").json()["state"] == "idle"


def test_train_is_refused_when_the_split_would_mix_bursts(tmp_path):
    project = training_project(tmp_path, strategy="random", group_pattern=None)
    with training_client(tmp_path, project, [sys.executable, "-c", "pass"]) as client:
        answer = client.post("/train")
    assert answer.status_code == 422
    assert "split.strategy: group and split.group_pattern: '([0-9a-f]{32})_'" in answer.json()["detail"]


def test_capture_client_fps_sets_each_clients_rate_and_a_rate_below_one_is_a_usage_error(tmp_path, capsys):
    """`signflow serve --capture-client-fps N`: N frames a second per client address, 8 seconds' worth at
    once (at least two longest bursts); 0 is argparse's one-line usage error."""
    from fastapi.testclient import TestClient

    from signflow._capture import ClientRates
    from signflow.cli import build_parser, main
    from signflow.serve import ServedModel, create_app
    from tests.test_serving import AnsweringModel

    args = build_parser().parse_args(["serve", "--capture-dir", str(tmp_path), "--capture-client-fps", "40"])
    store = CaptureStore(tmp_path / "captures", 2**30, ClientRates.sustaining(args.capture_client_fps))
    assert (store.client_rates.rate, store.client_rates.burst) == (40, 320)
    store.client_rates.clock = lambda: 0.0  # time stands still: only the bucket counts
    app = create_app(ServedModel(AnsweringModel(), "stand-in", None, ["a"], "stand-in"), capture=store)
    client = TestClient(app)
    answers = [post_burst(client, "a", MAX_FRAMES_PER_BURST, seed=i).status_code for i in range(6)]
    assert answers == [200] * 5 + [429], "320 frames at once: five 60-frame bursts, not six"
    assert build_parser().parse_args(["serve"]).capture_client_fps == 15
    default = ClientRates.sustaining(build_parser().parse_args(["serve"]).capture_client_fps)
    assert (default.rate, default.burst) == (ClientRates().rate, ClientRates().burst) == (15, 120)
    with pytest.raises(SystemExit):
        main(["serve", "--capture-client-fps", "0"])
    assert "--capture-client-fps: must be at least 1, got 0" in capsys.readouterr().err
