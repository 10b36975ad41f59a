"""Prediction speed of the two backends on this machine: PyTorch and ONNX Runtime, same model.

    python bench/predict_latency.py --model models/model.pt --images data/raw --out bench/predict_latency.json

Reports, per backend: single-image latency (p50/p95 over `--single` calls on one preprocessed
image, after warm-up) and batch throughput (images/s over `--batch-size` batches, median of
`--repeats`), plus the machine's load, threads and versions. Preprocessing (decode, resize) is the
same code for both and is left out; only the forward pass and softmax are timed. The ONNX file is
`--onnx`, or exported next to a temporary copy when not given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _timing import percentile  # bench/_timing.py

from signflow._images import is_image_name
from signflow._model_file import load_bundle
from signflow._preprocessing import load_images
from signflow.config import load_params
from signflow.export import export_onnx
from signflow.predict import OnnxPredictor, TorchPredictor


def time_backend(predictor, images: torch.Tensor, single: int, batch_size: int, repeats: int) -> dict:
    one = images[:1]
    for _ in range(10):
        predictor.probabilities(one)
    latencies = []
    for index in range(single):
        start = time.perf_counter()
        predictor.probabilities(images[index % len(images) : index % len(images) + 1])
        latencies.append((time.perf_counter() - start) * 1000)
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    predictor.probabilities(batches[0])
    throughputs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            predictor.probabilities(batch)
        throughputs.append(len(images) / (time.perf_counter() - start))
    return {
        "single_image_ms_p50": round(percentile(latencies, 50), 2),
        "single_image_ms_p95": round(percentile(latencies, 95), 2),
        "batch_images_per_second": round(statistics.median(throughputs), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="signflow .pt model file")
    parser.add_argument("--onnx", type=Path, help="its ONNX export (default: export one to a temporary folder)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params whose export.* export it")
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--max-images", type=int, default=256, help="images used for the batch figure")
    parser.add_argument("--single", type=int, default=200, help="single-image calls timed per backend")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="passes over the images for the batch figure")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args()

    bundle = load_bundle(args.model)
    paths = sorted(p for p in args.images.rglob("*") if p.is_file() and is_image_name(p))[: args.max_images]
    if not paths:
        parser.error(f"{args.images}: no images found")
    images = load_images(paths, bundle.preprocessing)
    with tempfile.TemporaryDirectory() as tmp:
        export = load_params(args.params).export
        onnx_path = args.onnx or export_onnx(export, args.model, Path(tmp) / "model.onnx").onnx_path
        results = {
            "torch": time_backend(TorchPredictor(args.model), images, args.single, args.batch_size, args.repeats),
            "onnx": time_backend(OnnxPredictor(Path(onnx_path)), images, args.single, args.batch_size, args.repeats),
        }
    import onnxruntime

    report = {
        "model": bundle.model_name,
        "image_size": bundle.preprocessing.image_size,
        "images": len(paths),
        "batch_size": args.batch_size,
        "backends": results,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_1min": round(os.getloadavg()[0], 2),
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
    }
    print("| backend | single image p50 ms | p95 ms | batch images/s |")
    print("|---|---|---|---|")
    for name, figures in results.items():
        print(
            f"| {name} | {figures['single_image_ms_p50']} | {figures['single_image_ms_p95']} | "
            f"{figures['batch_images_per_second']} |"
        )
    print(f"model {bundle.model_name} at {bundle.preprocessing.image_size} px; load {report['load_1min']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
