"""int8 vs float: size, CPU latency per image and test accuracy on the reference dataset.

    python bench/int8.py --archive ../shared/datasets/sign-language-digits.zip \\
        --weights ../shared/weights/mobilenetv2_100.tv_in1k.safetensors --seed 1 --out bench/int8.json

Makes a fresh project (bench/pipeline.py's make_project: this repo's dvc.yaml and params.yaml, the
weights file, the seed), runs `dvc repro export` (extract, split, train, evaluate, export) and prints
the export step's figures (models/export.json) as a markdown table. The int8 model is measured
whether or not the gate keeps it. Latency: median of 30 single-image ONNX Runtime runs on the CPU
(default threads), on a shared machine: noisy, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from pipeline import make_project  # bench/pipeline.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="signflow-int8-") as tmp:
        project = make_project(Path(tmp), args.archive, args.weights, args.seed, {})
        started = time.perf_counter()
        subprocess.run(["dvc", "repro", "export"], cwd=project, check=True, stdout=subprocess.DEVNULL)
        figures = json.loads((project / "models" / "export.json").read_text())
        figures["repro_seconds"] = round(time.perf_counter() - started, 1)
        figures["cpu_count"] = os.cpu_count()
    print("| model | size | CPU latency / image | test accuracy |\n|---|---|---|---|")
    for label in ("float", "int8"):
        model = figures.get(label)
        if model:
            print(
                f"| {label} | {model['bytes'] / 2**20:.2f} MiB | {model['latency_ms']:.2f} ms | "
                f"{100 * model['test_accuracy']:.2f} % |"
            )
    print(figures.get("reason", "export.int8 is off"))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
