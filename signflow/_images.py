"""Reading images the way every step must: EXIF orientation applied, any mode converted to RGB."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
JUNK_DIRS = frozenset({"__macosx", ".git", ".ipynb_checkpoints"})
SPLIT_FOLDER_NAMES = {
    **dict.fromkeys(("train", "training"), "train"),
    **dict.fromkeys(("valid", "validation", "val", "dev"), "valid"),
    **dict.fromkeys(("test", "testing", "eval"), "test"),
}
"""Folder names (compared case-insensitively) that mean a dataset ships its own split, and the split each names."""

MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
"""Pillow refuses larger images as decompression bombs when it opens them; checked here before decoding."""


def is_image_name(path: str | Path) -> bool:
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def is_junk(path: str | Path) -> bool:
    parts = Path(path).parts
    return any(p.lower() in JUNK_DIRS or p.startswith("._") for p in parts) or Path(path).name.lower() in JUNK_NAMES


def split_folder_name(name: str) -> str | None:
    """`train`, `valid` or `test` when a folder of this name holds a split of the dataset, else None."""
    return SPLIT_FOLDER_NAMES.get(name.lower())


def load_rgb(path: str | Path, max_side: int | None = None) -> Image.Image:
    """Open, decode fully, rotate by EXIF and convert to 8-bit RGB.

    `max_side` shrinks large photos early (JPEG draft mode), which is what keeps a 3024x3024 image
    from costing 100x a 100x100 one. Raises OSError/ValueError for unreadable files.
    """
    with Image.open(path) as image:
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"{image.width}x{image.height} pixels is above the limit of {MAX_PIXELS:,} pixels")
        if max_side is not None and image.format == "JPEG":
            image.draft("RGB", (max_side, max_side))
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = image.point(lambda value: value * (1 / 256)).convert("L")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        return image.convert("RGB")


def check_image(path: str | Path) -> tuple[int, int, Image.Image]:
    """Fully decode an image; return its (width, height) after EXIF rotation and the decoded RGB image
    (large JPEGs decoded at 256 px or more a side), so callers can use it without decoding again.
    Raise if unreadable."""
    image = load_rgb(path, max_side=256)
    with Image.open(path) as original:
        width, height = original.size
        orientation = original.getexif().get(0x0112, 1)
    if image.width == 0 or image.height == 0:
        raise ValueError("image has zero size")
    width, height = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return width, height, image
