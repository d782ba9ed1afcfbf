"""YOLO detectors: the torchvision detection interface for every registered one, and the YOLOv1 loss against a
hand-computed value. ``yolo_n`` learning generated shapes from scratch to mAP@0.5 >= 0.7 is asserted once,
through `raycv train`, in tests/test_detection_e2e.py."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

import raycv.models.yolo  # registers the YOLO models
from raycv.models import create_model, list_models
from raycv.models.yolo_v1 import yolo_v1_loss
from tests._util import torch_threads

NUM_CLASSES = 3
YOLO_MODELS = list_models("yolo*", task="detection")


@pytest.fixture(autouse=True)
def two_threads() -> Iterator[None]:
    with torch_threads(2):
        yield


def _empty_target() -> dict[str, Tensor]:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def test_the_yolo_models_are_registered() -> None:
    assert {"yolo_v1", "yolo_n", "yolo_s"} <= set(YOLO_MODELS)
    assert raycv.models.yolo.yolo_n.__name__ == "yolo_n"


@pytest.mark.parametrize("name", YOLO_MODELS)
def test_eval_returns_well_formed_detections_in_each_images_pixels(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, image_size=64).eval()
    model.score_thresh = 0.0  # an untrained model scores low; keep every candidate to check them all
    model.detections_per_img = 30
    sizes = [(48, 80), (70, 40)]
    with torch.no_grad():
        outputs = model([torch.randn(3, h, w) for h, w in sizes])
    assert len(outputs) == 2
    for output, (height, width) in zip(outputs, sizes):
        boxes, scores, labels = output["boxes"], output["scores"], output["labels"]
        assert 0 < len(boxes) <= 30
        assert boxes.shape == (len(boxes), 4) and boxes.dtype == torch.float32
        assert scores.shape == (len(boxes),) and labels.shape == (len(boxes),)
        assert labels.dtype == torch.int64 and int(labels.min()) >= 1 and int(labels.max()) <= NUM_CLASSES
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert (scores[:-1] >= scores[1:]).all()  # sorted by score, as torchvision returns them


@pytest.mark.parametrize("name", YOLO_MODELS)
def test_train_losses_are_finite_and_a_step_changes_the_parameters(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, image_size=64).train()
    images = [torch.randn(3, 64, 64), torch.randn(3, 50, 90), torch.randn(3, 40, 40)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 30.0, 60.0, 50.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.tensor([[10.0, 5.0, 50.0, 45.0]]), "labels": torch.tensor([2])},
        _empty_target(),
    ]
    losses = model(images, targets)
    assert isinstance(losses, dict) and losses
    assert all(loss.ndim == 0 and torch.isfinite(loss) for loss in losses.values())
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sum(losses.values()).backward()
    optimizer.step()
    changed = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert changed > len(before) // 2

    only_empty = model([torch.randn(3, 64, 64)], [_empty_target()])
    assert all(torch.isfinite(loss) for loss in only_empty.values())
    sum(only_empty.values()).backward()  # a batch without objects still trains (the no-object terms)


def test_train_mode_needs_targets_and_labels_in_range() -> None:
    model = create_model("yolo_n", num_classes=NUM_CLASSES, image_size=64)
    with pytest.raises(ValueError, match="needs targets"):
        model([torch.randn(3, 64, 64)])
    with pytest.raises(ValueError, match=r"1\.\.3"):
        model(
            [torch.randn(3, 64, 64)], [{"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([0])}]
        )
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("yolo_n", num_classes=NUM_CLASSES, image_size=100)


def test_yolo_v1_loss_matches_the_formula_by_hand() -> None:
    # S = 2, B = 2, K = 2, a 64 px image: one object (8, 8, 24, 40) of class 1, centre (16, 24) in cell
    # (row 0, col 0) at (x, y) = (0.5, 0.75) of the cell, (w, h) = (0.25, 0.5) of the image.
    predictions = torch.zeros(1, 2, 2, 2 * 5 + 2)
    predictions[0, 0, 0, :5] = torch.tensor([0.5, 0.5, 0.25, 0.25, 0.8])  # box (8, 8, 24, 24): IoU 0.5
    predictions[0, 0, 0, 5:10] = torch.tensor([0.1, 0.1, 0.04, 0.04, 0.3])  # a tiny box: IoU 0
    predictions[0, 0, 0, 10:] = torch.tensor([0.6, 0.4])
    predictions[0, 1, 1, 4] = 0.2  # a confident box in an empty cell
    predictions[0, 1, 1, 10:] = torch.tensor([0.5, 0.5])  # classes of empty cells are not penalised
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 24.0, 40.0]]), "labels": torch.tensor([1])}]

    losses = yolo_v1_loss(predictions, targets, image_size=64, boxes_per_cell=2)

    # Box 0 overlaps most, so it is responsible; box 1 and the other cells' boxes are "no object".
    coord = (0.5 - 0.5) ** 2 + (0.75 - 0.5) ** 2 + (math.sqrt(0.25) - math.sqrt(0.25)) ** 2
    coord += (math.sqrt(0.5) - math.sqrt(0.25)) ** 2
    expected = {
        "loss_box": 5.0 * coord,
        "loss_obj": (0.5 - 0.8) ** 2,
        "loss_noobj": 0.5 * (0.3**2 + 0.2**2),
        "loss_cls": (1 - 0.6) ** 2 + (0 - 0.4) ** 2,
    }
    assert {k: round(float(v), 5) for k, v in losses.items()} == pytest.approx(expected, abs=1e-5)
    assert float(sum(losses.values())) == pytest.approx(0.526967 + 0.09 + 0.065 + 0.32, abs=1e-5)
