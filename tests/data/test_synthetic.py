"""raycv.data.synthetic_scenes and raycv.data.synthetic: annotations describe exactly the visible pixels,
output is a function of the seed, the classification samples are learnable, and the writers lay files out
as documented."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from torch import nn

from raycv.data import synthetic
from raycv.data.images import decode_image
from raycv.data.special_images import make_special_images
from raycv.data.synthetic import write_flat_archive, write_imagefolder
from raycv.data.synthetic_scenes import CLASSES, render_classification_sample, render_scene
from raycv.storage import Storage

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)


def _ring(mask: np.ndarray) -> np.ndarray:
    """Pixels 4-adjacent to ``mask`` but outside it."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


@pytest.mark.parametrize(
    ("seed", "size", "n_objects"), [(0, 64, 1), (1, 96, 4), (2, (48, 80), 6), (3, 64, 12)]
)
def test_scene_annotations_match_the_visible_pixels(seed, size, n_objects):
    scene = render_scene(np.random.default_rng(seed), size=size, n_objects=n_objects)
    height, width = (size, size) if isinstance(size, int) else size
    n = len(scene.labels)
    assert scene.image.shape == (height, width, 3) and scene.image.dtype == np.uint8
    assert scene.mask.shape == (height, width) and scene.mask.dtype == np.uint8
    assert scene.instance_masks.shape == (n, height, width) and scene.instance_masks.dtype == bool
    assert scene.boxes.shape == (n, 4) and scene.boxes.dtype == np.float32
    assert scene.labels.dtype == np.int64 and 1 <= n <= n_objects
    assert ((scene.labels >= 0) & (scene.labels < len(CLASSES))).all()
    assert (scene.instance_masks.sum(axis=0) <= 1).all()  # visible pixels belong to one instance
    assert ((scene.mask > 0) == scene.instance_masks.any(axis=0)).all()
    for instance, box, label in zip(scene.instance_masks, scene.boxes, scene.labels, strict=True):
        assert instance.any()
        assert (scene.mask[instance] == label + 1).all()
        ys, xs = np.nonzero(instance)
        assert box.tolist() == [
            xs.min(),
            ys.min(),
            xs.max() + 1,
            ys.max() + 1,
        ]  # tight, pixel-edge coordinates
        colours = np.unique(scene.image[instance], axis=0)
        assert len(colours) == 1  # one flat colour over exactly the masked pixels ...
        ring = scene.image[_ring(instance)]
        assert not (ring == colours[0]).all(axis=1).any()  # ... and none just outside them


def test_occluded_instances_are_dropped_and_later_shapes_win():
    kept = [
        render_scene(np.random.default_rng(s), size=32, n_objects=25, min_scale=0.5, max_scale=0.9)
        for s in range(5)
    ]
    assert any(len(scene.labels) < 25 for scene in kept)
    for scene in kept:
        assert scene.instance_masks.any(axis=(1, 2)).all()


def test_scene_is_a_function_of_the_generator_state():
    a, b = (render_scene(np.random.default_rng(7), size=40, n_objects=5) for _ in range(2))
    for field in ("image", "mask", "instance_masks", "boxes", "labels"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    c = render_scene(np.random.default_rng(8), size=40, n_objects=5)
    assert not np.array_equal(a.image, c.image)


def test_empty_scene_and_class_subsets():
    empty = render_scene(np.random.default_rng(0), size=(16, 24), n_objects=0)
    assert (
        empty.instance_masks.shape == (0, 16, 24)
        and empty.boxes.shape == (0, 4)
        and empty.labels.shape == (0,)
    )
    assert (empty.mask == 0).all()
    triangles = render_scene(np.random.default_rng(0), size=32, n_objects=4, classes=("triangle",))
    assert (triangles.labels == 0).all() and set(np.unique(triangles.mask)) <= {0, 1}


def test_scene_argument_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(
        ValueError, match=r"subset of \('circle', 'square', 'triangle'\); unknown: \['hexagon'\]"
    ):
        render_scene(rng, size=32, n_objects=1, classes=("circle", "hexagon"))
    with pytest.raises(ValueError, match=r"min_scale <= max_scale, got min_scale=0\.7, max_scale=0\.3"):
        render_scene(rng, size=32, n_objects=1, min_scale=0.7, max_scale=0.3)
    with pytest.raises(ValueError, match="n_objects must be >= 0"):
        render_scene(rng, size=32, n_objects=-1)
    with pytest.raises(ValueError, match="size must be positive"):
        render_scene(rng, size=(0, 32), n_objects=1)


# -- Classification samples -------------------------------------------------------------------------------


def test_classification_sample_shape_size_and_determinism():
    for label in range(len(CLASSES)):
        image = render_classification_sample(np.random.default_rng(label), label, size=40)
        assert image.shape == (40, 40, 3) and image.dtype == np.uint8
        assert np.array_equal(
            image, render_classification_sample(np.random.default_rng(label), label, size=40)
        )
        # The shape is the one flat colour; its extent is 30-70% of the side (pixel-centre rounding: +-1).
        colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
        xs = np.nonzero((image == colours[counts.argmax()]).all(axis=-1))[1]
        assert 0.3 * 40 - 1 <= xs.max() + 1 - xs.min() <= 0.7 * 40 + 1
    with pytest.raises(ValueError, match=r"label must be in 0..2"):
        render_classification_sample(np.random.default_rng(0), 3, size=32)


def _samples(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    images = np.stack([render_classification_sample(rng, int(k), size=32) for k in labels])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.25)
    return x, torch.from_numpy(labels)


@pytest.fixture
def one_torch_thread():
    """Tiny convolutions run ~15x faster on one thread than on two contended ones (2.8 s against 45 s
    measured on the 2-core CI machine while other tests ran)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_classification_samples_are_learnable_by_a_small_cnn(one_torch_thread):
    torch.manual_seed(0)
    x_train, y_train = _samples(0, 600)
    x_test, y_test = _samples(1, 300)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(), nn.Linear(32, len(CLASSES)),
    )  # fmt: skip
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(200):
        batch = torch.randint(0, len(x_train), (32,))
        loss = nn.functional.cross_entropy(net(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(dim=1) == y_test).float().mean().item()
    assert accuracy > 0.95, accuracy


# -- Writers ----------------------------------------------------------------------------------------------


def test_write_imagefolder_layout_counts_and_determinism(tmp_path):
    root = str(tmp_path / "shapes")
    assert write_imagefolder(root, n_per_class=4, size=24, seed=3) == {name: 4 for name in CLASSES}
    assert sorted(os.listdir(root)) == sorted(CLASSES)
    for name in CLASSES:
        assert sorted(os.listdir(os.path.join(root, name))) == [f"{name}_{i:05d}.png" for i in range(4)]
    first = STORE.read_bytes(os.path.join(root, "square", "square_00002.png"))
    assert decode_image(first).shape == (24, 24, 3)
    # Same seed, more images: the first files come out byte-identical (thread order plays no part).
    again = str(tmp_path / "again")
    write_imagefolder(again, n_per_class=6, size=24, seed=3)
    assert STORE.read_bytes(os.path.join(again, "square", "square_00002.png")) == first
    other = str(tmp_path / "other")
    write_imagefolder(other, n_per_class=1, size=24, seed=4, classes=("triangle",), ext=".jpg")
    assert os.listdir(other) == ["triangle"] and os.listdir(os.path.join(other, "triangle")) == [
        "triangle_00000.jpg"
    ]


def test_write_imagefolder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"ext must be one of .*got '\.heic'"):
        write_imagefolder(str(tmp_path), n_per_class=1, ext=".heic")
    with pytest.raises(ValueError, match="unknown: \\['star'\\]"):
        write_imagefolder(str(tmp_path), n_per_class=1, classes=("star",))
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        write_imagefolder(str(tmp_path), n_per_class=1, seed=-1)
    assert not os.listdir(tmp_path)


def test_write_imagefolder_to_s3(bucket):
    counts = write_imagefolder(f"{bucket}/ds", n_per_class=3, size=16, seed=0, classes=("circle", "square"))
    assert counts == {"circle": 3, "square": 3}
    uris = [entry.uri for entry in STORE.iter_files(f"{bucket}/ds", extensions=(".png",))]
    assert uris == [f"{bucket}/ds/{c}/{c}_{i:05d}.png" for c in ("circle", "square") for i in range(3)]


def test_write_flat_archive_names_labels_and_prefix_stability(tmp_path):
    root = str(tmp_path / "archive")
    truth = write_flat_archive(root, n=12, size=20, seed=5)
    assert sorted(os.listdir(root)) == sorted(os.path.basename(uri) for uri in truth)
    for uri, label in truth.items():
        found = re.fullmatch(r"\d{5}_(\w+)\.png", os.path.basename(uri))
        assert found is not None
        name = found.group(1)
        assert CLASSES[label] == name and decode_image(STORE.read_bytes(uri)).shape == (20, 20, 3)
    assert np.bincount(list(truth.values()), minlength=3).tolist() == [4, 4, 4]
    larger = write_flat_archive(str(tmp_path / "larger"), n=15, size=20, seed=5)
    assert [os.path.basename(u) for u in larger][:12] == [os.path.basename(u) for u in truth]
    for uri in truth:
        twin = os.path.join(str(tmp_path / "larger"), os.path.basename(uri))
        assert STORE.read_bytes(twin) == STORE.read_bytes(uri)


def test_special_images_are_complete_small_and_fresh():
    files = make_special_images()
    assert set(files) == {
        "truncated.jpg", "empty.png", "text.png", "bomb.png", "gray16.png", "cmyk.jpg", "rgba.png",
        "gray.png", "exif_rotated.jpg", "palette.gif", "image.webp", "image.bmp", "image.tif",
    }  # fmt: skip
    assert files["empty.png"] == b"" and files["truncated.jpg"].startswith(b"\xff\xd8\xff")
    assert files["text.png"].decode("utf-8").startswith("This is a text file")
    assert len(files["bomb.png"]) < 1_000_000 and sum(map(len, files.values())) < 100_000
    files.clear()
    assert len(make_special_images()) == 13  # callers get their own dict


def test_rendering_names_stay_importable_from_synthetic():
    assert synthetic.render_scene is render_scene and synthetic.CLASSES is CLASSES
    assert synthetic.render_classification_sample is render_classification_sample


def test_digits_are_an_image_folder_of_ten_classes_deterministic_by_seed(tmp_path):
    from raycv.data.formats import read_imagefolder
    from raycv.data.synthetic import write_digits
    from raycv.data.synthetic_scenes import digit_image

    truth = write_digits(str(tmp_path / "a"), n_per_class=3, size=24, seed=5)
    again = write_digits(str(tmp_path / "b"), n_per_class=3, size=24, seed=5)
    assert len(truth) == 30 and sorted(set(truth.values())) == list(range(10))
    for uri, digit in truth.items():
        twin = uri.replace(str(tmp_path / "a"), str(tmp_path / "b"))
        assert again[twin] == digit and open(uri, "rb").read() == open(twin, "rb").read()
    ds = read_imagefolder(str(tmp_path / "a"), Storage())
    assert ds.class_names == [str(d) for d in range(10)] and len(ds.samples) == 30
    image = digit_image(np.random.default_rng(0), 7, 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    # the same random stream with another digit gives another image
    assert not np.array_equal(image, digit_image(np.random.default_rng(0), 1, 32))
    with pytest.raises(ValueError, match=r"digit must be in 0\.\.9"):
        digit_image(np.random.default_rng(0), 10, 32)
