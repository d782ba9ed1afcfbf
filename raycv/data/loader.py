"""A batch loader for training workers: fetch bytes from object storage in threads, decode, transform.

Why not a torch DataLoader with worker processes: inside a Ray Train worker on a small CPU budget extra
processes compete with the training step itself, while fetching from S3 is latency-bound and decoding
small images releases the GIL, so a thread pool that prefetches the next batch keeps the step busy.
Each rank reads only its own shard, and every rank gets the same number of batches (DDP needs equal
step counts). Encoded bytes are cached per worker up to ``cache_bytes``, so object storage is read
once per worker and later epochs cost only the decode.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from raycv.data.images import decode_image, decode_reduced
from raycv.storage import Storage

# (decoded image [H, W, C] uint8, the sample's target, rng) -> (model input, training target)
Transform = Callable[[np.ndarray, Any, np.random.Generator], tuple[Any, Any]]


def shard_indices(n: int, rank: int, world: int, *, shuffle: bool, seed: int, pad: bool) -> list[int]:
    """Indices ``rank`` reads out of ``n``: a seeded permutation cut into ``world`` interleaved shards.

    With ``pad`` the list is padded (repeating the first indices) so every rank gets the same count, as
    torch's DistributedSampler does; without it the shards are disjoint and cover ``n`` exactly once.
    """
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    idx = order.tolist()
    if pad and n % world:
        idx += idx[: world - n % world]
    return idx[rank::world]


def label_target(sample: Any, fetch: Callable[[str], bytes]) -> Any:
    """A sample's class index (the default target of :class:`BatchLoader`)."""
    return sample.label


def stack_labels(items: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images stacked to [B, C, H, W] and class indices to [B] int64 (the default collate)."""
    return torch.stack([im for im, _ in items]), torch.tensor([t for _, t in items], dtype=torch.int64)


class BatchLoader:
    """Yields ``collate([(transform(image, target, rng), ...)])`` batches for a list of indices into ``samples``.

    ``load_target(sample, fetch)`` gives a sample's training target (``fetch`` reads a URI through the cache):
    its class index by default, a task's label map or boxes otherwise. Files are read through ``store``.
    """

    def __init__(
        self,
        samples: Sequence[Any],
        transform: Transform,
        *,
        batch_size: int,
        store: Storage,
        load_target: Callable[[Any, Callable[[str], bytes]], Any] = label_target,
        collate: Callable[[list[tuple[Any, Any]]], tuple[Any, Any]] = stack_labels,
        threads: int = 8,
        cache_bytes: int = 1 << 30,
        decode_size: tuple[int, int] | None = None,
        bands: int = 3,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.load_target, self.collate = load_target, collate
        # The size ``transform`` resizes a whole image to first: large JPEGs are then decoded at a reduced
        # DCT scale, as the annotation read tasks do (:func:`raycv.data.images.decode_reduced`), so training,
        # evaluation and annotation see the same pixels. Tasks whose targets are pixels or boxes decode in full.
        self.decode_size = decode_size
        self.bands = bands  # the model's input bands: other than 3, read by raycv.data.bands
        self.batch_size = batch_size
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="raycv-load")
        self._cache: dict[str, bytes] = {}
        self._cache_left = cache_bytes
        self._lock = threading.Lock()

    def _fetch(self, uri: str) -> bytes:
        data = self._cache.get(uri)
        if data is None:
            data = self.store.read_bytes(uri)
            with self._lock:
                if len(data) <= self._cache_left:
                    self._cache[uri] = data
                    self._cache_left -= len(data)
        return data

    def _load_one(self, index: int, seed: int) -> tuple[Any, Any]:
        sample = self.samples[index]
        if self.bands != 3:
            from raycv.data.bands import decode_bands  # rasterio, for N-band models only

            image = decode_bands(self._fetch(sample.uri), sample.uri, self.bands)
        elif self.decode_size is not None:
            image = decode_reduced(self._fetch(sample.uri), sample.uri, self.decode_size)[0]
        else:
            image = decode_image(self._fetch(sample.uri), sample.uri)
        target = self.load_target(sample, self._fetch)
        return self.transform(image, target, np.random.default_rng(seed))

    def _load_batch(self, indices: list[int], seed: int) -> tuple[Any, Any]:
        return self.collate(list(self._pool.map(self._load_one, indices, [seed + i for i in indices])))

    def iterate(self, indices: list[int], *, seed: int = 0) -> Iterator[tuple[Any, Any]]:
        """Batches over ``indices`` in order, loading batch k+1 while the caller works on batch k."""
        chunks = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        pending: Future[tuple[Any, Any]] | None = None
        with ThreadPoolExecutor(max_workers=1) as prefetch:
            for k, chunk in enumerate(chunks):
                current = pending or prefetch.submit(self._load_batch, chunk, seed)
                pending = (
                    prefetch.submit(self._load_batch, chunks[k + 1], seed) if k + 1 < len(chunks) else None
                )
                yield current.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
