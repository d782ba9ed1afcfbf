"""Segmenters: logits at the input resolution for every registered one, U-Net and SegNet layouts, the tiny CI
model learning a generated masks problem, and transfer learning across heads of another size."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from raycv.models import (
    create_model,
    freeze_backbone,
    get_model_info,
    head_module_names,
    list_models,
    load_weights,
)
from tests._util import torch_threads

TASK = "semantic_segmentation"
HEADS = {
    "deeplabv3_mobilenet_v3_large": ["classifier.4"],
    "deeplabv3_resnet50": ["classifier.4"],
    "fcn_resnet50": ["classifier.4"],
    "lraspp_mobilenet_v3_large": ["classifier.low_classifier", "classifier.high_classifier"],
    "segnet": ["head"],
    "test_segmenter": ["head"],
    "unet": ["head"],
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a loaded 2-core box two threads fight over the cores and run slower."""
    with torch_threads(1):
        yield


def make_masks(n: int, *, size: int = 32, n_objects: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Bright circles (class 1) and squares (class 2) of random colour, size and position on dark noise.

    Later shapes cover earlier ones; the masks describe the visible pixels.

    Returns:
        images: [n, 3, size, size] float32 in [0, 1]; masks: [n, size, size] int64, 0 = background.
    """
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    images = torch.rand(n, 3, size, size, generator=generator) * 0.3
    masks = torch.zeros(n, size, size, dtype=torch.int64)
    for image, mask in zip(images, masks):
        for _ in range(n_objects):
            label = int(torch.randint(1, 3, (1,), generator=generator))
            radius = size * (0.15 + 0.1 * torch.rand(1, generator=generator).item())
            cx, cy = (size / 2 + (torch.rand(2, generator=generator) - 0.5) * (size - 2 * radius)).tolist()
            dx, dy = xs - cx, ys - cy
            if label == 1:
                shape = dx**2 + dy**2 <= radius**2
            else:
                shape = (dx.abs() <= radius * 0.85) & (dy.abs() <= radius * 0.85)
            image[:, shape] = 0.5 + 0.5 * torch.rand(3, 1, generator=generator)
            mask[shape] = label
    return images, masks


def iou_per_class(masks: Tensor, preds: Tensor, num_classes: int) -> Tensor:
    """[K] IoU = TP / (TP + FP + FN), from the [K, K] confusion matrix (row = true, column = predicted)."""
    confusion = torch.bincount(masks.flatten() * num_classes + preds.flatten(), minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes).double()
    true_positives = confusion.diag()
    return true_positives / (confusion.sum(0) + confusion.sum(1) - true_positives)


def test_registers_the_segmenters() -> None:
    assert list_models(task=TASK) == sorted(HEADS)
    assert list_models("test_*", task=TASK) == ["test_segmenter"]
    sizes = {name: (get_model_info(name).source, get_model_info(name).min_input_size) for name in HEADS}
    assert sizes == {
        "deeplabv3_mobilenet_v3_large": ("torchvision", 32),
        "deeplabv3_resnet50": ("torchvision", 32),
        "fcn_resnet50": ("torchvision", 32),
        "lraspp_mobilenet_v3_large": ("torchvision", 32),
        "segnet": ("raycv", 16),
        "test_segmenter": ("raycv", 16),
        "unet": ("raycv", 16),
    }


@pytest.mark.parametrize("name", list_models(task=TASK))
def test_predicts_logits_at_the_input_resolution(name: str) -> None:
    size = get_model_info(name).min_input_size
    model = create_model(name, num_classes=3, image_size=size)
    assert head_module_names(model) == HEADS[name]
    assert {model.get_submodule(head).out_channels for head in HEADS[name]} == {3}
    # The minimum, and sides that are no multiple of any stride (raycv's own pad and crop back).
    for height, width in [(size, size), (size + 5, size + 11)]:
        for training in (False, True):
            with torch.no_grad():
                logits = model.train(training)(torch.rand(2, 3, height, width))
            assert type(logits) is Tensor  # not torchvision's {"out": ...} dict
            assert logits.shape == (2, 3, height, width)
            assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list_models(task=TASK))
def test_one_training_step_on_four_channels(name: str) -> None:
    torch.manual_seed(0)
    size = get_model_info(name).min_input_size
    model = create_model(name, num_classes=3, in_channels=4, image_size=size)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 4
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = model(torch.rand(2, 4, size + 5, size + 11))
    loss = nn.functional.cross_entropy(logits, torch.randint(0, 3, (2, size + 5, size + 11)))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # The gradient reached both ends: the 4-channel input conv and every head conv.
    first_name = next(n for n, m in model.named_modules() if m is first_conv)
    assert {f"{first_name}.weight", *(f"{head}.weight" for head in HEADS[name])} <= changed


@pytest.mark.parametrize(
    ("upsample", "layer"), [("transpose", nn.ConvTranspose2d), ("bilinear", nn.Upsample)]
)
def test_unet_upsamples_as_asked(upsample: str, layer: type[nn.Module]) -> None:
    model = create_model("unet", num_classes=2, depth=3, base_channels=8, upsample=upsample)
    assert sum(isinstance(m, layer) for m in model.modules()) == 3  # one per decoder level
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 1  # shared by the levels
    assert model(torch.rand(2, 3, 20, 13)).shape == (2, 2, 20, 13)


def test_unet_default_layout() -> None:
    model = create_model("unet", num_classes=2)
    widths = [block[1][0].out_channels for block in model.encoder]
    assert (widths, model.bottleneck[1][0].out_channels) == ([32, 64, 128, 256], 512)
    assert sum(p.numel() for p in model.parameters()) == 7_766_018


def test_depth_too_deep_for_the_image_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"needs image_size >= 64, got 40. Pass depth=5"):
        create_model("unet", num_classes=2, depth=6, image_size=40)
    with pytest.raises(ValueError, match="upsample must be one of transpose, bilinear, got 'nearest'"):
        create_model("unet", num_classes=2, upsample="nearest")
    with pytest.raises(ValueError, match="depth must be an integer >= 1, got 0"):
        create_model("segnet", num_classes=2, depth=0)


def test_segnet_unpools_with_the_encoders_indices() -> None:
    torch.manual_seed(0)
    model = create_model("segnet", num_classes=2, depth=3, base_channels=4).eval()
    assert model.pool.return_indices and isinstance(model.unpool, nn.MaxUnpool2d)
    pooled: list[Tensor] = []
    unpooled: list[tuple[Tensor, Tensor]] = []
    model.pool.register_forward_hook(lambda module, inputs, output: pooled.append(output[1]))
    model.unpool.register_forward_hook(lambda module, inputs, output: unpooled.append((inputs[1], output)))
    with torch.no_grad():
        assert model(torch.rand(1, 3, 24, 19)).shape == (1, 2, 24, 19)
    assert len(pooled) == len(unpooled) == 3
    for indices, (used, output) in zip(reversed(pooled), unpooled):
        assert used is indices  # the deepest pool's indices serve the first unpool, and so on
        # Each value lands where its maximum came from; every other position is zero.
        at_max = torch.zeros_like(output).flatten(2).scatter_(2, indices.flatten(2), 1.0).view_as(output)
        assert (output[at_max == 0] == 0).all()


def test_generator_makes_the_requested_problem() -> None:
    images, masks = make_masks(8, size=32, seed=1)
    assert images.shape == (8, 3, 32, 32) and masks.shape == (8, 32, 32)
    assert set(masks.unique().tolist()) == {0, 1, 2}
    pixels, foreground = images.permute(0, 2, 3, 1), masks > 0  # pixels: [8, 32, 32, 3]
    assert (pixels[foreground] >= 0.5).all() and (pixels[~foreground] <= 0.3).all()


@pytest.mark.timeout(60)
def test_test_segmenter_learns_generated_masks() -> None:
    torch.manual_seed(0)
    images, masks = make_masks(512, seed=0)
    held_out_images, held_out_masks = make_masks(64, seed=1)
    model = create_model("test_segmenter", num_classes=3, image_size=32)
    assert sum(p.numel() for p in model.parameters()) < 10_000
    steps, batch_size = 300, 16
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.02, total_steps=steps)
    for _ in range(steps):
        batch = torch.randint(0, len(images), (batch_size,))
        loss = nn.functional.cross_entropy(model(images[batch]), masks[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        preds = model.eval()(held_out_images).argmax(dim=1)
    iou = iou_per_class(held_out_masks, preds, 3)
    assert iou.min() >= 0.8, iou.tolist()  # every class, so also the mIoU


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("deeplabv3_mobilenet_v3_large", ["classifier.4.weight", "classifier.4.bias"]),
        ("unet", ["head.weight", "head.bias"]),
    ],
)
def test_freeze_backbone_trains_only_the_head(name: str, head: list[str]) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3)
    assert freeze_backbone(model) == head
    assert [n for n, p in model.named_parameters() if p.requires_grad] == head
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.rand(2, 3, 32, 32)), torch.randint(0, 3, (2, 32, 32)))
    loss.backward()
    optimizer.step()
    assert [n for n, p in model.named_parameters() if not torch.equal(p, before[n])] == head


@pytest.mark.parametrize(
    ("name", "heads"),
    [
        ("deeplabv3_mobilenet_v3_large", ["classifier.4"]),
        ("lraspp_mobilenet_v3_large", ["classifier.low_classifier", "classifier.high_classifier"]),
        ("unet", ["head"]),
    ],
)
def test_load_weights_across_num_classes_skips_only_the_head(name: str, heads: list[str]) -> None:
    torch.manual_seed(0)
    source = create_model(name, num_classes=5).state_dict()
    model = create_model(name, num_classes=3)
    report = load_weights(model, source)
    head_keys = [f"{head}.{kind}" for head in heads for kind in ("weight", "bias")]
    assert report.skipped == head_keys
    assert report.loaded == [key for key in source if key not in head_keys]
    assert report.unexpected == report.missing == []
    target = model.state_dict()
    assert all(torch.equal(target[key], source[key]) for key in report.loaded)
