"""The model replicas' speed options (precision, channels_last, compile, fuse_conv_bn), called in-process on one batch:
no Ray. Random-weight models on generated shapes: what is compared is the same model with and without the
option, not accuracy."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from raycv.annotation.actor import ActorSpec, fuse_conv_bn
from raycv.annotation.classifier import Classifier
from raycv.annotation.segmenter import Segmenter
from raycv.config import AnnotateConfig, build_config
from raycv.data import synthetic
from raycv.data.images import decode_png_mask, encode_png
from raycv.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from raycv.errors import ConfigError
from raycv.models import create_model, saved
from raycv.outputs import schema as outputs
from raycv.storage import Storage
from raycv.training import run_directory

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)

SIZE = 64


def _run(path, arch: str, task: str, num_classes: int) -> str:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=num_classes, image_size=SIZE)
    run_directory.save_weights(str(path / "model.pt"), model.state_dict())
    card = {
        "task": task,
        "arch": arch,
        "num_classes": num_classes,
        "class_names": [f"c{i}" for i in range(num_classes)],
        "image_size": SIZE,
        "in_channels": 3,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    }
    STORE.write_json(str(path / "model.json"), card)
    return str(path)


def _plan(n: int) -> dict[str, np.ndarray]:
    blank = np.array([""] * n, dtype=object)
    uris = [f"/x/{i}.png" for i in range(n)]
    return {
        "image_id": np.array([outputs.image_id_of(u) for u in uris], dtype=object),
        "image_uri": np.array(uris, dtype=object),
        "source_etag": blank,
        "error_stage": blank,
        "error_type": blank,
        "error_message": blank,
    }


@pytest.fixture(scope="module")
def shapes() -> dict[str, np.ndarray]:
    """80 decoded, resized images as the read stage hands them to a Classifier."""
    n = 80
    rng = np.random.default_rng(0)
    pixels = np.stack([synthetic.render_classification_sample(rng, i % 3, size=SIZE) for i in range(n)])
    full = np.full(n, SIZE, np.int32)
    return {**_plan(n), "pixels": pixels, "width": full, "height": full}


def _standardise_head(run: str, head: str, pixels: np.ndarray) -> None:
    """Rescale the run's last layer so that each class's logits have mean 0 and std 1 on ``pixels``.

    Untouched, a random-weight model gives every image (pixel) the same class and any precision would
    'agree'; this way every class comes out, some near a tie, which is where reduced precision flips labels.
    """
    model = saved.load_run(run, STORE).model
    layer = getattr(model, head)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255.0)
    with torch.no_grad():
        logits = model(normalize(x, IMAGENET_MEAN, IMAGENET_STD)).transpose(0, 1).flatten(1)  # [K, N(HW)]
        mean, std = logits.mean(1), logits.std(1)
        layer.weight.div_(std.view(-1, *[1] * (layer.weight.dim() - 1)))
        layer.bias.copy_((layer.bias - mean) / std)
    run_directory.save_weights(f"{run}/model.pt", model.state_dict())


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, shapes):
    run = _run(tmp_path_factory.mktemp("cls"), "resnet18", "classification", 3)
    _standardise_head(run, "fc", shapes["pixels"])
    return run


def _labels_scores(table) -> tuple[np.ndarray, np.ndarray]:
    assert table.column("status").to_pylist() == ["ok"] * table.num_rows
    return np.array(table.column("label").to_pylist()), np.array(table.column("score").to_pylist())


def test_bf16_channels_last_classifier_matches_fp32(classifier_run, shapes):
    ref = Classifier(ActorSpec(model=classifier_run, store=STORE, run_id="r", threads=1, channels_last=False))
    fast = Classifier(
        ActorSpec(
            model=classifier_run, store=STORE, run_id="r", threads=1, precision="bf16", channels_last=True
        )
    )
    assert next(fast.run.model.parameters()).is_contiguous(memory_format=torch.channels_last)
    labels, scores = _labels_scores(ref(shapes))
    fast_labels, fast_scores = _labels_scores(fast(shapes))
    assert len(set(labels)) == 3  # a real test: every class is predicted somewhere
    assert (labels == fast_labels).mean() >= 0.95
    assert np.abs(scores - fast_scores).max() <= 0.05


def test_bf16_channels_last_segmenter_matches_fp32(tmp_path):
    run = _run(tmp_path, "unet", "semantic_segmentation", 4)
    scenes = [synthetic.render_scene(np.random.default_rng(i), size=SIZE, n_objects=2) for i in range(6)]
    _standardise_head(run, "head", np.stack([s.image for s in scenes]))
    batch = {**_plan(6), "data": np.array([encode_png(s.image) for s in scenes], dtype=object)}
    out = str(tmp_path / "out")
    ref = Segmenter(
        ActorSpec(model=run, store=STORE, run_id="r", threads=1, output=out, channels_last=False)
    )(batch)
    fast = Segmenter(
        ActorSpec(
            model=run, store=STORE, run_id="r", threads=1, output=out, precision="bf16", channels_last=True
        )
    )(batch)
    assert fast.column("status").to_pylist() == ["ok"] * 6
    a = np.stack([decode_png_mask(m) for m in ref.column("mask_png").to_pylist()])
    b = np.stack([decode_png_mask(m) for m in fast.column("mask_png").to_pylist()])
    assert a.shape == b.shape == (6, SIZE, SIZE) and len(np.unique(a)) == 4
    assert (a == b).mean() >= 0.95


def test_channels_last_is_the_default_and_changes_no_label(classifier_run, shapes, tmp_path):
    """NHWC (the default: faster on CPU too) computes the same function as NCHW, up to summation order."""
    assert build_config(AnnotateConfig, {"model": "r/", "input": "i/", "output": "o/"}).channels_last
    nchw = Classifier(
        ActorSpec(model=classifier_run, store=STORE, run_id="r", threads=1, channels_last=False)
    )
    nhwc = Classifier(ActorSpec(model=classifier_run, store=STORE, run_id="r", threads=1))
    assert next(nhwc.run.model.parameters()).is_contiguous(memory_format=torch.channels_last)
    assert next(nchw.run.model.parameters()).is_contiguous()
    labels, scores = _labels_scores(nchw(shapes))
    got_labels, got_scores = _labels_scores(nhwc(shapes))
    assert len(set(labels)) == 3 and (labels == got_labels).all()
    assert np.abs(scores - got_scores).max() <= 1e-4

    run = _run(tmp_path, "unet", "semantic_segmentation", 4)
    scenes = [synthetic.render_scene(np.random.default_rng(i), size=SIZE, n_objects=2) for i in range(4)]
    _standardise_head(run, "head", np.stack([s.image for s in scenes]))
    batch = {**_plan(4), "data": np.array([encode_png(s.image) for s in scenes], dtype=object)}
    out = str(tmp_path / "out")
    masks = [
        np.stack([decode_png_mask(m) for m in table.column("mask_png").to_pylist()])
        for table in (
            Segmenter(
                ActorSpec(model=run, store=STORE, run_id="r", threads=1, output=out, channels_last=False)
            )(batch),
            Segmenter(ActorSpec(model=run, store=STORE, run_id="r", threads=1, output=out))(batch),
        )
    ]
    assert len(np.unique(masks[0])) == 4 and (masks[0] == masks[1]).mean() >= 0.999


def _batchnorms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_conv_bn_fusion_is_the_default_and_changes_no_label(classifier_run, shapes, tmp_path):
    """Each BatchNorm after a convolution folded into it: the same function up to rounding, BatchNorms gone;
    off with fuse_conv_bn: false and with Grad-CAM (which hooks the model's layers)."""
    assert build_config(AnnotateConfig, {"model": "r/", "input": "i/", "output": "o/"}).fuse_conv_bn
    plain = Classifier(
        ActorSpec(
            model=classifier_run, store=STORE, run_id="r", threads=1, channels_last=False, fuse_conv_bn=False
        )
    )
    fused = Classifier(
        ActorSpec(model=classifier_run, store=STORE, run_id="r", threads=1, channels_last=False)
    )
    assert _batchnorms(plain.run.model) == 20 and _batchnorms(fused.run.model) == 0  # resnet18's 20
    labels, scores = _labels_scores(plain(shapes))
    got_labels, got_scores = _labels_scores(fused(shapes))
    assert len(set(labels)) == 3 and (labels == got_labels).all()
    assert np.abs(scores - got_scores).max() <= 1e-4
    explained = Classifier(
        ActorSpec(model=classifier_run, store=STORE, run_id="r", threads=1, explain="gradcam")
    )
    assert _batchnorms(explained.run.model) == 20

    run = _run(tmp_path, "deeplabv3_mobilenet_v3_large", "semantic_segmentation", 4)
    images = np.stack(
        [synthetic.render_scene(np.random.default_rng(i), size=SIZE, n_objects=2).image for i in range(4)]
    )
    segmenters = [
        Segmenter(ActorSpec(model=run, store=STORE, run_id="r", threads=1, fuse_conv_bn=fuse))
        for fuse in (False, True)
    ]
    assert _batchnorms(segmenters[0].run.model) > 0 and _batchnorms(segmenters[1].run.model) == 0
    probs = [seg._probs(images) for seg in segmenters]  # class scores of one batch at the model's size
    assert probs[0].shape == (4, 4, SIZE, SIZE) and np.abs(probs[0] - probs[1]).max() <= 1e-4


def test_fuse_conv_bn_leaves_what_it_cannot_fuse_as_it_is():
    class Branchy(torch.nn.Module):  # control flow on the input: torch.fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x if x.sum() > 0 else -x))

    branchy = Branchy().eval()
    assert fuse_conv_bn(branchy) is branchy and _batchnorms(branchy) == 1
    training = create_model("resnet18", num_classes=3).train()
    assert fuse_conv_bn(training) is training and _batchnorms(training) == 20  # BatchNorm still learning
    model = create_model("resnet18", num_classes=3).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x)
        fused = fuse_conv_bn(model)
        assert _batchnorms(fused) == 0 and torch.allclose(fused(x), ref, rtol=1e-4, atol=1e-5)


def test_compile_gives_the_same_labels(classifier_run, shapes):
    small = {k: v[:8] for k, v in shapes.items()}
    labels, scores = _labels_scores(
        Classifier(ActorSpec(model=classifier_run, store=STORE, run_id="r", threads=1))(small)
    )
    compiled = Classifier(ActorSpec(model=classifier_run, store=STORE, run_id="r", threads=1, compile=True))
    got_labels, got_scores = _labels_scores(compiled(small))
    assert compiled.model.worked, "torch.compile fell back to eager on this platform"
    assert (labels == got_labels).all() and np.allclose(scores, got_scores, atol=1e-4)


def test_compile_failure_warns_and_runs_eagerly(classifier_run, shapes, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: broken)
    small = {k: v[:4] for k, v in shapes.items()}
    labels, _ = _labels_scores(
        Classifier(ActorSpec(model=classifier_run, store=STORE, run_id="r", threads=1))(small)
    )
    with caplog.at_level(logging.WARNING, logger="raycv.annotation.actor"):
        got, _ = _labels_scores(
            Classifier(ActorSpec(model=classifier_run, store=STORE, run_id="r", threads=1, compile=True))(
                small
            )
        )
    assert (labels == got).all()
    assert "torch.compile failed (RuntimeError: no compiler here); running the model eagerly" in caplog.text


def test_fp16_is_refused_on_cpu(classifier_run):
    data = {"model": "run/", "input": "in/", "output": "out/", "precision": "fp16", "gpus_per_actor": 0}
    with pytest.raises(ConfigError) as e:
        build_config(AnnotateConfig, data)
    assert e.value.field == "precision" and e.value.value == "fp16"
    assert "precision: bf16" in e.value.fix and "gpus_per_actor: 1" in e.value.fix
    assert build_config(AnnotateConfig, {**data, "gpus_per_actor": 1}).precision == "fp16"
    assert build_config(AnnotateConfig, {**data, "precision": "bf16"}).precision == "bf16"
    # gpus_per_actor: auto: decided once the cluster is known (a CPU-only cluster: the same message, exit 2)
    from raycv.annotation.pipeline import check_sized_precision
    from raycv.annotation.sizing import size_actors

    auto = build_config(AnnotateConfig, {k: v for k, v in data.items() if k != "gpus_per_actor"})
    with pytest.raises(ConfigError, match="fp16 runs on CUDA GPUs only"):
        check_sized_precision(auto, size_actors("auto", "auto", "auto", {"CPU": 2}))
    check_sized_precision(auto, size_actors("auto", "auto", "auto", {"CPU": 8, "GPU": 1}))
    # an actor that lands on a CPU (no CUDA there) says the same
    with pytest.raises(ConfigError, match="fp16 runs on CUDA GPUs only"):
        Classifier(ActorSpec(model=classifier_run, store=STORE, run_id="r", threads=1, precision="fp16"))


def test_bf16_detector_runs_the_backbone_reduced_and_boxes_in_fp32(tmp_path):
    from raycv.annotation.detector import Detector

    run = _run(tmp_path, "test_instance_segmenter", "instance_segmentation", 3)
    scenes = [synthetic.render_scene(np.random.default_rng(i), size=SIZE, n_objects=2) for i in range(4)]
    batch = {**_plan(4), "data": np.array([encode_png(s.image) for s in scenes], dtype=object)}
    kw = {"score_threshold": 0.0, "iou_threshold": 0.5}
    ref = (
        Detector(ActorSpec(model=run, store=STORE, run_id="r", threads=1, channels_last=False, **kw))(batch)
        .column("objects")
        .to_pylist()
    )
    fast = Detector(
        ActorSpec(model=run, store=STORE, run_id="r", threads=1, precision="bf16", channels_last=True, **kw)
    )
    dtypes = set()
    conv = next(m for m in fast.run.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    got = fast(batch).column("objects").to_pylist()
    assert dtypes == {torch.bfloat16}  # the backbone ran in bf16 ...
    assert sum(map(len, ref)) > 0
    for a, b in zip(ref, got, strict=True):  # ... and the best box of each image barely moved
        assert a and b and a[0]["label"] == b[0]["label"]
        assert np.abs(np.array(a[0]["box"]) - np.array(b[0]["box"])).max() <= 1.0
        assert abs(a[0]["score"] - b[0]["score"]) <= 0.05
