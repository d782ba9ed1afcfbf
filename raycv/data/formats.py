"""Dataset format readers (SPEC §4). Each lists a dataset root into samples without decoding images."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np

from raycv import storage
from raycv.errors import DatasetError
from raycv.storage import Storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".dcm")


@dataclass(frozen=True)
class Sample:
    """One labelled image: its URI and either a class index or the URI of its label-map PNG."""

    uri: str
    label: int = -1
    mask_uri: str | None = None


@dataclass(frozen=True)
class Dataset:
    """A listed dataset: its samples and class names (index = label)."""

    samples: list[Sample]
    class_names: list[str]


def read_imagefolder(root: str, store: Storage) -> Dataset:
    """``ROOT/<class_name>/<image>``; class index = position of the name in the sorted class names.

    One recursive listing of the root (a single paged LIST on S3), nothing decoded. A local root may be
    spelled any way (``ds``, ``./ds``, ``~/ds``, ``file://...``): it is made absolute first.

    Raises:
        DatasetError: when the root holds no class folder with images, or only one (nothing to learn).
        FileNotFoundError: when the root does not exist.
    """
    root = storage.canonical_uri(root)
    base = root.rstrip("/") + "/"
    by_class: dict[str, list[str]] = {}
    for entry in store.iter_files(root, extensions=IMAGE_EXTENSIONS):
        parts = entry.uri[len(base) :].split("/") if entry.uri.startswith(base) else []
        if len(parts) < 2:
            continue  # a loose file at the root (or a root that is a file) belongs to no class
        by_class.setdefault(parts[0], []).append(entry.uri)
    if not by_class:
        raise DatasetError(
            f"No images in class folders under {root}: the imagefolder format expects "
            f"ROOT/<class_name>/<image> (extensions {', '.join(IMAGE_EXTENSIONS)})."
        )
    names = sorted(by_class)
    if len(names) < 2:
        raise DatasetError(
            f"Found 1 class folder '{names[0]}' under {root}; imagefolder needs ROOT/<class_name>/<image> "
            "with at least two classes: point the dataset at the folder that holds the class folders, or "
            "add the other classes."
        )
    samples = [Sample(uri, i) for i, name in enumerate(names) for uri in sorted(by_class[name])]
    return Dataset(samples, names)


def read_masks(root: str, store: Storage, num_classes: int | None = None) -> Dataset:
    """``ROOT/images/<stem>.<ext>`` with ``ROOT/masks/<stem>.png`` (uint8 label maps, 255 = ignore).

    Like every reader here, a local ``root`` is made absolute first (:func:`raycv.storage.canonical_uri`),
    so the samples name the same files on every worker whatever the driver's folder.

    Class names come from ``ROOT/classes.txt`` (one per line, line k = label k); without it, from
    ``num_classes`` as ``class_0 ...``. Images and masks are paired by stem with two listings.

    Raises:
        DatasetError: no images, an image without a mask, or no way to know the classes.
    """
    root = storage.canonical_uri(root)
    images = _by_stem(store, storage.join(root, "images"), IMAGE_EXTENSIONS)
    masks = _by_stem(store, storage.join(root, "masks"), (".png",), missing_ok=True)
    if not images:
        raise DatasetError(
            f"No images under {root}/images: the masks format expects ROOT/images and ROOT/masks."
        )
    missing = sorted(set(images) - set(masks))
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) under {root}/images have no ROOT/masks/<stem>.png, e.g. '{missing[0]}'; "
            "add the masks or remove those images."
        )
    try:
        text = store.read_bytes(storage.join(root, "classes.txt")).decode()
        names = [line.strip() for line in text.splitlines() if line.strip()]
    except FileNotFoundError:
        if not num_classes:
            raise DatasetError(
                f"No {root}/classes.txt: add it (one class name per line) or set model.num_classes."
            ) from None
        names = [f"class_{i}" for i in range(num_classes)]
    return Dataset([Sample(images[s], mask_uri=masks[s]) for s in sorted(images)], names)


def split_train_val(
    samples: list[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """A deterministic, stratified split: the same ``seed`` always gives the same validation images.

    Each class keeps at least one training image; a class with one image contributes none to val.
    """
    rng = np.random.default_rng(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    labels = sorted({getattr(s, "label", -1) for s in samples})
    for label in labels:
        group = [s for s in samples if getattr(s, "label", -1) == label]
        order = rng.permutation(len(group))
        n_val = min(len(group) - 1, round(len(group) * val_fraction))
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return train, val


def _by_stem(
    store: Storage, folder: str, extensions: tuple[str, ...], *, missing_ok: bool = False
) -> dict[str, str]:
    """The files of ``folder`` (one listing) by file stem: how images pair with their masks or labels."""
    try:
        return {stem(e.uri): e.uri for e in store.iter_files(folder, extensions=extensions)}
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise


def stem(uri: str) -> str:
    return posixpath.splitext(posixpath.basename(uri))[0]


@dataclass(frozen=True)
class DetectionSample:
    """One image with its objects.

    ``boxes`` are [x1, y1, x2, y2] in pixels, or normalised to 0..1 when ``normalized`` (the YOLO format,
    converted once the image's size is known); ``labels`` index the dataset's class names; ``segmentations``
    hold each object's COCO segmentation (polygons or RLE) when the dataset has masks.
    """

    uri: str
    boxes: tuple[tuple[float, float, float, float], ...]
    labels: tuple[int, ...]
    segmentations: tuple[Any, ...] | None = None
    width: int | None = None
    height: int | None = None
    normalized: bool = False


@dataclass(frozen=True)
class DetectionDataset:
    samples: list[DetectionSample]
    class_names: list[str]


def read_coco(root: str, store: Storage) -> DetectionDataset:
    """``ROOT/annotations.json`` (COCO) with ``file_name`` relative to ``ROOT/images/``.

    Category ids may be any integers: labels are their positions in id order. ``iscrowd`` objects are
    left out (they mark regions to ignore, not instances to learn); images without objects are kept.

    Raises:
        DatasetError: a missing or malformed annotations file, or an annotation of an unknown image.
    """
    import json

    root = storage.canonical_uri(root)
    uri = storage.join(root, "annotations.json")
    try:
        coco = json.loads(store.read_bytes(uri))
        images = {im["id"]: im for im in coco["images"]}
        categories = sorted(coco["categories"], key=lambda c: c["id"])
    except FileNotFoundError:
        raise DatasetError(
            f"No {uri}: the coco format expects ROOT/annotations.json and ROOT/images/."
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{uri} is not a COCO annotations file ({type(exc).__name__}: {exc}).") from exc
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    objects: dict[Any, list[dict[str, Any]]] = {i: [] for i in images}
    for ann in coco.get("annotations", []):
        if ann.get("iscrowd", 0):
            continue
        if ann["image_id"] not in objects:
            raise DatasetError(
                f"{uri}: annotation {ann.get('id')} refers to unknown image_id {ann['image_id']}."
            )
        objects[ann["image_id"]].append(ann)
    has_masks = any("segmentation" in a for anns in objects.values() for a in anns)
    samples = []
    for image_id in sorted(images, key=lambda i: str(images[i]["file_name"])):
        im, anns = images[image_id], objects[image_id]
        boxes = tuple((x, y, x + w, y + h) for x, y, w, h in (a["bbox"] for a in anns))
        segs = tuple(a.get("segmentation") for a in anns) if has_masks else None
        samples.append(
            DetectionSample(
                storage.join(root, "images", im["file_name"]),
                boxes,
                tuple(label_of[a["category_id"]] for a in anns),
                segs,
                im.get("width"),
                im.get("height"),
            )
        )
    return DetectionDataset(samples, [str(c["name"]) for c in categories])


def read_yolo(root: str, store: Storage) -> DetectionDataset:
    """``ROOT/images/<stem>.<ext>``, ``ROOT/labels/<stem>.txt`` (``class cx cy w h`` normalised), ``classes.txt``.

    An image without a label file has no objects. Boxes stay normalised until the image is decoded.

    Raises:
        DatasetError: no classes.txt, a malformed label line, or a class index out of range.
    """
    root = storage.canonical_uri(root)
    try:
        text = store.read_bytes(storage.join(root, "classes.txt")).decode()
    except FileNotFoundError:
        raise DatasetError(f"No {root}/classes.txt: the yolo format needs one class name per line.") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    images = _by_stem(store, storage.join(root, "images"), IMAGE_EXTENSIONS)
    label_files = _by_stem(store, storage.join(root, "labels"), (".txt",), missing_ok=True)
    samples = []
    for s in sorted(images):
        boxes: list[tuple[float, float, float, float]] = []
        labels: list[int] = []
        if s in label_files:
            for n, line in enumerate(store.read_bytes(label_files[s]).decode().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    k, cx, cy, w, h = line.split()[:5]
                    label, box = (
                        int(k),
                        (
                            float(cx) - float(w) / 2,
                            float(cy) - float(h) / 2,
                            float(cx) + float(w) / 2,
                            float(cy) + float(h) / 2,
                        ),
                    )
                except ValueError:
                    raise DatasetError(
                        f"{label_files[s]}:{n}: expected 'class cx cy w h', got {line!r}."
                    ) from None
                if not 0 <= label < len(names):
                    raise DatasetError(
                        f"{label_files[s]}:{n}: class {label} is not in classes.txt (0..{len(names) - 1})."
                    )
                boxes.append(box)
                labels.append(label)
        samples.append(DetectionSample(images[s], tuple(boxes), tuple(labels), normalized=True))
    if not samples:
        raise DatasetError(
            f"No images under {root}/images: the yolo format expects ROOT/images and ROOT/labels."
        )
    return DetectionDataset(samples, names)
