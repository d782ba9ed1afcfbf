"""N-band models in `raycv annotate`: a model of C != 3 input bands reads C bands of each GeoTIFF (geo.bands
picks them), a 1-band model the luminance of ordinary images; an RGB model's first convolution adapted to 6
bands, given rasters whose bands repeat R, G, B, labels as the RGB model does on the RGB images."""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
import torchvision
from PIL import Image

from raycv.cli import main
from raycv.data.bands import band_indexes, to_bands
from raycv.data.images import decode_png_mask, resize_rgb
from raycv.errors import DecodeError
from raycv.models.registry import create_model
from raycv.storage import Storage
from tests._util import write_yaml

STORE = Storage()
CLASSES = ["ant", "bee", "cat"]


def _geotiff_bytes(tmp_path, bands: np.ndarray) -> bytes:
    """A GeoTIFF holding ``bands`` ([count, H, W] uint8) as its bytes."""
    count, height, width = bands.shape
    path = tmp_path / f"scratch-{count}.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=width, height=height, count=count, dtype="uint8",
        crs="EPSG:32633", transform=rasterio.transform.from_origin(500000, 4500000, 10, 10),
    ) as dst:  # fmt: skip
        dst.write(bands)
    return path.read_bytes()


@pytest.fixture(scope="module")
def rgb_images(tmp_path_factory) -> dict[str, np.ndarray]:
    folder = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(7)
    out = {}
    for i, (h, w) in enumerate([(48, 64), (64, 48), (56, 56), (40, 72)]):
        base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = np.array(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC))
        Image.fromarray(image).save(folder / f"im{i}.png")
        out[str(folder / f"im{i}.png")] = image
    return out


def _annotate(tmp_path, model: dict, inputs: list[str], out: str, **extra) -> tuple[int, dict]:
    cfg = write_yaml(
        tmp_path,
        f"a-{os.path.basename(out)}.yaml",
        {"model": model, "input": inputs, "output": out, "actors": 1, "batch_size": 4, **extra},
    )
    code = main(["annotate", cfg])
    rows = {r["image_uri"]: r for r in pq.read_table(f"{out}/images").to_pylist()} if code == 0 else {}
    return code, rows


# -- Units -------------------------------------------------------------------------------------------------------


def test_band_indexes_take_the_first_bands_or_geo_bands_and_never_pad():
    assert band_indexes(13, 4, None, "s.tif") == [1, 2, 3, 4]
    assert band_indexes(6, 6, [3, 2, 1, 6, 5, 4], "s.tif") == [3, 2, 1, 6, 5, 4]
    assert band_indexes(1, 3, None, "s.tif") == [1, 1, 1]  # a 3-band model sees a gray raster as RGB
    assert band_indexes(4, 1, None, "s.tif") == [1]
    with pytest.raises(DecodeError, match=r"raster has 4 band\(s\) and the model takes 6"):
        band_indexes(4, 6, None, "s.tif")
    with pytest.raises(DecodeError, match=r"geo.bands names band\(s\) \[7\] and this raster has 6"):
        band_indexes(6, 2, [1, 7], "s.tif")


def test_to_bands_is_pillow_luminance_for_one_band_and_refuses_other_counts():
    rgb = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    gray = to_bands(rgb, 1, "x.png")
    assert gray.shape == (30, 40, 1)
    assert (gray[:, :, 0] == np.asarray(Image.fromarray(rgb).convert("L"))).all()
    assert to_bands(rgb, 3, "x.png") is rgb
    with pytest.raises(DecodeError, match=r"takes 4 bands and this image has 3 \(RGB\).*GeoTIFFs"):
        to_bands(rgb, 4, "x.png")


def test_resize_of_n_bands_is_the_rgb_resize_band_by_band():
    image = np.random.default_rng(1).integers(0, 256, (50, 60, 6), dtype=np.uint8)
    out = resize_rgb(image, (20, 33))
    assert out.shape == (20, 33, 6)
    for half in (slice(0, 3), slice(3, 6)):
        assert (out[:, :, half] == resize_rgb(np.ascontiguousarray(image[:, :, half]), (20, 33))).all()


# -- Classification and embeddings --------------------------------------------------------------------------------


def test_six_band_rasters_label_as_the_rgb_model_labels_the_rgb_images(
    tmp_path, bucket, rgb_images, ray_local
):
    """Band adaptation end to end: resnet18's RGB state_dict on S3, loaded with in_channels 6 (its first conv
    adapted), over GeoTIFFs on S3 whose bands are R, G, B, R, G, B of each image (and, read through
    geo.bands, B, G, R, B, G, R stored), gives the RGB model's labels and scores."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    rgb = {"task": "classification", "arch": "torchvision:resnet18", "weights": str(path), "classes": CLASSES}
    rgb["preprocess"] = {"resize": [48, 48]}
    code, want = _annotate(tmp_path, rgb, sorted(rgb_images), str(tmp_path / "rgb"))
    assert code == 0 and len(want) == 4

    rasters, swapped, names = [], [], {}
    for i, (uri, image) in enumerate(sorted(rgb_images.items())):
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))
        for folder, bands, out in (
            ("six", [0, 1, 2, 0, 1, 2], rasters),
            ("bgr", [2, 1, 0, 2, 1, 0], swapped),
        ):
            target = f"{bucket}/{folder}/im{i}.tif"
            STORE.write_bytes(target, _geotiff_bytes(tmp_path, chw[bands]))
            out.append(target)
            names[target] = uri
    six = {**rgb, "in_channels": 6}
    code, got = _annotate(tmp_path, six, rasters, f"{bucket}/out6")
    assert code == 0 and len(got) == 4
    code, got_swapped = _annotate(
        tmp_path, six, swapped, f"{bucket}/out6bgr", geo={"bands": [3, 2, 1, 6, 5, 4]}
    )
    assert code == 0 and len(got_swapped) == 4
    for rows in (got, got_swapped):
        for uri, row in rows.items():
            ref = want[names[uri]]
            assert row["status"] == "ok", row
            assert (row["label"], row["width"], row["height"]) == (ref["label"], ref["width"], ref["height"])
            assert row["score"] == pytest.approx(ref["score"], abs=1e-4)
            assert [t["label"] for t in row["topk"]] == [t["label"] for t in ref["topk"]]

    # embeddings of the same adapted model, from the 6-band rasters: the RGB images' embeddings
    emb = {**rgb, "task": "embedding"}
    emb.pop("classes")
    code, e_rgb = _annotate(tmp_path, emb, sorted(rgb_images), str(tmp_path / "e-rgb"))
    assert code == 0
    code, e_six = _annotate(tmp_path, {**emb, "in_channels": 6}, rasters, f"{bucket}/e6")
    assert code == 0
    for uri, row in e_six.items():
        assert np.abs(np.array(row["embedding"]) - np.array(e_rgb[names[uri]]["embedding"])).max() < 1e-4


def test_wrong_band_counts_become_error_rows_and_the_run_goes_on(tmp_path, rgb_images, ray_local):
    """A 6-band model: a 6-band raster is labelled, a 4-band raster and a PNG get decode error rows."""
    torch.manual_seed(1)
    path = tmp_path / "six.pth"
    torch.save(create_model("test_classifier", num_classes=3, in_channels=6).state_dict(), path)
    rng = np.random.default_rng(2)
    good, short = tmp_path / "good.tif", tmp_path / "short.tif"
    good.write_bytes(_geotiff_bytes(tmp_path, rng.integers(0, 256, (6, 32, 40), dtype=np.uint8)))
    short.write_bytes(_geotiff_bytes(tmp_path, rng.integers(0, 256, (4, 32, 40), dtype=np.uint8)))
    png = sorted(rgb_images)[0]
    spec = {"task": "classification", "arch": "test_classifier", "weights": str(path), "classes": CLASSES,
            "in_channels": 6, "preprocess": {"resize": [32, 32]}}  # fmt: skip
    code, rows = _annotate(
        tmp_path, spec, [str(good), str(short), png], str(tmp_path / "mixed"), max_error_fraction=1.0
    )
    assert code == 0 and len(rows) == 3
    assert rows[str(good)]["status"] == "ok" and (rows[str(good)]["width"], rows[str(good)]["height"]) == (
        40,
        32,
    )
    assert rows[str(short)]["error_stage"] == "decode"
    assert "raster has 4 band(s) and the model takes 6" in rows[str(short)]["error_message"]
    assert rows[png]["error_stage"] == "decode"
    assert "takes 6 bands and this image has 3 (RGB)" in rows[png]["error_message"]


def test_a_one_band_model_reads_luminance_of_images_and_band_one_of_rasters(tmp_path, rgb_images, ray_local):
    """A grayscale (1-band) model gives a PNG and a 1-band GeoTIFF of that PNG's luminance the same label."""
    torch.manual_seed(2)
    path = tmp_path / "gray.pth"
    torch.save(create_model("test_classifier", num_classes=3, in_channels=1).state_dict(), path)
    rasters = {}
    for i, (uri, image) in enumerate(sorted(rgb_images.items())):
        luma = np.asarray(Image.fromarray(image).convert("L"))[None]
        target = tmp_path / f"gray{i}.tif"
        target.write_bytes(_geotiff_bytes(tmp_path, np.ascontiguousarray(luma)))
        rasters[str(target)] = uri
    spec = {"task": "classification", "arch": "test_classifier", "weights": str(path), "classes": CLASSES,
            "in_channels": 1, "preprocess": {"resize": [40, 40]}}  # fmt: skip
    code, from_png = _annotate(tmp_path, spec, sorted(rgb_images), str(tmp_path / "g-png"))
    assert code == 0
    code, from_tif = _annotate(tmp_path, spec, sorted(rasters), str(tmp_path / "g-tif"))
    assert code == 0
    assert len(from_tif) == len(from_png) == 4
    for tif, row in from_tif.items():
        ref = from_png[rasters[tif]]
        assert row["status"] == ref["status"] == "ok"
        assert row["label"] == ref["label"] and row["score"] == pytest.approx(ref["score"], abs=1e-4)


# -- Segmentation -------------------------------------------------------------------------------------------------


def test_six_band_segmentation_of_rasters_tiled_and_whole_matches_rgb(tmp_path, rgb_images, ray_local):
    """The segmenter reads 6 bands of each GeoTIFF (whole, and by tiles for the one larger than tile.size):
    the same label maps as the RGB model on the RGB PNGs."""
    torch.manual_seed(4)
    path = tmp_path / "seg.pth"
    torch.save(create_model("test_segmenter", num_classes=3).state_dict(), path)
    spec = {"task": "semantic_segmentation", "arch": "test_segmenter", "weights": str(path),
            "classes": CLASSES, "preprocess": {"resize": None}}  # fmt: skip
    tile = {"size": 48, "overlap": 8}
    code, want = _annotate(tmp_path, spec, sorted(rgb_images), str(tmp_path / "s-rgb"), tile=tile)
    assert code == 0
    rasters = {}
    for i, (uri, image) in enumerate(sorted(rgb_images.items())):
        target = tmp_path / f"seg{i}.tif"
        target.write_bytes(
            _geotiff_bytes(tmp_path, np.ascontiguousarray(image.transpose(2, 0, 1)[[0, 1, 2] * 2]))
        )
        rasters[str(target)] = uri
    code, got = _annotate(
        tmp_path, {**spec, "in_channels": 6}, sorted(rasters), str(tmp_path / "s6"), tile=tile
    )
    assert code == 0 and len(got) == 4
    for tif, row in got.items():
        ref = want[rasters[tif]]
        assert row["status"] == "ok" and row["crs"] == "EPSG:32633"
        a, b = decode_png_mask(row["mask_png"]), decode_png_mask(ref["mask_png"])
        assert a.shape == b.shape == rgb_images[rasters[tif]].shape[:2]
        assert (a == b).mean() >= 0.999


# -- What exits 2 -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "arch", "extra", "message"),
    [
        ("classification", "test_classifier", {"geo": {"bands": [1, 2, 3]}}, r"geo.bands.*takes 4 band\(s\)"),
        ("classification", "test_classifier", {"decode": "actor"}, r"decode: actor decodes RGB JPEGs"),
        ("detection", "test_detector", {}, r"Detectors take 3-band \(RGB\) images"),
    ],
)
def test_settings_a_four_band_model_cannot_take_exit_2(
    tmp_path, capsys, rgb_images, task, arch, extra, message
):
    torch.manual_seed(0)
    path = tmp_path / "m.pth"
    # a detector's classes include the background
    model = create_model(arch, num_classes=3 if task != "detection" else 4, in_channels=4)
    torch.save(model.state_dict(), path)
    spec = {"task": task, "arch": arch, "weights": str(path), "classes": CLASSES, "in_channels": 4}
    if task == "classification":
        spec["preprocess"] = {"resize": [32, 32]}
    else:
        spec["preprocess"] = {"resize": None}
    code, _ = _annotate(tmp_path, spec, sorted(rgb_images), str(tmp_path / "no"), **extra)
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


# -- Training on N bands ----------------------------------------------------------------------------------------


def _four_band_folder(tmp_path, root, n_per_class: int, seed: int) -> dict[str, int]:
    """An image folder of 4-band GeoTIFFs whose class is in band 4 alone (a bright or a dark near-infrared
    square on noise); bands 1-3 are the same noise for both classes, so an RGB reading is at chance."""
    rng = np.random.default_rng(seed)
    labels = {}
    for label, name in enumerate(["dark", "bright"]):
        os.makedirs(root / name, exist_ok=True)
        for i in range(n_per_class):
            bands = rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)
            bands[3] = rng.integers(90, 160, (32, 32), dtype=np.uint8)
            y, x = rng.integers(4, 16, 2)
            bands[3, y : y + 12, x : x + 12] = 240 if label else 10
            path = root / name / f"{i}.tif"
            path.write_bytes(_geotiff_bytes(tmp_path, bands))
            labels[str(path)] = label
    return labels


@pytest.mark.timeout(600)
def test_training_on_four_band_rasters_learns_from_the_fourth_band_and_annotates_them(tmp_path, ray_local):
    """`raycv train` with model.options.in_channels 4 over a folder of 4-band GeoTIFFs learns a class that
    only band 4 shows (>= 0.9 validation accuracy), its card says 4 bands, and annotating new rasters of
    the same kind with the run labels them (>= 0.9)."""
    import json

    labels = _four_band_folder(tmp_path, tmp_path / "nir", 40, seed=0)
    cfg = write_yaml(
        tmp_path,
        "train.yaml",
        {
            "model": {"arch": "test_classifier", "options": {"in_channels": 4}},
            "data": {"train": str(tmp_path / "nir"), "image_size": 32, "val_fraction": 0.25},
            "train": {"epochs": 5, "batch_size": 16, "lr": 0.01, "seed": 0},
            "scaling": {"num_workers": 1, "cpus_per_worker": 2},
            "output": {"dir": str(tmp_path / "run")},
        },
    )
    assert main(["train", cfg]) == 0
    card = json.loads(STORE.read_bytes(str(tmp_path / "run" / "model.json")))
    assert card["in_channels"] == 4 and len(card["normalization"]["mean"]) == 4
    assert card["best_metrics"]["accuracy"] >= 0.9, card["best_metrics"]
    assert len(labels) == 80

    fresh = _four_band_folder(tmp_path, tmp_path / "new", 10, seed=1)
    code, rows = _annotate(tmp_path, str(tmp_path / "run"), sorted(fresh), str(tmp_path / "labels"))
    assert code == 0 and len(rows) == 20
    right = sum(rows[uri]["label_name"] == ["dark", "bright"][label] for uri, label in fresh.items())
    assert right / 20 >= 0.9, right


def test_colour_jitter_on_a_four_band_model_exits_2(tmp_path, capsys):
    cfg = write_yaml(
        tmp_path,
        "t.yaml",
        {
            "model": {"arch": "test_classifier", "options": {"in_channels": 4}},
            "data": {"train": str(tmp_path)},
            "train": {"augment": {"color_jitter": 0.2}},
            "output": {"dir": str(tmp_path / "run")},
        },
    )
    assert main(["train", cfg]) == 2
    assert "set color_jitter: 0" in capsys.readouterr().err
