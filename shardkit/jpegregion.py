"""Decode only a JPEG's crop box: libjpeg-turbo's cropped decode, through nvImageCodec's CPU backend.

A ``RandomResizedCrop`` keeps on average less than half of a photo. libjpeg-turbo can skip the rows
above and below a box and decode (IDCT, upsample, convert) only the columns it spans
(``jpeg_skip_scanlines`` / ``jpeg_crop_scanline``), the way DALI's CPU ``image_random_crop``
decodes. The one maintained wheel that brings its own libjpeg-turbo *and* exposes that call on a
machine without a GPU is NVIDIA's ``nvidia-nvimgcodec-cu12`` (Apache-2.0; its CPU backend needs no
CUDA): ``CodeStream(data).get_sub_code_stream(region=...)`` decoded by a CPU-only ``Decoder``.
The pixels are those of a whole decode, cut to the box (it widens the box by a pixel so chroma
upsampling sees real neighbours; tests check equality).

It has no DCT scaling, so :func:`shardkit.decode.decode_image_hwc` asks for a region only when the
box is decoded at full scale (1/1: most crops of ImageNet-sized photos); simplejpeg's 1/2, 1/4 and
1/8 decodes stay faster for boxes that allow them. Anything this module cannot do returns None
and the caller takes its usual path, which decides (and names) errors: a truncated or damaged
JPEG, a warning, an odd colour space.

The library is imported lazily, once per process (DataLoader workers each have their own), with
the process's standard error silenced for the import: it announces, on every import, each GPU
library it did not find. ``SHARDKIT_JPEG_REGION=0`` turns region decoding off (the benchmark uses
it to measure with and without); without the package it is off.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Optional, Tuple

import numpy as np

SWITCH = "SHARDKIT_JPEG_REGION"
# What a region costs is about the share of rows down to its bottom edge: the rows above it must
# still be entropy-decoded (Huffman codes run on), only the rows below are never touched, and
# narrower columns barely matter (measured on 500×375 photos at quality 90: rows 0-50% cost 0.5 of a
# whole decode at any width, rows 25-75% 0.73, rows 50-100% 0.9, the whole image 1.04 against
# simplejpeg's 1.0). So a region is asked for only when its bottom edge is above this share.
WORTH_BELOW = 0.9
# Narrower or lower boxes save nothing, and a box one pixel wide at the left edge came back with
# chroma off by a few levels at the image's last rows: such boxes take the usual path.
MIN_SIDE = 8

_lock = threading.Lock()
_module: Any = None  # the imported nvimgcodec, False when unavailable, None before the first try
_local = threading.local()  # one Decoder per thread (and per process: see _decoder)


def _silenced_import():
    """Import nvimgcodec with file descriptor 2 pointed at /dev/null: its import prints a line
    (to the C-level stderr, which Python cannot redirect) for each GPU library it did not find."""
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")  # no per-image warnings on bad data
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):  # pragma: no cover - closed or replaced stderr
        pass
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 to silence (closed): import as it is
        from nvidia import nvimgcodec  # noqa: PLC0415
        return nvimgcodec
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 2)
        finally:
            os.close(null)
        from nvidia import nvimgcodec  # noqa: PLC0415 - optional, heavy, loaded on first use
        return nvimgcodec
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _load() -> Any:
    global _module
    if _module is None:
        with _lock:
            if _module is None:
                if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
                    _module = False
                else:
                    try:
                        _module = _silenced_import()
                    except Exception:  # noqa: BLE001 - not installed, or broken: keep the usual path
                        _module = False
    return _module


def available() -> bool:
    """Whether region decoding is on in this process (the package imports and the switch allows)."""
    return bool(_load())


def _decoder(n: Any) -> Any:
    pid = os.getpid()
    dec = getattr(_local, "decoder", None)
    if dec is None or _local.pid != pid:  # a forked worker makes its own
        dec = n.Decoder(device_id=n.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=1,
                        backends=[n.Backend(n.BackendKind.CPU_ONLY)])
        _local.decoder, _local.pid = dec, pid
        _local.params = n.DecodeParams(apply_exif_orientation=False, color_spec=n.ColorSpec.SRGB)
    return dec


def _ends_with_eoi(data) -> bool:
    """An end-of-image marker near the end (writers may pad after it)."""
    return b"\xff\xd9" in bytes(data[-64:])


def decode_region(data, box: Tuple[int, int, int, int]) -> Optional[np.ndarray]:
    """The RGB pixels of ``box`` = (left, top, right, bottom) of the JPEG ``data``, as an
    H×W×3 uint8 array (the box's own size), or None when region decoding is off or fails."""
    n = _load()
    left, top, right, bottom = box
    if not n or right - left < MIN_SIDE or bottom - top < MIN_SIDE:
        return None
    head, tail = bytes(data[:3]), bytes(data[-2:])
    if head != b"\xff\xd8\xff" or (tail != b"\xff\xd9" and not _ends_with_eoi(data)):
        # Not a JPEG, or one cut short: a region above the cut would decode, so the damage would
        # show only in the epochs whose crops reach it. The usual path names it every time.
        return None
    try:
        dec = _decoder(n)
        stream = n.CodeStream(data)  # bytes or a view of the read buffer: no copy
        region = stream.get_sub_code_stream(region=n.Region(top, left, bottom, right))
        img = dec.decode(region, params=_local.params)
        if img is None:  # damaged data, a warning, an unsupported kind: the usual path decides
            return None
        arr = np.asarray(img.cpu())
    except Exception:  # noqa: BLE001 - any refusal: the usual path decides and names it
        return None
    if arr.shape != (bottom - top, right - left, 3) or arr.dtype != np.uint8:
        return None
    return arr
