import os

import pytest

from raycv.data.formats import Sample, read_imagefolder, split_train_val
from raycv.errors import DatasetError
from raycv.storage import Storage

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)


def test_imagefolder_classes_are_sorted_names_and_loose_files_ignored(tmp_path):
    for rel in ["b/1.png", "b/2.jpg", "a/x.png", "a/deep/y.png", "c/readme.txt", "loose.png"]:
        STORE.write_bytes(str(tmp_path / rel), b"x")
    ds = read_imagefolder(str(tmp_path), STORE)
    assert ds.class_names == ["a", "b"]
    got = sorted((s.uri.split(str(tmp_path))[1], s.label) for s in ds.samples)
    assert got == [("/a/deep/y.png", 0), ("/a/x.png", 0), ("/b/1.png", 1), ("/b/2.jpg", 1)]


def test_imagefolder_on_s3(bucket):
    for rel in ["ds/cat/1.png", "ds/dog/2.png", "ds/dog/3.png"]:
        STORE.write_bytes(f"{bucket}/{rel}", b"x")
    ds = read_imagefolder(f"{bucket}/ds", STORE)
    assert ds.class_names == ["cat", "dog"]
    assert [s.label for s in ds.samples] == [0, 1, 1]
    assert ds.samples[0].uri == f"{bucket}/ds/cat/1.png"


def test_imagefolder_errors(tmp_path):
    STORE.write_bytes(str(tmp_path / "only.png"), b"x")
    with pytest.raises(DatasetError, match=r"ROOT/<class_name>/<image>"):
        read_imagefolder(str(tmp_path), STORE)
    with pytest.raises(FileNotFoundError):
        read_imagefolder(str(tmp_path / "missing"), STORE)


def test_split_is_stratified_deterministic_and_disjoint():
    samples = [Sample(f"u{i}", i % 3) for i in range(90)] + [Sample("lonely", 3)]
    train, val = split_train_val(samples, 0.2, seed=5)
    again = split_train_val(samples, 0.2, seed=5)
    assert (train, val) == again
    assert {s.uri for s in train}.isdisjoint({s.uri for s in val})
    assert len(train) + len(val) == 91
    assert [sum(s.label == k for s in val) for k in range(4)] == [
        6,
        6,
        6,
        0,
    ]  # a 1-image class stays in train
    other = split_train_val(samples, 0.2, seed=6)[1]
    assert {s.uri for s in other} != {s.uri for s in val}


def test_masks_format_pairs_images_and_masks_by_stem(tmp_path):
    from raycv.data.formats import read_masks
    from raycv.data.synthetic import write_masks_dataset

    names = write_masks_dataset(str(tmp_path / "ds"), n=5, size=24, seed=1)
    ds = read_masks(str(tmp_path / "ds"), STORE)
    assert ds.class_names == names == ["background", "circle", "square", "triangle"]
    assert [s.uri.rsplit("/", 1)[1] for s in ds.samples] == [f"{i:05d}.png" for i in range(5)]
    assert all(s.mask_uri and s.mask_uri.endswith(f"masks/{i:05d}.png") for i, s in enumerate(ds.samples))


def test_masks_format_errors_say_what_to_fix(tmp_path):
    from raycv.data.formats import read_masks

    STORE.write_bytes(str(tmp_path / "images" / "a.png"), b"x")
    STORE.write_bytes(str(tmp_path / "images" / "b.png"), b"x")
    STORE.write_bytes(str(tmp_path / "masks" / "a.png"), b"x")
    with pytest.raises(DatasetError, match=r"1 image\(s\) .* have no ROOT/masks/<stem>.png, e.g. 'b'"):
        read_masks(str(tmp_path), STORE)
    STORE.write_bytes(str(tmp_path / "masks" / "b.png"), b"x")
    with pytest.raises(DatasetError, match=r"add it .* or set model\.num_classes"):
        read_masks(str(tmp_path), STORE)
    assert read_masks(str(tmp_path), STORE, num_classes=3).class_names == ["class_0", "class_1", "class_2"]


def test_masks_dataset_scenes_follow_their_parameters(tmp_path):
    import numpy as np

    from raycv.data.images import decode_image, decode_png_mask
    from raycv.data.synthetic import _rng, write_masks_dataset
    from raycv.data.synthetic_scenes import render_scene

    write_masks_dataset(str(tmp_path), n=2, size=40, seed=3, classes=("circle", "square"), scale=(0.3, 0.4))
    rng = _rng(3, 3, 1)
    n = int(rng.integers(1, 3))
    scene = render_scene(
        rng, size=40, n_objects=n, classes=("circle", "square"), upright=True, min_scale=0.3, max_scale=0.4
    )
    assert np.array_equal(decode_image(STORE.read_bytes(str(tmp_path / "images" / "00001.png"))), scene.image)
    assert np.array_equal(
        decode_png_mask(STORE.read_bytes(str(tmp_path / "masks" / "00001.png"))), scene.mask
    )


def test_coco_format_with_any_category_ids_masks_and_empty_images(tmp_path):
    import numpy as np
    from pycocotools import mask as mask_utils

    from raycv.data.formats import read_coco
    from raycv.data.synthetic import write_detection_dataset

    names = write_detection_dataset(str(tmp_path), n=8, size=64, seed=2, fmt="coco", category_ids=[7, 3, 11])
    ds = read_coco(str(tmp_path), STORE)
    assert ds.class_names == ["square", "circle", "triangle"]  # labels follow category id order: 3, 7, 11
    assert names == ["circle", "square", "triangle"]
    assert len(ds.samples) == 8 and any(not s.boxes for s in ds.samples)  # images without objects are kept
    s = next(s for s in ds.samples if s.boxes)
    assert s.uri.endswith("images/" + s.uri.rsplit("/", 1)[1]) and (s.width, s.height) == (64, 64)
    x1, y1, x2, y2 = s.boxes[0]
    m = mask_utils.decode(s.segmentations[0])
    ys, xs = np.nonzero(m)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)  # the box bounds its mask


def test_coco_crowd_objects_are_left_out_and_errors_are_clear(tmp_path):
    import json

    from raycv.data.formats import read_coco

    coco = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 1},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]},
        ],
    }
    STORE.write_bytes(str(tmp_path / "annotations.json"), json.dumps(coco).encode())
    ds = read_coco(str(tmp_path), STORE)
    assert ds.samples[0].boxes == ((0, 0, 5, 5),) and ds.samples[0].labels == (0,)
    coco["annotations"].append({"id": 3, "image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1]})
    STORE.write_bytes(str(tmp_path / "annotations.json"), json.dumps(coco).encode())
    with pytest.raises(DatasetError, match="unknown image_id 9"):
        read_coco(str(tmp_path), STORE)
    with pytest.raises(DatasetError, match=r"expects ROOT/annotations\.json"):
        read_coco(str(tmp_path / "nothing"), STORE)


def test_yolo_format_round_trips_boxes(tmp_path):
    from raycv.data.formats import read_yolo
    from raycv.data.synthetic import write_detection_dataset

    write_detection_dataset(str(tmp_path / "y"), n=6, size=(48, 80), seed=4, fmt="yolo")
    write_detection_dataset(str(tmp_path / "c"), n=6, size=(48, 80), seed=4, fmt="coco")
    yolo = read_yolo(str(tmp_path / "y"), STORE)
    from raycv.data.formats import read_coco

    coco = read_coco(str(tmp_path / "c"), STORE)
    assert yolo.class_names == coco.class_names == ["circle", "square", "triangle"]
    for ys, cs in zip(yolo.samples, coco.samples):
        assert ys.normalized and ys.labels == cs.labels
        for yb, cb in zip(ys.boxes, cs.boxes):
            assert all(abs(a * s - b) < 1e-3 for a, b, s in zip(yb, cb, (80, 48, 80, 48)))
    STORE.write_bytes(str(tmp_path / "y" / "labels" / "00000.txt"), b"7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match=r"class 7 is not in classes\.txt"):
        read_yolo(str(tmp_path / "y"), STORE)


def test_imagefolder_with_a_relative_root_finds_its_class_folders(tmp_path, monkeypatch):
    """``data.train: ds`` run from the folder holding ds/cat and ds/dog used to give one class, 'mp'."""
    for rel in ["ds/cat/1.png", "ds/dog/2.png", "ds/dog/3.png"]:
        STORE.write_bytes(str(tmp_path / rel), b"x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for root in ["ds", "./ds", "ds/", "~/ds", "file://ds", "file://" + str(tmp_path / "ds")]:
        ds = read_imagefolder(root, STORE)
        assert ds.class_names == ["cat", "dog"], root
        assert [(s.uri, s.label) for s in ds.samples] == [
            (str(tmp_path / "ds/cat/1.png"), 0),
            (str(tmp_path / "ds/dog/2.png"), 1),
            (str(tmp_path / "ds/dog/3.png"), 1),
        ], root


def test_imagefolder_with_one_class_is_refused(tmp_path, monkeypatch):
    STORE.write_bytes(str(tmp_path / "ds" / "cat" / "1.png"), b"x")
    STORE.write_bytes(str(tmp_path / "ds" / "cat" / "2.png"), b"x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as err:
        read_imagefolder("ds", STORE)
    message = str(err.value)
    assert f"Found 1 class folder 'cat' under {tmp_path / 'ds'}" in message
    assert "ROOT/<class_name>/<image> with at least two classes" in message


def test_every_format_reads_a_relative_root_as_absolute_uris(tmp_path, monkeypatch):
    from raycv.data.formats import read_coco, read_masks, read_yolo
    from raycv.data.synthetic import write_detection_dataset, write_masks_dataset

    write_masks_dataset(str(tmp_path / "m"), n=2, size=24, seed=1)
    write_detection_dataset(str(tmp_path / "c"), n=2, size=32, seed=2, fmt="coco")
    write_detection_dataset(str(tmp_path / "y"), n=2, size=32, seed=2, fmt="yolo")
    monkeypatch.chdir(tmp_path)
    masks = read_masks("./m", STORE)
    assert [s.uri for s in masks.samples] == [str(tmp_path / f"m/images/{i:05d}.png") for i in range(2)]
    assert [s.mask_uri for s in masks.samples] == [str(tmp_path / f"m/masks/{i:05d}.png") for i in range(2)]
    for ds in (read_coco("c", STORE), read_yolo("file://y", STORE)):
        assert len(ds.samples) == 2 and all(s.uri.startswith(str(tmp_path) + "/") for s in ds.samples)
        assert all(os.path.isfile(s.uri) for s in ds.samples)
