"""Drawing with Pillow only (no plotting library): predictions on images, training curves, confusion matrices.

Every function takes and returns plain arrays or PIL images; coordinates are (x, y) in pixels of the
image being drawn on.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct colours (Tableau 10, then 10 lighter ones), by label; more labels wrap around.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)  # fmt: skip
# Segmentation classes with one of these names are left unpainted (and out of GeoJSON exports).
BACKGROUND_NAMES = frozenset({"background", "bg", "_background_", "__background__"})


def colour_of(label: int) -> tuple[int, int, int]:
    return PALETTE[int(label) % len(PALETTE)]


def font(size: int) -> Any:
    """Pillow's bundled scalable font at ``size`` px (no system fonts needed)."""
    return ImageFont.load_default(size=max(8, int(size)))


def fit(image: np.ndarray, max_side: int) -> np.ndarray:
    """[H, W, 3] uint8 scaled down (never up) so that its longer side is at most ``max_side``."""
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """An integer map ([h, w] label map or bool mask) resized by nearest neighbour to ``height x width``."""
    if labels.shape[:2] == (height, width):
        return labels
    im = Image.fromarray(labels.astype(np.uint8))
    return np.asarray(im.resize((width, height), Image.Resampling.NEAREST)).astype(labels.dtype)


def blend_labels(
    image: np.ndarray, labels: np.ndarray, *, skip: Sequence[int] = (), alpha: float = 0.5
) -> np.ndarray:
    """Paint every label of ``labels`` ([H, W] ints, resized to the image) in its colour, blended by ``alpha``."""
    labels = resize_labels(labels, *image.shape[:2])
    lut = np.array([colour_of(i) for i in range(256)], np.float32)
    painted = ~np.isin(labels, list(skip))
    out = image.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * lut[labels[painted]]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def blend_mask(
    image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float = 0.45
) -> np.ndarray:
    """Blend ``colour`` over the pixels where ``mask`` ([H, W] bool, resized to the image) is set."""
    mask = resize_labels(mask.astype(np.uint8), *image.shape[:2]).astype(bool)
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.array(colour, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """[H, W] floats in 0..1 -> [H, W, 3] uint8 on a blue-cyan-yellow-red scale (the classic "jet")."""
    v = np.clip(heat, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.rint(np.concatenate([r, g, b], axis=-1) * 255).astype(np.uint8)


def blend_heatmap(image: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Overlay a heatmap (any size, stretched bilinearly to the image); cold pixels stay visible."""
    h, w = image.shape[:2]
    if heat.shape != (h, w):
        im = Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32))  # mode "F"
        heat = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR))
    weight = alpha * np.clip(heat, 0, 1)[..., None]
    out = (1 - weight) * image.astype(np.float32) + weight * heat_colours(heat).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _text_size(draw: ImageDraw.ImageDraw, text: str, f: Any) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=f)
    return int(x1 - x0), int(y1 - y0)


def label_tag(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: tuple[int, int, int], f: Any
) -> None:
    """``text`` in white on a ``colour`` box whose bottom-left is ``xy`` (kept inside the image)."""
    tw, th = _text_size(draw, text, f)
    pad = max(1, th // 5)
    x = min(max(0.0, xy[0]), max(0.0, draw.im.size[0] - tw - 2 * pad))
    y = max(0.0, xy[1] - th - 2 * pad)
    draw.rectangle([x, y, x + tw + 2 * pad, y + th + 2 * pad], fill=colour)
    draw.text((x + pad, y + pad), text, fill=(255, 255, 255), font=f, anchor="lt")


def draw_boxes(
    image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[int], texts: Sequence[str]
) -> None:
    """Boxes ``(x1, y1, x2, y2)`` in ``image``'s pixels, each with its tag, in the colour of its label."""
    draw = ImageDraw.Draw(image)
    side = min(image.size)
    width = max(1, side // 250)
    f = font(max(10, side // 40))
    for box, label, text in zip(boxes, labels, texts, strict=True):
        c = colour_of(label)
        draw.rectangle([float(v) for v in box], outline=c, width=width)
        label_tag(draw, (float(box[0]), float(box[1])), text, c, f)


def draw_legend(image: Image.Image, entries: Sequence[tuple[tuple[int, int, int], str]]) -> None:
    """A legend of colour swatches and names in the top-right corner, on a translucent panel."""
    if not entries:
        return
    draw = ImageDraw.Draw(image, "RGBA")
    f = font(max(10, min(image.size) // 40))
    line = max(_text_size(draw, "Ag", f)[1], 8) + 6
    width = max(_text_size(draw, text, f)[0] for _, text in entries) + line + 12
    x0 = max(0, image.size[0] - width - 4)
    draw.rectangle([x0, 4, x0 + width, 4 + line * len(entries) + 4], fill=(0, 0, 0, 150))
    for i, (colour, text) in enumerate(entries):
        y = 8 + i * line
        draw.rectangle([x0 + 4, y, x0 + line - 2, y + line - 6], fill=(*colour, 255))
        draw.text((x0 + line + 4, y), text, fill=(255, 255, 255, 255), font=f, anchor="lt")


def draw_caption(image: Image.Image, text: str) -> None:
    """``text`` on a dark band across the top of ``image``."""
    draw = ImageDraw.Draw(image, "RGBA")
    f = font(max(10, min(image.size) // 14))
    _, th = _text_size(draw, text, f)
    draw.rectangle([0, 0, image.size[0], th + 8], fill=(0, 0, 0, 160))
    draw.text((4, 4), text, fill=(255, 255, 255, 255), font=f, anchor="lt")


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# -- Charts ---------------------------------------------------------------------------------------------------


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    size: tuple[int, int] = (560, 380),
    y_range: tuple[float, float] | None = None,
) -> Image.Image:
    """One panel: each series ``name -> (xs, ys)`` as a line with dots, axes with ticks, and a legend."""
    w, h = size
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    f, small = font(15), font(12)
    left, right, top, bottom = 58, 16, 34, 40
    draw.text((w // 2, 8), title, fill="black", font=f, anchor="mt")
    xs_all = [float(x) for xs, _ in series.values() for x in xs]
    ys_all = [float(y) for _, ys in series.values() for y in ys if y is not None and math.isfinite(y)]
    x_lo, x_hi = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    y_lo, y_hi = y_range or ((min(ys_all), max(ys_all)) if ys_all else (0.0, 1.0))
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x_lo) / (x_hi - x_lo) * (w - left - right),
            h - bottom - (y - y_lo) / (y_hi - y_lo) * (h - top - bottom),
        )

    draw.rectangle([left, top, w - right, h - bottom], outline=(80, 80, 80))
    for t in _nice_ticks(y_lo, y_hi):
        _, y = px(x_lo, t)
        draw.line([left, y, w - right, y], fill=(230, 230, 230))
        draw.text((left - 4, y), f"{t:.3g}", fill="black", font=small, anchor="rm")
    for t in _nice_ticks(x_lo, x_hi, 8):
        x, _ = px(t, y_lo)
        draw.text((x, h - bottom + 4), f"{t:g}", fill="black", font=small, anchor="mt")
    draw.text(((left + w - right) // 2, h - 4), "epoch", fill="black", font=small, anchor="mb")
    for i, (name, (xs, ys)) in enumerate(series.items()):
        c = PALETTE[i % len(PALETTE)]
        pts = [px(float(x), float(y)) for x, y in zip(xs, ys, strict=True) if y is not None]
        if len(pts) > 1:
            draw.line(pts, fill=c, width=2)
        for x, y in pts:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=c)
        ly = top + 12 + 16 * i
        draw.line([left + 8, ly, left + 24, ly], fill=c, width=2)
        draw.text((left + 28, ly), name, fill=c, font=small, anchor="lm")
    return im


def curves_image(history: Sequence[dict[str, Any]], metric_names: Sequence[str]) -> Image.Image:
    """Training curves of ``metrics.jsonl``: train loss on the left, the validation metrics on the right."""
    epochs = [float(r["epoch"]) for r in history]
    loss = {"train_loss": (epochs, [float(r.get("train_loss", math.nan)) for r in history])}
    metrics = {
        m: (epochs, [float(r[m]) if isinstance(r.get(m), int | float) else math.nan for r in history])
        for m in metric_names
        if any(isinstance(r.get(m), int | float) for r in history)
    }
    left = line_chart(loss, title="train loss")
    right = line_chart(metrics, title="validation", y_range=(0.0, 1.0))
    out = Image.new("RGB", (left.size[0] + right.size[0], left.size[1]), "white")
    out.paste(left, (0, 0))
    out.paste(right, (left.size[0], 0))
    return out


def confusion_image(cm: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str]) -> Image.Image:
    """A confusion matrix (rows = true class, columns = predicted), cells shaded by the row's share.

    Counts are written in the cells up to 30 classes; beyond that only the shading is drawn.
    """
    m = np.asarray(cm, dtype=np.int64)
    k = m.shape[0]
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    cell = int(np.clip(600 // max(k, 1), 6, 64))
    f = font(max(8, min(14, cell // 3)))
    names = [str(n)[:18] for n in class_names[:k]] + [str(i) for i in range(len(class_names), k)]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = (max(_text_size(probe, n, f)[0] for n in names) + 12) if k <= 60 else 12
    top = margin + 24
    im = Image.new("RGB", (margin + k * cell + 12, top + k * cell + 24), "white")
    draw = ImageDraw.Draw(im)
    draw.text((margin + k * cell // 2, 4), "predicted", fill="black", font=f, anchor="mt")
    for i in range(k):
        for j in range(k):
            v = float(share[i, j])
            fill = (int(255 - 225 * v), int(255 - 170 * v), int(255 - 75 * v))
            x, y = margin + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fill, outline=(220, 220, 220))
            if k <= 30:
                draw.text((x + cell / 2, y + cell / 2), str(m[i, j]), fill="white" if v > 0.55 else "black",
                          font=f, anchor="mm")  # fmt: skip
        if k <= 60:
            draw.text((margin - 6, top + i * cell + cell / 2), names[i], fill="black", font=f, anchor="rm")
    if k <= 60:  # column names, rotated
        for j, name in enumerate(names):
            tw, th = _text_size(draw, name, f)
            label = Image.new("RGBA", (tw + 4, th + 6), (255, 255, 255, 0))
            ImageDraw.Draw(label).text((2, 2), name, fill="black", font=f, anchor="lt")
            label = label.rotate(90, expand=True)
            x = margin + j * cell + (cell - label.size[0]) // 2
            im.paste(label, (x, max(0, top - label.size[1] - 2)), label)
    draw.text((4, im.size[1] - 4), "rows: true class", fill="black", font=f, anchor="lb")
    return im
