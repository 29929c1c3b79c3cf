"""The stats picture (``shardkit show --stats``): :func:`dataset_stats`'s numbers drawn in four
panels (samples per class, image sizes, samples per shard, shard sizes)."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image, ImageDraw

from ..common import format_bytes
from .choosing import check_count
from .drawing import (
    BACKGROUND,
    BAR,
    BAR2,
    DOT,
    GRID,
    MUTED,
    TEXT,
    Box,
    clean_text,
    fit_text,
    font_at,
    nice_ticks,
    panel,
    save_picture,
)
from .stats import dataset_stats

if TYPE_CHECKING:
    from .choosing import Source

PANEL_W, PANEL_H, MARGIN, TITLE_H = 600, 400, 16, 64  # the four panels, the page's edges, the title


def stats_picture(source: Source, path: str | os.PathLike | None = None, *, seed: int = 0,
                  max_samples: int | None = None, top: int = 15,
                  storage_options: dict | None = None, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Draw a dataset's numbers in one picture and write it to ``path`` (PNG) when given:
    samples per class (bars, most first; the ``top`` largest and smallest when there are more
    than ``2 * top`` classes), samples and bytes per shard (bars, or histograms beyond 100
    shards), and image sizes (width × height, each dot a sample, darker where many are).

    The numbers are :func:`dataset_stats`'s (``seed``, ``max_samples``, ``progress``); returns
    them with ``"image"``, ``"path"`` and ``"size"`` added."""
    check_count("top", top)
    stats = dataset_stats(source, seed=seed, max_samples=max_samples,
                          storage_options=storage_options, cache_dir=cache_dir, progress=progress)
    im = draw_stats(stats, top=top)
    if path is not None:
        save_picture(im, path)
    stats.update(image=im, path=None if path is None else str(path), size=im.size)
    return stats


def draw_stats(stats: dict[str, Any], top: int = 15) -> Image.Image:
    """The picture of :func:`dataset_stats`'s numbers (see :func:`stats_picture`)."""
    per_class = stats["per_class"]
    bars = 0 if not per_class else min(len(per_class), 2 * top + 1)
    class_h = max(PANEL_H, 64 + bars * 16)
    width = 2 * PANEL_W + 3 * MARGIN
    height = TITLE_H + class_h + PANEL_H + 2 * MARGIN
    im = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(im)
    d.text((MARGIN, 10), fit_text(stats["location"], font_at(18), width - 2 * MARGIN),
           font=font_at(18), fill=TEXT)
    classes = stats["classes"]
    what = (f"{len(classes)} classes" if classes else
            f"{len(per_class)} labels" if per_class else "no labels")
    read = (f"a seeded subset of {stats['looked_at']} samples (seed {stats['seed']})"
            if stats["subset"] else f"all {stats['looked_at']:,} samples")
    line = (f"{stats['num_samples']:,} samples · {what} · {stats['num_shards']:,} shards · "
            f"{format_bytes(stats['num_bytes'])} · {stats['mode']} · read {read} in "
            f"{stats['seconds']:.1f} s")
    d.text((MARGIN, 38), fit_text(line, font_at(12), width - 2 * MARGIN), font=font_at(12), fill=MUTED)
    x0, x1 = MARGIN, 2 * MARGIN + PANEL_W
    y0, y1 = TITLE_H, TITLE_H + class_h + MARGIN
    _class_panel(d, (x0, y0, x0 + PANEL_W, y0 + class_h), stats, top)
    _size_panel(d, im, (x1, y0, x1 + PANEL_W, y0 + class_h), stats)
    _shard_panel(d, (x0, y1, x0 + PANEL_W, y1 + PANEL_H), "Samples per shard",
                 stats["shard_samples"], lambda v: f"{v:,.0f}")
    _shard_panel(d, (x1, y1, x1 + PANEL_W, y1 + PANEL_H), "Shard sizes",
                 stats["shard_bytes"], format_bytes)
    return im


def _class_panel(d: ImageDraw.ImageDraw, box: Box, stats: dict, top: int) -> None:
    per_class = stats["per_class"]
    unlabeled = stats["unlabeled"]
    if not per_class:
        panel(d, box, "Samples per class")
        d.text((box[0] + 10, box[1] + 40), f"no labels: {stats['looked_at']:,} samples read",
               font=font_at(12), fill=MUTED)
        return
    items = sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0]))
    counts = np.array([c for _, c in items])
    note = (f"{len(items)} classes; min {counts.min():,}, median {np.median(counts):,.0f}, "
            f"max {counts.max():,}" + (f"; {unlabeled:,} without a label" if unlabeled else ""))
    panel(d, box, "Samples per class", note)
    rows: list[tuple[str, int] | None] = list(items)
    split = len(items) > 2 * top + 1
    if split:  # the largest and the smallest classes
        rows = [*items[:top], None, *items[-top:]]
    font = font_at(11)
    rh = max(16, min(28, (box[3] - box[1] - 70) // len(rows)))  # a row per bar
    label_w = min(170, int(max(font.getlength(clean_text(name)) for name, _ in items)) + 8)
    ticks = nice_ticks(float(counts.max()))
    left, right = box[0] + 10 + label_w, box[2] - 50
    y = box[1] + 36
    scale = (right - left) / ticks[-1]
    for t in ticks:
        x = left + t * scale
        d.line((x, y, x, y + len(rows) * rh), fill=GRID)
        d.text((x - font.getlength(f"{t:,.0f}") / 2, y + len(rows) * rh + 2), f"{t:,.0f}",
               font=font, fill=MUTED)
    for r, row in enumerate(rows):
        yy = y + r * rh
        if row is None:
            d.text((box[0] + 10, yy + rh // 2 - 7), f"… {len(items) - 2 * top:,} more classes …",
                   font=font, fill=MUTED)
            continue
        name, count = row
        d.text((box[0] + 10, yy + rh // 2 - 7), fit_text(name, font, label_w - 8), font=font, fill=TEXT)
        d.rectangle((left, yy + 2, left + max(1, round(count * scale)), yy + rh - 3),
                    fill=BAR2 if split and r > top else BAR)
        d.text((left + count * scale + 4, yy + rh // 2 - 7), f"{count:,}", font=font, fill=TEXT)


def _shard_panel(d: ImageDraw.ImageDraw, box: Box, title: str, values: np.ndarray,
                 fmt: Callable[[float], str]) -> None:
    font = font_at(11)
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        panel(d, box, title, "no shards")
        return
    note = (f"{len(values):,} shards; min {fmt(values.min())}, median {fmt(np.median(values))}, "
            f"max {fmt(values.max())}")
    left, right, top_y, bottom = box[0] + 70, box[2] - 16, box[1] + 40, box[3] - 40
    if len(values) <= 100:  # a bar per shard
        panel(d, box, title, note)
        heights, xs, centred = values, None, True
        xlabel = "shard"
    else:  # a histogram of the shards' values
        panel(d, box, title + " (histogram)", note)
        lo, hi = float(values.min()), float(values.max())
        if np.all(values == np.round(values)) and hi - lo < 40:  # a bin per whole number
            edges = np.arange(lo - 0.5, hi + 1.0)
            heights = np.histogram(values, bins=edges)[0]
            xs, centred = edges + 0.5, True  # labelled at the bars' middles
        else:
            heights, xs = np.histogram(values, bins=30, range=(lo, hi if hi > lo else lo + 1))
            centred = False  # labelled at the bins' edges
        xlabel = "shards with this many" if "Samples" in title else "shards of this size"
    ticks = nice_ticks(float(np.max(heights)))
    yscale = (bottom - top_y) / ticks[-1]
    for t in ticks:
        y = bottom - t * yscale
        d.line((left, y, right, y), fill=GRID)
        text = f"{t:,.0f}" if xs is not None else fmt(t)
        d.text((left - 6 - font.getlength(text), y - 7), text, font=font, fill=MUTED)
    n = len(heights)
    step = (right - left) / n
    for i, h in enumerate(heights):
        xa = left + i * step
        d.rectangle((xa + (1 if step > 3 else 0), bottom - h * yscale, xa + step - 1, bottom),
                    fill=BAR)
    d.line((left, bottom, right, bottom), fill=TEXT)
    if xs is None:
        marks = sorted({0, n - 1, *range(0, n, max(1, math.ceil(n / 8)))})
        for i in marks:
            text = str(i)
            d.text((left + (i + 0.5) * step - font.getlength(text) / 2, bottom + 4), text,
                   font=font, fill=MUTED)
    else:
        every = max(1, math.ceil(n / 8)) if centred else 6
        for k in range(0, n if centred else n + 1, every):
            text = fmt(xs[k])
            x = left + (k + (0.5 if centred else 0)) * step
            d.text((x - font.getlength(text) / 2, bottom + 4), text, font=font, fill=MUTED)
    d.text((right - font.getlength(xlabel), bottom + 20), xlabel, font=font, fill=MUTED)


def _size_panel(d: ImageDraw.ImageDraw, im: Image.Image, box: Box, stats: dict) -> None:
    font = font_at(11)
    w, h = stats["widths"], stats["heights"]
    ok = (w > 0) & (h > 0)
    w, h = w[ok], h[ok]
    source = ("original sizes (packer's metadata)" if stats["sizes_from_metadata"] == len(w)
              else "stored sizes (image headers)" if stats["sizes_from_metadata"] == 0
              else "original sizes (metadata), else headers")
    if len(w) == 0:
        panel(d, box, "Image sizes", "no sizes known")
        return
    pairs, counts = np.unique(np.stack([w, h], axis=1), axis=0, return_counts=True)
    common = ", ".join(f"{a}x{b} ({c:,})" for (a, b), c in
                       sorted(zip(pairs.tolist(), counts.tolist()), key=lambda t: -t[1])[:3] if c > 1)
    panel(d, box, "Image sizes", f"{source}; width x height")
    d.text((box[0] + 10, box[1] + 28),
           fit_text(f"width {w.min()} to {w.max()} (median {np.median(w):.0f}), height {h.min()} "
                    f"to {h.max()} (median {np.median(h):.0f}); {len(pairs):,} distinct sizes"
                    + (f", most common: {common}" if common else ""), font,
                    box[2] - box[0] - 20), font=font, fill=MUTED)
    left, right, top_y, bottom = box[0] + 56, box[2] - 20, box[1] + 52, box[3] - 40
    xt, yt = nice_ticks(1.05 * float(w.max())), nice_ticks(1.05 * float(h.max()))  # dots inside
    xs, ys = (right - left) / xt[-1], (bottom - top_y) / yt[-1]
    for t in xt:
        x = left + t * xs
        d.line((x, top_y, x, bottom), fill=GRID)
        d.text((x - font.getlength(f"{t:,.0f}") / 2, bottom + 4), f"{t:,.0f}", font=font, fill=MUTED)
    for t in yt:
        y = bottom - t * ys
        d.line((left, y, right, y), fill=GRID)
        d.text((left - 6 - font.getlength(f"{t:,.0f}"), y - 7), f"{t:,.0f}", font=font, fill=MUTED)
    d.line((left, bottom, right, bottom), fill=TEXT)
    d.line((left, top_y, left, bottom), fill=TEXT)
    d.text((right - font.getlength("width"), bottom + 20), "width", font=font, fill=MUTED)
    d.text((left + 4, top_y + 2), "height", font=font, fill=MUTED)
    # dots: a density raster (any number of samples costs the same), each dot 5x5 pixels
    pw, ph = right - left + 1, bottom - top_y + 1
    px = np.clip(np.round(w * xs).astype(np.int64), 0, pw - 1)
    py = np.clip(np.round(bottom - top_y - h * ys).astype(np.int64), 0, ph - 1)
    grid = np.pad(np.bincount(py * pw + px, minlength=pw * ph).reshape(ph, pw).astype(np.float64), 2)
    dense = np.zeros((ph, pw))
    for dy in range(5):
        for dx in range(5):
            dense = np.maximum(dense, grid[dy:dy + ph, dx:dx + pw])
    alpha = np.where(dense > 0, 0.35 + 0.65 * np.log1p(dense) / np.log1p(dense.max()), 0.0)
    layer = np.zeros((ph, pw, 4), dtype=np.uint8)
    layer[..., :3] = DOT
    layer[..., 3] = (alpha * 255).astype(np.uint8)
    rgba = Image.fromarray(layer)
    im.paste(rgba, (left, top_y), rgba)
