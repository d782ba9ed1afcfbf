"""Models from outside raycv in `raycv annotate`: torchvision/timm architectures with their weights (state_dict
or safetensors, on the S3 server), torchvision_weights from a local torch hub cache, TorchScript, torch.export
and ONNX files; preprocessing as declared; weights as data only; embeddings."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

from raycv.cli import main
from raycv.storage import Storage
from tests._util import write_yaml

STORE = Storage()
CLASSES = ["ant", "bee", "cat"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, np.ndarray]:
    """Six photos-like images of different sizes and aspect ratios (so a shorter-side resize gives several
    input sizes in one batch)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    out = {}
    for i, (h, w) in enumerate([(60, 80), (80, 60), (64, 64), (50, 90), (72, 72), (90, 50)]):
        base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = np.array(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC))
        path = folder / f"im{i}.png"
        Image.fromarray(image).save(path)
        out[str(path)] = image
    return out


def _r18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=len(CLASSES)).eval()


def _reference(model: torch.nn.Module, images: dict[str, np.ndarray], resize=64, crop=None) -> dict:
    """torchvision's own eval transforms on PIL images: Resize(int) (shorter side), CenterCrop, ToTensor,
    Normalize; the model's softmax per image."""
    steps = [v2.Resize(resize), *([v2.CenterCrop(crop)] if crop else [])]
    tf = v2.Compose(
        [v2.PILToTensor(), *steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    )
    with torch.inference_mode():
        return {
            uri: torch.softmax(model(tf(Image.fromarray(im))[None]), 1)[0].numpy()
            for uri, im in images.items()
        }


def _annotate(tmp_path, model, images, out: str, **extra) -> tuple[int, dict]:
    cfg = write_yaml(
        tmp_path,
        f"a-{os.path.basename(out)}.yaml",
        {"model": model, "input": sorted(images), "output": out, "actors": 1, "batch_size": 4, **extra},
    )
    code = main(["annotate", cfg])
    rows = {r["image_uri"]: r for r in pq.read_table(f"{out}/images").to_pylist()} if code == 0 else {}
    return code, rows


def _summary(out: str) -> dict:
    return json.loads(STORE.read_bytes(f"{out}/_summary.json"))


def _check_labels(rows: dict, reference: dict, tol: float = 2e-3) -> None:
    assert len(rows) == len(reference)
    for uri, probs in reference.items():
        r = rows[uri]
        assert r["status"] == "ok", r
        assert r["label"] == int(probs.argmax()) and r["label_name"] == CLASSES[r["label"]]
        assert r["score"] == pytest.approx(float(probs.max()), abs=tol)


def test_torchvision_arch_with_safetensors_and_pth_weights_on_s3(tmp_path, bucket, images, ray_local):
    from safetensors.torch import save

    model = _r18()
    data = save(model.state_dict())
    STORE.write_bytes(f"{bucket}/m/r18.safetensors", data)
    spec = {
        "task": "classification",
        "arch": "torchvision:resnet18",
        "weights": f"{bucket}/m/r18.safetensors",
        "classes": CLASSES,
        "preprocess": {"resize": 64},
    }
    code, rows = _annotate(tmp_path, spec, images, f"{bucket}/out/st")
    assert code == 0
    _check_labels(rows, _reference(model, images))
    assert {r["model_id"] for r in rows.values()} == {hashlib.sha256(data).hexdigest()[:16]}
    code, _ = _annotate(tmp_path, spec, images, f"{bucket}/out/st")  # incremental: nothing new
    assert code == 0 and _summary(f"{bucket}/out/st")["skipped"] == len(images)
    # a .pth state_dict and the classes from a text file on S3, with a centre crop
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    STORE.write_bytes(f"{bucket}/m/r18.pth", buf.getvalue())
    STORE.write_bytes(f"{bucket}/m/classes.txt", "\n".join(CLASSES).encode())
    spec.update(
        weights=f"{bucket}/m/r18.pth",
        classes=f"{bucket}/m/classes.txt",
        preprocess={"resize": 72, "crop": 56},
    )
    code, rows = _annotate(tmp_path, spec, images, f"{bucket}/out/st")  # new weights: new work
    assert code == 0 and _summary(f"{bucket}/out/st")["skipped"] == 0 and len(rows) == len(images)
    _check_labels(rows, _reference(model, images, resize=72, crop=56))


def test_timm_arch_uses_its_pretrained_config(tmp_path, bucket, images, ray_local):
    import timm

    torch.manual_seed(1)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    STORE.write_bytes(f"{bucket}/m/timm.pth", buf.getvalue())
    spec = {
        "task": "classification",
        "arch": "timm:resnet18",
        "weights": f"{bucket}/m/timm.pth",
        "classes": CLASSES,
    }
    code, rows = _annotate(tmp_path, spec, images, f"{bucket}/out/timm")
    assert code == 0
    cfg = timm.data.resolve_data_config({}, model=model)  # 224 px, crop_pct 0.95: resize 235, crop 224
    _check_labels(rows, _reference(model, images, resize=int(224 / cfg["crop_pct"]), crop=224), tol=5e-3)


def test_torchvision_weights_from_the_hub_cache_never_downloaded(tmp_path, monkeypatch, images, ray_local):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    spec = {
        "task": "classification",
        "arch": "torchvision:resnet18",
        "torchvision_weights": "ResNet18_Weights.IMAGENET1K_V1",
    }
    code = main(
        [
            "annotate",
            write_yaml(
                tmp_path,
                "miss.yaml",
                {"model": spec, "input": sorted(images), "output": str(tmp_path / "o0")},
            ),
        ]
    )
    assert code == 2  # not in the cache: exit 2 with the way to put it there, no download
    torch.manual_seed(2)
    model = torchvision.models.resnet18().eval()  # random weights stand in for the real file
    cache.mkdir(parents=True)
    torch.save(model.state_dict(), cache / os.path.basename(weights.url))
    code, rows = _annotate(tmp_path, spec, images, str(tmp_path / "out"))
    assert code == 0
    t = weights.transforms()  # resize 256, crop 224 from the enum's metadata, categories from its meta
    ref = _reference(model, images, resize=t.resize_size[0], crop=t.crop_size[0])
    for uri, probs in ref.items():
        assert rows[uri]["label_name"] == weights.meta["categories"][int(probs.argmax())]
        assert rows[uri]["score"] == pytest.approx(float(probs.max()), abs=2e-3)


@pytest.mark.parametrize("fmt", ["torchscript", "pt2", "onnx"])
def test_model_files(fmt, tmp_path, images, ray_local):
    model = _r18()
    x = torch.zeros(2, 3, 64, 64)
    path = tmp_path / {"torchscript": "m.ts", "pt2": "m.pt2", "onnx": "m.onnx"}[fmt]
    if fmt == "torchscript":
        torch.jit.save(torch.jit.trace(model, x), str(path))
    elif fmt == "pt2":
        batch = torch.export.Dim("batch", min=1)
        torch.export.save(
            torch.export.export(
                model,
                (x,),
                dynamic_shapes={
                    "x": {
                        0: batch,
                        2: torch.export.Dim("h", min=33, max=512),
                        3: torch.export.Dim("w", min=33, max=512),
                    }
                },
            ),
            str(path),
        )
    else:
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=True,
            external_data=False,
            dynamic_shapes={"x": {0: "n", 2: "h", 3: "w"}},
        )
    spec = {"task": "classification", "file": str(path), "classes": CLASSES, "preprocess": {"resize": 64}}
    code, rows = _annotate(tmp_path, spec, images, str(tmp_path / f"out-{fmt}"))
    assert code == 0
    _check_labels(rows, _reference(model, images))
    assert {r["model_id"] for r in rows.values()} == {hashlib.sha256(path.read_bytes()).hexdigest()[:16]}


def _exit2(tmp_path, capsys, spec, images) -> str:
    cfg = write_yaml(
        tmp_path, "bad.yaml", {"model": spec, "input": sorted(images), "output": str(tmp_path / "bad")}
    )
    assert main(["annotate", cfg]) == 2
    return capsys.readouterr().err


def _r18_spec(weights) -> dict:
    return {
        "task": "classification",
        "arch": "torchvision:resnet18",
        "weights": str(weights),
        "classes": CLASSES,
    }


def test_weights_that_do_not_fit_exit_2_naming_the_key(tmp_path, capsys, images):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(num_classes=3).state_dict(), path)
    spec = _r18_spec(path)
    err = _exit2(tmp_path, capsys, spec, images)
    assert "unexpected key 'layer1.2." in err and "model.weights" in err, err
    torch.save(_r18().state_dict(), path)
    err = _exit2(tmp_path, capsys, {**spec, "classes": ["a", "b"]}, images)
    assert "'fc.weight' has shape [3, 512] in the weights and [2, 512] in the model" in err, err


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def test_weights_are_data_a_pickled_model_or_code_is_refused_without_running(tmp_path, capsys, images):
    whole = tmp_path / "whole.pt"
    torch.save(_r18(), whole)  # a pickled nn.Module, not a state_dict
    spec = _r18_spec(whole)
    err = _exit2(tmp_path, capsys, spec, images)
    assert "save model.state_dict()" in err and "export the model" in err, err
    flag = tmp_path / "pwned"
    _Payload.flag = str(flag)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"fc.weight": _Payload()}))
    err = _exit2(tmp_path, capsys, {**spec, "weights": str(evil)}, images)
    assert "pickled Python objects" in err and not flag.exists()


def test_embeddings_from_a_torchvision_classifier_are_its_pooled_features(tmp_path, images, ray_local):
    model = _r18()
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    spec = {
        "task": "embedding",
        "arch": "torchvision:resnet18",
        "weights": str(path),
        "preprocess": {"resize": 64},
    }
    code, rows = _annotate(tmp_path, spec, images, str(tmp_path / "emb"))
    assert code == 0
    table = pq.read_table(str(tmp_path / "emb" / "images"))
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 512)
    features = torch.nn.Sequential(*list(model.children())[:-1])  # up to the global average pool
    tf = v2.Compose(
        [v2.PILToTensor(), v2.Resize(64), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    )
    for uri, im in images.items():
        with torch.inference_mode():
            want = torch.nn.functional.normalize(features(tf(Image.fromarray(im))[None]).flatten(1), dim=1)[0]
        got = np.array(rows[uri]["embedding"], np.float32)
        assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-5)
        assert np.abs(got - want.numpy()).max() < 2e-3


def test_torchvision_segmenter_with_dict_output_gives_label_maps_at_full_size(tmp_path, images, ray_local):
    """lraspp returns {"out": [N, K, h, w]}: scores upsampled to each original size, then argmax."""
    from raycv.data.images import decode_png_mask

    torch.manual_seed(3)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3
    ).eval()
    path = tmp_path / "seg.pth"
    torch.save(model.state_dict(), path)
    spec = {
        "task": "semantic_segmentation",
        "arch": "torchvision:lraspp_mobilenet_v3_large",
        "weights": str(path),
        "classes": CLASSES,
        "preprocess": {"resize": 64},
    }
    code, rows = _annotate(tmp_path, spec, images, str(tmp_path / "seg"))
    assert code == 0
    tf = v2.Compose(
        [v2.PILToTensor(), v2.Resize(64), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    )
    for uri, im in images.items():
        with torch.inference_mode():
            out = model(tf(Image.fromarray(im))[None])["out"]
            want = torch.nn.functional.interpolate(out, size=im.shape[:2], mode="bilinear").argmax(1)[0]
        got = decode_png_mask(rows[uri]["mask_png"])
        assert got.shape == im.shape[:2]
        assert (got == want.numpy()).mean() >= 0.999


def test_torchvision_detector_boxes_in_original_pixels(tmp_path, images, ray_local):
    """A detector resizes inside: it takes each image at its own size and its boxes are the image's."""
    torch.manual_seed(4)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=4, min_size=128, max_size=128
    ).eval()
    path = tmp_path / "det.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(path))
    spec = {
        "task": "detection",
        "arch": "torchvision:fasterrcnn_mobilenet_v3_large_fpn",
        "weights": str(path),
        "classes": CLASSES,
    }
    code = main(
        [
            "annotate",
            write_yaml(
                tmp_path,
                "det.yaml",
                {"model": {**spec, "preprocess": {"resize": 64}}, "input": sorted(images), "output": "x"},
            ),
        ]
    )
    assert code == 2  # detectors resize themselves: a resize is refused
    code, _ = _annotate(tmp_path, spec, images, str(tmp_path / "det"), score_threshold=0.0)
    assert code == 0
    objects = pq.read_table(str(tmp_path / "det" / "objects")).to_pylist()
    assert objects, "a random detector still proposes boxes at score_threshold 0"
    for o in objects:
        h, w = images[o["image_uri"]].shape[:2]
        x1, y1, x2, y2 = o["box"]
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h and o["label_name"] in CLASSES
