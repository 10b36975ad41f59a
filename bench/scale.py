"""Scale benchmark: one whole `dvc repro` on N images, with each step's wall time, images/s, peak
RSS and the cache's disk use.

    python bench/scale.py --images 2062 --archive ../shared/datasets/sign-language-digits.zip \\
        --weights ../shared/weights/mobilenetv2_100.tv_in1k.safetensors --out bench/scale-2k.json
    python bench/scale.py --images 20000 ... --dataset-dir /tmp/signflow-20k --out bench/scale-20k.json
    python bench/scale.py --images 87000 ... --dataset-dir /tmp/signflow-87k --out bench/scale-87k.json

N equal to the archive's own image count (2062 for Sign Language Digits) runs the real dataset as
it is. Any other N builds a dataset of N images from it, like the 87,000-image ASL alphabet (29
classes x 3000 at 200x200): each photo gives about N/2062 jittered copies (random crop of 70-100% of
its area, rotation up to 8 degrees, brightness and contrast +-10%) at 200x200 px, as JPEG, each class
keeping its share. The dataset is written to --dataset-dir (kept and reused when it already holds N
images; default: a temporary folder removed afterwards).

The test accuracy of a built dataset MEANS NOTHING: copies of one photo land in the train, valid
and test splits alike, so the model is tested on near-duplicates of its training images. This measures
time and memory only.

Each run is a fresh project (this repository's dvc.yaml, params.yaml and the signflow code its
stages depend on, a data.dvc pointing at the dataset, train.weights_file set, `--set` overrides
applied) in which one `dvc repro` runs with its cache folder (.signflow-cache) inside the project;
the extract step's time includes DVC's import of the dataset folder, which comes first. A step's
wall time runs from DVC's "Running stage" line for it to the next one (it includes its Python start-
up and DVC's hashing of its outputs). Peak RSS per step is the largest high-water mark (VmHWM, read
from /proc every 0.2 s) of any process running that step's `signflow` command, its DataLoader
workers included; "dvc" is the `dvc repro` process itself (it hashes data/raw). The largest RSS of
any process, read exactly by the kernel (getrusage), is printed as well. Linux only (/proc). Nothing
here asserts on time: timings on a shared machine are noisy; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import yaml
from _timing import STAGES, timed_repro  # bench/_timing.py
from PIL import Image, ImageEnhance, ImageOps
from pipeline import make_project  # bench/pipeline.py: the same project as the reference benchmark

ROOT = Path(__file__).resolve().parents[1]
SIZE = 200
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def subfolders(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir()]


def source_photos(archive: Path, scratch: Path) -> dict[str, list[Path]]:
    """The archive's class folders (its one folder whose sub-folders hold images): class -> photos."""
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(scratch)
    for folder in sorted(p for p in scratch.rglob("*") if p.is_dir()):
        classes = {
            c.name: sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for c in subfolders(folder)
        }
        classes = {name: files for name, files in classes.items() if files}
        if len(classes) >= 2:
            return dict(sorted(classes.items()))
    raise SystemExit(f"{archive}: no folder of class folders found")


def copies_per_photo(photos: dict[str, list[Path]], images: int) -> list[tuple[int, str, Path, int]]:
    """(photo number, class, photo, copies): the N copies go round-robin over all the photos."""
    flat = [(name, photo) for name, files in photos.items() for photo in files]
    base, extra = divmod(images, len(flat))
    return [(index, name, photo, base + (index < extra)) for index, (name, photo) in enumerate(flat)]


def jittered_copies(job: tuple[int, str, Path, int, Path, int]) -> int:
    """Write `copies` jittered 200 px copies of one photo; returns how many were written."""
    number, name, photo, copies, dest, seed = job
    rng = np.random.default_rng([seed, number])
    with Image.open(photo) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    image.thumbnail((2 * SIZE, 2 * SIZE))
    for copy in range(copies):
        area, aspect = rng.uniform(0.7, 1.0), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        width = min(image.width, round(image.width * np.sqrt(area * aspect)))
        height = min(image.height, round(image.height * np.sqrt(area / aspect)))
        left, top = rng.integers(0, image.width - width + 1), rng.integers(0, image.height - height + 1)
        out = image.crop((left, top, left + width, top + height))
        out = out.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR)
        out = out.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.9, 1.1))
        out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.9, 1.1))
        out.save(dest / name / f"{photo.stem}_{copy:03d}.jpg", quality=90)
    return copies


def build_dataset(archive: Path, images: int, dest: Path, seed: int) -> Path:
    """`dest/<class>/<photo>_<k>.jpg`: `images` jittered copies of the archive's photos (reused if
    `dest` already holds that many)."""
    if dest.is_dir() and sum(1 for _ in dest.rglob("*.jpg")) == images:
        print(f"dataset: reusing {images} images in {dest}", flush=True)
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="signflow-scale-src-") as scratch:
        photos = source_photos(archive, Path(scratch))
        for name in photos:
            (dest / name).mkdir(parents=True, exist_ok=True)
        jobs = [(*plan, dest, seed) for plan in copies_per_photo(photos, images) if plan[-1] > 0]
        started = time.perf_counter()
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            written = sum(pool.map(jittered_copies, jobs, chunksize=16))
    print(f"dataset: {written} images of {SIZE} px in {dest} ({time.perf_counter() - started:.0f} s)", flush=True)
    return dest


def _peak_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssMonitor(threading.Thread):
    """Polls the process tree under `pid`: the largest VmHWM of each step's processes, and of dvc's."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval_s = psutil.Process(pid), interval_s
        self.peaks_kb: dict[str, int] = {}
        self.done = threading.Event()

    def _label(self, process: psutil.Process) -> str | None:
        command = " ".join(process.cmdline())
        match = re.search(r"signflow (\w+)", command)
        return match.group(1) if match else None

    def poll(self) -> None:
        self.peaks_kb["dvc"] = max(self.peaks_kb.get("dvc", 0), _peak_kb(self.root.pid))
        for process in self.root.children(recursive=True):
            try:
                label = self._label(process)
            except psutil.Error:
                continue
            if label:
                self.peaks_kb[label] = max(self.peaks_kb.get(label, 0), _peak_kb(process.pid))

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.poll()
            except psutil.Error:
                pass
            self.done.wait(self.interval_s)


def disk_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_pipeline(project: Path) -> dict:
    """One `dvc repro`: stage times from its output, RSS from the monitor, cache size at each stage start."""
    cache = project / ".signflow-cache"
    monitors: list[RssMonitor] = []
    cache_at_start: list[int] = []

    def start_monitor(process: subprocess.Popen) -> None:
        monitors.append(RssMonitor(process.pid))
        monitors[0].start()

    def on_stage(name: str, seconds: float) -> None:
        cache_at_start.append(disk_bytes(cache))
        print(f"  {seconds:7.0f} s  {name}", flush=True)

    try:
        timing = timed_repro(project, start_monitor, on_stage)
    finally:
        if monitors:
            monitors[0].done.set()
            monitors[0].join()
    monitor, total = monitors[0], timing.total
    cache_after = cache_at_start[1:] + [disk_bytes(cache)]
    steps = {
        name: {"seconds": seconds, "peak_rss_mb": round(monitor.peaks_kb.get(name, 0) / 1024)}
        for name, seconds in timing.step_seconds().items()
    }
    for name, size in zip(steps, cache_after, strict=True):
        steps[name]["cache_mb_after"] = round(size / 1e6)
    return {
        "steps": steps,
        "total_seconds": round(total, 1),
        "dvc_peak_rss_mb": round(monitor.peaks_kb.get("dvc", 0) / 1024),
        "largest_rss_mb_exact": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    }


def step_images(project: Path) -> dict[str, int]:
    """Images each step worked through: extract and split all, train its split x epochs, evaluate the test split."""
    report = json.loads((project / "data" / "split" / "report.json").read_text())
    counts = report["counts"]
    source = json.loads((project / "data" / "raw" / "SOURCE.json").read_text())
    downloaded = sum(source["counts"].values()) if isinstance(source.get("counts"), dict) else 0
    return {
        "extract": downloaded,
        "split": sum(counts.values()) + len(report["excluded"]),
        "train": counts["train"],
        "evaluate": counts["test"],
    }


def train_summary(project: Path) -> dict:
    import torch

    summary = torch.load(project / "models" / "model.pt", map_location="cpu", weights_only=True)["summary"]
    return {
        "epochs": summary["epochs_run"],
        "epoch_seconds": round(summary["train_seconds"], 1),
        "train_images_per_second": round(summary["train_images_per_second"], 1),
    }


def markdown_table(result: dict) -> str:
    images, train = result["images_per_step"], result["train"]
    rows = ["| step | wall s | images | images/s | peak RSS MB | cache after step |", "|---|---|---|---|---|---|"]
    for name in STAGES:
        step = result["steps"][name]
        count = images.get(name)
        if name == "train":
            rate = f"{train['train_images_per_second']} (epochs)"
            count = f"{count} x {train['epochs']} epochs"
        else:
            rate = f"{count / step['seconds']:.0f}" if count else "-"
        cache = f"{step['cache_mb_after'] / 1000:.2f} GB"
        rows.append(f"| {name} | {step['seconds']} | {count or '-'} | {rate} | {step['peak_rss_mb']} | {cache} |")
    rows.append(
        f"| **total** | **{result['total_seconds']}** | | | {result['largest_rss_mb_exact']} (any process, exact) | |"
    )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, required=True, help="N: the archive's own count runs it as it is")
    parser.add_argument("--archive", type=Path, required=True, help="the Sign Language Digits zip")
    parser.add_argument("--weights", type=Path, help="local ImageNet weights for train.model (else no weights)")
    parser.add_argument("--dataset-dir", type=Path, help="where the built dataset is kept and reused")
    parser.add_argument("--workdir", type=Path, help="where the project is made (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=1, help="split and train seed, and the jitter's")
    parser.add_argument("--out", type=Path, default=Path("bench/scale.json"), help="JSON results file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("SIGNFLOW_CACHE_DIR", None)  # the cache folder is measured inside the project
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    with tempfile.TemporaryDirectory(prefix="signflow-scale-") as scratch:
        workdir = args.workdir or Path(scratch)
        with zipfile.ZipFile(args.archive) as bundle:
            real = sum(1 for n in bundle.namelist() if "/Dataset/" in n and Path(n).suffix.lower() in IMAGE_SUFFIXES)
        if args.images == real:
            source, built = args.archive, False
        else:
            source = build_dataset(args.archive, args.images, args.dataset_dir or workdir / "dataset", args.seed)
            built = True
        project = make_project(workdir, source, args.weights, args.seed, overrides, name="project")
        load_before = os.getloadavg()
        result = run_pipeline(project)
        result.update(
            images=args.images,
            built_dataset=built,
            images_per_step=step_images(project),
            train=train_summary(project),
            test_accuracy=json.loads((project / "reports" / "metrics.json").read_text())["accuracy"],
            project_disk_mb=round(disk_bytes(project) / 1e6),
            load_before=[round(x, 2) for x in load_before],
            load_after=[round(x, 2) for x in os.getloadavg()],
            cpu_count=os.cpu_count(),
            overrides=overrides,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(markdown_table(result))
    accuracy = f"test accuracy {result['test_accuracy']:.4f}"
    if built:
        accuracy += " (MEANINGLESS: copies of one photo are in train and test alike)"
    print(f"\n{args.images} images; {accuracy}; dvc's own peak RSS {result['dvc_peak_rss_mb']} MB; ", end="")
    print(f"project on disk {result['project_disk_mb']} MB; load {result['load_before']} -> {result['load_after']}")
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
