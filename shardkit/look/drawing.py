"""Chart primitives shared by the contact sheet and the stats picture: colours, fonts, one line of
text fitted to a width, a framed panel with a title, round axis ticks, and writing a picture.

Text drawn here may come from the data (class names, keys): it is cut to one printable line.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

BACKGROUND, TEXT, MUTED = (255, 255, 255), (30, 30, 30), (110, 110, 110)
CELL, FRAME, GRID = (238, 238, 238), (200, 200, 200), (232, 232, 232)
BAR, BAR2, DOT = (70, 110, 170), (214, 120, 60), (40, 70, 140)

Box = tuple[int, int, int, int]


@lru_cache(maxsize=None)
def font_at(size: int) -> Any:
    """Pillow's default font at ``size`` pixels (one bitmap size on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def clean_text(text: str) -> str:
    """One line of printable text (data may hold newlines, controls, lone surrogates)."""
    text = text[:400].encode("utf-8", "replace").decode("utf-8")
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def fit_text(text: str, font: Any, width: float, middle: bool = False) -> str:
    """``text`` on one line, cut with an ellipsis to ``width`` pixels: its end, or with
    ``middle`` its middle (keys differ at both ends)."""
    text = clean_text(text)
    if font.getlength(text) <= width:
        return text

    def cut(k: int) -> str:
        if not middle:
            return text[:k] + "…"
        return text[:(k + 1) // 2] + "…" + text[len(text) - k // 2:]

    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.getlength(cut(mid)) <= width:
            lo = mid
        else:
            hi = mid - 1
    return cut(lo)


def save_picture(im: Image.Image, path: str | os.PathLike) -> None:
    """Write a picture atomically: JPEG for a ``.jpg`` / ``.jpeg`` path, else PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix.lower() in (".jpg", ".jpeg"):
            im.save(tmp, format="JPEG", quality=88)
        else:
            im.save(tmp, format="PNG", optimize=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def panel(d: ImageDraw.ImageDraw, box: Box, title: str, note: str = "") -> None:
    """A framed panel: its title, then ``note`` (muted, cut to the frame) on the same line."""
    d.rectangle(box, outline=FRAME)
    d.text((box[0] + 10, box[1] + 8), title, font=font_at(14), fill=TEXT)
    if note:
        left = box[0] + 20 + font_at(14).getlength(title)
        d.text((left, box[1] + 10), fit_text(note, font_at(11), box[2] - left - 10),
               font=font_at(11), fill=MUTED)


def nice_ticks(vmax: float, n: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``vmax`` (steps of 1, 2 or 5 × 10^k)."""
    if vmax <= 0:
        return [0.0, 1.0]
    mag = 10.0 ** math.floor(math.log10(vmax / n))
    steps = [s * mag for s in (1, 2, 5, 10, 20) if vmax < 1 or s * mag >= 1]  # whole counts
    step = min(steps, key=lambda st: (abs(math.ceil(vmax / st - 1e-9) - n), st))
    if step == int(step):
        step = int(step)
    count = math.ceil(vmax / step - 1e-9)
    return [round(i * step, 12) for i in range(count + 1)]
