"""The CUDA path: the frozen prefix in PyTorch on the GPU under bfloat16 autocast, batches read into
pinned memory and copied without blocking, channels_last inputs. Skipped without a CUDA device
(tests/conftest.py); the same code runs on the CPU in the other tests."""

import copy
import math

import pytest
import torch

from signflow._feature_cache import compute_features
from signflow._model import apply_freeze_policy, create_model, preprocessing_for
from signflow._preprocessing import load_images
from signflow._runners import CachedRunner, create_runner
from signflow._training_data import TrainingData
from signflow.train import create_optimizer
from tests.helpers import image_split, tiny_params, train_config

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def test_cached_training_on_cuda_runs_the_prefix_in_torch_and_reads_pinned_batches(tmp_path):
    config = train_config(
        model="mobilenetv2_100",
        image_size=32,
        trainable_blocks=2,
        cached_views=2,
        epochs=2,
        device="cuda",
        amp=True,
        channels_last=True,
        loader_workers=1,
        inference_batch_size=8,
    )
    torch.manual_seed(0)
    model = create_model(config, num_classes=3)
    apply_freeze_policy(model, config.trainable_blocks)
    model = model.to(CUDA, memory_format=torch.channels_last)
    prep = preprocessing_for(model, 32)
    splits = image_split(tmp_path / "images", "train", 24, seed=1), image_split(tmp_path / "images", "valid", 8, seed=2)
    runner = create_runner(
        model, TrainingData(tmp_path / "cache", prep, *splits), prep, config, CUDA, torch.Generator()
    )
    assert type(runner) is CachedRunner and runner.prefix_runtime == "torch"
    assert runner.loader().pin_memory

    loss, accuracy = runner.train_epoch(create_optimizer(config, model), torch.Generator().manual_seed(1), 1)
    assert math.isfinite(loss) and 0 <= runner.validate()[1] <= 1
    rows = next(iter(runner.loader()))  # the last epoch's first batch
    assert rows.is_pinned()
    batch = runner.batch_inputs(rows, torch.Generator(), 1)
    assert batch.device.type == "cuda" and batch.is_contiguous(memory_format=torch.channels_last)

    # The GPU's bfloat16 features are the CPU's float32 ones to bfloat16's precision.
    prefix_on_cpu = copy.deepcopy(runner.split.prefix).to("cpu")
    chunks = load_images(splits[0].paths, prep).split(8)
    cpu = torch.device("cpu")
    expected = torch.cat(
        list(compute_features(prefix_on_cpu, chunks, prep, cpu, torch.channels_last, config.augment, torch.Generator()))
    )
    stored = runner.train_features
    actual = stored.layout.to_tensor(torch.from_numpy(stored.array.read_range(0, 24)).float())
    assert (actual - expected).abs().max() <= 0.05 * expected.abs().max()


@pytest.mark.parametrize("trainable_blocks", ["all", 1])
def test_the_train_and_evaluate_steps_run_on_cuda(tiny_zip, tmp_path, trainable_blocks):
    from signflow._model_file import load_bundle
    from signflow.config import parse_params
    from signflow.evaluate import evaluate
    from signflow.extract import extract_dataset
    from signflow.split import split_dataset
    from signflow.train import train_model
    from tests.helpers import section

    params = parse_params(tiny_params(device="cuda", trainable_blocks=trainable_blocks, loader_workers=1))
    raw, split = tmp_path / "raw", tmp_path / "split"
    extract_dataset(tiny_zip, raw, params.extract)
    split_dataset(raw, split, params.split)
    result = train_model(params.train, raw, split, tmp_path / "model.pt", tmp_path / "log.csv", tmp_path / "cache")
    assert result.epochs_run == params.train.epochs and result.train_images_per_second > 0
    assert load_bundle(tmp_path / "model.pt").state_dict, "weights saved from the GPU load on the CPU"
    evaluation = evaluate(section("evaluate"), tmp_path / "model.pt", raw, split, tmp_path / "reports")
    assert 0 <= evaluation.accuracy <= 1
