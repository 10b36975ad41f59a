"""Peak memory of `signflow serve` under the worst requests it accepts, on this machine.

    python bench/serve_memory.py --model models/model.onnx --concurrent 8 --out bench/serve_memory.json

For each case a fresh server (`signflow serve --model ...` on 127.0.0.1) answers one warm-up
request; then `--concurrent` clients post the case's image at once. Reported per case: the server's
resident memory when idle (VmRSS after the warm-up), its peak (VmHWM, the kernel's high-water mark,
so no spike is missed between samples) and the difference, and the HTTP statuses. The images are
one-colour files declaring as many pixels as the model accepts (its max_pixels, from the ONNX
metadata; a few KB each): a 1-bit PNG, an RGBA PNG and a lossless WebP, the costliest to decode
measured. A last case posts `--chunked-mb` MB with chunked transfer encoding (no Content-Length).
Nothing is asserted; the machine's core count is recorded (DECODE_SLOTS depends on it).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import socket
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import Server, free_port  # noqa: E402


def model_max_pixels(model: str) -> int:
    import onnxruntime as ort

    onnx = Path(model) / "model.onnx" if Path(model).is_dir() else Path(model)
    if not onnx.is_file():
        onnx = Path(model) / "artifacts" / "model.onnx"
    meta = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    preprocessing = json.loads(meta.get("signflow.preprocessing") or meta["signflow._preprocessing"])
    return int(preprocessing.get("max_pixels", 50_000_000))


def worst_images(max_pixels: int) -> dict[str, bytes]:
    side = math.isqrt(max_pixels)
    cases = {"1-bit PNG": ("1", 0, "PNG", {}), "RGBA PNG": ("RGBA", (10, 200, 30, 128), "PNG", {})}
    cases["RGB WebP (lossless)"] = ("RGB", (10, 200, 30), "WEBP", {"lossless": True})
    images = {}
    for name, (mode, colour, fmt, options) in cases.items():
        buffer = io.BytesIO()
        Image.new(mode, (side, side), colour).save(buffer, fmt, **options)
        images[f"{name} {side}x{side}"] = buffer.getvalue()
    return images


def memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def post(port: int, body: bytes) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def post_chunked(port: int, megabytes: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = os.urandom(2**20)
        try:
            for _ in range(megabytes):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the end of the upload
        return int(sock.recv(4096).split(b" ", 2)[1])


def measure(model: str, case: str, send, clients: int, scratch: Path, warmup: bytes) -> dict:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "signflow", "serve", "--model", model, "--port", str(port)]
    server = Server(command, port, "/info", scratch / "serve.log", env)
    try:
        post(port, warmup)
        idle = memory_kb(server.process.pid)["VmRSS"]
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda: statuses.append(send(port))) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        peak = memory_kb(server.process.pid)["VmHWM"]
    finally:
        server.stop()
    figures = {"clients": clients, "statuses": sorted(statuses), "idle_mb": round(idle / 1024)}
    figures |= {"peak_mb": round(peak / 1024), "peak_minus_idle_mb": round((peak - idle) / 1024)}
    print(f"{case}: {figures}", flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="what `signflow serve --model` takes (a local path here)")
    parser.add_argument("--concurrent", type=int, default=8, help="clients posting the same image at once")
    parser.add_argument("--chunked-mb", type=int, default=300, help="size of the chunked upload")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    from signflow.serve import DECODE_SLOTS, MAX_CONNECTIONS, MAX_IMAGE_BYTES

    max_pixels = model_max_pixels(args.model)
    warmup = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(warmup, "JPEG")
    results: dict = {"cases": {}}
    with tempfile.TemporaryDirectory(prefix="signflow-serve-memory-") as tmp:
        for case, image in worst_images(max_pixels).items():
            send = lambda port, image=image: post(port, image)  # noqa: E731
            results["cases"][f"{case} ({len(image):,} bytes)"] = measure(
                args.model, case, send, args.concurrent, Path(tmp), warmup.getvalue()
            )
        case = f"chunked upload of {args.chunked_mb} MB"
        send = lambda port: post_chunked(port, args.chunked_mb)  # noqa: E731
        results["cases"][case] = measure(args.model, case, send, 1, Path(tmp), warmup.getvalue())
    results["server"] = {"decode_slots": DECODE_SLOTS, "max_connections": MAX_CONNECTIONS}
    results["server"] |= {"max_image_bytes": MAX_IMAGE_BYTES, "model_max_pixels": max_pixels}
    results["machine"] = {"cpus": os.cpu_count(), "load": os.getloadavg(), "python": platform.python_version()}
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
