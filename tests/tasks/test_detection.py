"""Detection task helpers: COCO metrics on hand-made cases, RLE round trips, merging tiles, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from raycv.annotation.tiling import tile_grid
from raycv.data.rle import decode_rle, encode_rle
from raycv.data.synthetic_scenes import render_scene
from raycv.tasks.coco import coco_metrics
from raycv.tasks.detection import augment_detection
from raycv.tasks.tiles import merge_tile_detections, tile_offsets_to_image

BOXES = torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 20.0, 90.0, 80.0], [5.0, 60.0, 40.0, 95.0]])
LABELS = torch.tensor([1, 2, 1])


def predict(
    boxes: torch.Tensor, labels: torch.Tensor = LABELS, **extra: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {"boxes": boxes, "scores": torch.linspace(0.9, 0.5, len(boxes)), "labels": labels, **extra}


def test_perfect_predictions_score_one() -> None:
    target = {"boxes": BOXES, "labels": LABELS}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    metrics = coco_metrics(
        [predict(BOXES), {**empty, "scores": torch.zeros(0)}], [target, empty], num_classes=2
    )
    assert metrics == pytest.approx({"map": 1.0, "map_50": 1.0})


def test_shifted_boxes_keep_map_50_but_lose_map() -> None:
    # 4 px on a 40 px box: IoU 36*40 / (44*40) = 0.82, inside (0.5, 0.95).
    shifted = BOXES + torch.tensor([4.0, 0.0, 4.0, 0.0])
    metrics = coco_metrics([predict(shifted)], [{"boxes": BOXES, "labels": LABELS}], num_classes=2)
    assert metrics["map_50"] == pytest.approx(1.0)
    assert 0.3 < metrics["map"] < 0.9


def test_a_missing_detection_halves_recall_of_its_class() -> None:
    # Class 1 has two objects and one detection: its AP is 0.5 (precision 1 up to recall 0.5, then nothing);
    # class 2 is perfect; the mean over classes is 0.75.
    metrics = coco_metrics(
        [predict(BOXES[:2], LABELS[:2])], [{"boxes": BOXES, "labels": LABELS}], num_classes=2
    )
    assert metrics["map_50"] == pytest.approx(0.75, abs=0.01)
    assert metrics["map"] == pytest.approx(0.75, abs=0.01)


def test_a_detection_on_an_image_without_objects_is_a_false_positive() -> None:
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    target = {"boxes": BOXES[:1], "labels": LABELS[:1]}
    # The false positive scores higher than the true one: precision 0.5 at recall 1.
    false_positive = {"boxes": BOXES[:1], "scores": torch.tensor([0.99]), "labels": LABELS[:1]}
    metrics = coco_metrics([predict(BOXES[:1], LABELS[:1]), false_positive], [target, empty], num_classes=2)
    assert metrics["map_50"] == pytest.approx(0.5, abs=0.01)


def test_nothing_evaluable_is_zero() -> None:
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
    }
    assert coco_metrics([empty], [empty], num_classes=3) == {"map": 0.0, "map_50": 0.0}
    target = {"boxes": BOXES, "labels": LABELS}
    assert coco_metrics([empty], [target], num_classes=3) == {"map": 0.0, "map_50": 0.0}


def test_segm_compares_masks_not_boxes() -> None:
    scene = render_scene(np.random.default_rng(0), size=64, n_objects=3, upright=True)
    gt_masks = torch.from_numpy(scene.instance_masks)
    boxes, labels = torch.from_numpy(scene.boxes), torch.from_numpy(scene.labels) + 1
    target = {"boxes": boxes, "labels": labels, "masks": gt_masks.to(torch.uint8)}
    probabilities = gt_masks[:, None].float() * 0.8 + 0.1  # [N, 1, H, W], 0.9 inside, 0.1 outside
    perfect = predict(boxes, labels, masks=probabilities)
    assert coco_metrics([perfect], [target], num_classes=3, iou_type="segm")["map"] == pytest.approx(1.0)
    # Right boxes, but every mask emptied to its top-left pixel: box AP stays 1, mask AP falls to 0.
    dots = torch.zeros_like(gt_masks)
    for i, (x1, y1, _, _) in enumerate(boxes.long().tolist()):
        dots[i, y1, x1] = True
    wrong = predict(boxes, labels, masks=dots)
    assert coco_metrics([wrong], [target], num_classes=3, iou_type="bbox")["map"] == pytest.approx(1.0)
    assert coco_metrics([wrong], [target], num_classes=3, iou_type="segm")["map"] == pytest.approx(0.0)


def test_rle_round_trip_matches_pycocotools() -> None:
    rng = np.random.default_rng(1)
    scene = render_scene(rng, size=(48, 80), n_objects=2)
    for mask in [
        *scene.instance_masks,
        rng.random((7, 5)) > 0.5,
        np.zeros((3, 4), bool),
        np.ones((2, 9), bool),
    ]:
        size, counts = encode_rle(mask)
        assert size == list(mask.shape)
        assert isinstance(counts, str)
        np.testing.assert_array_equal(decode_rle(size, counts), mask)
        decoded = mask_utils.decode({"size": size, "counts": counts.encode()})
        np.testing.assert_array_equal(decoded.astype(bool), mask)
        assert int(mask_utils.area({"size": size, "counts": counts.encode()})) == int(mask.sum())


def test_tile_offsets_move_boxes_into_the_image() -> None:
    moved = tile_offsets_to_image(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 100, 50)
    assert moved.tolist() == [[101.0, 52.0, 103.0, 54.0]]


def test_an_object_across_a_tile_border_is_reported_once() -> None:
    # A 200 x 100 image in two 120 px tiles overlapping by 40 px: left [0, 120), right [80, 200).
    windows = tile_grid(100, 200, 120, 40)
    assert [(x0, w) for _, x0, _, w in windows] == [(0, 120), (80, 120)]
    # The object spans x 90..140. The left tile sees it cut at its right edge (90..120); the right tile whole.
    left_cut = torch.tensor([[90.0, 30.0, 120.0, 60.0]])
    right_whole = tile_offsets_to_image(torch.tensor([[10.0, 30.0, 60.0, 60.0]]), 80, 0)
    # A second object, near the first but distinct, seen whole by both tiles (x 84..110, y 70..95).
    near = torch.tensor([[84.0, 70.0, 110.0, 95.0]])
    boxes = torch.cat([left_cut, right_whole, near, near + 0.5])
    scores = torch.tensor([0.95, 0.9, 0.8, 0.85])
    labels = torch.tensor([1, 1, 1, 1])
    tile_ids = torch.tensor([0, 1, 0, 1])
    # NMS alone keeps the cut box: its IoU with the whole one is 30/50 < 0.7.
    assert len(merge_tile_detections(boxes, scores, labels, 0.7)) == 3
    keep = merge_tile_detections(boxes, scores, labels, 0.7, windows=windows, tile_ids=tile_ids)
    assert sorted(keep.tolist()) == [1, 3]  # the whole object from the right tile, the near one once


def test_a_cut_box_no_other_tile_holds_is_kept_and_classes_do_not_merge() -> None:
    windows = tile_grid(100, 200, 120, 40)
    # An object wider than the overlap: cut in both tiles, neither holds it whole -> both pieces stay.
    boxes = torch.tensor([[30.0, 10.0, 120.0, 50.0], [80.0, 10.0, 170.0, 50.0]])
    keep = merge_tile_detections(
        boxes,
        torch.tensor([0.9, 0.8]),
        torch.tensor([1, 1]),
        0.7,
        windows=windows,
        tile_ids=torch.tensor([0, 1]),
    )
    assert sorted(keep.tolist()) == [0, 1]
    same = torch.tensor([[10.0, 10.0, 50.0, 50.0], [10.0, 10.0, 50.0, 50.0]])
    keep = merge_tile_detections(same, torch.tensor([0.9, 0.8]), torch.tensor([1, 2]), 0.5)
    assert sorted(keep.tolist()) == [0, 1]


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_keeps_boxes_on_their_shapes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scene = render_scene(rng, size=(48, 64), n_objects=2, upright=True, min_scale=0.35)
    image, target = augment_detection(
        scene.image,
        scene.boxes,
        scene.labels,
        scene.instance_masks,
        rng,
        size=80,
        hflip=True,
        scale_jitter=(0.8, 1.6),
        color_jitter=0.0,
    )
    assert image.shape == (3, 80, 80) and image.dtype == torch.float32
    assert target["masks"].shape[1:] == (80, 80)
    assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"])
    colours = torch.stack([torch.from_numpy(scene.image[m][0]).float() / 255 for m in scene.instance_masks])
    for box, mask in zip(target["boxes"], target["masks"]):
        x1, y1, x2, y2 = box.tolist()
        assert 0 <= x1 < x2 <= 80 and 0 <= y1 < y2 <= 80
        # The mask fills its box (to the pixel; nearest resampling rounds) ...
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert len(xs) > 0
        assert abs(xs.min() - x1) <= 1.5 and abs(xs.max() + 1 - x2) <= 1.5
        assert abs(ys.min() - y1) <= 1.5 and abs(ys.max() + 1 - y2) <= 1.5
        # ... and the image under the mask is one shape's colour (edge pixels blend, hence the median).
        median = image[:, ys, xs].median(dim=1).values
        assert (colours - median).abs().max(dim=1).values.min() < 0.05


def test_augmentation_flips_the_box_with_the_image() -> None:
    image = np.zeros((40, 40, 3), np.uint8)
    image[10:20, 4:12] = 255  # white block on the left
    boxes = np.array([[4.0, 10.0, 12.0, 20.0]])
    flipped = None
    for seed in range(20):  # find a draw that flips
        rng = np.random.default_rng(seed)
        out, target = augment_detection(image, boxes, np.array([1]), None, rng, size=80, hflip=True)
        if target["boxes"][0, 0] > 40:
            flipped = (out, target)
            break
    assert flipped is not None
    out, target = flipped
    assert "masks" not in target
    assert target["boxes"].tolist() == [[56.0, 20.0, 72.0, 40.0]]  # x 8..24 at scale 2, mirrored in 80
    assert out[:, 22:38, 58:70].min() > 0.95 and out[:, :, :50].max() < 0.05


def test_hflip_is_a_probability() -> None:
    image = np.zeros((20, 20, 3), np.uint8)
    boxes = np.array([[0.0, 0.0, 5.0, 5.0]])
    rng = np.random.default_rng(0)
    for hflip, expected_x1 in ((1.0, 15.0), (0.0, 0.0), (False, 0.0)):
        _, target = augment_detection(image, boxes, np.array([1]), None, rng, size=20, hflip=hflip)
        assert float(target["boxes"][0, 0]) == expected_x1


def test_augmentation_drops_boxes_cropped_away() -> None:
    image = np.zeros((100, 100, 3), np.uint8)
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [90.0, 90.0, 100.0, 100.0]])
    # Scale 4x: the 400 px image is cropped to 100 px, which can hold at most one of the two corners.
    _, target = augment_detection(
        image,
        boxes,
        np.array([1, 2]),
        None,
        np.random.default_rng(0),
        size=100,
        hflip=False,
        scale_jitter=(4, 4),
    )
    assert len(target["boxes"]) <= 1


def test_a_partial_view_inside_the_whole_box_is_merged_away() -> None:
    # The left tile [0, 120) sees the object (x 100..140) cut and predicts a box that stops short of its
    # edge (100..116: not within edge_margin of x = 120) - IoU with the whole box is only 0.4.
    windows = tile_grid(100, 200, 120, 40)
    boxes = torch.tensor([[100.0, 30.0, 140.0, 60.0], [100.0, 32.0, 116.0, 58.0], [150.0, 30.0, 190.0, 60.0]])
    scores, labels, tiles = torch.tensor([0.9, 0.7, 0.8]), torch.tensor([1, 1, 2]), torch.tensor([1, 0, 1])
    kept = merge_tile_detections(boxes, scores, labels, 0.5, windows=windows, tile_ids=tiles)
    assert sorted(kept.tolist()) == [0, 2]
    # Without the containment step (or untiled) both stay; another class inside the box is never merged.
    kept = merge_tile_detections(
        boxes, scores, labels, 0.5, windows=windows, tile_ids=tiles, ios_threshold=None
    )
    assert sorted(kept.tolist()) == [0, 1, 2]
    other = merge_tile_detections(
        boxes, scores, torch.tensor([1, 2, 2]), 0.5, windows=windows, tile_ids=tiles
    )
    assert sorted(other.tolist()) == [0, 1, 2]
