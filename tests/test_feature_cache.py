import math

import pytest
import torch

from signflow._feature_cache import compute_features, onnx_prefix, split_model
from signflow._model import apply_freeze_policy, create_model, preprocessing_for
from signflow._runners import CachedRunner, PlainRunner, SplitTensors, create_runner
from signflow.config import TrainConfig
from signflow.train import create_optimizer
from tests.helpers import augment_config, small_timm_model, train_config


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
    )
    return train_config(**{**base, **kw})


def data(n: int, seed: int) -> SplitTensors:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return SplitTensors(images, torch.randint(0, 3, (n,), generator=generator))


def _train_one_epoch(runner_cls, config: TrainConfig):
    torch.manual_seed(0)
    model = create_model(config, num_classes=3)
    apply_freeze_policy(model, config.trainable_blocks)
    prep = preprocessing_for(model, 32)
    train, valid = data(24, 1), data(8, 2)
    generator = torch.Generator().manual_seed(5)
    if runner_cls is CachedRunner:
        example = torch.randn(2, 3, 32, 32)
        runner = CachedRunner(
            split_model(model, example), model, train, valid, prep, config, torch.device("cpu"), generator
        )
    else:
        runner = PlainRunner(model, train, valid, prep, config, torch.device("cpu"))
    optimizer = create_optimizer(config, model)
    loss, accuracy = runner.train_epoch(optimizer, torch.Generator().manual_seed(9), 1)
    return model, loss, runner.validate()


def test_cached_tail_training_equals_the_plain_loop_without_augmentation():
    config = cfg(augment={"enabled": False}, cache_runtime="torch")
    plain, plain_loss, plain_valid = _train_one_epoch(PlainRunner, config)
    cached, cached_loss, cached_valid = _train_one_epoch(CachedRunner, config)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-4)
    assert cached_valid[0] == pytest.approx(plain_valid[0], rel=1e-4)
    for (name, a), (_, b) in zip(plain.state_dict().items(), cached.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_split_is_refused_for_full_fine_tune_and_used_when_frozen():
    model = create_model(cfg(), num_classes=3)
    apply_freeze_policy(model, "all")
    assert split_model(model, torch.randn(2, 3, 32, 32)) is None
    apply_freeze_policy(model, 2)
    split = split_model(model, torch.randn(2, 3, 32, 32))
    assert split is not None and split.cut_name.startswith("blocks.")
    assert not any(p.requires_grad for p in split.prefix.parameters())


def test_create_runner_falls_back_when_caching_is_off_or_impossible():
    config = cfg(cache_frozen_features=False)
    model = create_model(config, num_classes=3)
    apply_freeze_policy(model, 2)
    prep = preprocessing_for(model, 32)
    args = (model, data(8, 1), data(4, 2), prep)
    assert type(create_runner(*args, config, torch.device("cpu"), torch.Generator())) is PlainRunner
    config = cfg(cache_frozen_features=True, cached_views=2)
    assert type(create_runner(*args, config, torch.device("cpu"), torch.Generator())) is CachedRunner
    apply_freeze_policy(model, "all")
    assert type(create_runner(*args, config, torch.device("cpu"), torch.Generator())) is PlainRunner


def test_head_only_training_caches_pooled_features_with_channels_last():
    """trainable_blocks 0 cuts after global pooling: (N, C) features, where channels_last does not apply."""
    config = cfg(trainable_blocks=0, channels_last=True, cached_views=2)
    model = create_model(config, num_classes=3)
    apply_freeze_policy(model, 0)
    model = model.to(memory_format=torch.channels_last)
    prep = preprocessing_for(model, 32)
    runner = create_runner(model, data(8, 1), data(4, 2), prep, config, torch.device("cpu"), torch.Generator())
    assert type(runner) is CachedRunner
    assert runner.train_views[0].dim() == 2
    runner.train_epoch(create_optimizer(config, model), torch.Generator().manual_seed(1), 1)
    plain = PlainRunner(model, runner.train_data, runner.valid_data, prep, config, torch.device("cpu"))
    assert runner.validate() == pytest.approx(plain.validate(), rel=1e-4), "the cached validation is the model's own"


def test_onnx_runtime_prefix_gives_the_torch_features_and_the_same_training():
    """cache_runtime onnxruntime (the CPU default) and torch cache the same features, train the same."""
    config = cfg(cached_views=2, trainable_blocks=2, lr=1e-4)
    results = {}
    for runtime in ("torch", "onnxruntime"):
        torch.manual_seed(0)
        model = create_model(config, num_classes=3)
        apply_freeze_policy(model, config.trainable_blocks)
        prep = preprocessing_for(model, 32)
        runner = create_runner(
            model,
            data(24, 1),
            data(8, 2),
            prep,
            config.model_copy(update={"cache_runtime": runtime}),
            torch.device("cpu"),
            torch.Generator().manual_seed(3),
        )
        assert type(runner) is CachedRunner and runner.prefix_runtime == runtime
        loss, _ = runner.train_epoch(create_optimizer(config, model), torch.Generator().manual_seed(9), 1)
        results[runtime] = (runner.train_views, runner.valid_features, loss)
    for a, b in zip(results["torch"][0], results["onnxruntime"][0], strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(results["torch"][1], results["onnxruntime"][1], atol=1e-4)
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
def test_other_families_cache_through_onnx_runtime_and_train(name):
    """No weights, small images: the ONNX Runtime cache path is exact enough and trains for these too."""
    config = cfg(model=name, trainable_blocks=1, cached_views=1)
    model = small_timm_model(name, num_classes=3)
    apply_freeze_policy(model, config.trainable_blocks)
    prep = preprocessing_for(model, 32)
    train = data(8, 1)
    runner = create_runner(model, train, data(4, 2), prep, config, torch.device("cpu"), torch.Generator())
    assert type(runner) is CachedRunner and runner.prefix_runtime == "onnxruntime"
    torch_view = compute_features(
        runner.split.prefix,
        train.images,
        prep,
        batch_size=8,
        device=torch.device("cpu"),
        memory_format=torch.contiguous_format,
        augment_cfg=config.augment,
        generator=torch.Generator(),
    )
    assert torch.allclose(runner.train_views[0], torch_view, atol=1e-3, rtol=1e-3)
    loss, _ = runner.train_epoch(create_optimizer(config, model), torch.Generator().manual_seed(1), 1)
    assert math.isfinite(loss) and 0 <= runner.validate()[1] <= 1
