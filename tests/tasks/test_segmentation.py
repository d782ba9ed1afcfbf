import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raycv.tasks.segmentation import (
    IGNORE_INDEX,
    class_pixels,
    confusion_matrix,
    dice_loss,
    metrics_from_confusion,
    segmentation_loss,
)

# Two 2x3 label maps; one void pixel (255) whose prediction must count nowhere.
TARGETS = torch.tensor([[[0, 0, 1], [1, 2, 255]], [[0, 1, 1], [2, 2, 0]]])
PREDS = torch.tensor([[[0, 1, 1], [1, 2, 0]], [[0, 1, 2], [2, 0, 0]]])


def test_confusion_matrix_of_a_hand_worked_example():
    cm = confusion_matrix(TARGETS, PREDS, 3)
    # pairs (true, pred): image 0: (0,0) (0,1) (1,1) (1,1) (2,2); image 1: (0,0) (1,1) (1,2) (2,2) (2,0) (0,0)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[3, 1, 0], [0, 3, 1], [1, 0, 2]]


def test_metrics_against_hand_computed_values():
    m = metrics_from_confusion(confusion_matrix(TARGETS, PREDS, 3))
    # IoU = TP / (TP + FP + FN): 3 / (3+1+1), 3 / (3+1+1), 2 / (2+1+1)
    assert m["iou_per_class"] == pytest.approx([3 / 5, 3 / 5, 1 / 2])
    assert m["miou"] == pytest.approx((3 / 5 + 3 / 5 + 1 / 2) / 3)  # 17/30
    # Dice = 2TP / (2TP + FP + FN): 6/8, 6/8, 4/6
    assert m["dice"] == pytest.approx((3 / 4 + 3 / 4 + 2 / 3) / 3)  # 13/18
    assert m["pixel_accuracy"] == pytest.approx(8 / 11)  # 11 pixels count, the void one does not


def test_ignored_and_out_of_range_targets_are_left_out():
    t = torch.tensor([[[0, IGNORE_INDEX, 7]]])
    p = torch.tensor([[[0, 1, 1]]])
    assert confusion_matrix(t, p, 2).tolist() == [[1, 0], [0, 0]]
    assert confusion_matrix(torch.tensor([[[0, 9]]]), torch.tensor([[[0, 1]]]), 2, ignore_index=9).sum() == 1


def test_absent_classes_are_left_out_of_the_means():
    # K = 5: class 3 is neither true nor predicted; class 4 is predicted once but never true (IoU 0, counts)
    t = torch.cat([TARGETS.flatten(), torch.tensor([0])])
    p = torch.cat([PREDS.flatten(), torch.tensor([4])])
    m = metrics_from_confusion(confusion_matrix(t, p, 5))
    assert m["iou_per_class"][3] is None
    assert m["iou_per_class"][4] == 0.0
    assert m["iou_per_class"][0] == pytest.approx(3 / 6)  # one more FN for class 0
    assert m["miou"] == pytest.approx((3 / 6 + 3 / 5 + 1 / 2 + 0) / 4)
    assert m["dice"] == pytest.approx((6 / 9 + 3 / 4 + 2 / 3 + 0) / 4)
    perfect = metrics_from_confusion(np.array([[5, 0, 0], [0, 5, 0], [0, 0, 0]]))
    assert perfect == {"miou": 1.0, "iou_per_class": [1.0, 1.0, None], "dice": 1.0, "pixel_accuracy": 1.0}


def test_empty_confusion_matrix_gives_zeros_not_nan():
    m = metrics_from_confusion(torch.zeros(3, 3, dtype=torch.int64))
    assert m == {"miou": 0.0, "iou_per_class": [None, None, None], "dice": 0.0, "pixel_accuracy": 0.0}


def test_summing_confusion_matrices_over_workers_gives_the_whole_set_metrics():
    parts = [confusion_matrix(TARGETS[i : i + 1], PREDS[i : i + 1], 3) for i in range(2)]
    assert metrics_from_confusion(sum(parts)) == metrics_from_confusion(confusion_matrix(TARGETS, PREDS, 3))


def test_confusion_matrix_rejects_predictions_outside_the_classes():
    with pytest.raises(ValueError, match="num_classes=3"):
        confusion_matrix(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 3]]]), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3), 3)


def _confident(targets: torch.Tensor, k: int, scale: float = 20.0) -> torch.Tensor:
    """[N, K, H, W] logits that put (almost) all the probability on ``targets``; void pixels get class 0."""
    t = torch.where(targets == IGNORE_INDEX, torch.zeros_like(targets), targets)
    return F.one_hot(t, k).permute(0, 3, 1, 2).float() * scale


def test_dice_loss_is_near_zero_for_perfect_predictions_and_large_for_wrong_ones():
    perfect = dice_loss(_confident(TARGETS, 3), TARGETS)
    wrong = dice_loss(_confident((TARGETS + 1) % 3, 3), TARGETS)
    assert 0 <= float(perfect) < 1e-3
    assert float(wrong) > 0.7
    uniform = dice_loss(torch.zeros(2, 3, 2, 3), TARGETS)
    assert float(perfect) < float(uniform) < float(wrong)


def test_dice_loss_ignores_void_pixels_and_has_gradients():
    logits = torch.randn(2, 3, 2, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss = dice_loss(logits, TARGETS)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad[1].abs().sum() > 0
    assert (logits.grad[0, :, 1, 2] == 0).all()  # the void pixel gets no gradient
    changed = logits.detach().clone()
    changed[0, :, 1, 2] = torch.tensor([-50.0, 50.0, 0.0])
    assert torch.allclose(dice_loss(changed, TARGETS), loss.detach())


def test_segmentation_loss_kinds():
    logits = torch.randn(2, 3, 2, 3, generator=torch.Generator().manual_seed(1))
    ce = F.cross_entropy(logits, TARGETS, ignore_index=IGNORE_INDEX, label_smoothing=0.1)
    dice = dice_loss(logits, TARGETS)
    assert torch.allclose(segmentation_loss(logits, TARGETS, kind="ce", label_smoothing=0.1), ce)
    assert torch.allclose(segmentation_loss(logits, TARGETS, kind="dice"), dice)
    both = segmentation_loss(logits, TARGETS, kind="ce+dice", label_smoothing=0.1)
    assert torch.allclose(both, ce + dice)
    plain = F.cross_entropy(logits, TARGETS, ignore_index=IGNORE_INDEX)
    assert torch.allclose(segmentation_loss(logits, TARGETS, kind="ce"), plain)


def test_segmentation_loss_of_an_all_void_batch_is_zero_with_a_graph():
    logits = torch.randn(1, 3, 2, 2).requires_grad_()
    loss = segmentation_loss(logits, torch.full((1, 2, 2), IGNORE_INDEX), kind="ce+dice")
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert (logits.grad == 0).all()


def test_segmentation_loss_rejects_bad_kinds_labels_and_shapes():
    logits = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="choose one of ce, dice, ce\\+dice"):
        segmentation_loss(logits, torch.zeros(1, 2, 2, dtype=torch.int64), kind="focal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="targets hold class 3 but the model has 3 classes"):
        segmentation_loss(logits, torch.tensor([[[0, 1], [2, 3]]]), kind="ce")
    with pytest.raises(ValueError, match="upsample the logits"):
        dice_loss(logits, torch.zeros(1, 4, 4, dtype=torch.int64))


def test_class_pixels_counts_present_classes_by_label():
    label_map = np.array([[2, 2, 0], [2, 0, 2]], dtype=np.uint8)
    assert class_pixels(label_map, ["background", "road", "building"]) == [
        {"label": 0, "label_name": "background", "pixels": 2},
        {"label": 2, "label_name": "building", "pixels": 4},
    ]
    assert class_pixels(np.zeros((0, 0), dtype=np.uint8), ["a"]) == []
    with pytest.raises(ValueError, match="holds class 2 but only 2 class names"):
        class_pixels(label_map, ["background", "road"])
