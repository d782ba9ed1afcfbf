"""The decode half of the GPU benchmark (``jobs/bench/gpu.py``): JPEG decode img/s with nvJPEG vs raycv's CPU
decode, on the same generated JPEGs to the same output size.

``--decode-images`` generated JPEGs (1024x768, quality 90) to ``[224, 224]`` RGB: raycv's CPU path
(``decode_reduced`` with libjpeg's DCT scaling + ``resize_rgb``) on 1 thread and on all cores (a thread pool:
Pillow releases the GIL while decoding), and nvJPEG (``torchvision.io.decode_jpeg(list, device="cuda")`` in
batches, then an antialiased bilinear resize on the GPU; the host-to-device copy of the JPEG bytes counted).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ._cli import ratio


def make_jpegs(n: int, size_wh: tuple[int, int], seed: int = 0) -> list[bytes]:
    """``n`` JPEGs (quality 90) of smooth gradients, rectangles and mild noise: photo-like sizes, not noise."""
    import io

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size_wh
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.1, 0.5, 3)
        base = np.stack([xx * a, yy * b, (xx + yy) * c], axis=-1) % 256
        noisy = base + rng.normal(0, 6, base.shape)
        im = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
            x1, y1 = int(rng.integers(x0 + 1, w)), int(rng.integers(y0 + 1, h))
            draw.rectangle((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _cpu_decode(data: bytes, side: int) -> np.ndarray:
    from raycv.data.images import decode_reduced, resize_rgb

    pixels, _, _ = decode_reduced(data, "bench.jpg", (side, side))
    return resize_rgb(pixels, (side, side))


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[Any, float]:
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - t0


def bench_decode(args: argparse.Namespace, side: int, src_wh: tuple[int, int]) -> list[dict[str, Any]]:
    """Rows for raycv's CPU decode (1 thread, all cores) and nvJPEG, same JPEGs, same output size."""
    jpegs = make_jpegs(args.decode_images, src_wh)
    base = {"images": len(jpegs), "src_size": list(src_wh), "out_size": side, "jpeg_quality": 90}
    threads = os.cpu_count() or 1
    rows: list[dict[str, Any]] = []
    _cpu_decode(jpegs[0], side)  # warm-up: Pillow's plugins load on first use
    for decoder, workers in (("cpu_raycv", 1), ("cpu_raycv_threads", threads)):
        if workers == 1:
            decoded, seconds = _timed(lambda: [_cpu_decode(d, side) for d in jpegs], lambda: None)
        else:
            with ThreadPoolExecutor(workers) as pool:
                decoded, seconds = _timed(
                    lambda pool=pool: list(pool.map(_cpu_decode, jpegs, [side] * len(jpegs))), lambda: None
                )
        rows.append(
            {**base, "decoder": decoder, "device": "cpu", "threads": workers, "img_s": len(decoded) / seconds}
        )
    rows.append({**base, "decoder": "nvjpeg", "device": "cuda", **_nvjpeg(args, jpegs, side)})
    reference = rows[0]["img_s"]
    for row in rows:
        row["ratio_vs_cpu"] = ratio(row.get("img_s"), reference)
    return rows


def _nvjpeg(args: argparse.Namespace, jpegs: list[bytes], side: int) -> dict[str, Any]:
    """nvJPEG img/s (decode + resize on the GPU) and its mean |difference| from the CPU path, or why skipped."""
    import torch

    if args.device != "cuda" or not torch.cuda.is_available():
        return {"img_s": None, "skipped": f"nvJPEG needs a CUDA device; this run is --device {args.device}"}
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs]
    chunks = [encoded[i : i + args.decode_batch] for i in range(0, len(encoded), args.decode_batch)]

    def run() -> list[Any]:
        out = []
        for chunk in chunks:
            images = torch.stack(decode_jpeg(chunk, device="cuda"))  # one size here: a [B, 3, H, W] uint8
            small = F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True)
            out.extend(small.round_().clamp_(0, 255).to(torch.uint8))
        return out

    try:
        run()  # warm-up: nvJPEG's handles and buffers
        decoded, seconds = _timed(run, torch.cuda.synchronize)
    except RuntimeError as e:  # an nvJPEG missing from this torchvision build, say
        return {"img_s": None, "skipped": f"decode_jpeg on CUDA failed: {e}"}
    gpu_first = decoded[0].permute(1, 2, 0).cpu().numpy().astype(np.int16)
    diff = float(np.abs(gpu_first - _cpu_decode(jpegs[0], side).astype(np.int16)).mean())
    return {"img_s": len(decoded) / seconds, "batch": args.decode_batch, "mean_abs_diff_vs_cpu": diff}
