"""Frame-to-answer latency of the webcam page: server inference vs in-browser (ONNX Runtime Web).

    npm ci --prefix web    # ONNX Runtime Web into signflow/_web/
    python bench/browser_latency.py --onnx models/model.onnx --seconds 20 --out bench/browser_latency.json

Serves `--onnx` (with its int8 model when model.int8.onnx is beside it) as `signflow serve` does, on
127.0.0.1, and opens the page in headless Chromium (tests/browser.py) with a fake 320x240 camera.
For each mode it records, for every frame answered, the page's frame-to-answer time (frame grabbed
-> top 3 shown: for the server that includes the JPEG encoding, the POST, decoding and the model;
in the browser the resize/crop in JavaScript and ONNX Runtime Web's WebAssembly, one thread).
Modes: server; browser with the int8 model (`?precision=int8`, when there is one); browser with the
float model (the page's default).
Prints a markdown table (median, p90, frames per second). Timings on a shared machine are noisy;
nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser import Chromium, write_y4m  # noqa: E402
from tests.test_browser_inference import serving  # noqa: E402


async def latencies(url: str, video: Path, seconds: float) -> dict:
    browser = Chromium(video)
    try:
        await browser.connect()
        await browser.goto(url)
        await browser.wait_for("+(document.body.dataset.answered || 0) >= 3", timeout=120)
        mode = await browser.eval("document.getElementById('mode').textContent")
        samples, last = [], int(await browser.eval("document.body.dataset.answered"))
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            answered, latency = await browser.eval("[+document.body.dataset.answered, +document.body.dataset.latency]")
            if answered > last:
                samples.append(latency)
                last = answered
            await asyncio.sleep(0.02)
        return {"mode": mode, "samples": samples, "frames_per_second": len(samples) / seconds}
    finally:
        await browser.close()


def summary(name: str, result: dict) -> dict:
    samples = sorted(result["samples"])
    return {
        "setup": name,
        "frames": len(samples),
        "median_ms": round(statistics.median(samples), 1),
        "p90_ms": round(samples[int(0.9 * (len(samples) - 1))], 1),
        "frames_per_second": round(result["frames_per_second"], 2),
        "page_says": result["mode"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(20)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="signflow-latency-") as tmp:
        video = write_y4m(Path(tmp) / "camera.y4m", frames)
        int8 = args.onnx.with_name(f"{args.onnx.stem}.int8{args.onnx.suffix}")
        setups = [("server (float32, ONNX Runtime on the server's CPU)", args.onnx, "")]
        if int8.is_file():
            setups.append(("in the browser (int8, ONNX Runtime Web)", args.onnx, "?inference=browser&precision=int8"))
        setups.append(("in the browser (float32, ONNX Runtime Web)", args.onnx, "?inference=browser"))
        for name, model, query in setups:
            with serving(model) as (url, _app):
                rows.append(summary(name, asyncio.run(latencies(url + query, video, args.seconds))))
    print("| inference | frames | median frame-to-answer | p90 | frames/s |\n|---|---|---|---|---|")
    for row in rows:
        figures = f"{row['median_ms']} ms | {row['p90_ms']} ms | {row['frames_per_second']}"
        print(f"| {row['setup']} | {row['frames']} | {figures} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
