"""``decode: actor``: the read tasks ship encoded files and the classification actor decodes them on its
device (nvJPEG on a GPU). Compared with the read tasks' CPU decode (``decode: tasks``) on the same files:
same sizes, pixels within two levels, the same error rows, the same predictions."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from raycv.annotation.actor import ActorSpec
from raycv.annotation.classifier import Classifier
from raycv.annotation.decode import decode_batch, device_decodable
from raycv.annotation.pipeline import _stages
from raycv.annotation.read import read_bytes_batch, read_decode_batch
from raycv.annotation.sizing import size_actors
from raycv.annotation.source import resolve
from raycv.cli import main
from raycv.config import AnnotateConfig, build_config
from raycv.data import synthetic_scenes
from raycv.data.special_images import make_special_images
from raycv.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from raycv.models import create_model
from raycv.outputs import schema as outputs
from raycv.storage import Storage
from raycv.training import run_directory
from tests._util import write_yaml

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)

SIZE = 64
BAD = ["truncated.jpg", "empty.png", "text.png", "bomb.png"]


def _jpeg(image: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """name -> path: shapes as RGB, grayscale and progressive JPEGs of several sizes, a PNG, the special
    files (CMYK and EXIF-rotated JPEGs, 16-bit PNG, GIF, ...) and the broken ones."""
    folder = tmp_path_factory.mktemp("decode")
    rng = np.random.default_rng(3)
    data = {}
    for i, size in enumerate([48, 96, 200, 64, 131]):
        image = synthetic_scenes.render_classification_sample(rng, i % 3, size=size)
        data[f"rgb{i}.jpg"] = _jpeg(image)
        data[f"progressive{i}.jpg"] = _jpeg(image, progressive=True)
        data[f"gray{i}.jpg"] = _jpeg(image.mean(axis=2).astype(np.uint8))
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG")
        data[f"shape{i}.png"] = buf.getvalue()
    data.update(make_special_images())
    paths = {}
    for name, payload in data.items():
        paths[name] = str(folder / name)
        STORE.write_bytes(paths[name], payload)
    return paths


def _plan(uris: list[str]) -> dict[str, np.ndarray]:
    blank = np.array([""] * len(uris), dtype=object)
    return {
        "image_id": np.array([outputs.image_id_of(u) for u in uris], dtype=object),
        "image_uri": np.array(uris, dtype=object),
        "source_etag": blank,
    }


def test_only_plain_jpegs_go_to_the_device_decoder(files):
    def decodable(name: str) -> bool:
        return device_decodable(STORE.read_bytes(files[name]), 10**8) is not None

    assert all(decodable(f"{kind}{i}.jpg") for kind in ("rgb", "gray", "progressive") for i in range(5))
    # EXIF rotation is applied by the CPU decoder only; CMYK needs Pillow's conversion; the rest aren't JPEG.
    # (truncated.jpg has a whole header: the device decoder fails on it, then the CPU decoder gives the error.)
    for name in ["exif_rotated.jpg", "cmyk.jpg", "shape0.png", "image.tif", "empty.png", "text.png"]:
        assert not decodable(name), name
    assert device_decodable(STORE.read_bytes(files["rgb2.jpg"]), 200 * 200 - 1) is None  # over max_pixels


def test_actor_decode_matches_the_read_tasks(files):
    names = sorted(files)
    uris = [files[n] for n in names]
    cpu = read_decode_batch(_plan(uris), size_hw=(SIZE, SIZE), store=STORE, max_pixels=10**8)
    data = [STORE.read_bytes(u) for u in uris]
    decoded = decode_batch(data, uris, (SIZE, SIZE), "cpu", max_pixels=10**8)
    assert len(decoded) == len(names)
    diffs = []
    for i, (name, d) in enumerate(zip(names, decoded, strict=True)):
        if name in BAD:
            assert d.pixels is None and d.error is not None, name
            assert (
                (d.error[0], d.error[1])
                == (cpu["error_stage"][i], cpu["error_type"][i])
                == (
                    "decode",
                    "DecodeError",
                )
            ), name
            assert name in d.error[2]
            continue
        assert d.error is None and cpu["error_stage"][i] == "", name
        assert (d.width, d.height) == (cpu["width"][i], cpu["height"][i]), name
        ours = (d.pixels * 255).round().to(torch.int32).permute(1, 2, 0).numpy()
        diff = np.abs(ours - cpu["pixels"][i].astype(np.int32))
        assert diff.max() <= 2, (name, diff.max())
        diffs.append(diff.mean())
    assert np.mean(diffs) < 0.3
    assert (
        decoded[names.index("exif_rotated.jpg")].height,
        decoded[names.index("exif_rotated.jpg")].width,
    ) == (
        40,
        20,
    )
    assert "pixels" in decoded[names.index("bomb.png")].error[2]


def test_a_batch_without_jpegs_decodes_on_the_cpu_path(files):
    names = ["shape0.png", "image.bmp", "empty.png"]
    decoded = decode_batch(
        [STORE.read_bytes(files[n]) for n in names], names, (SIZE, SIZE), "cpu", max_pixels=10**8
    )
    assert [d.pixels is not None for d in decoded] == [True, True, False]
    assert decoded[0].pixels.shape == (3, SIZE, SIZE) and decoded[2].error[:2] == ("decode", "DecodeError")
    assert decode_batch([], [], (SIZE, SIZE), "cpu", max_pixels=10) == []


def _run(path) -> str:
    torch.manual_seed(0)
    model = create_model("test_classifier", num_classes=3, image_size=SIZE)
    run_directory.save_weights(str(path / "model.pt"), model.state_dict())
    card = {
        "task": "classification",
        "arch": "test_classifier",
        "num_classes": 3,
        "class_names": ["c0", "c1", "c2"],
        "image_size": SIZE,
        "in_channels": 3,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    }
    STORE.write_json(str(path / "model.json"), card)
    return str(path)


def test_annotate_with_decode_actor_gives_the_rows_of_decode_tasks(files, tmp_path, ray_local):
    """`raycv annotate` with decode: actor (Ray, CPU actors) against the Classifier on the read tasks' pixels."""
    run = _run(tmp_path / "run")
    uris = sorted(files.values())
    out = str(tmp_path / "out")
    cfg = write_yaml(
        tmp_path,
        "annotate.yaml",
        {"model": run, "input": uris, "output": out, "batch_size": 8, "actors": 1, "decode": "actor"},
    )
    assert main(["annotate", cfg]) == 0
    rows = {r["image_uri"]: r for r in pq.read_table(f"{out}/images").to_pylist()}
    summary = json.loads(STORE.read_bytes(f"{out}/_summary.json"))
    assert len(rows) == summary["total"] == len(uris) and summary["error"] == len(BAD)

    plan = _plan(uris)
    expected = Classifier(ActorSpec(model=run, store=STORE, run_id="ref", threads=1, topk=3))(
        read_decode_batch(plan, size_hw=(SIZE, SIZE), store=STORE, max_pixels=178_956_970)
    ).to_pylist()
    score_diffs = []
    for want in expected:
        got = rows[want["image_uri"]]
        for key in ("status", "error_stage", "error_type", "width", "height", "label"):
            assert got[key] == want[key], (want["image_uri"], key, got[key], want[key])
        if want["status"] == "ok":
            score_diffs.append(abs(got["score"] - want["score"]))
    assert len(score_diffs) == len(uris) - len(BAD) and max(score_diffs) < 0.01
    # The read tasks shipped the files' bytes, not pixels.
    config = build_config(AnnotateConfig, yaml.safe_load(STORE.read_bytes(cfg)))
    read, _, _, spec = _stages(
        config, resolve(config.model, STORE), "r", STORE, size_actors(1, 1, 0, {"CPU": 2})
    )
    assert read is read_bytes_batch and spec.max_pixels == 178_956_970


def test_decode_must_be_tasks_or_actor(tmp_path, capsys):
    cfg = write_yaml(
        tmp_path, "a.yaml", {"model": str(tmp_path), "input": str(tmp_path), "output": "o", "decode": "gpu"}
    )
    assert main(["annotate", cfg]) == 2
    err = capsys.readouterr().err
    assert "decode" in err and "gpu" in err and "actor" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA GPU")
def test_nvjpeg_decode_matches_the_cpu_decode(files):
    names = [n for n in sorted(files) if device_decodable(STORE.read_bytes(files[n]), 10**8)]
    data = [STORE.read_bytes(files[n]) for n in names]
    on_gpu = decode_batch(data, names, (SIZE, SIZE), "cuda", max_pixels=10**8)
    on_cpu = decode_batch(data, names, (SIZE, SIZE), "cpu", max_pixels=10**8)
    for g, c in zip(on_gpu, on_cpu, strict=True):
        assert g.pixels.device.type == "cuda" and (g.width, g.height) == (c.width, c.height)
        assert float((g.pixels.cpu() - c.pixels).abs().max()) <= 3 / 255  # nvJPEG's IDCT differs slightly
