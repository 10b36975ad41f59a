"""Reading images the way every step must: EXIF orientation applied, any mode converted to RGB,
and images too large or too oddly shaped to be worth decoding refused with a reason."""

from __future__ import annotations

from collections.abc import Callable
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

PILLOW_PIXEL_LIMIT = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
"""Pillow refuses larger images as decompression bombs when it opens them. `split.max_pixels` may
not exceed it, so every image the split accepts can be decoded by the later steps."""
DEFAULT_MAX_PIXELS = 50_000_000
"""split.max_pixels's default in params.yaml: the limit of a model file or split folder from before
they recorded the split.max_pixels they were made with."""
PILLOW_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
"""Pillow's own refusal at open, and its warning, which a warnings filter may turn into an error."""
READ_ERRORS = (OSError, ValueError, SyntaxError)
"""What Pillow raises for a file it cannot read (load_rgb turns its bomb refusals into ImageRefused)."""


class ImageRefused(ValueError):
    """An image that is readable but refused (too many pixels, absurd shape); the message says why."""


def unreadable_reason(error: Exception) -> str:
    """Why an image could not be decoded, for people. A damaged file can make Pillow raise nearly
    anything (a malformed TIFF: TypeError, OverflowError), so callers catch every Exception there."""
    if isinstance(error, READ_ERRORS):
        return str(error) or type(error).__name__
    return f"damaged or unsupported image file ({type(error).__name__}: {error})"


def is_image_name(path: str | Path) -> bool:
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def is_junk(path: str | Path) -> bool:
    parts = Path(path).parts
    return any(p.lower() in JUNK_DIRS or p.startswith("._") for p in parts) or Path(path).name.lower() in JUNK_NAMES


def split_folder_name(name: str) -> str | None:
    """`train`, `valid` or `test` when a folder of this name holds a split of the dataset, else None."""
    return SPLIT_FOLDER_NAMES.get(name.lower())


def load_rgb(path: str | Path, max_side: int | None = None, max_pixels: int = PILLOW_PIXEL_LIMIT) -> Image.Image:
    """Open, decode fully, rotate by EXIF and convert to 8-bit RGB.

    `max_side` shrinks large photos early (JPEG draft mode), which is what keeps a 3024x3024 image
    from costing 100x a 100x100 one. An image of more than `max_pixels` pixels is refused from its
    header, before decoding (Pillow's own limit only warns below twice its size, and draft mode
    shrinks only JPEGs: a 1 MB PNG can declare 170 megapixels). Raises OSError/ValueError
    (ImageRefused) for unusable files.
    """
    try:
        return _decode_rgb(path, max_side, max_pixels)
    except PILLOW_BOMB_ERRORS as error:
        raise ImageRefused(str(error)) from None


def _decode_rgb(
    path: str | Path, max_side: int | None, max_pixels: int, inspect: Callable[[Image.Image], None] | None = None
) -> Image.Image:
    # Outside `with` (which holds the opened image to its end), each step drops the image before it:
    # a 50-megapixel RGBA PNG peaks at 3 full copies (decoded, white background, composite), not 5,
    # and an RGB one at 1, not 3 (bench/serve_memory.py measures the served model's copy of this).
    image = _open_decoded(path, max_side, max_pixels, inspect)
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value * (1 / 256)).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        del image
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def _open_decoded(
    path: str | Path, max_side: int | None, max_pixels: int, inspect: Callable[[Image.Image], None] | None = None
) -> Image.Image:
    """The image decoded as stored (large JPEGs in draft mode), refused from its header when too large;
    `inspect` sees the opened image before anything is decoded (and may raise to refuse it)."""
    with Image.open(path) as image:
        if inspect is not None:
            inspect(image)
        if image.width * image.height > max_pixels:
            raise ImageRefused(
                f"{image.width}x{image.height} pixels is above the limit of {max_pixels:,} pixels (split.max_pixels); "
                "not decoded"
            )
        if max_side is not None and image.format == "JPEG":
            image.draft("RGB", (max_side, max_side))
        image.load()
    return image


def check_image(path: str | Path, max_pixels: int, max_aspect_ratio: float) -> tuple[int, int, Image.Image]:
    """Fully decode an image; return its (width, height) after EXIF rotation and the decoded RGB image
    (large JPEGs decoded at 256 px or more a side), so callers can use it without decoding again.
    Raise if it is unreadable, or ImageRefused (before decoding) if it has more than `max_pixels` pixels or its
    longer side is more than `max_aspect_ratio` times its shorter side. The file is opened once: the
    header is checked on the opened image before it is decoded."""
    header: dict[str, int] = {}

    def refuse_from_header(original: Image.Image) -> None:
        width, height = original.size
        if width == 0 or height == 0:
            raise ValueError("image has zero size")
        if width * height > max_pixels:
            raise ImageRefused(
                f"{width}x{height} is {width * height:,} pixels, above split.max_pixels ({max_pixels:,}); "
                "raise it to use this image"
            )
        if max(width, height) > max_aspect_ratio * min(width, height):
            raise ImageRefused(
                f"{width}x{height}: one side is {max(width, height) / min(width, height):,.0f} times the other, "
                f"above split.max_aspect_ratio ({max_aspect_ratio:g}); the centre square the model sees would be "
                "a sliver of it"
            )
        header.update(width=width, height=height, orientation=original.getexif().get(0x0112, 1))

    try:
        image = _decode_rgb(path, 256, max_pixels, refuse_from_header)
    except PILLOW_BOMB_ERRORS as error:
        raise ImageRefused(str(error)) from None
    width, height = header["width"], header["height"]
    width, height = (height, width) if header["orientation"] in (5, 6, 7, 8) else (width, height)
    return width, height, image
