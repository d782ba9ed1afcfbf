"""`raycv export`: COCO that pycocotools loads and round-trips, YOLO labels that parse back to the boxes,
GeoJSON polygons in the scene's map coordinates (a GeoTIFF labelled by the real Segmenter actor class)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from raycv.annotation.actor import ActorSpec
from raycv.cli import main
from raycv.data.geotiff import raster_info
from raycv.data.images import decode_png_mask, encode_png
from raycv.data.synthetic_geo import make_test_geotiff
from raycv.data.synthetic_scenes import CLASSES
from raycv.models import create_model
from raycv.outputs import schema as outputs
from raycv.outputs.export import export_output
from raycv.outputs.read import parse_where
from raycv.storage import Storage
from raycv.tasks.segmentation import class_pixels
from raycv.training import run_directory
from tests._outputs import common, detection_output, write_images

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)

SEG_NAMES = ["background", *CLASSES]


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    return detection_output(tmp_path_factory.mktemp("det"))


def test_coco_loads_in_pycocotools_and_round_trips_boxes_and_masks(det, tmp_path):
    from pycocotools.coco import COCO

    path = str(tmp_path / "coco.json")
    assert main(["export", det["out"], "--format", "coco", "--out", path]) == 0
    coco = COCO(path)
    assert len(coco.getImgIds()) == 4  # the error row is left out
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert len(coco.getAnnIds()) == len(det["objects"])
    for img in coco.loadImgs(coco.getImgIds()):
        scene = det["scenes"][img["file_name"]]
        assert (img["height"], img["width"]) == scene.image.shape[:2]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert len(anns) == len(scene.boxes)
        for ann, box, label, mask in zip(anns, scene.boxes, scene.labels, scene.instance_masks):
            x1, y1, x2, y2 = box.tolist()
            assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
            assert ann["category_id"] == label + 1 and 0 < ann["score"] <= 1
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
            assert ann["area"] == mask.sum()


def test_where_on_object_columns_selects_objects(det, tmp_path):
    path = str(tmp_path / "coco.json")
    s = export_output(
        det["out"], "coco", path, STORE, where=parse_where("score >= 0.5 and label_name != 'square'")
    )
    anns = json.load(open(path))["annotations"]
    wanted = [o for o in det["objects"] if o["score"] >= 0.5 and o["label_name"] != "square"]
    assert s.items == len(anns) == len(wanted) > 0
    assert all(a["score"] >= 0.5 and a["category_id"] != 2 for a in anns)


def test_yolo_labels_parse_back_to_the_boxes(det, tmp_path):
    root = tmp_path / "yolo"
    assert main(["export", det["out"], "--format", "yolo", "--out", str(root), "--copy-images"]) == 0
    assert (root / "classes.txt").read_text().split() == list(CLASSES)
    for uri, scene in det["scenes"].items():
        stem = os.path.splitext(os.path.basename(uri))[0]
        h, w = scene.image.shape[:2]
        lines = [x.split() for x in (root / "labels" / f"{stem}.txt").read_text().splitlines()]
        back = np.array(
            [
                [
                    float(cx) - float(bw) / 2,
                    float(cy) - float(bh) / 2,
                    float(cx) + float(bw) / 2,
                    float(cy) + float(bh) / 2,
                ]
                for _, cx, cy, bw, bh in lines
            ]
        ) * [w, h, w, h]
        assert [int(x[0]) for x in lines] == scene.labels.tolist()
        np.testing.assert_allclose(back, scene.boxes, atol=1e-3)
        assert (root / "images" / f"{stem}.png").read_bytes() == open(uri, "rb").read()
    assert "image_uri" in (root / "images.csv").read_text()


def _ring_area(ring) -> float:
    x, y = np.asarray(ring, dtype=np.float64).T
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _polygon_area(geom) -> float:
    rings = geom["coordinates"]
    return _ring_area(rings[0]) - sum(_ring_area(r) for r in rings[1:])


@pytest.fixture(scope="module")
def geo(tmp_path_factory):
    """A 300x200 UTM GeoTIFF labelled by the Segmenter actor class (untrained test_segmenter, in-process),
    its label map then replaced by the scene's ground truth so that the polygons are known."""
    from raycv.annotation.segmenter import Segmenter

    tmp = tmp_path_factory.mktemp("geo")
    scene, truth = str(tmp / "scene.tif"), str(tmp / "truth.png")
    make_test_geotiff(scene, width=300, height=200, count=3, dtype="uint8", mask_path=truth)
    run = tmp / "run"
    run_directory.save_weights(
        str(run / "model.pt"), create_model("test_segmenter", num_classes=4).state_dict()
    )
    card = {
        "task": "semantic_segmentation",
        "arch": "test_segmenter",
        "num_classes": 4,
        "class_names": SEG_NAMES,
        "image_size": 32,
        "in_channels": 3,
    }
    STORE.write_json(str(run / "model.json"), card)
    out = str(tmp / "out")
    seg = Segmenter(
        ActorSpec(model=str(run), store=STORE, run_id="r1", threads=1, output=out, geo={"bands": [1, 2, 3]})
    )
    blank = np.array([""], dtype=object)
    batch = {
        "image_id": np.array([outputs.image_id_of(scene)], dtype=object),
        "image_uri": np.array([scene], dtype=object),
        "source_etag": blank,
        "error_stage": blank,
        "error_type": blank,
        "error_message": blank,
        "data": np.array([b""], dtype=object),
    }
    row = seg(batch).to_pylist()[0]
    assert row["status"] == "ok" and row["crs"] == "EPSG:32633", row
    labels = decode_png_mask(open(truth, "rb").read())
    row.update(mask_png=encode_png(labels), class_pixels=class_pixels(labels, SEG_NAMES))
    plain = common(
        str(tmp / "plain.png"),
        task="semantic_segmentation",
        width=4,
        height=4,
        mask_png=encode_png(np.ones((4, 4), np.uint8)),
        class_pixels=class_pixels(np.ones((4, 4), np.uint8), SEG_NAMES),
    )
    write_images(out, [row, plain], "semantic_segmentation")
    return {"out": out, "scene": scene, "labels": labels}


def test_geojson_polygons_lie_in_the_scene_and_cover_its_labels(geo, tmp_path):
    path = str(tmp_path / "scene.geojson")
    assert main(["export", geo["out"], "--format", "geojson", "--out", path]) == 0
    doc = json.load(open(path))
    assert doc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    info = raster_info(geo["scene"], STORE)
    x0, px, _, y0, _, py = info.transform
    xmin, xmax, ymin, ymax = x0, x0 + px * info.width, y0 + py * info.height, y0
    area: dict[int, float] = {}
    for feat in doc["features"]:
        assert feat["properties"]["image_uri"] == geo["scene"]  # the non-geo row is left out
        pts = np.array([p for ring in feat["geometry"]["coordinates"] for p in ring])
        assert (pts[:, 0] >= xmin).all() and (pts[:, 0] <= xmax).all()
        assert (pts[:, 1] >= ymin).all() and (pts[:, 1] <= ymax).all()
        label = feat["properties"]["label"]
        assert feat["properties"]["label_name"] == SEG_NAMES[label] != "background"
        area[label] = area.get(label, 0.0) + _polygon_area(feat["geometry"])
    present = [k for k in range(1, 4) if (geo["labels"] == k).any()]
    assert sorted(area) == present
    for k in present:  # vectorising loses nothing: each class's polygons cover exactly its pixels
        assert area[k] == pytest.approx((geo["labels"] == k).sum() * abs(px * py))


def test_geojson_reprojects_to_lon_lat(geo, tmp_path):
    path = str(tmp_path / "wgs84.geojson")
    s = export_output(geo["out"], "geojson", path, STORE, crs="EPSG:4326")
    doc = json.load(open(path))
    assert "crs" not in doc and s.images == 1 and s.skipped == 1
    pts = np.array([p for f in doc["features"] for ring in f["geometry"]["coordinates"] for p in ring])
    # UTM 33N easting 500 km is the zone's central meridian, 15 E; northing 5000 km is about 45.1 N
    assert (abs(pts[:, 0] - 15.02) < 0.03).all() and (abs(pts[:, 1] - 45.14) < 0.03).all()


def test_semantic_segmentation_to_coco_rle_per_class(geo, tmp_path):
    from pycocotools.coco import COCO

    path = str(tmp_path / "seg.json")
    export_output(geo["out"], "coco", path, STORE, where=parse_where("crs is not null"))
    coco = COCO(path)
    (img,) = coco.loadImgs(coco.getImgIds())
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
        k = ann["category_id"] - 1
        assert np.array_equal(coco.annToMask(ann).astype(bool), geo["labels"] == k)


def test_formats_a_task_cannot_give_are_usage_errors(geo, tmp_path, capsys):
    assert main(["export", geo["out"], "--format", "yolo", "--out", str(tmp_path / "y")]) == 2
    assert "coco or geojson" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                geo["out"],
                "--format",
                "coco",
                "--out",
                str(tmp_path / "c.json"),
                "--where",
                "nope > 1",
            ]
        )
        == 2
    )
    assert "No column nope" in capsys.readouterr().err
