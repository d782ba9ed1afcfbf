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

from raycv.data.formats import DetectionSample, Sample
from raycv.data.images import decode_image, decode_png_mask, decode_reduced
from raycv.storage import Storage

Target = int | np.ndarray
# (image [H, W, 3] uint8, target: class index or [H, W] uint8 label map, rng) -> (image tensor, target)
Transform = Callable[[np.ndarray, Target, np.random.Generator], tuple[torch.Tensor, torch.Tensor | int]]


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


class BatchLoader:
    """Yields ``(images [B, C, H, W] float, targets)`` for a list of indices into ``samples``.

    Targets are class indices [B] int64, or label maps [B, H, W] int64 for samples with a ``mask_uri``.
    Files are read through ``store``.
    """

    def __init__(
        self,
        samples: Sequence[Sample] | Sequence[DetectionSample],
        transform: Transform,
        *,
        batch_size: int,
        store: Storage,
        threads: int = 8,
        cache_bytes: int = 1 << 30,
        decode_size: tuple[int, int] | None = None,
    ) -> None:
        self.samples = samples
        self.transform = transform
        # The size ``transform`` resizes a labelled image to first: large JPEGs are then decoded at a reduced
        # DCT scale, as the annotation read tasks do (:func:`raycv.data.images.decode_reduced`), so training,
        # evaluation and annotation see the same pixels. Images with masks or boxes decode in full.
        self.decode_size = decode_size
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

    def _load_one(self, index: int, seed: int) -> tuple[torch.Tensor, Any]:
        sample = self.samples[index]
        if self.decode_size is not None and isinstance(sample, Sample) and sample.mask_uri is None:
            image = decode_reduced(self._fetch(sample.uri), sample.uri, self.decode_size)[0]
        else:
            image = decode_image(self._fetch(sample.uri), sample.uri)
        target: Any
        if isinstance(sample, DetectionSample):
            target = sample  # the detection transform reads boxes, labels and masks from the sample
        elif sample.mask_uri is not None:
            target = decode_png_mask(self._fetch(sample.mask_uri), sample.mask_uri)
        else:
            target = sample.label
        return self.transform(image, target, np.random.default_rng(seed))

    def _load_batch(self, indices: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = list(self._pool.map(self._load_one, indices, [seed + i for i in indices]))
        images = torch.stack([im for im, _ in items])
        targets = [t for _, t in items]
        if isinstance(targets[0], dict):
            return images, targets  # type: ignore[return-value]  # detection: one dict per image
        if isinstance(targets[0], torch.Tensor):
            return images, torch.stack(targets).to(torch.int64)  # type: ignore[arg-type]
        return images, torch.tensor(targets, dtype=torch.int64)

    def iterate(self, indices: list[int], *, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches over ``indices`` in order, loading batch k+1 while the caller works on batch k."""
        chunks = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        pending: Future[tuple[torch.Tensor, torch.Tensor]] | None = None
        with ThreadPoolExecutor(max_workers=1) as prefetch:
            for k, chunk in enumerate(chunks):
                current = pending or prefetch.submit(self._load_batch, chunk, seed)
                pending = (
                    prefetch.submit(self._load_batch, chunks[k + 1], seed) if k + 1 < len(chunks) else None
                )
                yield current.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
