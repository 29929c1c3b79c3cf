"""A sample as a picture: its image (or ``.npy`` array) as RGB, a thumbnail of it (crossed out when it
cannot be read), and its width and height from the packer's metadata or the image's header alone.

``.npy`` members are read from their header and raw payload; nothing is unpickled.
"""

from __future__ import annotations

import io
import json
import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from ..jpegheader import jpeg_size
from ..shardformat import IMAGE_FIELDS, MAX_PIXELS
from .drawing import fit_text, font_at

if TYPE_CHECKING:
    from .choosing import Pick

THUMB = 128  # default thumbnail box (pixels, square; images keep their aspect inside it)


def picture(sample: dict, box: int = THUMB, layout: str | None = None) -> Image.Image:
    """The sample's image as an RGB picture at least ``box`` pixels on its shorter side where the
    image has them (JPEGs are decoded at a reduced scale); ``.npy`` arrays (H×W×C or C×H×W, any
    numeric type, stretched to 0..255 when not uint8) too. ``ValueError`` when it has none or it
    cannot be read; images over the pixel limit are refused from the header."""
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is not None:
        try:
            im = Image.open(io.BytesIO(bytes(sample[field])))
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(f"{im.width}x{im.height} pixels, over the limit of {MAX_PIXELS}")
            im.draft("RGB", (box, box))  # JPEG: decode at 1/2, 1/4 or 1/8 scale where that suffices
            return im.convert("RGB")
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ValueError(f"cannot decode its .{field}: {exc}") from None
    if "npy" in sample:
        return _array_picture(_npy(bytes(sample["npy"])), layout)
    raise ValueError("no image member (jpg, png, webp, npy, ...)")


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran order, dtype, payload offset)`` of ``.npy`` bytes; nothing unpickled."""
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = read(fp)
    except (ValueError, OSError, SyntaxError, TypeError) as exc:
        raise ValueError(f"not a valid .npy array: {exc}") from None
    if dtype.hasobject:
        raise ValueError("the array holds Python objects (pickle); refused")
    return tuple(shape), bool(fortran), dtype, fp.tell()


def _npy(data: bytes) -> np.ndarray:
    shape, fortran, dtype, offset = _npy_header(data)
    count = math.prod(shape)
    if dtype.kind not in "biuf" or len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"not a plain numeric array of shape {shape} ({dtype})")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


def _hw_axes(shape: tuple[int, ...], layout: str | None) -> tuple[int, int, int | None] | None:
    """``(height axis, width axis, channel axis or None)`` of an array that is an image."""
    if len(shape) == 2:
        return 0, 1, None
    if len(shape) != 3:
        return None
    last, first = shape[2] in (1, 3, 4), shape[0] in (1, 3, 4)
    if last and (layout != "CHW" or not first):
        return 0, 1, 2
    if first:
        return 1, 2, 0
    return None


def _array_picture(arr: np.ndarray, layout: str | None) -> Image.Image:
    axes = _hw_axes(arr.shape, layout)
    if axes is None or 0 in arr.shape:
        raise ValueError(f"an array of shape {arr.shape} is not an image")
    h, w, c = axes
    if arr.shape[h] * arr.shape[w] > MAX_PIXELS:
        raise ValueError(f"{arr.shape[w]}x{arr.shape[h]} pixels, over the limit of {MAX_PIXELS}")
    arr = arr if c is None else np.moveaxis(arr, (h, w, c), (0, 1, 2))
    if arr.dtype != np.uint8:
        a = np.nan_to_num(arr.astype(np.float64))
        lo, hi = float(a.min()), float(a.max())
        arr = ((a - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)).astype(np.uint8)
    if arr.ndim == 3:
        arr = arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, :3]
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def thumbnail(im: Image.Image, box: int = THUMB) -> Image.Image:
    """``im`` scaled (up or down) to fit a ``box`` × ``box`` square, keeping its aspect."""
    scale = min(box / im.width, box / im.height)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    if size == im.size:
        return im
    return im.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)


def image_size(sample: dict, metadata: bool = True, layout: str | None = None,
               ) -> tuple[tuple[int, int] | None, bool]:
    """``((width, height) or None, from metadata)``: the original size the packer kept in the
    sample's ``.json`` (``metadata``), else the stored image's, read from its header only."""
    if metadata and "json" in sample:
        try:
            meta = json.loads(bytes(sample["json"]))
        except (ValueError, UnicodeDecodeError):
            meta = None
        size = meta.get("size") if isinstance(meta, dict) else None
        if isinstance(size, list) and len(size) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
            return (size[0], size[1]), True
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is not None:
        data = sample[field]
        size = jpeg_size(data) if field in ("jpg", "jpeg") else None
        if size is None:
            try:
                with Image.open(io.BytesIO(bytes(data))) as im:  # reads the header only
                    size = im.size
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                return None, False
        return (int(size[0]), int(size[1])), False
    if "npy" in sample:
        try:
            shape = _npy_header(bytes(sample["npy"]))[0]
        except ValueError:
            return None, False
        axes = _hw_axes(shape, layout)
        return (None if axes is None else (shape[axes[1]], shape[axes[0]])), False
    return None, False


def _placeholder(box: int, why: str) -> Image.Image:
    im = Image.new("RGB", (box, box), (250, 228, 228))
    d = ImageDraw.Draw(im)
    d.line((0, 0, box, box), fill=(200, 80, 80), width=2)
    d.line((0, box, box, 0), fill=(200, 80, 80), width=2)
    d.text((4, box // 2 - 7), fit_text(why, font_at(10), box - 8), font=font_at(10), fill=(120, 0, 0))
    return im


def pick_thumbnails(picks: list[Pick], box: int, layout: str | None,
                    errors: list[dict]) -> list[Image.Image]:
    """A thumbnail of each pick; one that cannot be read is drawn crossed out and listed in
    ``errors``."""
    out = []
    for p in picks:
        try:
            out.append(thumbnail(picture(p.sample, box, layout), box))
        except ValueError as exc:
            errors.append({"index": p.index, "key": p.key, "error": str(exc)})
            out.append(_placeholder(box, "cannot decode"))
    return out
