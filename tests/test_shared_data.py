"""Checks on the real Sign Language Digits archive; skipped when ../shared is absent."""

import pandas as pd

from signflow.config import DownloadConfig, SplitConfig
from signflow.download import download_dataset
from signflow.split import split_dataset

UPSTREAM_COUNTS = [205, 206, 206, 206, 207, 207, 207, 206, 208, 204]


def test_real_archive_downloads_and_splits_stratified(shared_dir, tmp_path):
    info = download_dataset(
        DownloadConfig(url=str(shared_dir / "datasets" / "sign-language-digits.zip")), tmp_path / "raw"
    )
    assert info.class_names == [str(d) for d in range(10)]
    assert [info.counts[c] for c in info.class_names] == UPSTREAM_COUNTS
    assert not list((tmp_path / "raw").rglob("example_*"))
    result = split_dataset(tmp_path / "raw", tmp_path / "split", SplitConfig(train=0.7, valid=0.15, test=0.15))
    assert sum(result.counts.values()) + result.excluded == 2062
    train = pd.read_csv(tmp_path / "split" / "train.csv")
    sideways = train[train["path"].str.contains("IMG_5874|IMG_5935|IMG_5978")]
    assert (sideways["width"] == sideways["height"]).all()
