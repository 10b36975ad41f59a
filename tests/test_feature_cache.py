import math

import pytest
import torch

from signflow._feature_cache import FeatureCache, compute_features, cut_model, onnx_prefix
from signflow._model import apply_freeze_policy, create_model, preprocessing_for
from signflow._preprocessing import load_images
from signflow._runners import CachedRunner, PlainRunner, create_runner
from signflow._training_data import TrainingData
from signflow.train import create_optimizer
from tests.helpers import augment_config, image_split, small_timm_model, train_config

CPU = torch.device("cpu")


def cfg(**kw):
    base = dict(
        model="mobilenetv2_100",
        pretrained=False,
        image_size=32,
        batch_size=8,
        epochs=1,
        lr=1e-2,
        trainable_blocks=3,
        channels_last=False,
        loader_workers=0,
        inference_batch_size=8,
        cache_dtype="float32",
    )
    return train_config(**{**base, **kw})


@pytest.fixture
def splits(tmp_path):
    """24 train and 8 valid noise images of 32 px, 3 classes."""
    return image_split(tmp_path / "images", "train", 24, seed=1), image_split(tmp_path / "images", "valid", 8, seed=2)


def model_and_prep(config, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(config, num_classes=3)
    apply_freeze_policy(model, config.trainable_blocks)
    return model, preprocessing_for(model, config.image_size)


def _train_one_epoch(runner_cls, config, splits, cache):
    model, prep = model_and_prep(config)
    data = TrainingData(cache, prep, *splits)
    generator = torch.Generator().manual_seed(5)
    if runner_cls is CachedRunner:
        cut = cut_model(model, torch.randn(2, 3, 32, 32))
        runner = CachedRunner(cut, model, data, prep, config, CPU, generator)
    else:
        runner = PlainRunner(model, data, prep, config, CPU)
    optimizer = create_optimizer(config, model)
    loss, accuracy = runner.train_epoch(optimizer, torch.Generator().manual_seed(9), 1)
    return model, loss, runner.validate()


def test_cached_tail_training_equals_the_plain_loop_without_augmentation(splits, tmp_path):
    config = cfg(augment={"enabled": False}, cache_runtime="torch")
    plain, plain_loss, plain_valid = _train_one_epoch(PlainRunner, config, splits, tmp_path / "a")
    cached, cached_loss, cached_valid = _train_one_epoch(CachedRunner, config, splits, tmp_path / "b")
    assert cached_loss == pytest.approx(plain_loss, rel=1e-4)
    assert cached_valid[0] == pytest.approx(plain_valid[0], rel=1e-4)
    for (name, a), (_, b) in zip(plain.state_dict().items(), cached.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_loader_worker_processes_only_read_so_training_is_the_same(splits, tmp_path):
    """The plain loop with batches read in a worker process trains exactly as reading in-process."""
    results = []
    for workers in (0, 1):
        config = cfg(trainable_blocks="all", loader_workers=workers)
        model, loss, valid = _train_one_epoch(PlainRunner, config, splits, tmp_path / f"w{workers}")
        results.append((loss, valid, model.state_dict()))
    assert results[0][:2] == results[1][:2]
    for name, tensor in results[0][2].items():
        assert torch.equal(tensor, results[1][2][name]), name


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_disk_cached_features_are_the_in_memory_ones_and_a_rerun_reuses_them(splits, tmp_path, dtype, monkeypatch):
    """What the runner reads back from the cache files is what computing the views in memory gives
    (exactly in float32, to float16's precision in float16), the generator ends where drawing the
    views leaves it, and a second run with the same inputs computes nothing."""
    config = cfg(cached_views=2, epochs=2, cache_dtype=dtype, cache_runtime="torch", trainable_blocks=2)
    model, prep = model_and_prep(config)
    data = TrainingData(tmp_path / "cache", prep, *splits)
    generator = torch.Generator().manual_seed(3)
    runner = create_runner(model, data, prep, config, CPU, generator)
    assert type(runner) is CachedRunner and runner.views == 2

    # The in-memory path: the whole split decoded into one tensor, the views computed from it.
    images, drawn = load_images(splits[0].paths, prep), torch.Generator().manual_seed(3)
    chunks = lambda: images.split(config.inference_batch_size)  # noqa: E731
    expected = [
        torch.cat(
            list(compute_features(runner.cut.prefix, chunks(), prep, CPU, runner.memory_format, config.augment, drawn))
        )
        for _ in range(2)
    ]
    assert torch.equal(generator.get_state(), drawn.get_state())

    def read_view(features, view: int) -> torch.Tensor:
        rows = features.array.read_range(view * 24, (view + 1) * 24)
        return features.layout.to_tensor(torch.from_numpy(rows)).float()

    for view in range(2):
        actual = read_view(runner.train_features, view)
        if dtype == "float32":
            assert torch.equal(actual, expected[view])
        else:
            assert torch.allclose(actual, expected[view], rtol=1e-3, atol=1e-6)
            assert not torch.equal(actual, expected[view]), "float16 rounds"
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 4, "train and valid images, train and valid features"

    def must_not_run(*args, **kwargs):
        raise AssertionError("features were computed again")

    monkeypatch.setattr("signflow._feature_cache.compute_features", must_not_run)
    again_generator = torch.Generator().manual_seed(3)
    again = create_runner(model, TrainingData(tmp_path / "cache", prep, *splits), prep, config, CPU, again_generator)
    assert torch.equal(read_view(again.train_features, 1), read_view(runner.train_features, 1))
    assert torch.equal(again_generator.get_state(), drawn.get_state()), "a reused cache moves the generator on"


def test_a_changed_input_makes_a_new_cache_entry(splits, tmp_path):
    """Images, image size, weights, cut point, view seed, views and number format are all in the key."""
    base = cfg(cached_views=2, epochs=2, trainable_blocks=2)

    def keys(config, image_splits=splits, weights_seed=0, generator_seed=3):
        model, prep = model_and_prep(config, weights_seed)
        data = TrainingData(tmp_path / "cache", prep, *image_splits)
        cut = cut_model(model, torch.randn(2, 3, config.image_size, config.image_size))
        cache = FeatureCache(cut, data, config, CPU, torch.Generator().manual_seed(generator_seed))
        return {"images": data.entries["train"].key, **{n: e.key for n, e in cache.entries.items()}}

    reference = keys(base)
    assert keys(base) == reference, "same inputs, same entries"
    other = image_split(tmp_path / "other", "train", 24, seed=7)
    assert keys(base, image_splits=(other, splits[1])).keys() == reference.keys()
    changed = {
        "images": keys(base, image_splits=(other, splits[1])),
        "image size": keys(cfg(cached_views=2, epochs=2, trainable_blocks=2, image_size=48)),
        "weights": keys(base, weights_seed=1),
        "cut point": keys(cfg(cached_views=2, epochs=2, trainable_blocks=3)),
        "view seed": keys(base, generator_seed=4),
        "views": keys(cfg(cached_views=3, epochs=3, trainable_blocks=2)),
        "number format": keys(cfg(cached_views=2, epochs=2, trainable_blocks=2, cache_dtype="float16")),
    }
    for what, new in changed.items():
        assert new["train"] != reference["train"], what
    assert changed["images"]["images"] != reference["images"]
    assert changed["weights"]["images"] == reference["images"], "new weights reuse the decoded images"
    assert changed["view seed"]["valid"] == reference["valid"], "the valid split has no augmented views"


def test_a_changed_image_is_computed_again_not_reused(splits, tmp_path):
    config = cfg(cached_views=1, trainable_blocks=2)
    model, prep = model_and_prep(config)
    create_runner(model, TrainingData(tmp_path / "cache", prep, *splits), prep, config, CPU, torch.Generator())
    other = image_split(tmp_path / "other", "train", 24, seed=7)
    runner = create_runner(
        model, TrainingData(tmp_path / "cache", prep, other, splits[1]), prep, config, CPU, torch.Generator()
    )
    assert len(list((tmp_path / "cache").glob("images-*.bin"))) == 3
    assert len(list((tmp_path / "cache").glob("features-*.bin"))) == 3
    decoded = runner.data.images("train").read_range(0, 24)
    assert (decoded == load_images(other.paths, prep).numpy()).all()


def test_the_cut_is_refused_for_full_fine_tune_and_used_when_frozen():
    model = create_model(cfg(), num_classes=3)
    apply_freeze_policy(model, "all")
    assert cut_model(model, torch.randn(2, 3, 32, 32)) is None
    apply_freeze_policy(model, 2)
    cut = cut_model(model, torch.randn(2, 3, 32, 32))
    assert cut is not None and cut.cut_name.startswith("blocks.")
    assert not any(p.requires_grad for p in cut.prefix.parameters())


def test_create_runner_falls_back_when_caching_is_off_or_impossible(splits, tmp_path):
    config = cfg(cache_frozen_features=False)
    model = create_model(config, num_classes=3)
    apply_freeze_policy(model, 2)
    prep = preprocessing_for(model, 32)
    data = TrainingData(tmp_path / "cache", prep, *splits)
    assert type(create_runner(model, data, prep, config, CPU, torch.Generator())) is PlainRunner
    config = cfg(cache_frozen_features=True, cached_views=2)
    assert type(create_runner(model, data, prep, config, CPU, torch.Generator())) is CachedRunner
    apply_freeze_policy(model, "all")
    assert type(create_runner(model, data, prep, config, CPU, torch.Generator())) is PlainRunner


def test_head_only_training_caches_pooled_features_with_channels_last(splits, tmp_path):
    """trainable_blocks 0 cuts after global pooling: (N, C) features, where channels_last does not apply."""
    config = cfg(trainable_blocks=0, channels_last=True, cached_views=2, epochs=2)
    model = create_model(config, num_classes=3)
    apply_freeze_policy(model, 0)
    model = model.to(memory_format=torch.channels_last)
    prep = preprocessing_for(model, 32)
    data = TrainingData(tmp_path / "cache", prep, *splits)
    runner = create_runner(model, data, prep, config, CPU, torch.Generator())
    assert type(runner) is CachedRunner
    assert runner.train_features.array.spec.row_shape == (model.num_features,)
    runner.train_epoch(create_optimizer(config, model), torch.Generator().manual_seed(1), 1)
    plain = PlainRunner(model, data, prep, config, CPU)
    assert runner.validate() == pytest.approx(plain.validate(), rel=1e-4), "the cached validation is the model's own"


def test_channels_last_features_read_back_with_channels_last_strides(splits, tmp_path):
    config = cfg(channels_last=True, trainable_blocks=2, cache_dtype="float32")
    model, prep = model_and_prep(config)
    model = model.to(memory_format=torch.channels_last)
    runner = create_runner(model, TrainingData(tmp_path / "cache", prep, *splits), prep, config, CPU, torch.Generator())
    rows = torch.from_numpy(runner.train_features.array.read_rows([3, 1]))
    batch = runner.batch_inputs(rows, torch.Generator(), 1)
    assert batch.dim() == 4 and batch.is_contiguous(memory_format=torch.channels_last)
    assert batch.dtype == torch.float32


def test_onnx_runtime_prefix_gives_the_torch_features_and_the_same_training(splits, tmp_path):
    """cache_runtime onnxruntime (the CPU default) and torch cache the same features, train the same."""
    config = cfg(cached_views=2, epochs=2, trainable_blocks=2, lr=1e-4, cache_dtype="float32")
    results = {}
    for runtime in ("torch", "onnxruntime"):
        model, prep = model_and_prep(config)
        runner = create_runner(
            model,
            TrainingData(tmp_path / runtime, prep, *splits),
            prep,
            config.model_copy(update={"cache_runtime": runtime}),
            CPU,
            torch.Generator().manual_seed(3),
        )
        assert type(runner) is CachedRunner and runner.prefix_runtime == runtime
        loss, _ = runner.train_epoch(create_optimizer(config, model), torch.Generator().manual_seed(9), 1)
        train, valid = runner.train_features.array, runner.valid_features.array
        results[runtime] = (train.read_range(0, len(train)), valid.read_range(0, len(valid)), loss)
    for a, b in zip(results["torch"][:2], results["onnxruntime"][:2], strict=True):
        assert torch.allclose(torch.from_numpy(a), torch.from_numpy(b), atol=1e-4)
    assert results["onnxruntime"][2] == pytest.approx(results["torch"][2], rel=1e-3)


def test_onnx_prefix_falls_back_to_none_when_export_fails(caplog):
    class NotExportable(torch.nn.Module):
        def forward(self, x):
            return torch.from_numpy(x.numpy() * 2)  # leaves the graph: the exporter cannot trace it

    with caplog.at_level("WARNING"):
        assert onnx_prefix(NotExportable(), torch.randn(2, 3, 8, 8), threads=1) is None
    assert "using PyTorch" in caplog.text


def test_augment_matches_an_affine_grid_crop_and_flip_mirrors():
    from signflow._augment import augment

    images = torch.randint(0, 256, (4, 3, 12, 10), generator=torch.Generator().manual_seed(0)).float()
    config = augment_config(scale_min=0.5, color_jitter=0.0)
    crop = augment(images.clone(), config, torch.Generator().manual_seed(1))
    # the same draws, through torch's affine_grid (what the broadcast grid replaces)
    rand = torch.Generator().manual_seed(1)
    area = 0.5 + 0.5 * torch.rand(4, generator=rand)
    ratio = torch.exp((torch.rand(4, generator=rand) * 2 - 1) * math.log(4 / 3))
    sx, sy = torch.sqrt(area * ratio).clamp(max=1.0), torch.sqrt(area / ratio).clamp(max=1.0)
    tx, ty = (torch.rand(4, generator=rand) * 2 - 1) * (1 - sx), (torch.rand(4, generator=rand) * 2 - 1) * (1 - sy)
    theta = torch.zeros(4, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    expected = torch.nn.functional.grid_sample(images, grid, padding_mode="reflection", align_corners=False)
    assert torch.allclose(crop, expected, atol=1e-3)
    mirrored = augment(images.clone(), config.model_copy(update={"hflip": 1.0}), torch.Generator().manual_seed(1))
    assert torch.allclose(mirrored, crop.flip(-1), atol=1e-3)
    jittered = augment(images.clone(), augment_config(scale_min=0.5, color_jitter=0.5), torch.Generator())
    assert jittered.shape == images.shape and 0 <= jittered.min() and jittered.max() <= 255


@pytest.mark.parametrize("name", ["vgg16", "mobilenetv3_large_100"])
def test_other_families_cache_through_onnx_runtime_and_train(name, splits, tmp_path):
    """No weights, small images: the ONNX Runtime cache path is exact enough and trains for these too."""
    config = cfg(model=name, trainable_blocks=1, cached_views=1, cache_dtype="float32")
    model = small_timm_model(name, num_classes=3)
    apply_freeze_policy(model, config.trainable_blocks)
    prep = preprocessing_for(model, 32)
    data = TrainingData(tmp_path / "cache", prep, *splits)
    runner = create_runner(model, data, prep, config, CPU, torch.Generator())
    assert type(runner) is CachedRunner and runner.prefix_runtime == "onnxruntime"
    chunks = load_images(splits[0].paths, prep).split(8)
    torch_view = torch.cat(
        list(
            compute_features(
                runner.cut.prefix, chunks, prep, CPU, torch.contiguous_format, config.augment, torch.Generator()
            )
        )
    )
    cached = runner.train_features
    stored = cached.layout.to_tensor(torch.from_numpy(cached.array.read_range(0, 24)))
    assert torch.allclose(stored, torch_view, atol=1e-3, rtol=1e-3)
    loss, _ = runner.train_epoch(create_optimizer(config, model), torch.Generator().manual_seed(1), 1)
    assert math.isfinite(loss) and 0 <= runner.validate()[1] <= 1


def test_a_rerun_on_the_cache_and_a_resumed_run_train_the_model_of_a_fresh_run(tiny_zip, tmp_path, monkeypatch):
    """The train step on the frozen-feature cache: a second run reuses the cached views (the generator
    moved on as if it had drawn them) and trains the same weights; so does an interrupted run resumed
    on the cache, and a run with a temporary cache folder."""
    from signflow._model_file import load_bundle
    from signflow.config import parse_params
    from signflow.extract import extract_dataset
    from signflow.split import split_dataset
    from signflow.train import train_model
    from tests.helpers import tiny_params

    params = parse_params(tiny_params(epochs=3, trainable_blocks=1, cached_views=2, loader_workers=0))
    raw, split, cache = tmp_path / "raw", tmp_path / "split", tmp_path / "cache"
    extract_dataset(tiny_zip, raw, params.extract)
    split_dataset(raw, split, params.split)

    def train(name: str, cache_dir):
        train_model(params.train, raw, split, tmp_path / f"{name}.pt", tmp_path / f"{name}.csv", cache_dir)
        return load_bundle(tmp_path / f"{name}.pt").fingerprint()

    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the temporary cache goes
    fresh = train("fresh", None)
    assert not list(tmp_path.glob("signflow-cache-*")), "the temporary cache is removed"
    assert train("first", cache) == fresh
    assert train("reused", cache) == fresh
    original = CachedRunner.train_epoch

    def interrupt_at_epoch_2(self, optimizer, generator, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, optimizer, generator, epoch)

    monkeypatch.setattr(CachedRunner, "train_epoch", interrupt_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train("resumed", cache)
    monkeypatch.setattr(CachedRunner, "train_epoch", original)
    assert train("resumed", cache) == fresh
