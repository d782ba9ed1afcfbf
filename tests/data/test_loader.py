import numpy as np
import torch

from raycv import storage
from raycv.data.formats import Sample
from raycv.data.images import encode_png
from raycv.data.loader import BatchLoader, shard_indices


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
        storage.write_bytes(uri, encode_png(np.full((8, 8, 3), i * 30, np.uint8)))
        samples.append(Sample(uri, i % 2))

    def tf(image: np.ndarray, target, rng: np.random.Generator):
        return torch.from_numpy(image).permute(2, 0, 1).float(), target

    loader = BatchLoader(samples, tf, batch_size=3)
    batches = list(loader.iterate([6, 0, 1, 2, 3, 4, 5]))
    loader.close()
    assert [b[0].shape[0] for b in batches] == [3, 3, 1]
    values = torch.cat([b[0][:, 0, 0, 0] for b in batches]).tolist()
    assert values == [180, 0, 30, 60, 90, 120, 150]
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 0, 1, 0, 1, 0, 1]
