"""Dataset format readers (SPEC §4). Each lists a dataset root into samples without decoding images."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import numpy as np

from raycv import storage
from raycv.errors import DatasetError

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


def read_imagefolder(root: str, endpoint_url: str | None = None) -> Dataset:
    """``ROOT/<class_name>/<image>``; class index = position of the name in the sorted class names.

    One recursive listing of the root (a single paged LIST on S3), nothing decoded.

    Raises:
        DatasetError: when the root holds no class folder with images.
        FileNotFoundError: when the root does not exist.
    """
    by_class: dict[str, list[str]] = {}
    base = root.rstrip("/")
    for entry in storage.iter_files(root, extensions=IMAGE_EXTENSIONS, endpoint_url=endpoint_url):
        rel = entry.uri[len(base) :].lstrip("/\\")
        parts = rel.replace("\\", "/").split("/")
        if len(parts) < 2:
            continue  # a loose file at the root belongs to no class
        by_class.setdefault(parts[0], []).append(entry.uri)
    if not by_class:
        raise DatasetError(
            f"No images in class folders under {root}: the imagefolder format expects "
            f"ROOT/<class_name>/<image> (extensions {', '.join(IMAGE_EXTENSIONS)})."
        )
    names = sorted(by_class)
    samples = [Sample(uri, i) for i, name in enumerate(names) for uri in sorted(by_class[name])]
    return Dataset(samples, names)


def read_masks(root: str, endpoint_url: str | None = None, num_classes: int | None = None) -> Dataset:
    """``ROOT/images/<stem>.<ext>`` with ``ROOT/masks/<stem>.png`` (uint8 label maps, 255 = ignore).

    Class names come from ``ROOT/classes.txt`` (one per line, line k = label k); without it, from
    ``num_classes`` as ``class_0 ...``. Images and masks are paired by stem with two listings.

    Raises:
        DatasetError: no images, an image without a mask, or no way to know the classes.
    """
    images = {
        stem(e.uri): e.uri
        for e in storage.iter_files(
            storage.join(root, "images"), extensions=IMAGE_EXTENSIONS, endpoint_url=endpoint_url
        )
    }
    try:
        masks = {
            stem(e.uri): e.uri
            for e in storage.iter_files(
                storage.join(root, "masks"), extensions=(".png",), endpoint_url=endpoint_url
            )
        }
    except FileNotFoundError:
        masks = {}
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
        text = storage.read_bytes(storage.join(root, "classes.txt"), endpoint_url).decode()
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
    labels = sorted({s.label for s in samples})
    for label in labels:
        group = [s for s in samples if s.label == label]
        order = rng.permutation(len(group))
        n_val = min(len(group) - 1, round(len(group) * val_fraction))
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return train, val


def stem(uri: str) -> str:
    return posixpath.splitext(posixpath.basename(uri))[0]
