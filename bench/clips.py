"""Does the default split tell the truth on a merged video-frame dataset? Synthetic clips, three ways.

    python bench/clips.py --weights ../shared/weights/mobilenetv2_100.tv_in1k.safetensors --out bench/clips.json

Builds a dataset the way a webcam or phone user does: short clips of a hand-sized shape (class:
triangle, square or pentagon) moving and turning a little each frame over a scene of its own, every
frame a JPEG, all frames merged into one folder per class (`<class>/clip<k>_f<n>.jpg`). Then, for
each seed, the pipeline's own split, train and evaluate steps (this repo's params.yaml, with the
weights file and the seed set) run three times:

- `report`: a random split without near-duplicate grouping (what signflow did before), with the
  accuracy on all test images and on those without a near-duplicate in train;
- `defaults`: params.yaml as it is (auto: random split, near-duplicate clusters kept in one split);
- `by clip`: strategy group with group_pattern `/(clip\\d+)_`, every clip in one split: the truth.

A test frame whose neighbouring frames were trained on measures memory, not recognition: the first
figure is inflated, and the defaults should come close to the clip-grouped one. Prints a table and
writes JSON. Accuracy is deterministic for a machine and thread count; nothing is timed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"triangle": 3, "square": 4, "pentagon": 5}
CONFIGS = {
    "report": {"near_duplicates": "report"},
    "defaults": {},
    "by clip": {"strategy": "group", "group_pattern": r"/(clip\d+)_"},
}


def _scene(rng: np.random.Generator, size: int) -> np.ndarray:
    start, end = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    ramp = np.linspace(0, 1, size)
    angle = rng.uniform(0, 2 * np.pi)
    mix = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    mix = (mix - mix.min()) / np.ptp(mix)
    base = start * (1 - mix[..., None]) + end * mix[..., None]
    blobs = Image.fromarray(rng.uniform(0, 255, (size // 5, size // 5)).astype(np.uint8)).resize((size, size))
    blobs = np.asarray(blobs.filter(ImageFilter.GaussianBlur(2)), dtype=np.float64) - 128
    return np.clip(base + blobs[..., None] * rng.uniform(0.5, 1.0), 0, 255)


def _frame(scene: np.ndarray, sides: int, x: float, y: float, radius: float, angle: float, colour) -> Image.Image:
    image = Image.fromarray(scene.astype(np.uint8))
    corners = np.deg2rad(angle) + 2 * np.pi * np.arange(sides) / sides
    ImageDraw.Draw(image).polygon(
        [(x + radius * np.cos(c), y + radius * np.sin(c)) for c in corners], fill=tuple(int(v) for v in colour)
    )
    return image


def _jpeg(pixels: np.ndarray, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def build_clips(root: Path, clips: int, frames: int, seed: int, size: int = 100) -> Path:
    """`root/<class>/clip<k>_f<n>.jpg`: `clips` clips of `frames` frames per class."""
    rng = np.random.default_rng(seed)
    for index, (name, sides) in enumerate(CLASSES.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for clip in range(clips):
            scene, colour = _scene(rng, size), rng.uniform(0, 255, 3)
            x, y, radius = rng.uniform(35, 65), rng.uniform(35, 65), rng.uniform(11, 16)
            heading, speed, angle = rng.uniform(0, 2 * np.pi), rng.uniform(0.8, 1.6), rng.uniform(0, 360)
            for frame in range(frames):
                step = frame - frames / 2
                image = _frame(
                    scene,
                    sides,
                    x + speed * np.cos(heading) * step,
                    y + speed * np.sin(heading) * step,
                    radius,
                    angle + 2.5 * frame,
                    colour,
                )
                pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, 6, (size, size, 3))
                (root / name / f"clip{index}{clip:02d}_f{frame:02d}.jpg").write_bytes(_jpeg(pixels))
    return root


def run_config(raw: Path, work: Path, params: dict, changes: dict) -> dict:
    from signflow.config import parse_params
    from signflow.evaluate import evaluate
    from signflow.split import split_dataset
    from signflow.train import train_model

    raw_params = json.loads(json.dumps(params))
    raw_params["split"].update(changes)
    config = parse_params(raw_params)
    split = split_dataset(raw, work / "split", config.split)
    train_model(config.train, raw, work / "split", work / "model.pt", work / "train_log.csv")
    result = evaluate(config.evaluate, work / "model.pt", raw, work / "split", work / "reports", work / "train_log.csv")
    return {
        "split": split.description,
        "test_images": result.test_images,
        "test_near_duplicates_in_train": result.test_near_duplicates_in_train,
        "accuracy": round(result.accuracy, 4),
        "accuracy_without_near_duplicates": None
        if result.accuracy_without_near_duplicates is None
        else round(result.accuracy_without_near_duplicates, 4),
    }


def markdown_table(runs: dict[int, dict[str, dict]]) -> str:
    rows = [
        "| split | seed | test images | with a near-duplicate in train | reported accuracy | without those |",
        "|---|---|---|---|---|---|",
    ]
    for name in CONFIGS:
        for seed, configs in runs.items():
            run = configs[name]
            without = run["accuracy_without_near_duplicates"]
            rows.append(
                f"| {name} | {seed} | {run['test_images']} | {run['test_near_duplicates_in_train']} | "
                f"{run['accuracy']:.4f} | {'' if without is None else f'{without:.4f}'} |"
            )
        mean = statistics.mean(configs[name]["accuracy"] for configs in runs.values())
        rows.append(f"| **{name}** | mean | | | **{mean:.4f}** | |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="local ImageNet weights for train.model (else random weights)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="split and train seeds")
    parser.add_argument("--clips", type=int, default=16, help="clips per class")
    parser.add_argument("--frames", type=int, default=15, help="frames per clip")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic clips")
    parser.add_argument("--out", type=Path, default=Path("bench/clips.json"), help="JSON results file")
    parser.add_argument("--keep", type=Path, help="also write the clip dataset here, to look at")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(weights_file=str(args.weights.resolve()) if args.weights else None)
    params["train"]["pretrained"] = args.weights is not None
    runs: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="signflow-clips-") as scratch:
        raw = build_clips(args.keep or Path(scratch) / "raw", args.clips, args.frames, args.data_seed)
        for seed in args.seeds:
            params["split"]["seed"] = params["train"]["seed"] = seed
            runs[seed] = {}
            for name, changes in CONFIGS.items():
                runs[seed][name] = run_config(raw, Path(scratch) / f"{seed}-{name}", params, changes)
                print(f"seed {seed}, {name}: {json.dumps(runs[seed][name])}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"clips_per_class": args.clips, "frames_per_clip": args.frames, "classes": list(CLASSES), "runs": runs}
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(markdown_table(runs))
    print(f"\nresults in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
