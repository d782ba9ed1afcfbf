"""Detectors: well-formed outputs and finite losses for every registered one (empty images included), the
tiny CI models learning generated scenes, and transfer learning that trains just the class-dependent heads."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import raycv.models.detection as detection
from raycv.data.synthetic_scenes import render_scene
from raycv.models.registry import create_model, get_model_info, list_models
from raycv.models.transfer import freeze_backbone, head_module_names, load_weights
from tests._util import torch_threads

NUM_CLASSES = 3
HEADS = {
    "fasterrcnn_mobilenet_v3_large_fpn": ["roi_heads.box_predictor"],
    "fasterrcnn_resnet50_fpn": ["roi_heads.box_predictor"],
    "fasterrcnn_resnet50_fpn_v2": ["roi_heads.box_predictor"],
    "fcos_resnet50_fpn": ["head.classification_head.cls_logits"],
    "retinanet_resnet50_fpn_v2": ["head.classification_head.cls_logits"],
    "ssd300_vgg16": ["head.classification_head"],
    "ssdlite320_mobilenet_v3_large": ["head.classification_head"],
    "test_detector": ["roi_heads.box_predictor"],
    "maskrcnn_resnet50_fpn": ["roi_heads.box_predictor", "roi_heads.mask_predictor.mask_fcn_logits"],
    "maskrcnn_resnet50_fpn_v2": ["roi_heads.box_predictor", "roi_heads.mask_predictor.mask_fcn_logits"],
    "test_instance_segmenter": ["roi_heads.box_predictor", "roi_heads.mask_predictor.mask_fcn_logits"],
}
# Fewer proposals and detections than torchvision's defaults (1000-2000): the same code paths, a CPU test's time.
FAST = {
    "rcnn": {
        "rpn_pre_nms_top_n_train": 200,
        "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 100,
        "rpn_post_nms_top_n_test": 50,
        "box_batch_size_per_image": 32,
        "box_detections_per_img": 20,
    },
    "dense": {"topk_candidates": 100, "detections_per_img": 20},
    "ssd": {"topk_candidates": 100, "detections_per_img": 20},
}


def ours(task: str) -> list[str]:
    """The models of ``task`` that raycv.models.detection registers (other modules may register more)."""
    return [
        name
        for name in list_models(task=task)
        if get_model_info(name).builder.__module__ == detection.__name__
    ]


DETECTORS = ours("detection")
SEGMENTERS = ours("instance_segmentation")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a loaded 2-core box two threads fight over the cores and run slower."""
    with torch_threads(1):
        yield


def fast_options(name: str) -> dict[str, int]:
    if name.startswith("test_"):
        return {}
    if name.startswith("ssd"):
        return FAST["ssd"]
    return FAST["dense"] if name.startswith(("fcos", "retinanet")) else FAST["rcnn"]


def targets_for(sizes: list[tuple[int, int]], *, with_masks: bool) -> list[dict[str, Tensor]]:
    """One object (label 2, box (5, 6, 40, 30)) on the first image; none on the others."""
    targets = []
    for i, (height, width) in enumerate(sizes):
        boxes = torch.tensor([[5.0, 6.0, 40.0, 30.0]]) if i == 0 else torch.zeros(0, 4)
        target = {"boxes": boxes, "labels": torch.full((len(boxes),), 2, dtype=torch.int64)}
        if with_masks:
            masks = torch.zeros(len(boxes), height, width, dtype=torch.uint8)
            masks[:, 6:30, 5:40] = 1
            target["masks"] = masks
        targets.append(target)
    return targets


def test_registers_the_detectors() -> None:
    assert sorted(DETECTORS + SEGMENTERS) == sorted(HEADS)
    assert set(SEGMENTERS) == {name for name in HEADS if "mask" in name or name == "test_instance_segmenter"}
    assert all(get_model_info(name).source == "torchvision" for name in HEADS if not name.startswith("test_"))


@pytest.mark.parametrize("name", DETECTORS + SEGMENTERS)
def test_forward_train_and_freeze(name: str) -> None:
    """Eval outputs per image, finite losses with an image without objects, and heads that freeze_backbone
    leaves trainable: one build per model, the resnet50 ones are slow to run on a CPU."""
    with_masks = name in SEGMENTERS
    model = create_model(name, num_classes=NUM_CLASSES, image_size=128, **fast_options(name))
    sizes = [(60, 80), (90, 70)]
    images = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(h)) for h, w in sizes]

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for output, (height, width) in zip(outputs, sizes):
        n = len(output["boxes"])
        assert (
            output["boxes"].shape == (n, 4)
            and output["scores"].shape == (n,)
            and output["labels"].shape == (n,)
        )
        if n:
            boxes = output["boxes"]
            # Inside the input image, up to float rounding of the resize back (300 px -> 80 px for SSD300).
            assert (boxes[:, :2] >= -1e-3).all()
            assert (boxes[:, 2] <= width + 1e-3).all() and (boxes[:, 3] <= height + 1e-3).all()
            assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
            assert int(output["labels"].min()) >= 1 and int(output["labels"].max()) <= NUM_CLASSES
        if with_masks:
            masks = output["masks"]
            assert masks.shape == (n, 1, height, width)
            assert n == 0 or (masks.min() >= 0 and masks.max() <= 1)

    model.train()
    losses = model(images, targets_for(sizes, with_masks=with_masks))
    assert losses and all(torch.isfinite(value) and value.ndim == 0 for value in losses.values())
    if with_masks:
        assert "loss_mask" in losses
    torch.stack(list(losses.values())).sum().backward()

    assert head_module_names(model) == HEADS[name]
    trainable = freeze_backbone(model)
    assert trainable and all(any(p.startswith(f"{head}.") for head in HEADS[name]) for p in trainable)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)


def test_image_size_sets_the_internal_resize() -> None:
    model = create_model("fasterrcnn_mobilenet_v3_large_fpn", num_classes=2, image_size=96)
    assert model.transform.min_size == (96,) and model.transform.max_size == 96
    lite = create_model("ssdlite320_mobilenet_v3_large", num_classes=2, image_size=96)
    assert lite.transform.fixed_size == (96, 96)
    # torchvision's own defaults stay when no size is given.
    assert create_model("fasterrcnn_mobilenet_v3_large_fpn", num_classes=2).transform.min_size == (800,)
    assert create_model("test_detector", num_classes=2).transform.min_size == (64,)


def test_other_channel_counts() -> None:
    for name in ("test_detector", "ssdlite320_mobilenet_v3_large"):
        model = create_model(name, num_classes=2, in_channels=1, image_size=64).eval()
        with torch.no_grad():
            (output,) = model([torch.rand(1, 50, 70)])
        assert output["boxes"].shape[1] == 4
    # normalised per band as load_weights repeats RGB kernels over them (adapt_input_conv)
    six = create_model("fasterrcnn_mobilenet_v3_large_fpn", num_classes=2, in_channels=6)
    assert six.transform.image_mean == [0.485, 0.456, 0.406] * 2
    assert six.transform.image_std == [0.229, 0.224, 0.225] * 2


def test_builders_refuse_options_raycv_sets() -> None:
    with pytest.raises(ValueError, match="never downloaded"):
        create_model("fcos_resnet50_fpn", num_classes=2, weights="DEFAULT")


def scenes(n: int, seed: int, *, with_masks: bool) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(n):
        scene = render_scene(rng, size=64, n_objects=2, upright=True)
        images.append(torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255)
        target = {"boxes": torch.from_numpy(scene.boxes), "labels": torch.from_numpy(scene.labels) + 1}
        if with_masks:
            target["masks"] = torch.from_numpy(scene.instance_masks).to(torch.uint8)
        targets.append(target)
    return images, targets


def train(model: nn.Module, *, steps: int, with_masks: bool) -> list[float]:
    torch.manual_seed(0)
    images, targets = scenes(16, seed=1, with_masks=with_masks)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    history = []
    for step in range(steps):
        batch = [(step * 2 + i) % len(images) for i in range(2)]
        loss = detection.detection_losses(model, [images[i] for i in batch], [targets[i] for i in batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history


@pytest.mark.parametrize("name", ["test_detector", "test_instance_segmenter"])
def test_tiny_models_learn(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, image_size=64)
    losses = train(model, steps=30, with_masks=name == "test_instance_segmenter")
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_transfer_to_another_number_of_classes() -> None:
    torch.manual_seed(0)
    source = create_model("test_instance_segmenter", num_classes=5)
    target = create_model("test_instance_segmenter", num_classes=NUM_CLASSES)
    report = load_weights(target, source.state_dict())
    assert sorted(report.skipped) == [
        "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.bias",
        "roi_heads.mask_predictor.mask_fcn_logits.weight",
    ]
    assert not report.missing and not report.unexpected
    backbone = "backbone.0.0.weight"
    assert torch.equal(target.state_dict()[backbone], source.state_dict()[backbone])
    assert target.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES + 1  # + background
    # Fine-tune just the heads: the backbone does not move.
    freeze_backbone(target)
    before = target.state_dict()[backbone].clone()
    train(target, steps=2, with_masks=True)
    assert torch.equal(target.state_dict()[backbone], before)


# -- The same boxes eager, scripted and in ONNX (raycv.models.detection_sizes) ---------------------------------


def test_the_resized_size_is_exact_and_the_same_eager_scripted_and_in_onnx():
    """torchvision's float scale gave TorchScript and ONNX Runtime another size than eager mode for 48% and
    19% of 400 random sizes; the exact resize gives floor(side * min(min/short, max/long)), in all three."""
    import io
    import warnings
    from fractions import Fraction

    import onnxruntime as ort

    from raycv.models.detection_sizes import ExactResizeTransform, exact_size

    for h, w, lo, hi in [(75, 100, 64, 64), (100, 75, 64, 64), (80, 112, 64, 64), (300, 1000, 800, 1333)]:
        scale = min(Fraction(lo, min(h, w)), Fraction(hi, max(h, w)))
        assert exact_size(h, w, lo, hi) == (int(h * scale), int(w * scale))
    model = create_model("test_detector", num_classes=2, image_size=64).eval()
    assert type(model.transform) is ExactResizeTransform

    class Resize(nn.Module):
        def __init__(self, transform: nn.Module) -> None:
            super().__init__()
            self.transform = transform

        def forward(self, x: Tensor) -> Tensor:
            return self.transform.resize(x, None)[0]

    resize = Resize(model.transform).eval()
    scripted = torch.jit.script(resize)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            resize, (torch.rand(3, 64, 64),), buf, dynamo=False, opset_version=17, input_names=["image"],
            output_names=["out"], dynamic_axes={"image": {1: "h", 2: "w"}, "out": {1: "oh", 2: "ow"}},
        )  # fmt: skip
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(16, 300, 2))
        x = torch.rand(3, h, w)
        eager = resize(x)
        assert tuple(eager.shape[-2:]) == exact_size(h, w, 64, 64)
        assert torch.equal(scripted(x), eager)
        assert np.abs(session.run(None, {"image": x.numpy()})[0] - eager.numpy()).max() < 1e-4


def test_roi_scales_are_read_from_the_backbone_not_from_the_first_image():
    """torchvision's pooler infers its scale from the first batch: 16 x 16 features of an image resized to
    45 x 64 give 1/2 instead of 1/4, kept for good. raycv's detectors have it from their build on, so what
    they return does not depend on which image came first."""
    from torchvision.ops import MultiScaleRoIAlign

    pool = MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2)
    pool({"0": torch.rand(1, 4, 16, 16)}, [torch.tensor([[0.0, 0.0, 8.0, 8.0]])], [(45, 64)])
    assert pool.scales == [0.5]  # torchvision's inference, wrong for a stride-4 backbone

    def model() -> nn.Module:
        torch.manual_seed(0)
        return create_model("test_detector", num_classes=2, image_size=64).eval()

    first_wide, first_square = model(), model()
    assert first_wide.roi_heads.box_roi_pool.scales == [0.25]
    wide, square = torch.rand(3, 80, 112), torch.rand(3, 64, 64)
    with torch.inference_mode():
        first_wide([wide])
        a = first_wide([square])[0]
        b = first_square([square])[0]
    assert first_wide.roi_heads.box_roi_pool.scales == [0.25]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    masks = create_model("test_instance_segmenter", num_classes=2, image_size=64)
    assert masks.roi_heads.box_roi_pool.scales == masks.roi_heads.mask_roi_pool.scales == [0.25]
