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
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
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


def tiny_params(url: str | Path, **train_overrides) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["download"].update(url=str(url), sha256=None, retries=0)
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


def make_project(tmp_path: Path, url: str | Path, **train_overrides) -> Path:
    """A git + DVC repo holding this project's dvc.yaml and a params.yaml for the tiny dataset."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(url, **train_overrides), sort_keys=False))
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

    return Params.model_fields[name].annotation.model_validate(_merged(tiny_params("x.zip")[name], overrides))


def _merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied; nested mappings (train.augment) are merged key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = (
            _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
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
