"""The capture folder of `signflow serve --capture-dir`: bursts of webcam frames saved as a dataset.

Layout: `<capture dir>/<class>/<burst id>_<n>.jpg`, class folders as every signflow source has them,
so `signflow source set <capture dir>` makes it the project's data. A burst id is a fresh uuid4 (32
hex digits): two browsers capturing at once never write the same file, and the split keeps each burst
in one split with `split.strategy: group` and `split.group_pattern: '([0-9a-f]{32})_'` (BURST_PATTERN).

Everything a client sends is bounded: the body of one burst (MAX_BURST_BYTES, read no further), its
frames (MAX_FRAMES_PER_BURST, each a JPEG Pillow can read, at most MAX_FRAME_PIXELS), bursts a minute
(MAX_BURSTS_PER_MINUTE, over all clients), the frames and deletes of each client address (ClientRates:
a token bucket), and the folder's total size (`max_bytes`). A burst whose
frames are blank (a covered or still-starting camera: black or one flat colour) is refused whole.
Each frame is written atomically; a burst is checked whole before its first frame is written.
"""

from __future__ import annotations

import io
import re
import threading
import time
import unicodedata
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from signflow._images import is_junk, split_folder_name
from signflow.errors import SignflowError
from signflow.fileio import write_atomic

__all__ = ["BURST_PATTERN", "CaptureError", "CaptureStore", "ClientRates", "check_class_name"]

BURST_PATTERN = r"([0-9a-f]{32})_"
"""split.group_pattern that makes each burst one group: its key is the burst id in the file name."""
MAX_FRAMES_PER_BURST = 60
MAX_FRAME_BYTES = 2 * 2**20
"""A 640x480 JPEG at quality 0.85 is about 30-60 KB; a frame above 2 MB is not a webcam frame."""
MAX_BURST_BYTES = 16 * 2**20
MAX_FRAME_PIXELS = 4096 * 4096
MAX_BURSTS_PER_MINUTE = 30
CLIENT_FRAMES_PER_SECOND = 15.0
"""A client's sustained rate: the page records at most 15 frames a second (its burst-rate input's max)."""
CLIENT_BURST_FRAMES = 2 * MAX_FRAMES_PER_BURST
"""What a client may send at once: two longest bursts back to back (a quick retake) pass; a flood is 429."""
CLIENT_BUCKET_SECONDS = 8
"""A client's bucket holds this many seconds of its sustained rate (at least CLIENT_BURST_FRAMES)."""
MAX_TRACKED_CLIENTS = 1024
"""Client addresses whose buckets are kept (about 200 bytes each); past it the least recently seen goes."""
MAX_CLASS_NAME = 64
BLANK_STD = 3.0
"""Grey-level standard deviation (0-255) under which a frame is blank: a black or covered camera
gives under 1, a plain wall in daylight 5-15 (sensor noise and shading)."""
DEFAULT_MAX_BYTES = 2 * 2**30


class CaptureError(SignflowError, ValueError):
    """A burst or a class name the capture folder refuses; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def check_class_name(name: str) -> str:
    """The class name in NFC, as the extract step names class folders; refused when it is not one
    plain folder name (no separators, no dot names, no junk or split-folder names, no control chars)."""
    name = unicodedata.normalize("NFC", name.strip())
    why = None
    if not name:
        why = "it is empty"
    elif len(name) > MAX_CLASS_NAME:
        why = f"it is longer than {MAX_CLASS_NAME} characters"
    elif "/" in name or "\\" in name:
        why = "it holds a path separator (/ or \\)"
    elif name.startswith("."):
        why = "it starts with a dot (hidden, or . and ..)"
    elif any(unicodedata.category(c).startswith("C") for c in name):
        why = "it holds control or invisible characters"
    elif is_junk(name):
        why = "the extract step leaves folders of that name out"
    elif split_folder_name(name) is not None:
        why = "a folder of that name is read as a train/valid/test split folder"
    if why:
        raise CaptureError(f"class name {name!r} refused: {why}; use letters, digits, spaces, - or _", 422)
    return name


class ClientRates:
    """A token bucket per client address, in frames: a burst costs its frame count, a delete one frame.

    A bucket holds `burst` tokens and refills at `rate` a second, so a page recording 60-frame bursts at
    its top speed (15 frames a second) never waits, and a script posting bursts back to back is refused
    after `burst` frames. Memory is bounded: at most `max_clients` buckets, the least recently seen
    forgotten first (a forgotten client starts full, as a new one does). Thread-safe.
    """

    def __init__(
        self,
        rate: float = CLIENT_FRAMES_PER_SECOND,
        burst: float = CLIENT_BURST_FRAMES,
        max_clients: int = MAX_TRACKED_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.rate, self.burst, self.max_clients, self.clock = rate, burst, max_clients, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        """client -> (tokens, when they were counted), least recently seen first."""
        self._lock = threading.Lock()

    @classmethod
    def sustaining(cls, rate: float) -> ClientRates:
        """`rate` frames a second per client, with a bucket of CLIENT_BUCKET_SECONDS' worth, at least
        CLIENT_BURST_FRAMES (two longest bursts at once); the defaults are `sustaining(CLIENT_FRAMES_PER_SECOND)`."""
        return cls(rate, max(CLIENT_BURST_FRAMES, CLIENT_BUCKET_SECONDS * rate))

    def take(self, client: str, cost: float) -> None:
        """Spend `cost` tokens of `client`'s bucket, or raise CaptureError 429 saying how long to wait."""
        cost = min(cost, self.burst)  # a request no bucket could ever pay is bounded elsewhere (413)
        with self._lock:
            now = self.clock()
            tokens, then = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens < cost:
                self._buckets[client] = (tokens, now)
                wait = (cost - tokens) / self.rate
                raise CaptureError(
                    f"too many frames from {client}: at most {self.rate:g} a second ({self.burst:g} at once); "
                    f"wait {max(1, round(wait))} s and record again",
                    429,
                )
            self._buckets[client] = (tokens - cost, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True)
class SavedBurst:
    class_name: str
    burst: str
    frames: int


class CaptureStore:
    """The capture folder: save, count and delete bursts. Thread-safe: the size check and the writes
    of a burst happen under one lock, so two bursts at once cannot both pass the size limit."""

    def __init__(self, root: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, client_rates: ClientRates | None = None):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.client_rates = client_rates if client_rates is not None else ClientRates()
        self._lock = threading.Lock()
        self._recent: deque[float] = deque()

    def class_folder(self, name: str) -> Path:
        """The folder of class `name`, refused if another class folder differs from it only in case."""
        name = check_class_name(name)
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.is_dir() and entry.name != name and entry.name.casefold() == name.casefold():
                    raise CaptureError(f"class {name!r} differs only in case from {entry.name!r}: use {entry.name!r}")
        return self.root / name

    def save_burst(self, class_name: str, frames: list[bytes]) -> SavedBurst:
        """Check the burst whole (count, sizes, JPEG, blank), then the rate and space, then write it."""
        folder = self.class_folder(class_name)
        check_frames(frames)
        with self._lock:
            self._take_rate_slot()
            used, incoming = self.total_bytes(), sum(map(len, frames))
            if used + incoming > self.max_bytes:
                raise CaptureError(
                    f"the capture folder is full: {used / 2**20:.1f} MB of {self.max_bytes / 2**20:.0f} MB used, "
                    f"this burst needs {incoming / 2**20:.1f} MB; delete bursts or start serve with a larger "
                    "--capture-max-mb",
                    413,
                )
            burst = uuid.uuid4().hex
            try:
                for index, frame in enumerate(frames):
                    write_atomic(folder / f"{burst}_{index:03d}.jpg", lambda tmp, data=frame: tmp.write_bytes(data))
            except OSError as error:
                self._remove(folder, burst)
                raise CaptureError(f"cannot save the burst in {folder}: {error.strerror or error}", 507) from None
        return SavedBurst(folder.name, burst, len(frames))

    def _take_rate_slot(self) -> None:
        now = time.monotonic()
        while self._recent and now - self._recent[0] > 60:
            self._recent.popleft()
        if len(self._recent) >= MAX_BURSTS_PER_MINUTE:
            wait = 60 - (now - self._recent[0])
            raise CaptureError(
                f"more than {MAX_BURSTS_PER_MINUTE} bursts a minute: wait {wait:.0f} s before the next one", 429
            )
        self._recent.append(now)

    def delete_burst(self, class_name: str, burst: str) -> int:
        """Remove the frames of one burst; the number removed (404 when there were none)."""
        if not re.fullmatch("[0-9a-f]{32}", burst):
            raise CaptureError(f"{burst!r} is not a burst id (32 hex digits)", 422)
        folder = self.class_folder(class_name)
        with self._lock:
            removed = self._remove(folder, burst)
        if not removed:
            raise CaptureError(f"class {folder.name!r} has no burst {burst}", 404)
        return removed

    @staticmethod
    def _remove(folder: Path, burst: str) -> int:
        frames = list(folder.glob(f"{burst}_*.jpg")) if folder.is_dir() else []
        for frame in frames:
            frame.unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        return len(frames)

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file()) if self.root.is_dir() else 0

    def classes(self) -> list[dict]:
        """Each class folder with its frames and bursts, by name."""
        found = []
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if not folder.is_dir() or is_junk(folder.name) or folder.name.startswith("."):
                continue
            bursts = [m.group(1) for f in folder.iterdir() if (m := re.fullmatch(BURST_PATTERN + r"\d+\.jpg", f.name))]
            found.append({"class": folder.name, "frames": len(bursts), "bursts": len(set(bursts))})
        return found

    def summary(self) -> dict:
        return {
            "folder": str(self.root),
            "classes": self.classes(),
            "bytes": self.total_bytes(),
            "max_bytes": self.max_bytes,
            "max_frames_per_burst": MAX_FRAMES_PER_BURST,
            "group_pattern": BURST_PATTERN,
        }


def split_frames(body: bytes, sizes: str) -> list[bytes]:
    """The frames of a burst body: JPEG files back to back, `sizes` their byte counts, comma-separated."""
    try:
        counts = [int(size) for size in sizes.split(",")] if sizes else []
    except ValueError:
        raise CaptureError("sizes must be the frames' byte counts separated by commas, e.g. 41233,40981", 400) from None
    if not counts or any(count <= 0 for count in counts) or sum(counts) != len(body):
        raise CaptureError(f"the frame sizes add up to {sum(counts)} bytes, the body has {len(body)}", 400)
    if len(counts) > MAX_FRAMES_PER_BURST:
        raise CaptureError(f"{len(counts)} frames in one burst; at most {MAX_FRAMES_PER_BURST}", 413)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [body[start : start + count] for start, count in zip(starts, counts, strict=True)]


def check_frames(frames: list[bytes]) -> None:
    """Every frame a readable JPEG within the bounds, and not all of them blank."""
    if not frames or len(frames) > MAX_FRAMES_PER_BURST:
        raise CaptureError(f"a burst holds 1 to {MAX_FRAMES_PER_BURST} frames, not {len(frames)}", 413)
    blank = 0
    for index, frame in enumerate(frames):
        if len(frame) > MAX_FRAME_BYTES:
            raise CaptureError(f"frame {index + 1} is larger than {MAX_FRAME_BYTES // 2**20} MB", 413)
        blank += frame_spread(frame, index) < BLANK_STD
    if blank:
        raise CaptureError(
            f"{blank} of {len(frames)} frames are blank (black or one flat colour): is the camera covered, "
            "or still starting? Nothing was saved; record the burst again",
            422,
        )


def frame_spread(frame: bytes, index: int) -> float:
    """Grey-level standard deviation of a JPEG frame, decoded small (draft mode)."""
    from PIL import Image, ImageStat

    if not frame.startswith(b"\xff\xd8"):
        raise CaptureError(f"frame {index + 1} is not a JPEG file", 422)
    try:
        with Image.open(io.BytesIO(frame)) as image:
            if image.width * image.height > MAX_FRAME_PIXELS:
                raise CaptureError(f"frame {index + 1} is {image.width}x{image.height}: too large for a frame", 413)
            image.draft("L", (64, 64))
            return ImageStat.Stat(image.convert("L")).stddev[0]
    except CaptureError:
        raise
    except Exception as error:  # noqa: BLE001 - a damaged JPEG makes Pillow raise many types
        raise CaptureError(f"frame {index + 1} is not a readable JPEG ({error})", 422) from None
