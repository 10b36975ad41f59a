import pytest
import torch

from signflow._model import (
    ModelError,
    apply_freeze_policy,
    create_model,
    parameter_blocks,
    preprocessing_for,
    set_train_mode,
)
from tests.helpers import CodeRunningPickle, small_timm_model, train_config


def train_cfg(model: str, **kw):
    base = dict(model=model, pretrained=False, image_size=32, batch_size=4, epochs=1, lr=1e-3)
    return train_config(**{**base, **kw})


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["mobilenetv2_100", "mobilenetv3_large_100", "vgg16", "tf_efficientnet_lite0"])
def test_freeze_policy_head_only_some_blocks_and_all(name):
    model = small_timm_model(name, num_classes=5)
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    head = {n for n, p in model.named_parameters() if id(p) in head_ids}
    blocks = parameter_blocks(model)
    assert len(blocks) >= 5 and not head & set().union(*blocks)
    apply_freeze_policy(model, 0)
    assert trainable_names(model) == head
    apply_freeze_policy(model, 2)
    assert trainable_names(model) == head | set(blocks[-1]) | set(blocks[-2])
    apply_freeze_policy(model, "all")
    assert trainable_names(model) == {n for n, _ in model.named_parameters()}


def test_more_blocks_than_the_model_has_is_an_error():
    model = create_model(train_cfg("mobilenetv2_100"), num_classes=3)
    count = len(parameter_blocks(model))
    with pytest.raises(ModelError, match=f"more than the {count} blocks"):
        apply_freeze_policy(model, count + 1)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ModelError, match="Did you mean: .*mobilenetv2_100"):
        create_model(train_cfg("mobilenet_v2_100"), num_classes=3)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(ModelError, match="weights_file"):
        create_model(train_cfg("mobilenetv2_100"), num_classes=3, weights_file=tmp_path / "none.safetensors")


def test_a_pickled_weights_file_is_refused_without_running_it(tmp_path):
    import pickle

    marker = tmp_path / "code-ran"
    weights = tmp_path / "weights.pth"
    weights.write_bytes(pickle.dumps({"state_dict": CodeRunningPickle(marker)}))
    with pytest.raises(ModelError, match="not a safetensors file or a weights-only PyTorch checkpoint"):
        create_model(train_cfg("mobilenetv2_100"), num_classes=3, weights_file=weights)
    assert not marker.exists()


def test_a_weights_only_checkpoint_and_safetensors_are_accepted(tmp_path):
    from safetensors.torch import save_file

    state = small_timm_model("mobilenetv2_100", num_classes=1000).state_dict()
    torch.save(state, tmp_path / "weights.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "weights.safetensors")
    for name in ("weights.pth", "weights.safetensors"):
        model = create_model(train_cfg("mobilenetv2_100"), num_classes=3, weights_file=tmp_path / name)
        assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"]), name


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_statistics():
    model = create_model(train_cfg("mobilenetv2_100"), num_classes=3)
    apply_freeze_policy(model, 1)
    before = model.bn1.running_mean.clone()
    set_train_mode(model)
    assert not model.bn1.training and model.get_classifier().training
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.equal(model.bn1.running_mean, before)


def test_preprocessing_comes_from_the_model_config():
    lite = preprocessing_for(create_model(train_cfg("tf_efficientnet_lite0"), 3), 96)
    assert lite.mean == (0.5, 0.5, 0.5) and lite.image_size == 96
    v2 = preprocessing_for(create_model(train_cfg("mobilenetv2_100"), 3), 64)
    assert v2.mean == pytest.approx((0.485, 0.456, 0.406))


@pytest.mark.parametrize("name", ["vgg16", "mobilenetv3_large_100"])
def test_a_training_step_changes_exactly_the_trainable_parameters(name):
    model = small_timm_model(name, num_classes=4)
    trainable = set(apply_freeze_policy(model, 1))
    set_train_mode(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 3]))
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable, "the step must move every trainable parameter and no frozen one"
