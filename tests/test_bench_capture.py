"""bench/capture.py's helpers: the bursts it posts are what the page posts and the server accepts,
and its arguments and stage arithmetic. (The benchmark itself times; nothing here does.)"""

from __future__ import annotations

import importlib.util
import io
import sys

import pytest
from PIL import Image

from signflow._capture import MAX_BURSTS_PER_MINUTE, check_frames, split_frames
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def bench():
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("bench_capture", ROOT / "bench" / "capture.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def test_the_bench_posts_page_sized_distinct_frames_the_server_accepts(bench):
    frames = bench.page_frames("cross", 4, seed=3)
    assert len(set(frames)) == 4, "every frame of a burst differs"
    for frame in frames:
        with Image.open(io.BytesIO(frame)) as image:
            assert (image.format, image.size) == ("JPEG", (320, 240)), "the page's frame: 320 px on the long side"
    body, sizes = bench.burst_body(frames)
    assert split_frames(body, sizes) == frames, "the server's own parser gets the frames back whole"
    check_frames(frames)  # not blank, readable: the server would save them
    assert bench.page_frames("cross", 4, seed=3) == frames, "same seed, same burst"


def test_the_bench_arguments_and_stage_seconds(bench):
    parser = bench.build_parser()
    frames = parser.parse_args(["frames"])
    assert frames.repeats * frames.bursts + 1 <= MAX_BURSTS_PER_MINUTE, "defaults fit the server's rate limit"
    assert frames.frames_per_burst == 20 and frames.follow_every == 5.0
    with pytest.raises(SystemExit):
        parser.parse_args(["train-live"])  # --weights is required: no hub download
    live = parser.parse_args(["train-live", "--weights", "w.safetensors", "--set", "train.epochs=4", "--out", "x"])
    assert live.bursts_per_class * live.frames_per_burst * live.classes == 900
    assert dict(map(bench.parse_setting, live.set)) == {"train.epochs": 4}
    with pytest.raises(Exception, match="key=value"):
        bench.parse_setting("train.epochs")
    seen = {"split": 2.5, "extract": 1.0, "train": 4.0}  # as read back from a JSON file: keys sorted
    stages = bench.stage_seconds(seen, 10.0)
    assert [(row["stage"], row["seconds"]) for row in stages] == [
        ("dvc start-up", 1.0),
        ("extract", 1.5),
        ("split", 1.5),
        ("train", 6.0),
    ]
    assert stages[-1]["began_s"] == 4.0
