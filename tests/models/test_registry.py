"""Every registered model builds and runs; the registry validates names, tasks and arguments."""

from __future__ import annotations

import gc
import re

import pytest
import torch
import torchvision
from torch import nn

from raycv.errors import UnknownModelError
from raycv.models import (
    create_model,
    get_model_info,
    head_module_names,
    list_models,
    register_model,
    registry,
)
from raycv.models.classification import replace_first_conv

# One model per kind of input layer that in_channels replaces: plain conv stems of several families,
# ViT's and Swin's patch embeddings, SqueezeNet's, DenseNet's and raycv's own.
REPRESENTATIVE = [
    "simple_cnn",
    "resnet18",
    "efficientnet_b0",
    "vit_b_16",
    "mobilenet_v3_small",
    "densenet121",
    "convnext_tiny",
    "squeezenet1_0",
    "swin_t",
]


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test vanish after it."""
    registry.list_models()  # the models registered on first use are registered now, outside the copies
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_BY_TASK", {t: set(names) for t, names in registry._BY_TASK.items()})


def _forward(model: nn.Module, size: int, in_channels: int = 3) -> list[torch.Tensor]:
    """Outputs for a batch of 2 in eval then training mode."""
    images = torch.rand(2, in_channels, size, size)
    outputs = []
    with torch.no_grad():
        for training in (False, True):
            outputs.append(model.train(training)(images))
    return outputs


@pytest.mark.parametrize("name", list_models(task="classification"))
def test_every_model_returns_logits_at_its_min_input_size(name: str) -> None:
    size = max(get_model_info(name).min_input_size, 32)
    model = create_model(name, num_classes=5, image_size=size)
    (head,) = head_module_names(model)  # the generic rule finds the 5-way layer of every architecture
    layer = model.get_submodule(head)
    assert getattr(layer, "out_features", None) == 5 or getattr(layer, "out_channels", None) == 5
    for output in _forward(model, size):
        assert type(output) is torch.Tensor  # not a namedtuple with auxiliary logits
        assert output.shape == (2, 5)
        assert torch.isfinite(output).all()
    del model
    gc.collect()  # the largest models hold GBs; free them before the next one


@pytest.mark.parametrize("in_channels", [1, 4])
@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_in_channels_replaces_the_input_layer(name: str, in_channels: int) -> None:
    size = max(get_model_info(name).min_input_size, 32)
    model = create_model(name, num_classes=5, in_channels=in_channels, image_size=size)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == in_channels
    for output in _forward(model, size, in_channels):
        assert output.shape == (2, 5)


def test_replace_first_conv_keeps_the_other_hyper_parameters() -> None:
    model = create_model("resnet18", num_classes=2)
    assert replace_first_conv(model, 4) == "conv1"
    conv = model.conv1
    assert (conv.in_channels, conv.out_channels) == (4, 64)
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((7, 7), (2, 2), (3, 3), None)


@pytest.mark.parametrize(("name", "size"), [("alexnet", 63), ("inception_v3", 75)])
def test_min_input_size_is_the_smallest_that_works(name: str, size: int) -> None:
    assert get_model_info(name).min_input_size == size
    model = create_model(name, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, size, size)).shape == (1, 3)
        with pytest.raises(RuntimeError):
            model(torch.rand(1, 3, size - 1, size - 1))


def test_fixed_size_models_take_image_size() -> None:
    assert get_model_info("vit_b_16").min_input_size == 32
    assert get_model_info("vit_h_14").min_input_size == 42  # smallest multiple of the patch size >= 32
    assert get_model_info("maxvit_t").min_input_size == 224
    with pytest.raises(ValueError, match="multiple of 16"):
        create_model("vit_b_16", num_classes=2, image_size=40)
    with pytest.raises(ValueError, match="at least 224"):
        create_model("maxvit_t", num_classes=2, image_size=128)
    model = create_model("vit_b_32", num_classes=2, image_size=64).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 2)


def test_unknown_name_suggests_the_closest_and_the_cli() -> None:
    with pytest.raises(UnknownModelError) as info:
        create_model("resnet19", num_classes=2)
    message = str(info.value)
    assert "Unknown model 'resnet19'. Did you mean 'resnet18'?" in message
    assert "Run `raycv models --task classification`" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownModelError, match="Run `raycv models` to list them"):
        get_model_info("zzzz")


@pytest.mark.parametrize("argument", ["num_classes", "in_channels", "image_size"])
@pytest.mark.parametrize("value", [0, -1, 2.0, True])
def test_invalid_arguments_name_the_argument(argument: str, value: object) -> None:
    kwargs: dict[str, object] = {"num_classes": 2, argument: value}
    with pytest.raises(ValueError, match=re.escape(f"{argument} must be an integer >= 1, got {value!r}")):
        create_model("test_classifier", **kwargs)  # type: ignore[arg-type]


def test_list_models_filters_by_pattern_and_task() -> None:
    assert list_models("resnet*") == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]
    assert list_models("*_cnn") == ["simple_cnn"]
    assert list_models("RESNET18") == []  # case-sensitive
    classifiers = list_models(task="classification")
    assert classifiers == sorted(classifiers)
    assert {"simple_cnn", "test_classifier", "vit_h_14", "maxvit_t"} <= set(classifiers)
    assert len(classifiers) == 2 + len(torchvision.models.list_models(module=torchvision.models))
    assert list_models("test_*", task="classification") == ["test_classifier"]
    with pytest.raises(ValueError, match="Unknown task 'segmentation'"):
        list_models(task="segmentation")


def test_model_info_describes_the_model() -> None:
    info = get_model_info("resnet18")
    assert (info.name, info.task, info.source, info.min_input_size) == (
        "resnet18",
        "classification",
        "torchvision",
        32,
    )
    assert info.description.startswith("ResNet-18 from Deep Residual Learning for Image Recognition.")
    own = get_model_info("simple_cnn")
    assert (own.source, own.min_input_size) == ("raycv", 16)
    assert own.description.startswith("LeNet-5")


def test_duplicate_name_and_unknown_task_raise() -> None:
    def builder(*, num_classes: int) -> nn.Module:
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="'resnet18' is already registered"):
        register_model("resnet18", task="classification")(builder)
    with pytest.raises(ValueError, match="Unknown task 'segmentation'"):
        register_model("new_model", task="segmentation")
    assert "new_model" not in list_models()


def test_builders_get_only_the_arguments_they_take(isolated_registry: None) -> None:
    @register_model("rgb_only", task="semantic_segmentation", min_input_size=8, description="3 channels")
    def rgb_only(*, num_classes: int) -> nn.Module:
        return nn.Conv2d(3, num_classes, 1)

    assert list_models("rgb_*", task="semantic_segmentation") == ["rgb_only"]
    assert get_model_info("rgb_only").description == "3 channels"
    model = create_model("rgb_only", num_classes=4, image_size=8)  # image_size only checked
    assert isinstance(model, nn.Conv2d)
    with pytest.raises(ValueError, match="3-channel input only, got in_channels=1"):
        create_model("rgb_only", num_classes=4, in_channels=1)
    with pytest.raises(ValueError, match="needs at least 8 px"):
        create_model("rgb_only", num_classes=4, image_size=4)


_WORKER = """
import sys

import numpy as np
import torch

import raycv.annotation.classifier, raycv.annotation.segmenter, raycv.training.loop  # what the workers import
from raycv.config.train import AugmentConfig, TrainConfig
from raycv.models import create_model, get_model_info
from raycv.tasks.registry import get_task

rng = np.random.default_rng(0)
image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
for arch, task, target in [
    ("test_classifier", "classification", 1),
    ("simple_cnn", "classification", 1),
    ("test_segmenter", "semantic_segmentation", np.zeros((40, 48), np.uint8)),
    ("unet", "semantic_segmentation", np.zeros((40, 48), np.uint8)),
]:
    TrainConfig.model_validate({"task": task, "model": {"arch": arch}, "data": {"train": "d"}, "output": {"dir": "o"}})
    train_tf, eval_tf = get_task(task).transforms((32, 32), AugmentConfig())  # the default augmentation
    pixels = torch.stack([train_tf(image, target, rng)[0], eval_tf(image, target, rng)[0]])
    create_model(arch, num_classes=3)(pixels).sum().backward()
print("before", "torchvision" in sys.modules)
info = get_model_info("resnet18")  # not registered yet: the torchvision architectures are, now
print("after", "torchvision" in sys.modules, info.source)
"""


def test_raycv_models_train_and_annotate_without_importing_torchvision() -> None:
    """Importing torchvision costs a worker ~1.5 s (it imports torch._dynamo): a run of raycv's own classifiers
    or segmenters never pays it; the first lookup of a torchvision architecture registers them all."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _WORKER], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["before False", "after True torchvision"], done.stdout


def _register_later(tmp_path, monkeypatch: pytest.MonkeyPatch, module: str, model: str, **kw: object) -> None:
    """Writes ``module`` (registering the classifier ``model``) and names it alone with register_later."""
    import sys

    args = "".join(f", {k}={v!r}" for k, v in kw.items())
    (tmp_path / f"{module}.py").write_text(
        "from torch import nn\n"
        "from raycv.models import register_model\n\n\n"
        f'@register_model("{model}", task="classification"{args})\n'
        f"def {model}(*, num_classes: int) -> nn.Module:\n"
        "    return nn.Flatten()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_LATER", [])
    monkeypatch.delitem(sys.modules, module, raising=False)
    registry.register_later(module, module)
    assert [module] == registry._LATER


def test_a_module_registered_later_is_imported_on_the_first_miss_only(
    tmp_path, monkeypatch: pytest.MonkeyPatch, isolated_registry: None
) -> None:
    import sys

    _register_later(tmp_path, monkeypatch, "later_models", "later_net", min_input_size=1)
    assert registry.is_registered("simple_cnn") and get_model_info("test_classifier").source == "raycv"
    assert "later_models" not in sys.modules  # a hit imports nothing
    assert not registry.is_registered("later_net", task="semantic_segmentation")  # the miss imported it
    assert "later_models" in sys.modules and registry._LATER == []
    assert registry.is_registered("later_net", task="classification") and "later_net" in list_models(
        "later_*"
    )


def test_a_name_a_later_module_registers_is_a_duplicate_before_that_module_is_imported(
    tmp_path, monkeypatch: pytest.MonkeyPatch, isolated_registry: None
) -> None:
    _register_later(tmp_path, monkeypatch, "later_models2", "later_net2")

    def builder(*, num_classes: int) -> nn.Module:
        return nn.Linear(1, num_classes)

    with pytest.raises(
        ValueError, match=re.escape("'later_net2' is already registered by later_models2.later_net2")
    ):
        register_model("later_net2", task="classification")(builder)
