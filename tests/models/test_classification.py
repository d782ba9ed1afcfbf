"""raycv's own classifiers: layout, input sizes, and that they learn a generated shapes problem quickly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from raycv.models import create_model
from raycv.models.classification import replace_first_conv

SHAPES = ("circle", "square", "triangle")


def make_shapes(n: int, *, num_classes: int, size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Bright shapes of random colour, size and position on uniform noise.

    Returns:
        images: [n, 3, size, size] float32 in [0, 1]; labels: [n] int64, the index in SHAPES, cycling.
    """
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    labels = torch.arange(n) % num_classes
    images = torch.rand(n, 3, size, size, generator=generator) * 0.3
    for image, label in zip(images, labels.tolist(), strict=True):
        radius = size * (0.15 + 0.15 * torch.rand(1, generator=generator).item())
        cx, cy = (size / 2 + (torch.rand(2, generator=generator) - 0.5) * (size - 2 * radius)).tolist()
        dx, dy = xs - cx, ys - cy
        if SHAPES[label] == "circle":
            mask = dx**2 + dy**2 <= radius**2
        elif SHAPES[label] == "square":
            mask = (dx.abs() <= radius * 0.85) & (dy.abs() <= radius * 0.85)
        else:  # apex up, base at the bottom
            mask = (dy >= -radius) & (dy <= radius * 0.8) & (dx.abs() <= (dy + radius) * 0.6)
        colour = 0.5 + 0.5 * torch.rand(3, 1, generator=generator)
        image[:, mask] = colour
    return images, labels


def fit(model: nn.Module, images: Tensor, labels: Tensor, *, epochs: int = 8, batch_size: int = 16) -> float:
    """Trains with AdamW and a cosine schedule; returns the eval-mode accuracy on the training set."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps = epochs * math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(images)).split(batch_size):
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        return (model(images).argmax(dim=1) == labels).float().mean().item()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("name", "num_classes", "size"),
    [("simple_cnn", 2, 32), ("simple_cnn", 3, 64), ("test_classifier", 2, 32), ("test_classifier", 3, 32)],
)
def test_learns_generated_shapes(name: str, num_classes: int, size: int) -> None:
    torch.manual_seed(0)
    images, labels = make_shapes(240, num_classes=num_classes, size=size)
    model = create_model(name, num_classes=num_classes, image_size=size)
    assert fit(model, images, labels) >= 0.9


def test_generator_makes_the_requested_problem() -> None:
    images, labels = make_shapes(6, num_classes=3, size=40, seed=1)
    assert images.shape == (6, 3, 40, 40)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert images.min() >= 0 and images.max() <= 1
    assert ((images > 0.3).all(dim=1).sum(dim=(1, 2)) > 20).all()  # every image holds a bright shape


def test_simple_cnn_has_the_lenet5_layout() -> None:
    model = create_model("simple_cnn", num_classes=7, in_channels=1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 16, (5, 5)),
        (16, 32, (5, 5)),
    ]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(32, 120), (120, 84), (84, 7)]
    assert isinstance(model.pool, nn.AdaptiveMaxPool2d)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2


def test_test_classifier_is_tiny() -> None:
    model = create_model("test_classifier", num_classes=3)
    assert sum(p.numel() for p in model.parameters()) < 20_000


@pytest.mark.parametrize("name", ["simple_cnn", "test_classifier"])
@pytest.mark.parametrize(("height", "width"), [(16, 16), (17, 23), (64, 64), (100, 48)])
def test_any_input_from_16_px_works(name: str, height: int, width: int) -> None:
    model = create_model(name, num_classes=4, in_channels=2).eval()
    with torch.no_grad():
        assert model(torch.rand(3, 2, height, width)).shape == (3, 4)


def test_googlenet_and_inception_have_no_auxiliary_heads() -> None:
    for name, size in (("googlenet", 32), ("inception_v3", 75)):
        model = create_model(name, num_classes=2)
        assert model.aux_logits is False
        loss = model(torch.rand(2, 3, size, size)).sum()  # training mode: a plain Tensor, not a namedtuple
        loss.backward()


def test_replace_first_conv_needs_a_conv() -> None:
    with pytest.raises(ValueError, match=r"Sequential has no nn\.Conv2d to adapt to in_channels=1"):
        replace_first_conv(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), 1)
