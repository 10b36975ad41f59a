"""Builders the tests share: tiny class-folder datasets made with PIL, archives laid out like the
upstream one, params for tiny runs, and throwaway git + DVC projects."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MALFORMED_TIFFS = sorted((ROOT / "tests" / "data").glob("crash_TIFF_*.bin"))
"""Fuzzed TIFFs on which Pillow's decoder raises TypeError and OverflowError (found by a fuzzer)."""
CLASS_COLOURS = {"alpha": (200, 40, 40), "beta": (40, 200, 40), "gamma ü": (40, 40, 200)}
PER_CLASS = 12


def make_image(path: Path, colour: tuple[int, int, int], seed: int, size: int = 40, fmt: str = "JPEG") -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt)
    return path


def build_class_folders(root: Path, per_class: int = PER_CLASS) -> Path:
    for index, (name, colour) in enumerate(CLASS_COLOURS.items()):
        for i in range(per_class):
            make_image(root / name / f"IMG_{i:03d}.JPG", colour, seed=index * 1000 + i)
    return root


def add_near_duplicates(root: Path, per_class: int) -> Path:
    """Beside the first `per_class` images of each class folder, a brighter re-encoded copy: a different file,
    the same photo to the split's perceptual hash (each pair is one near-duplicate cluster)."""
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        for original in sorted(folder.glob("IMG_*.JPG"))[:per_class]:
            copy = ImageEnhance.Brightness(Image.open(original).convert("RGB")).enhance(1.08)
            copy.save(original.with_name(f"{original.stem}_copy.JPG"), "JPEG", quality=70)
    return root


def build_split_folders(root: Path, folders: dict[str, str], per_class: int = PER_CLASS) -> Path:
    """Class folders inside split folders, `root/<folder>/<class>/`, as datasets that ship their own split
    do; `folders` maps each split (train, valid, test) to its folder name. Every image is distinct."""
    for split_index, (_split, folder) in enumerate(sorted(folders.items())):
        for index, (name, colour) in enumerate(CLASS_COLOURS.items()):
            for i in range(per_class):
                make_image(
                    root / folder / name / f"IMG_{i:03d}.JPG",
                    colour,
                    seed=50_000 * (split_index + 1) + index * 1000 + i,
                )
    return root


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    """Zip every file under `folder` (entries under `prefix/` when given), plus the junk archives carry."""
    with zipfile.ZipFile(archive, "w") as bundle:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                bundle.write(file, f"{prefix}/{file.relative_to(folder).as_posix()}".lstrip("/"))
        bundle.writestr("__MACOSX/._junk", "junk")
        bundle.writestr(f"{prefix}/.DS_Store".lstrip("/"), "junk")
        bundle.writestr(f"{prefix}/README.md".lstrip("/"), "# dataset\n")
    return archive


def pack_upstream_zip(class_root: Path, archive: Path) -> Path:
    """Lay the classes out as the upstream branch archive does, with an Examples/ folder beside them."""
    with zipfile.ZipFile(archive, "w") as bundle:
        prefix = "Sign-Language-Digits-Dataset-master"
        for file in sorted(class_root.rglob("*")):
            if file.is_file():
                bundle.write(file, f"{prefix}/Dataset/{file.relative_to(class_root).as_posix()}")
        example = make_image(archive.parent / "example.JPG", (128, 128, 128), seed=7)
        bundle.write(example, f"{prefix}/Examples/example_0.JPG")
        bundle.writestr(f"{prefix}/README.md", "# dataset\n")
        bundle.writestr("__MACOSX/._junk", "junk")
    return archive


def tiny_params(**train_overrides) -> dict:
    """params.yaml for tiny runs: a tiny timm model at 32 px, no weights, no accuracy gate."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["extract"].update(sha256=None)
    params["train"].update(
        model="test_efficientnet",
        pretrained=False,
        weights_file=None,
        trainable_blocks="all",
        image_size=32,
        batch_size=8,
        epochs=2,
        lr=3e-3,
        early_stopping_patience=0,
    )
    params["train"].update(train_overrides)
    params["register"].update(min_accuracy=0.0)
    return params


def make_project(tmp_path: Path, source: str | Path, **train_overrides) -> Path:
    """A git + DVC repo like a clone of this one (dvc.yaml, the signflow code its stages depend on),
    with data.dvc pointing at `source` and a params.yaml for tiny runs."""
    from signflow.source import normalise_source, render_data_dvc

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    shutil.copytree(ROOT / "signflow", project / "signflow", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".gitignore", project / ".gitignore")
    (project / "README.md").write_text("# a signflow project\n")
    (project / "data.dvc").write_text(render_data_dvc(*normalise_source(str(source), project)))
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(**train_overrides), sort_keys=False))
    for command in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        subprocess.run(command, cwd=project, check=True, env={**os.environ, "PATH": venv_path()})
    return project


def venv_path() -> str:
    """PATH with this interpreter's folder first, so `signflow` and `dvc` are this venv's."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def section(name: str, **overrides: Any):
    """One section of a tiny run's params (every key from params.yaml) as its typed config, with
    `overrides` applied; e.g. section("evaluate", gallery_size=3)."""
    from signflow.config import Params

    return Params.model_fields[name].annotation.model_validate(_merged(tiny_params()[name], overrides))


def _merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied; the nested section train.augment is merged key by key, any other
    value (a sweep grid, say) is replaced whole."""
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = {**base[key], **value} if key == "augment" else value
    return merged


def train_config(**overrides: Any):
    """The train section of a tiny run (a tiny timm model, 32 px, no weights) with `overrides` applied."""
    return section("train", **overrides)


def augment_config(**overrides: Any):
    return train_config(augment=overrides).augment


def small_timm_model(name: str, num_classes: int):
    """A timm model with random weights; VGG's 100M-parameter pre-logits MLP is shrunk to a sliver
    (its blocks and group structure, which the tests are about, stay those of the real model)."""
    import timm

    extra = {"mlp_ratio": 1 / 64} if name.startswith("vgg") else {}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **extra)


class CodeRunningPickle:
    """Unpickling this runs `touch marker`: what a malicious checkpoint would do to the loader."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EtagServer:
    """One file served over HTTP on 127.0.0.1 with an ETag (its md5), Last-Modified and Content-Length,
    like a CDN (behind HTTP Basic authentication when `login` is given); `publish` replaces it (new
    ETag), `stop` makes it unreachable. `complete_bodies` counts GETs whose whole body was sent: DVC's
    existence checks open a GET and drop it after the headers."""

    def __init__(self, payload: bytes, name: str = "dataset.zip", login: tuple[str, str] | None = None):
        import base64
        import http.server
        import threading

        self.name, self.complete_bodies, self.requests = name, 0, []
        expected = f"Basic {base64.b64encode(':'.join(login).encode()).decode()}" if login else None
        self.publish(payload)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _headers(self) -> bool:
                server.requests.append(f"{self.command} {self.path}")
                if self.path.split("?")[0] != f"/{server.name}":
                    self.send_error(404)
                    return False
                if expected and self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="data"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return False
                self.send_response(200)
                self.send_header("ETag", f'"{server.etag}"')
                self.send_header("Last-Modified", server.modified)
                self.send_header("Content-Length", str(len(server.payload)))
                self.end_headers()
                return True

            def do_HEAD(self):  # noqa: N802 - http.server's naming
                self._headers()

            def do_GET(self):  # noqa: N802
                if not self._headers():
                    return
                try:
                    for start in range(0, len(server.payload), 1 << 16):
                        self.wfile.write(server.payload[start : start + (1 << 16)])
                    self.wfile.flush()
                    server.complete_bodies += 1
                except OSError:
                    pass  # the client dropped it after the headers

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/{name}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def publish(self, payload: bytes) -> None:
        import hashlib
        import time
        from email.utils import formatdate

        self.payload, self.etag = payload, hashlib.md5(payload).hexdigest()
        self.modified = formatdate(time.time(), usegmt=True)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def padded_archive(class_root: Path, archive: Path, padding_mb: int = 16) -> bytes:
    """The upstream-style zip of `class_root` plus incompressible padding, so that a real download
    (whole body) is told apart from an existence check (headers and the first chunks only)."""
    pack_upstream_zip(class_root, archive)
    with zipfile.ZipFile(archive, "a") as bundle:
        bundle.writestr("padding.bin", np.random.default_rng(0).bytes(padding_mb << 20), zipfile.ZIP_STORED)
    return archive.read_bytes()


def image_split(folder: Path, name: str, count: int, seed: int, size: int = 32, classes: int = 3):
    """A split of `count` random-noise PNGs of `size` px (decoded at that size, they are exactly
    these pixels) with random labels, as training reads it (signflow._training_data.SplitFiles)."""
    import hashlib

    import torch

    from signflow._training_data import SplitFiles

    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / name / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    labels = torch.from_numpy(rng.integers(0, classes, count)).long()
    return SplitFiles(name, paths, hashes, labels)


# Photo-like pictures for near-duplicate tests: smooth backgrounds with a shape on them.


def scene(rng: np.random.Generator, size: int = 100) -> np.ndarray:
    """A smooth random background (colour gradient and blurred blobs), like a photo's backdrop."""
    start, end = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    ramp = np.linspace(0, 1, size)
    angle = rng.uniform(0, 2 * np.pi)
    mix = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    mix = (mix - mix.min()) / np.ptp(mix)
    base = start * (1 - mix[..., None]) + end * mix[..., None]
    blobs = Image.fromarray(rng.uniform(0, 255, (size // 4, size // 4)).astype(np.uint8)).resize((size, size))
    blobs = np.asarray(blobs.filter(ImageFilter.GaussianBlur(3)), dtype=np.float64) - 128
    return np.clip(base + blobs[..., None] * 0.6, 0, 255)


def with_shape(background: np.ndarray, x: float, y: float, angle: float, colour) -> Image.Image:
    """A square (the 'hand') drawn on the background at (x, y), turned by `angle` degrees."""
    image = Image.fromarray(background.astype(np.uint8))
    corners = np.deg2rad(angle) + np.pi / 2 * np.arange(4)
    points = [(x + 22 * np.cos(c), y + 22 * np.sin(c)) for c in corners]
    ImageDraw.Draw(image).polygon(points, fill=tuple(int(v) for v in colour))
    return image


def photo(rng: np.random.Generator) -> Image.Image:
    return with_shape(scene(rng), *rng.uniform(35, 65, 2), rng.uniform(0, 90), rng.uniform(0, 255, 3))


def reencoded(image: Image.Image, quality: int = 60) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def video(rng: np.random.Generator, frames: int = 10) -> list[Image.Image]:
    """A shape moving 1.5 px and turning 3 degrees per frame over a fixed background, with sensor noise."""
    background, colour = scene(rng), rng.uniform(0, 255, 3)
    x, y, angle = 40.0, 45.0, rng.uniform(0, 90)
    clip = []
    for frame in range(frames):
        image = with_shape(background, x + 1.5 * frame, y + 0.5 * frame, angle + 3 * frame, colour)
        noisy = np.asarray(image, dtype=np.float64) + rng.normal(0, 3, (100, 100, 3))
        clip.append(reencoded(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), 85))
    return clip
