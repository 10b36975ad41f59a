"""Near-duplicate detection on synthetic data made in the test: edited copies and video frames are
clustered, distinct pictures of one class are not, and the hash is the DCT perceptual hash."""

import json

import numpy as np
import pytest
from PIL import Image

from signflow._near_duplicates import components, image_hashes, near_pairs
from signflow.split import split_dataset
from tests.helpers import photo, reencoded, section, video


def cropped(image: Image.Image, keep: float = 0.9) -> Image.Image:
    margin = image.width * (1 - keep) / 2
    return image.resize(
        image.size, Image.Resampling.LANCZOS, box=(margin, margin, image.width - margin, image.height - margin)
    )


def brightened(image: Image.Image, factor: float) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) * factor + 0.5, 0, 255).astype(np.uint8))


def shifted(image: Image.Image, dx: int, dy: int) -> Image.Image:
    """The camera moved by (dx, dy) pixels; the uncovered border repeats the edge."""
    pixels = np.pad(np.asarray(image), ((2, 2), (2, 2), (0, 0)), mode="edge")
    return Image.fromarray(pixels[2 - dy : 2 - dy + image.height, 2 - dx : 2 - dx + image.width])


EDITS = {
    "jpeg60": lambda image: reencoded(image, 60),
    "crop90": cropped,
    "bright115": lambda image: brightened(image, 1.15),
    "bright85": lambda image: brightened(image, 0.85),
    "shift2x": lambda image: shifted(image, 2, 0),
    "shift2y": lambda image: shifted(image, 0, -2),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """raw/<class>/: per class 4 photos with every edit, 16 distinct photos, one 10-frame video.
    Returns the raw folder and the clusters expected (as sets of paths)."""
    rng = np.random.default_rng(13)
    raw = tmp_path_factory.mktemp("near") / "raw"
    expected = []
    for label in ("a", "b"):
        (raw / label).mkdir(parents=True)
        for index in range(20):
            image = photo(rng)
            image.save(raw / label / f"photo{index:02d}.png")
            if index < 4:
                for name, edit in EDITS.items():
                    edit(image).save(raw / label / f"photo{index:02d}_{name}.png")
                expected.append({f"{label}/photo{index:02d}{suffix}.png" for suffix in ["", *(f"_{n}" for n in EDITS)]})
        for frame, image in enumerate(video(rng)):
            image.save(raw / label / f"clip_{frame:02d}.jpg")
        expected.append({f"{label}/clip_{frame:02d}.jpg" for frame in range(10)})
    return raw, expected


def test_edited_copies_and_video_frames_are_clustered_and_distinct_photos_are_not(dataset, tmp_path):
    raw, expected = dataset
    split_dataset(raw, tmp_path / "split", section("split", near_duplicates="report"))
    report = json.loads((tmp_path / "split" / "report.json").read_text())
    clusters = [set(cluster["images"]) for cluster in report["near_duplicates"]["clusters"]]
    assert sorted(map(sorted, clusters)) == sorted(map(sorted, expected))


def test_grouped_split_keeps_every_cluster_in_one_split(dataset, tmp_path):
    raw, expected = dataset
    result = split_dataset(raw, tmp_path / "split", section("split", near_duplicates="group", seed=5))
    report = json.loads((tmp_path / "split" / "report.json").read_text())
    assert all(len(cluster["splits"]) == 1 for cluster in report["near_duplicates"]["clusters"])
    assert report["near_duplicates"]["test_images_with_train_near_duplicate"] == []
    assert "0 of" in result.description and "each kept within one split" in result.description


def test_hash_is_the_dct_perceptual_hash():
    """Bit for bit the definition imagehash.phash(image, hash_size=16) implements: 64x64 grayscale
    (LANCZOS), unnormalised DCT-II along both axes, the 16x16 lowest frequencies above their median."""
    rng = np.random.default_rng(0)
    n = np.arange(64)
    dct = 2 * np.cos(np.pi * (2 * n[None, :] + 1) * np.arange(16)[:, None] / 128)
    for _ in range(5):
        image = photo(rng)
        pixels = np.asarray(image.convert("L").resize((64, 64), Image.Resampling.LANCZOS), dtype=np.float64)
        low = dct @ pixels @ dct.T
        bits = (low > np.median(low)).ravel()
        assert np.array_equal(np.unpackbits(image_hashes(image)[0].astype(">u8").view(np.uint8)).astype(bool), bits)


def test_pairs_are_searched_within_a_class_and_chained_into_clusters():
    rng = np.random.default_rng(1)
    frames = video(rng, frames=6)
    hashes = np.stack([image_hashes(image) for image in [*frames, *frames[:2]]])
    classes = np.array([0] * 6 + [1, 1])
    pairs, distances = near_pairs(hashes, classes, 52)
    assert not any(classes[i] != classes[j] for i, j in pairs), "a copy with another label is not paired"
    assert (distances <= 52).all()
    label = components(len(hashes), pairs)
    assert len(set(label[:6])) == 1 and label[6] == label[7] != label[0]
