"""Latency and throughput of the served champion on 127.0.0.1, next to `signflow predict`'s.

    python bench/serve_latency.py --model champion --images data/raw --out bench/serve_latency.json

The registered version (`--model`: an alias or version of `register.model_name` in `--params`, or
a local MLflow model folder) is downloaded once, then timed four ways on the same image files:

- `signflow predict` in this process (file -> decode, resize -> forward -> softmax), with the ONNX
  Runtime backend (what `--backend auto` picks for a registered version) and with PyTorch;
- `mlflow models serve -m <folder> --env-manager local`: POST /invocations with base64 JSON, one
  image per request and batches of `--batch-size`;
- `signflow serve`: POST /predict with the image file as the body (what the webcam page sends).

Requests go one at a time over one kept-alive connection (the page also keeps one in flight), after
`--warmup` untimed ones. Reported per way: p50 and p95 milliseconds per request, requests/s and
images/s. The servers' start-up is not timed. Nothing is asserted; the machine's load is recorded.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _timing import percentile  # bench/_timing.py

ROOT = Path(__file__).resolve().parents[1]


def timed(call: Callable[[int], None], requests: int, images_per_request: int, warmup: int) -> dict:
    for index in range(warmup):
        call(index)
    latencies = []
    started = time.perf_counter()
    for index in range(requests):
        tick = time.perf_counter()
        call(index)
        latencies.append((time.perf_counter() - tick) * 1000)
    seconds = time.perf_counter() - started
    return {
        "images_per_request": images_per_request,
        "requests": requests,
        "p50_ms": round(percentile(latencies, 50), 1),
        "p95_ms": round(percentile(latencies, 95), 1),
        "mean_ms": round(statistics.mean(latencies), 1),
        "requests_per_second": round(requests / seconds, 1),
        "images_per_second": round(requests * images_per_request / seconds, 1),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server subprocess in its own process group, ready once `ready_path` answers 200."""

    def __init__(self, command: list[str], port: int, ready_path: str, log: Path, env: dict):
        self.port, self.log = port, log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 180
        while not self._answers(ready_path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{' '.join(command)} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def _answers(self, path: str) -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            connection.request("GET", path)
            return connection.getresponse().status == 200
        except OSError:
            return False

    def post(self, path: str, body: bytes, content_type: str) -> bytes:
        self.connection.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise SystemExit(f"POST {path}: HTTP {response.status}: {data[:500]!r}")
        return data

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def invocations_body(files: list[bytes]) -> bytes:
    rows = [[base64.b64encode(data).decode("ascii")] for data in files]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


def time_predict(folder: Path, paths: list[Path], args: argparse.Namespace) -> dict:
    """`signflow predict`'s library path on the files, per backend: one image, then batches."""
    from signflow.predict import OnnxPredictor, TorchPredictor, predict_images

    figures = {}
    predictors = {"onnx": lambda: OnnxPredictor(folder / "artifacts" / "model.onnx")}
    if (folder / "model.pt").is_file():
        predictors["torch"] = lambda: TorchPredictor(folder / "model.pt")
    count = args.batch_size
    batches = [paths[i : i + count] for i in range(0, len(paths) - count + 1, count)]
    for backend, make in predictors.items():
        predictor = make()

        def one(index: int, predictor=predictor) -> None:
            list(predict_images(predictor, [paths[index % len(paths)]]))

        def batch(index: int, predictor=predictor) -> None:
            list(predict_images(predictor, batches[index % len(batches)], batch_size=args.batch_size))

        figures[f"signflow predict ({backend})"] = {
            "single": timed(one, args.single, 1, args.warmup),
            "batch": timed(batch, args.batches, args.batch_size, 2),
        }
    return figures


def time_mlflow_serve(folder: Path, files: list[bytes], args: argparse.Namespace, scratch: Path) -> dict:
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = ["mlflow", "models", "serve", "-m", str(folder), "--env-manager", "local", "-h", "127.0.0.1"]
    server = Server([*command, "-p", str(port)], port, "/ping", scratch / "mlflow-serve.log", env)
    try:
        singles = [invocations_body([data]) for data in files]
        count = args.batch_size
        batches = [invocations_body(files[i : i + count]) for i in range(0, len(files) - count + 1, count)]

        def one(index: int) -> None:
            server.post("/invocations", singles[index % len(singles)], "application/json")

        def batch(index: int) -> None:
            server.post("/invocations", batches[index % len(batches)], "application/json")

        return {"single": timed(one, args.single, 1, args.warmup), "batch": timed(batch, args.batches, count, 2)}
    finally:
        server.stop()


def time_signflow_serve(folder: Path, files: list[bytes], args: argparse.Namespace, scratch: Path) -> dict:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "signflow", "serve", "--model", str(folder), "--port", str(port)]
    server = Server(command, port, "/info", scratch / "signflow-serve.log", env)
    try:
        post = lambda i: server.post("/predict", files[i % len(files)], "image/jpeg")  # noqa: E731
        return {"single": timed(post, args.single, 1, args.warmup)}
    finally:
        server.stop()


def markdown(results: dict) -> str:
    rows = ["| way | images per request | p50 ms | p95 ms | requests/s | images/s |", "|---|---|---|---|---|---|"]
    for way, kinds in results.items():
        for figures in kinds.values():
            rows.append(
                f"| {way} | {figures['images_per_request']} | {figures['p50_ms']} | {figures['p95_ms']} | "
                f"{figures['requests_per_second']} | {figures['images_per_second']} |"
            )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="champion", help="registry alias or version, or an MLflow model folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (registry settings)")
    parser.add_argument("--images", type=Path, required=True, help="folder of image files (searched recursively)")
    parser.add_argument("--max-images", type=int, default=256, help="distinct images used")
    parser.add_argument("--single", type=int, default=200, help="timed one-image requests per way")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch request")
    parser.add_argument("--batches", type=int, default=20, help="timed batch requests per way")
    parser.add_argument("--warmup", type=int, default=10, help="untimed one-image requests first")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args()

    from signflow._images import is_image_name
    from signflow._mlflow import downloaded_version, is_registry_reference, resolve_tracking_uri
    from signflow.config import load_params

    paths = sorted(p for p in args.images.rglob("*") if p.is_file() and is_image_name(p))[: args.max_images]
    if len(paths) < args.batch_size:
        parser.error(f"{args.images}: {len(paths)} images, fewer than --batch-size {args.batch_size}")
    files = [p.read_bytes() for p in paths]
    with tempfile.TemporaryDirectory(prefix="signflow-serve-bench-") as tmp:
        scratch = Path(tmp)
        if is_registry_reference(args.model):
            register = load_params(args.params).register
            with downloaded_version(register.model_name, args.model, resolve_tracking_uri(register)) as (got, _):
                folder = Path(shutil.copytree(got, scratch / "model"))
        else:
            folder = Path(args.model)
        load_before = os.getloadavg()[0]
        results = time_predict(folder, paths, args)
        results["mlflow models serve /invocations"] = time_mlflow_serve(folder, files, args, scratch)
        results["signflow serve /predict"] = time_signflow_serve(folder, files, args, scratch)
    import onnxruntime

    report = {
        "model": str(args.model),
        "images": len(paths),
        "mean_image_bytes": round(statistics.mean(map(len, files))),
        "batch_size": args.batch_size,
        "results": results,
        "cpu_count": os.cpu_count(),
        "load_1min_before": round(load_before, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
        "versions": {"onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
    }
    print(markdown(results))
    print(
        f"\n{len(paths)} images of {report['mean_image_bytes']} bytes on average; {os.cpu_count()} CPUs; "
        f"1-minute load {report['load_1min_before']} before, {report['load_1min_after']} after"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
