import numpy as np
import torch

from raycv.data.formats import Sample
from raycv.data.images import encode_png
from raycv.data.loader import BatchLoader, shard_indices
from raycv.storage import Storage

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)


def test_padded_shards_are_equal_and_cover_everything():
    shards = [shard_indices(10, r, 3, shuffle=True, seed=1, pad=True) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set().union(*shards) == set(range(10))
    assert shards == [shard_indices(10, r, 3, shuffle=True, seed=1, pad=True) for r in range(3)]


def test_unpadded_shards_partition_exactly():
    shards = [shard_indices(10, r, 3, shuffle=False, seed=0, pad=False) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))


def test_batches_keep_order_labels_and_shapes(tmp_path):
    samples = []
    for i in range(7):
        uri = str(tmp_path / f"{i}.png")
        STORE.write_bytes(uri, encode_png(np.full((8, 8, 3), i * 30, np.uint8)))
        samples.append(Sample(uri, i % 2))

    def tf(image: np.ndarray, target, rng: np.random.Generator):
        return torch.from_numpy(image).permute(2, 0, 1).float(), target

    loader = BatchLoader(samples, tf, batch_size=3, store=STORE)
    batches = list(loader.iterate([6, 0, 1, 2, 3, 4, 5]))
    loader.close()
    assert [b[0].shape[0] for b in batches] == [3, 3, 1]
    values = torch.cat([b[0][:, 0, 0, 0] for b in batches]).tolist()
    assert values == [180, 0, 30, 60, 90, 120, 150]
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 0, 1, 0, 1, 0, 1]


def test_decode_size_gives_the_annotation_read_tasks_pixels(tmp_path):
    """Classification training and evaluation decode large JPEGs as the annotation read tasks do."""
    import io

    from PIL import Image

    from raycv.annotation.read import read_decode_batch
    from raycv.data import synthetic
    from raycv.data.transforms import to_tensor_resized

    samples = []
    for i, size in enumerate([96, 300, 700]):
        image = synthetic.render_classification_sample(np.random.default_rng(i), i % 3, size=size)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG", quality=85)
        uri = str(tmp_path / f"{i}.jpg")
        STORE.write_bytes(uri, buf.getvalue())
        samples.append(Sample(uri, i % 3))
    size = (64, 64)

    def eval_tf(image: np.ndarray, target, rng: np.random.Generator):
        return to_tensor_resized(image, size), target

    loader = BatchLoader(samples, eval_tf, batch_size=3, decode_size=size, store=STORE)
    full = BatchLoader(samples, eval_tf, batch_size=3, store=STORE)
    (images, labels), (full_images, _) = next(loader.iterate([0, 1, 2])), next(full.iterate([0, 1, 2]))
    loader.close()
    full.close()
    uris = np.array([s.uri for s in samples], dtype=object)
    batch = {"image_id": uris, "image_uri": uris, "source_etag": np.array([""] * 3, dtype=object)}
    read = read_decode_batch(batch, size_hw=size, store=STORE, max_pixels=10**8)
    assert read["width"].tolist() == [96, 300, 700] and read["height"].tolist() == [96, 300, 700]
    expected = torch.from_numpy(read["pixels"]).permute(0, 3, 1, 2).float() / 255.0
    assert labels.tolist() == [0, 1, 2]
    assert torch.allclose(images, expected, atol=1e-6)  # the same pixels as annotation
    assert torch.equal(images[0], full_images[0])  # 96 px: under 4x the size, decoded in full
    assert not torch.equal(images[2], full_images[2])  # 700 px: decoded at 1/4 scale
    assert (images[2] - full_images[2]).abs().mean() <= 1 / 255
