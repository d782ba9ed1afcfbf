"""Generated shape datasets for the tests and the demo, written to a folder or bucket, deterministic by seed.

Each writer lays out one input format of SPEC §4 (``imagefolder``, a flat unlabelled archive, ``masks``,
``coco``, ``yolo``); file ``i`` depends only on the seed and ``i``, never on the order the threads write
in. The scenes themselves (shapes, sizes, annotations) are rendered by :mod:`raycv.data.synthetic_scenes`,
whose names stay importable from here.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from raycv import storage
from raycv.data.images import IMAGE_EXTENSIONS
from raycv.data.synthetic_scenes import CLASSES as CLASSES
from raycv.data.synthetic_scenes import Scene as Scene
from raycv.data.synthetic_scenes import check_classes, classification_image, digit_image
from raycv.data.synthetic_scenes import render_classification_sample as render_classification_sample
from raycv.data.synthetic_scenes import render_scene as render_scene
from raycv.storage import Storage

_WRITE_THREADS = 16  # S3 PUTs are latency-bound; local writes do not mind
_IMAGEFOLDER_STREAM, _FLAT_STREAM, _FLAT_ORDER_STREAM, _MASKS_STREAM, _DETECTION_STREAM, _DIGITS_STREAM = (
    0,
    1,
    2,
    3,
    4,
    5,
)  # distinct random streams
_Job = TypeVar("_Job")
_SAVE_OPTIONS: dict[str, dict[str, object]] = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}


# -- Writing datasets ------------------------------------------------------------------------------------------


def write_imagefolder(
    root: str,
    *,
    n_per_class: int,
    size: int = 32,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
    store: Storage | None = None,
    ext: str = ".png",
) -> dict[str, int]:
    """Write a classification dataset as ``ROOT/<class>/<class>_<i:05d><ext>``.

    Image ``i`` of class ``k`` depends only on ``(seed, k, i)``, so the files are the same whatever the
    thread scheduling, and a larger ``n_per_class`` extends a smaller one.

    Returns:
        Images written per class name.
    """
    store = store or Storage()
    check_classes(classes)
    fmt = _format_for(ext)
    if n_per_class < 0:
        raise ValueError(f"n_per_class must be >= 0, got {n_per_class}.")

    def write_one(job: tuple[int, int]) -> None:
        k, i = job
        rng = _rng(seed, _IMAGEFOLDER_STREAM, k, i)
        image = classification_image(rng, classes[k], size)
        uri = storage.join(root, classes[k], f"{classes[k]}_{i:05d}{ext}")
        store.write_bytes(uri, _encode(image, fmt))

    _run_parallel(write_one, [(k, i) for k in range(len(classes)) for i in range(n_per_class)])
    return {name: n_per_class for name in classes}


def write_digits(
    root: str, *, n_per_class: int, size: int = 32, seed: int = 0, store: Storage | None = None
) -> dict[str, int]:
    """A digits dataset (classes ``0``..``9``, :func:`~raycv.data.synthetic_scenes.digit_image`) as an image
    folder ``ROOT/<digit>/<digit>_<i:05d>.png``, deterministic by ``(seed, digit, i)``.

    Returns:
        ``{uri: digit}`` of every image written.
    """
    store = store or Storage()
    if n_per_class < 0:
        raise ValueError(f"n_per_class must be >= 0, got {n_per_class}.")
    jobs = [(d, i) for d in range(10) for i in range(n_per_class)]
    uris = {job: storage.join(root, str(job[0]), f"{job[0]}_{job[1]:05d}.png") for job in jobs}

    def write_one(job: tuple[int, int]) -> None:
        image = digit_image(_rng(seed, _DIGITS_STREAM, *job), job[0], size)
        store.write_bytes(uris[job], _encode(image, "PNG"))

    _run_parallel(write_one, jobs)
    return {uri: d for (d, _), uri in uris.items()}


def write_flat_archive(
    root: str, *, n: int, size: int = 32, seed: int = 0, store: Storage | None = None
) -> dict[str, int]:
    """Write an "unlabelled archive": ``n`` images directly under ``ROOT/`` as ``<i:05d>_<class>.png``.

    Each run of ``len(CLASSES)`` consecutive images holds every class once, in a shuffled order. File ``i``
    depends only on ``(seed, i)``, so a larger ``n`` rewrites the first files identically and adds more.

    Returns:
        ``{uri: label}`` with labels indexing :data:`CLASSES`.
    """
    store = store or Storage()
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    k = len(CLASSES)
    orders = [_rng(seed, _FLAT_ORDER_STREAM, block).permutation(k) for block in range(-(-n // k))]
    labels = [int(orders[i // k][i % k]) for i in range(n)]
    uris = [storage.join(root, f"{i:05d}_{CLASSES[label]}.png") for i, label in enumerate(labels)]

    def write_one(i: int) -> None:
        rng = _rng(seed, _FLAT_STREAM, i)
        image = classification_image(rng, CLASSES[labels[i]], size)
        store.write_bytes(uris[i], _encode(image, "PNG"))

    _run_parallel(write_one, list(range(n)))
    return dict(zip(uris, labels, strict=True))


def write_masks_dataset(
    root: str,
    *,
    n: int,
    size: int | tuple[int, int] = 64,
    seed: int = 0,
    n_objects: tuple[int, int] = (1, 2),
    classes: Sequence[str] = CLASSES,
    upright: bool = True,
    scale: tuple[float, float] = (0.25, 0.45),
    store: Storage | None = None,
) -> list[str]:
    """Write a semantic segmentation dataset in the ``masks`` format (SPEC §4).

    ``ROOT/images/<i:05d>.png`` scenes of shapes, ``ROOT/masks/<i:05d>.png`` their uint8 label maps
    (0 = background, k + 1 = ``classes[k]``) and ``ROOT/classes.txt`` (``background`` then the shapes).
    Scene ``i`` depends only on ``(seed, i)``.

    Returns:
        The class names, in label order.
    """
    store = store or Storage()
    check_classes(classes)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    names = ["background", *classes]

    def write_one(i: int) -> None:
        scene = _dataset_scene(_rng(seed, _MASKS_STREAM, i), size, n_objects, classes, upright, scale)
        store.write_bytes(storage.join(root, "images", f"{i:05d}.png"), _encode(scene.image, "PNG"))
        store.write_bytes(storage.join(root, "masks", f"{i:05d}.png"), _encode(scene.mask, "PNG"))

    _run_parallel(write_one, list(range(n)))
    store.write_bytes(storage.join(root, "classes.txt"), ("\n".join(names) + "\n").encode())
    return names


def write_detection_dataset(
    root: str,
    *,
    n: int,
    size: int | tuple[int, int] = 96,
    seed: int = 0,
    fmt: str = "coco",
    n_objects: tuple[int, int] = (0, 3),
    classes: Sequence[str] = CLASSES,
    upright: bool = True,
    scale: tuple[float, float] = (0.15, 0.35),
    category_ids: Sequence[int] | None = None,
    store: Storage | None = None,
) -> list[str]:
    """Write a detection / instance segmentation dataset in the ``coco`` or ``yolo`` format (SPEC §4).

    ``coco``: ``ROOT/images/<i:05d>.png`` and ``ROOT/annotations.json`` with xywh boxes, compressed-RLE
    instance masks and the given ``category_ids`` (default 1..K; any ids work). ``yolo``:
    ``ROOT/images``, ``ROOT/labels/<i:05d>.txt`` (``class cx cy w h`` normalised) and ``classes.txt``.
    Scenes may hold no object (``n_objects[0] == 0``). Scene ``i`` depends only on ``(seed, i)``.

    Returns:
        The class names, in label order.
    """
    store = store or Storage()
    check_classes(classes)
    if fmt not in ("coco", "yolo"):
        raise ValueError(f"fmt must be 'coco' or 'yolo', got {fmt!r}.")
    ids = list(category_ids or range(1, len(classes) + 1))
    scenes: list[Scene | None] = [None] * n

    def write_one(i: int) -> None:
        scene = _dataset_scene(_rng(seed, _DETECTION_STREAM, i), size, n_objects, classes, upright, scale)
        scenes[i] = scene
        store.write_bytes(storage.join(root, "images", f"{i:05d}.png"), _encode(scene.image, "PNG"))
        if fmt == "yolo":
            h, w = scene.image.shape[:2]
            lines = [
                f"{lb} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} "
                f"{(b[3] - b[1]) / h:.6f}"
                for b, lb in zip(scene.boxes, scene.labels, strict=True)
            ]
            store.write_bytes(storage.join(root, "labels", f"{i:05d}.txt"), "\n".join(lines).encode())

    _run_parallel(write_one, list(range(n)))
    if fmt == "yolo":
        store.write_bytes(storage.join(root, "classes.txt"), ("\n".join(classes) + "\n").encode())
    else:
        store.write_bytes(
            storage.join(root, "annotations.json"), json.dumps(_coco_json(scenes, classes, ids)).encode()
        )
    return list(classes)


def _coco_json(scenes: Sequence[Scene | None], classes: Sequence[str], ids: list[int]) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i, scene in enumerate(scenes):
        assert scene is not None
        h, w = scene.image.shape[:2]
        images.append({"id": i + 1, "file_name": f"{i:05d}.png", "width": w, "height": h})
        for box, label, m in zip(scene.boxes, scene.labels, scene.instance_masks, strict=True):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": ids[int(label)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(m.sum()),
                    "iscrowd": 0,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                }
            )
    categories = [{"id": ids[k], "name": name} for k, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _dataset_scene(
    rng: np.random.Generator,
    size: int | tuple[int, int],
    n_objects: tuple[int, int],
    classes: Sequence[str],
    upright: bool,
    scale: tuple[float, float],
) -> Scene:
    """One scene of a written dataset: its object count drawn first, from the scene's own generator."""
    n = int(rng.integers(n_objects[0], n_objects[1] + 1))
    return render_scene(
        rng, size=size, n_objects=n, classes=classes, upright=upright, min_scale=scale[0], max_scale=scale[1]
    )


def _rng(seed: int, *ids: int) -> np.random.Generator:
    """The generator of one file: a function of the seed and the file's ids only, not of write order."""
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    return np.random.default_rng([int(seed), *ids])


def _format_for(ext: str) -> str:
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"ext must be one of {IMAGE_EXTENSIONS}, got {ext!r}.")
    return Image.registered_extensions()[ext]


def _encode(image: np.ndarray, fmt: str) -> bytes:
    return save_image(Image.fromarray(image), fmt, **_SAVE_OPTIONS.get(fmt, {}))


def _run_parallel(fn: Callable[[_Job], None], jobs: list[_Job]) -> None:
    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=min(_WRITE_THREADS, len(jobs))) as pool:
        for _ in pool.map(fn, jobs):  # iterating re-raises the first failure
            pass


def save_image(im: Image.Image, fmt: str, **options: object) -> bytes:
    """``im`` encoded as ``fmt`` (a Pillow format name) with Pillow's save ``options``."""
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **options)
    return buffer.getvalue()
