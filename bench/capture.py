"""The webcam loop of `signflow serve --capture-dir`: frames saved per second, and Train -> live.

    python bench/capture.py frames --out bench/capture.json
    python bench/capture.py train-live --weights ../shared/weights/mobilenetv2_100.tv_in1k.safetensors \\
        --out bench/capture.json

Both start a real `signflow serve --capture-dir` subprocess on 127.0.0.1 (in a fresh project in a
temp folder: this repository's dvc.yaml, the signflow code its stages depend on, a data.dvc pointing
at the capture folder, `dvc init --no-scm`) and talk to it over HTTP the way the page does.

`frames`: bursts as the page records them (frames 320x240, the page's `SIDE` on the long side of a
640x480 camera, JPEG quality 85 like its `toBlob(..., 0.85)`; `--frames-per-burst` a burst, the
page's default 20) POSTed to `/capture/<class>?sizes=...`, one client after the other, then from two
clients at once. Each repeat posts `--bursts` bursts; frames/s is frames saved / the repeat's wall
time. The server takes at most 30 bursts a minute (signflow._capture.MAX_BURSTS_PER_MINUTE, over all
clients), so each way gets a fresh server and `--repeats` x `--bursts` must stay within 30.

`train-live`: `--classes` synthetic signs (tests/test_serving.py's SIGNS), `--bursts-per-class`
bursts of `--frames-per-burst` distinct frames each, uploaded through the capture API; then POST
/train (the page's Train button) and GET /train every `--poll` seconds until the run ends, then GET
/info until the new champion is live (the server's follower asks the registry every
`--follow-every` seconds, 5 by default). Reported: when each stage began (first seen in /train's
`step`, client clock from the POST), the run's end, the swap, the total, and the live version's
test accuracy and split as /info shows them. The params are this repository's (mobilenetv2_100 at
160 px, 12 epochs, 9 trainable blocks) with the split the capture page needs (strategy group,
group_pattern = BURST_PATTERN, near_duplicates report) and `train.weights_file` = `--weights` (no
hub download); `--set key=value` changes any other (named in the output).

Results are merged into `--out` under "frames" / "train_live_<N>_frames". Nothing here asserts on time: the
machine's 1-minute load before and after is recorded beside each figure.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import make_project  # noqa: E402  (bench/pipeline.py)
from serve_latency import Server, free_port  # noqa: E402  (bench/serve_latency.py)

from signflow._capture import BURST_PATTERN, CLIENT_FRAMES_PER_SECOND, MAX_BURSTS_PER_MINUTE  # noqa: E402
from signflow.fileio import write_json_atomic  # noqa: E402

PAGE_FRAME = (320, 240)
"""What the page posts from a 640x480 camera: SIDE (320) pixels on the long side."""
PAGE_JPEG_QUALITY = 85
CAPTURE_SPLIT = {
    "split.strategy": "group",
    "split.group_pattern": BURST_PATTERN,
    "split.near_duplicates": "report",
}
"""What docs/serving.md tells a capture project to set: each burst one group."""


FRAMES_CLIENT_FPS = 100_000
"""`--capture-client-fps` of the frames benchmark's server: far above what it can save, so the figure is
its saving rate; a default server lets one client save 15 frames a second (the page's top rate)."""


def page_frames(shape: str, count: int, seed: int) -> list[bytes]:
    """`count` distinct frames of one synthetic sign, encoded as the page encodes them."""
    from PIL import Image

    from tests.test_serving import sign_frames  # 240x320 frames: the page's size already

    encoded = []
    for pixels in sign_frames(shape, count, seed):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=PAGE_JPEG_QUALITY)
        encoded.append(buffer.getvalue())
    return encoded


def burst_body(frames: list[bytes]) -> tuple[bytes, str]:
    """The page's request: the JPEG files back to back, and their sizes for `?sizes=`."""
    return b"".join(frames), ",".join(str(len(frame)) for frame in frames)


class Client:
    """One browser tab: one kept-alive connection, one request at a time."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        self.connection.request(method, path, body=body)
        response = self.connection.getresponse()
        data = response.read()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, {"detail": data[:300].decode(errors="replace")}

    def post_burst(self, class_name: str, frames: list[bytes], wait_on_429: bool = False) -> dict:
        body, sizes = burst_body(frames)
        while True:
            status, answer = self.call("POST", f"/capture/{quote(class_name, safe='')}?sizes={sizes}", body)
            if status == 429 and wait_on_429:  # over 30 bursts a minute: wait, then send it again
                time.sleep(5)
                continue
            if status != 200:
                raise SystemExit(f"POST /capture/{class_name}: HTTP {status}: {answer.get('detail')}")
            return answer


def capture_project(scratch: Path, weights: Path | None, overrides: dict) -> tuple[Path, Path]:
    """A fresh project in `scratch` whose data.dvc points at `scratch/captures`, with the capture split
    and the registry's sqlite file by absolute path (`dvc repro` runs in the project, the server here)."""
    captures = scratch / "captures"
    captures.mkdir()
    registry = {"register.tracking_uri": f"sqlite:///{scratch / 'project' / 'mlflow.db'}"}
    return make_project(scratch, captures, weights, 42, {**CAPTURE_SPLIT, **overrides, **registry}, "project"), captures


def serve_capture(
    project: Path, captures: Path, log: Path, follow_every: float, client_fps: int | None = None
) -> Server:
    """`signflow serve --capture-dir` on a free port; `client_fps` raises the per-client rate limit
    (frames: the server's own saving rate is the figure, not the limit's 15 frames a second)."""
    port = free_port()
    command = [sys.executable, "-m", "signflow", "serve", "--params", str(project / "params.yaml")]
    command += ["--capture-dir", str(captures), "--port", str(port), "--follow-every", str(follow_every)]
    if client_fps is not None:
        command += ["--capture-client-fps", str(client_fps)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return Server(command, port, "/info", log, env)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def timed_repeat(port: int, bursts: list[list[bytes]], clients: int) -> dict:
    """Post `bursts` from `clients` connections at once (each its share, in turn); frames/s over the wall time."""
    connections = [Client(port) for _ in range(clients)]
    latencies: list[float] = []
    failures: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for frames in bursts[index::clients]:
                tick = time.perf_counter()
                connections[index].post_burst(f"class {index}", frames)
                latencies.append(time.perf_counter() - tick)
        except BaseException as error:  # noqa: BLE001 - re-raised below, in the main thread
            failures.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if failures:
        raise failures[0]
    frames = sum(map(len, bursts))
    return {"frames": frames, "seconds": seconds, "burst_ms": [s * 1000 for s in latencies]}


def in_process_ms_per_frame(frames: list[bytes], folder: Path, repeats: int = 5) -> dict:
    """Where a saved frame's time goes, without HTTP: the server's checks (JPEG, size, blank) and its
    atomic write (temp file, fsync, rename, fsync of the folder) against a plain write, same disk."""
    from signflow._capture import check_frames
    from signflow.fileio import write_atomic

    folder.mkdir()
    timings: dict[str, list[float]] = {"check": [], "atomic write": [], "plain write": []}
    for repeat in range(repeats):
        tick = time.perf_counter()
        check_frames(frames)
        timings["check"].append(time.perf_counter() - tick)
        tick = time.perf_counter()
        for index, frame in enumerate(frames):
            write_atomic(folder / f"a{repeat}_{index}.jpg", lambda tmp, data=frame: tmp.write_bytes(data))
        timings["atomic write"].append(time.perf_counter() - tick)
        tick = time.perf_counter()
        for index, frame in enumerate(frames):
            (folder / f"p{repeat}_{index}.jpg").write_bytes(frame)
        timings["plain write"].append(time.perf_counter() - tick)
    return {name: round(statistics.median(s) * 1000 / len(frames), 2) for name, s in timings.items()}


def bench_frames(args: argparse.Namespace, scratch: Path) -> dict:
    if args.repeats * args.bursts + 1 > MAX_BURSTS_PER_MINUTE:  # + the warm-up burst
        raise SystemExit(
            f"--repeats x --bursts is {args.repeats * args.bursts}, plus a warm-up burst: a server takes at most "
            f"{MAX_BURSTS_PER_MINUTE} bursts a minute"
        )
    project, captures = capture_project(scratch, None, {})
    total = args.repeats * args.bursts
    bursts = [page_frames("disc", args.frames_per_burst, seed) for seed in range(total)]
    bytes_per_frame = statistics.mean(len(f) for burst in bursts for f in burst)
    results = {}
    for clients in (1, 2):
        for old in captures.iterdir():  # each way starts from an empty capture folder
            shutil.rmtree(old)
        server = serve_capture(
            project, captures, scratch / f"serve-{clients}.log", args.follow_every, FRAMES_CLIENT_FPS
        )
        try:
            Client(server.port).post_burst("warm-up", bursts[0][:2])  # imports Pillow; not timed
            before = load()
            repeats = [
                timed_repeat(server.port, bursts[i * args.bursts : (i + 1) * args.bursts], clients)
                for i in range(args.repeats)
            ]
        finally:
            server.stop()
        rates = [r["frames"] / r["seconds"] for r in repeats]
        burst_ms = [ms for r in repeats for ms in r["burst_ms"]]
        results["sequential" if clients == 1 else f"{clients} clients at once"] = {
            "clients": clients,
            "frames_per_second_median": round(statistics.median(rates), 1),
            "frames_per_second_each_repeat": [round(r, 1) for r in rates],
            "burst_request_ms_median": round(statistics.median(burst_ms), 1),
            "frames_per_repeat": repeats[0]["frames"],
            "load_1min_before": before,
            "load_1min_after": load(),
        }
    report = {
        "frame": f"{PAGE_FRAME[0]}x{PAGE_FRAME[1]} JPEG quality {PAGE_JPEG_QUALITY} (synthetic sign, noisy background)",
        "bytes_per_frame_mean": round(bytes_per_frame),
        "frames_per_burst": args.frames_per_burst,
        "bursts_per_repeat": args.bursts,
        "repeats": args.repeats,
        "in_process_ms_per_frame": in_process_ms_per_frame(bursts[0], scratch / "in-process"),
        "sustained_ceiling_frames_per_second": round(MAX_BURSTS_PER_MINUTE * args.frames_per_burst / 60, 1),
        "server_capture_client_fps": FRAMES_CLIENT_FPS,
        "default_capture_client_fps": CLIENT_FRAMES_PER_SECOND,
        "results": results,
    }
    print("| clients | frames/s (median) | each repeat | ms per burst request (median) | load before → after |")
    print("|---|---|---|---|---|")
    for way, row in results.items():
        print(
            f"| {way} | {row['frames_per_second_median']} | {row['frames_per_second_each_repeat']} | "
            f"{row['burst_request_ms_median']} | {row['load_1min_before']} → {row['load_1min_after']} |"
        )
    print(
        f"\n{args.frames_per_burst}-frame bursts of {report['frame']}, {report['bytes_per_frame_mean']} bytes a "
        f"frame on average; the server's limit of {MAX_BURSTS_PER_MINUTE} bursts a minute caps a sustained "
        f"rate at {report['sustained_ceiling_frames_per_second']} frames/s with bursts of this length.\n"
        f"In one process, ms a frame: {report['in_process_ms_per_frame']}"
    )
    return report


def upload_capture(port: int, args: argparse.Namespace) -> dict:
    from tests.test_serving import SIGNS

    signs = list(SIGNS.items())[: args.classes]
    if len(signs) < args.classes:
        raise SystemExit(f"--classes {args.classes}: there are {len(SIGNS)} synthetic signs")
    client, frames, started = Client(port), 0, time.perf_counter()
    for index, (name, shape) in enumerate(signs):
        for burst in range(args.bursts_per_class):
            burst_frames = page_frames(shape, args.frames_per_burst, seed=1000 * index + burst)
            frames += client.post_burst(name, burst_frames, wait_on_429=True)["frames"]
    return {"frames": frames, "seconds": round(time.perf_counter() - started, 1), "classes": [n for n, _ in signs]}


def follow_run(client: Client, args: argparse.Namespace, started: float) -> dict:
    """GET /train until the run ends: when each stage was first seen, and the run's own status."""
    seen: dict[str, float] = {}
    while True:
        status, run = client.call("GET", "/train")
        if run.get("step") and run["step"] not in seen:
            seen[run["step"]] = round(time.perf_counter() - started, 1)
            print(f"  {seen[run['step']]:6.1f} s  stage {run['step']}", flush=True)
        if run.get("state") in ("done", "failed"):
            return {"stage_first_seen_s": seen, "run": run, "ended_s": round(time.perf_counter() - started, 1)}
        time.sleep(args.poll)


def wait_live(client: Client, args: argparse.Namespace, previous: str | None) -> dict | None:
    deadline = time.perf_counter() + args.live_timeout
    while time.perf_counter() < deadline:
        _, info = client.call("GET", "/info")
        if info.get("version") not in (None, previous):
            return info
        time.sleep(args.poll)
    return None


def stage_seconds(seen: dict[str, float], ended: float) -> list[dict]:
    """Each stage in run order with its seconds: from its first sighting to the next one's (the last
    one's to the run's end); "dvc start-up" runs from Train to the first stage (POST /train, `dvc repro`
    starting, DVC's checks). A list: the JSON file's keys are sorted."""
    names = sorted(seen, key=seen.get)
    begins = [0.0] + [seen[name] for name in names]
    ends = [seen[name] for name in names] + [ended]
    return [
        {"stage": name, "began_s": begin, "seconds": round(end - begin, 1)}
        for name, begin, end in zip(["dvc start-up", *names], begins, ends, strict=True)
    ]


def bench_train_live(args: argparse.Namespace, scratch: Path) -> dict:
    project, captures = capture_project(scratch, args.weights, dict(parse_setting(s) for s in args.set))
    params = yaml.safe_load((project / "params.yaml").read_text())
    server = serve_capture(project, captures, scratch / "serve.log", args.follow_every)
    try:
        client = Client(server.port)
        upload = upload_capture(server.port, args)
        print(f"uploaded {upload['frames']} frames of {upload['classes']} in {upload['seconds']} s", flush=True)
        previous = client.call("GET", "/info")[1].get("version")
        before = load()
        started = time.perf_counter()
        status, answer = client.call("POST", "/train")
        if status != 200:
            raise SystemExit(f"POST /train: HTTP {status}: {answer.get('detail')}")
        run = follow_run(client, args, started)
        if run["run"]["state"] != "done":
            raise SystemExit(f"the run failed: {run['run']['error']}\n{(scratch / 'serve.log').read_text()[-2000:]}")
        info = wait_live(client, args, previous)
        live_s = round(time.perf_counter() - started, 1)
        after = load()
    finally:
        server.stop()
    if info is None:
        raise SystemExit(f"no new champion went live within {args.live_timeout} s of the run's end (register's gate?)")
    train = params["train"]
    report = {
        "capture": upload,
        "frames_per_burst": args.frames_per_burst,
        "bursts_per_class": args.bursts_per_class,
        "model": {k: train[k] for k in ("model", "image_size", "epochs", "trainable_blocks", "weights_file")},
        "changed_from_params_yaml": {
            **CAPTURE_SPLIT,
            **dict(parse_setting(s) for s in args.set),
            "train.weights_file": str(args.weights),
            "register.tracking_uri": "the project's mlflow.db by absolute path",
        },
        "follow_every_s": args.follow_every,
        "stages": stage_seconds(run["stage_first_seen_s"], run["ended_s"]),
        "run_done_s": run["ended_s"],
        "run_seconds_by_server": run["run"]["seconds"],
        "done_to_live_s": round(live_s - run["ended_s"], 1),
        "train_to_live_s": live_s,
        "live_version": info["version"],
        "test_accuracy": info["test_accuracy"],
        "split": info["split"],
        "test_near_duplicates_in_train": info["test_near_duplicates_in_train"],
        "load_1min_before": before,
        "load_1min_after": after,
    }
    columns = [*(row["stage"] for row in report["stages"]), "run done", "done → live", "Train → live"]
    print("| " + " | ".join(f"{name} s" for name in columns) + " |\n|" + "---|" * len(columns))
    cells = [*(row["seconds"] for row in report["stages"]), report["run_done_s"], report["done_to_live_s"], live_s]
    print("| " + " | ".join(str(c) for c in cells) + " |")
    print(
        f"\nversion {info['version']} live {live_s} s after Train; test accuracy {info['test_accuracy']}; "
        f"split: {info['split']}; test frames with a near-copy in train: {info['test_near_duplicates_in_train']}; "
        f"1-minute load {before} before, {after} after"
    )
    return report


def parse_setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set {text!r}: write key=value, e.g. train.epochs=4")
    return key, yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, help="merge the figures into this JSON file")
    common.add_argument("--follow-every", type=float, default=5.0, help="serve's --follow-every (default: 5)")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    frames = commands.add_parser("frames", parents=[common], help="frames saved per second, one client and two at once")
    frames.add_argument("--frames-per-burst", type=int, default=20, help="frames a burst (the page's default: 20)")
    frames.add_argument("--bursts", type=int, default=5, help="bursts a repeat")
    frames.add_argument("--repeats", type=int, default=5)
    live = commands.add_parser("train-live", parents=[common], help="time from Train to the new champion live")
    live.add_argument("--weights", type=Path, required=True, help="local timm weights file (no hub download)")
    live.add_argument("--classes", type=int, default=3)
    live.add_argument("--bursts-per-class", type=int, default=10)
    live.add_argument("--frames-per-burst", type=int, default=30)
    live.add_argument("--poll", type=float, default=0.25, help="seconds between GET /train and GET /info")
    live.add_argument("--live-timeout", type=float, default=120, help="seconds to wait for the swap after the run")
    live.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change a param (dotted key)")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    for setting in getattr(args, "set", []):
        parse_setting(setting)
    if getattr(args, "weights", None) and not args.weights.is_file():
        raise SystemExit(f"--weights {args.weights}: no such file")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="signflow-capture-bench-") as tmp:
        if args.command == "frames":
            key, report = "frames", bench_frames(args, Path(tmp))
        else:
            report = bench_train_live(args, Path(tmp))
            key = f"train_live_{report['capture']['frames']}_frames"
    report["cpu_count"] = os.cpu_count()
    report["python"] = platform.python_version()
    if args.out:
        merged = json.loads(args.out.read_text()) if args.out.is_file() else {}
        merged[key] = report
        write_json_atomic(args.out, merged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
