import numpy as np
import torch

from raycv.tasks.classification import (
    confusion_matrix,
    metrics_from_confusion,
    mixup,
    soft_cross_entropy,
    topk_rows,
)


def test_metrics_against_hand_computed_values():
    # true:  0 0 0 1 1 2 ; pred: 0 0 1 1 2 2
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    p = torch.tensor([0, 0, 1, 1, 2, 2])
    cm = confusion_matrix(y, p, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    m = metrics_from_confusion(cm)
    # precision: 2/2, 1/2, 1/2 -> 2/3 ; recall: 2/3, 1/2, 1/1 -> 13/18
    assert abs(m["accuracy"] - 4 / 6) < 1e-9
    assert abs(m["precision"] - 2 / 3) < 1e-9
    assert abs(m["recall"] - 13 / 18) < 1e-9
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 * 1 / 1.5]
    assert abs(m["f1"] - sum(f1) / 3) < 1e-9


def test_absent_classes_are_left_out_of_macro_averages():
    cm = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 0]])
    assert metrics_from_confusion(cm) == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_soft_cross_entropy_matches_torch_for_hard_and_one_hot_labels():
    logits = torch.randn(8, 4)
    y = torch.randint(0, 4, (8,))
    hard = soft_cross_entropy(logits, y, 0.1)
    soft = soft_cross_entropy(logits, torch.nn.functional.one_hot(y, 4).float(), 0.1)
    ref = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(hard, ref) and torch.allclose(soft, ref, atol=1e-6)


def test_mixup_mixes_images_and_labels_with_the_same_weight():
    x = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    y = torch.tensor([0, 1])
    mx, my = mixup(x, y, 2, alpha=0.4, rng=np.random.default_rng(3))
    assert torch.allclose(my.sum(dim=1), torch.ones(2))
    # each mixed image is constant, equal to the weight of class 1 in its label
    assert torch.allclose(mx.mean(dim=(1, 2, 3)), my[:, 1], atol=1e-6)
    same_x, one_hot = mixup(x, y, 2, alpha=0.0, rng=np.random.default_rng(0))
    assert torch.equal(same_x, x) and one_hot.tolist() == [[1, 0], [0, 1]]


def test_topk_rows_are_sorted_and_named():
    rows = topk_rows(np.array([[0.1, 0.7, 0.2]]), ["a", "b", "c"], 2)
    assert [(r["label"], r["label_name"]) for r in rows[0]] == [(1, "b"), (2, "c")]
    assert abs(rows[0][0]["score"] - 0.7) < 1e-6
