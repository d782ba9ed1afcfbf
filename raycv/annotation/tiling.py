"""Tiled prediction of images too large for one forward pass, with blended seams and bounded memory.

A scene is cut into overlapping tiles (:func:`tile_grid`); each tile's class scores are weighted by a ramp
that fades towards the tile's interior edges (:func:`blend_weights`), where convolution padding makes the
scores wrong, and the weighted scores are summed and argmaxed. :func:`predict_tiled` does this one row band
of tiles at a time, so only the rows that tiles still overlap are ever held as scores.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Window = tuple[int, int, int, int]


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one axis: every ``tile - overlap`` px, the last one flush with the far edge."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, tile - overlap), size - tile]


def _check_tiling(height: int, width: int, tile: int, overlap: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got height={height}, width={width}.")
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(
            f"tile={tile}, overlap={overlap}: need tile >= 1 and 0 <= overlap < tile; "
            "an overlap of about tile // 8 hides the seams of most conv nets."
        )


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Window]:
    """The windows that cover an image, row by row.

    Tiles are ``tile`` px square and step by ``tile - overlap``; the last row and column are shifted back to end
    exactly at the image edge, so every tile is whole (and overlaps its neighbour by at least ``overlap``). An
    image side smaller than ``tile`` gets one tile of that side's size.

    Returns:
        ``(y0, x0, h, w)`` windows in image pixels, sorted by ``y0`` then ``x0``; all have the same ``h, w``.
    """
    _check_tiling(height, width, tile, overlap)
    h, w = min(tile, height), min(tile, width)
    xs = _starts(width, tile, overlap)
    return [(y0, x0, h, w) for y0 in _starts(height, tile, overlap) for x0 in xs]


def _ramp(n: int, overlap: int, fade_start: bool, fade_end: bool) -> np.ndarray:
    """[n] float32 weights: (i + 0.5) / overlap over the first/last ``overlap`` px of faded ends, else 1."""
    r = np.ones(n, dtype=np.float32)
    if overlap == 0:
        return r
    ramp = (np.arange(min(overlap, n), dtype=np.float32) + 0.5) / overlap
    if fade_start:
        r[: ramp.size] = ramp
    if fade_end:
        r[n - ramp.size :] = np.minimum(r[n - ramp.size :], ramp[::-1])
    return r


def blend_weights(
    h: int,
    w: int,
    overlap: int,
    *,
    top: bool = True,
    bottom: bool = True,
    left: bool = True,
    right: bool = True,
) -> np.ndarray:
    """[h, w] float32 blending weights of one tile: 1 in the middle, fading linearly at interior edges.

    Over the ``overlap`` px next to a faded side the weight goes (i + 0.5) / overlap for the i-th px from the
    edge, so it never reaches 0 (minimum 0.5 / overlap) and two tiles that overlap by exactly ``overlap`` px
    sum to 1 there. Corners take the product of the two ramps.

    Args:
        top, bottom, left, right: True where that side is interior (another tile covers the pixels beyond
            it) and should fade; False for a side on the image border, which keeps weight 1 because no other
            tile covers those pixels.
    """
    rows = _ramp(h, overlap, top, bottom)
    cols = _ramp(w, overlap, left, right)
    return np.outer(rows, cols)


def _read_window(read: Callable[[int, int, int, int], np.ndarray], window: Window) -> np.ndarray:
    y0, x0, h, w = window
    px = np.asarray(read(y0, x0, h, w))
    if px.ndim != 3 or px.shape[:2] != (h, w):
        raise ValueError(
            f"read({y0}, {x0}, {h}, {w}) returned shape {px.shape}; expected [{h}, {w}, C] "
            "(add a channel axis to single-band pixels)."
        )
    return px


def _read_batch(read: Callable[[int, int, int, int], np.ndarray], windows: list[Window]) -> np.ndarray:
    """[B, h, w, C] pixels of equal-size windows, filled in place to avoid a list-then-stack copy."""
    first = _read_window(read, windows[0])
    batch = np.empty((len(windows), *first.shape), dtype=first.dtype)
    batch[0] = first
    for i, window in enumerate(windows[1:], start=1):
        px = _read_window(read, window)
        if px.shape != first.shape:
            raise ValueError(f"read returned {px.shape} for {window} but {first.shape} for {windows[0]}.")
        batch[i] = px
    return batch


def _predict_batch(predict: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, k: int) -> np.ndarray:
    scores = np.asarray(predict(batch))
    b, h, w = batch.shape[:3]
    if scores.shape != (b, k, h, w):
        raise ValueError(
            f"predict returned shape {scores.shape} for a batch of {b} tiles of {h}x{w}; expected "
            f"{(b, k, h, w)} [B, K, h, w] scores with K=num_classes={k}, at the input resolution."
        )
    return scores


def _shift_up(acc: np.ndarray, rows: int) -> None:
    """Move ``acc[rows:]`` to the top of ``acc`` and zero the rows freed at the bottom, without a temporary."""
    keep = acc.shape[0] - rows
    # blocks of at most `rows` rows never overlap their source, so numpy copies them without a buffer
    for start in range(0, keep, rows):
        n = min(rows, keep - start)
        acc[start : start + n] = acc[start + rows : start + rows + n]
    acc[keep:] = 0


def predict_tiled(
    predict: Callable[[np.ndarray], np.ndarray],
    read: Callable[[int, int, int, int], np.ndarray],
    height: int,
    width: int,
    *,
    num_classes: int,
    tile: int,
    overlap: int,
    batch_size: int,
) -> np.ndarray:
    """Label map of a large image predicted tile by tile, with blended seams, never holding it whole.

    Tiles come from :func:`tile_grid`; each tile's scores are weighted by :func:`blend_weights` (interior sides
    faded) and summed; the argmax of the sum is the label. The grid is processed one row band at a time:
    a score accumulator of ``h`` rows (one tile height) spans the image width; once a band is done, the rows
    above the next band's top are final (no later tile touches them), are argmaxed into the output, and the
    accumulator slides down. Batches hold tiles of one band (the last batch of a band may be smaller).

    Peak memory, in bytes, with ``h, w = min(tile, height), min(tile, width)``, ``C`` channels of ``p`` bytes
    and ``s`` bytes per score from ``predict``::

        H * W                           the uint8 output
      + h * W * K * 4                   the float32 band accumulator
      + h * W * 8                       the int64 argmax of the rows finalised after a band
      + B * h * w * (C * p + K * s)     one batch of pixels and its scores
      + h * w * K * 4                   one weighted tile

    plus whatever ``predict`` allocates itself. Beyond the output that is about tile * (K + 2) / (K * H) of
    the K * H * W * 4 bytes a whole-image accumulator would take: for a 6000 x 6000 scene, K = 6, tile = 256,
    B = 4, 92 MB traced at peak (36 MB of it the output) against 864 MB.

    Args:
        predict: Maps a batch [B, h, w, C] of pixels to [B, K, h, w] float logits or probabilities (the blend is
            linear in whichever it returns).
        read: ``read(y0, x0, h, w)`` returns the [h, w, C] pixels of that window of the image.
        height, width: Image size in pixels.
        num_classes: K, at most 256 (the output is uint8).
        tile: Tile side in pixels.
        overlap: Minimum overlap between neighbouring tiles, in pixels; also the width of the blending ramp.
        batch_size: Tiles per ``predict`` call.

    Returns:
        [height, width] uint8 class indices.
    """
    _check_tiling(height, width, tile, overlap)
    if not 1 <= num_classes <= 256:
        raise ValueError(f"num_classes={num_classes}: the label map is uint8, so K must be in 1..256.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1.")
    h, w = min(tile, height), min(tile, width)
    ys, xs = _starts(height, tile, overlap), _starts(width, tile, overlap)
    out = np.empty((height, width), dtype=np.uint8)
    # [rows, W, K]: rows outermost so sliding the band moves contiguous blocks, K innermost so the argmax
    # reads it in place (an argmax over another axis copies the whole block first)
    acc = np.zeros((h, width, num_classes), dtype=np.float32)
    weights: dict[tuple[bool, bool, bool, bool], np.ndarray] = {}
    for band, y0 in enumerate(ys):
        # acc row 0 is image row y0: every row above has been finalised
        for i in range(0, len(xs), batch_size):
            windows = [(y0, x0, h, w) for x0 in xs[i : i + batch_size]]
            scores = _predict_batch(predict, _read_batch(read, windows), num_classes)
            for (_, x0, _, _), s in zip(windows, scores, strict=True):
                sides = (y0 > 0, y0 + h < height, x0 > 0, x0 + w < width)
                if sides not in weights:
                    top, bottom, left, right = sides
                    weights[sides] = blend_weights(
                        h, w, overlap, top=top, bottom=bottom, left=left, right=right
                    )
                acc[:, x0 : x0 + w] += s.transpose(1, 2, 0) * weights[sides][:, :, None]
        next_y0 = ys[band + 1] if band + 1 < len(ys) else height
        done = next_y0 - y0
        out[y0:next_y0] = acc[:done].argmax(axis=-1)
        _shift_up(acc, done)
    return out
