"""Turn one source file into the tar bytes of one sample (raw, resize or tensor mode).

Runs inside packing worker processes, so everything here is a plain function of its arguments.
The result of ``encode_sample`` is the complete tar encoding of the sample (headers, data,
padding): the shard writer only concatenates, hashes and counts bytes.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass
from typing import cast

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import SourceError
from ..jpegheader import jpeg_size
from ..shardformat import MAX_PIXELS, member_parts
from .folder import Item

# ``warnings.catch_warnings`` swaps process-wide state: raw-mode packing opens images from several
# threads, so the header parse that may warn about a decompression bomb is serialised.
_WARNINGS_LOCK = threading.Lock()

# File-format names as Pillow reports them -> the field (member extension) we store.
_FORMAT_FIELD = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp",
                 "GIF": "gif", "TIFF": "tiff"}
_EXT_FIELD = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp", "bmp": "bmp",
              "gif": "gif", "tif": "tiff", "tiff": "tiff"}
# Exceptions that mean "this file is bad", never a bug in our code.
_BAD_INPUT = (OSError, ValueError, SyntaxError, EOFError, UnidentifiedImageError,
              Image.DecompressionBombError, zlib.error, struct.error, pickle.UnpicklingError,
              IndexError)


@dataclass(frozen=True)
class EncodeOptions:
    """What one sample's bytes depend on (pickled to the encode workers). ``mode`` is the one
    applied: arrays are always encoded in ``"tensor"`` mode, whatever was asked for."""

    mode: str  # "raw" | "resize" | "tensor"
    size: int | None
    quality: int
    max_pixels: int = MAX_PIXELS


def encode_sample(item: Item, opts: EncodeOptions) -> tuple[bytes, dict]:
    """Encode one item. Returns ``(tar_bytes, info)`` or raises ``SourceError`` for bad input.

    ``info`` is a small dict for the pack summary (``dtype``/``shape`` for arrays).
    """
    parts, info = encode_parts(item, opts)
    return b"".join(parts), info


def encode_parts(item: Item, opts: EncodeOptions) -> tuple[list[bytes], dict]:
    """Like ``encode_sample``, but the tar bytes as a list of buffers (no copy of the payload).

    ``info`` is a small dict for the pack summary (``dtype``/``shape`` for arrays).
    """
    try:
        with open(item.path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SourceError(item.relpath, f"unreadable: {exc.strerror or exc}") from exc
    if not data:
        raise SourceError(item.relpath, "empty file (0 bytes)")
    try:
        if item.kind == "array":
            field, payload, meta, info = _encode_array(item, data)
        elif opts.mode == "raw":
            field, payload, meta = _encode_raw(item, data, opts)
            info = {}
        else:
            field, payload, meta = _encode_image(item, data, opts)
            info = {}
    except SourceError:
        raise
    except _BAD_INPUT as exc:
        raise SourceError(item.relpath, _reason(exc)) from exc
    meta = {"path": item.relpath, "class": item.class_name, **meta}
    parts: list[bytes] = []
    if item.label is not None:
        parts += member_parts(f"{item.key}.cls", str(item.label).encode("ascii"))
    parts += member_parts(f"{item.key}.{field}", payload)
    text = json.dumps(meta, sort_keys=True, ensure_ascii=False)
    # A file name that is not UTF-8 (os.fsdecode's lone surrogates) becomes a JSON \udcXX escape:
    # the member stays valid UTF-8 and json.loads gives back the same str (os.fsencode: the bytes).
    parts += member_parts(f"{item.key}.json", text.encode("utf-8", "backslashreplace"))
    return parts, info


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        return f"decompression bomb refused: {exc}"
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image (unknown or corrupt format)"
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated image: {text}"
    return f"corrupt: {text}"


def _open(item: Item, data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only), check the format matches the extension and the pixel limit."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombWarning as exc:
            raise SourceError(item.relpath, f"decompression bomb refused: {exc}") from exc
    ext = item.relpath.rsplit(".", 1)[-1].lower()
    actual = _FORMAT_FIELD.get(im.format or "", (im.format or "unknown").lower())
    if _EXT_FIELD.get(ext) != actual:
        raise SourceError(item.relpath, f"content is {im.format} but the name says .{ext}")
    w, h = im.size
    if w * h > max_pixels:
        raise SourceError(item.relpath, f"image has {w}x{h}={w * h} pixels, over the limit of "
                                        f"{max_pixels} (decompression bomb?)")
    return im


def _encode_raw(item: Item, data: bytes, opts: EncodeOptions) -> tuple[str, bytes, dict]:
    """Original bytes, checked cheaply: format, pixel limit, end marker (truncation)."""
    ext = item.relpath.rsplit(".", 1)[-1].lower()
    if _EXT_FIELD.get(ext) == "jpg":
        size = jpeg_size(data)  # the common case, without Pillow
        if size is not None:
            w, h = size
            if w * h > opts.max_pixels:
                raise SourceError(item.relpath, f"image has {w}x{h}={w * h} pixels, over the "
                                                f"limit of {opts.max_pixels} (decompression bomb?)")
            if b"\xff\xd9" not in data[-1024:]:
                raise SourceError(item.relpath, "truncated image: JPEG end-of-image marker missing")
            return "jpg", data, {"size": [w, h]}
    im = _open(item, data, opts.max_pixels)
    assert im.format is not None  # _open refused images of a format not in _FORMAT_FIELD
    field = _FORMAT_FIELD[im.format]
    tail = data[-1024:]
    if field == "jpg" and b"\xff\xd9" not in tail:
        raise SourceError(item.relpath, "truncated image: JPEG end-of-image marker missing")
    if field == "png":
        if b"IEND" not in tail:
            raise SourceError(item.relpath, "truncated image: PNG IEND chunk missing")
        im.verify()  # chunk CRCs; does not decode pixels
    return field, data, {"size": list(im.size)}


def _decode_rgb(item: Item, data: bytes, opts: EncodeOptions,
                min_short: int | None) -> tuple[Image.Image, tuple[int, int]]:
    im = _open(item, data, opts.max_pixels)
    orig = im.size
    if min_short and im.format == "JPEG":
        # Reduced-scale DCT decoding: Pillow keeps the image at least this large.
        w, h = orig
        scale = min_short / min(w, h)
        if scale < 1:
            im.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
    im.load()
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # 16-bit (or 32-bit) grey: Pillow's convert("RGB") clips at 255 (a white image); scale
        # 16-bit levels down to 8 bits instead. "F" has no known range and is clipped.
        arr = np.asarray(im)
        arr = np.clip(arr, 0, 255) if im.mode == "F" else np.clip(arr, 0, 65535) >> 8
        im = Image.fromarray(arr.astype(np.uint8), "L")
    if im.mode != "RGB":
        im = im.convert("RGBA").convert("RGB") if "transparency" in im.info else im.convert("RGB")
    return im, orig


def _resize_short(im: Image.Image, size: int, upscale: bool) -> Image.Image:
    w, h = im.size
    short = min(w, h)
    if short == size or (short < size and not upscale):
        return im
    if w <= h:
        new = (size, max(1, round(h * size / w)))
    else:
        new = (max(1, round(w * size / h)), size)
    return im.resize(new, Image.Resampling.BICUBIC)  # the IntEnum behind Image.BICUBIC (3)


try:  # libjpeg-turbo and OpenCV for the common case (dependencies; Pillow covers the rest)
    import cv2 as _cv2
    import simplejpeg as _sj
except ImportError:  # pragma: no cover
    _cv2 = _sj = None  # type: ignore[assignment]  # optional modules: None when not installed


def _fast_jpeg_rgb(im: Image.Image, data: bytes, min_short: int | None) -> np.ndarray | None:
    """H×W×3 uint8 of a plain JPEG through libjpeg-turbo, DCT-reduced while the shorter side stays
    at least ``min_short``; None when Pillow must decide (another format, CMYK, an EXIF rotation,
    any decoder warning such as truncated data)."""
    if _sj is None or _cv2 is None or im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return None
    try:
        if im.getexif().get(0x0112, 1) != 1:  # orientation: Pillow applies it
            return None
    except Exception:  # noqa: BLE001 - unreadable EXIF: let Pillow decide
        return None
    w, h = im.size
    s = next((f for f in (8, 4, 2) if min_short and min(w, h) / f >= min_short), 1)
    try:
        return _sj.decode_jpeg(data, "RGB", min_height=-(-h // s), min_width=-(-w // s))
    except ValueError:
        return None


def _shorter_side_to(arr: np.ndarray, size: int) -> np.ndarray:
    """Shrink so the shorter side is ``size`` (OpenCV's area filter, one thread)."""
    h, w = arr.shape[:2]
    if min(w, h) == size:
        return arr
    new = (size, max(1, round(h * size / w))) if w <= h else (max(1, round(w * size / h)), size)
    _cv2.setNumThreads(1)
    return _cv2.resize(arr, new, interpolation=_cv2.INTER_AREA)


def _encode_image_fast(item: Item, data: bytes,
                       opts: EncodeOptions) -> tuple[str, bytes, dict] | None:
    """The resize/tensor encodings of a plain JPEG without Pillow's decode, resampler or encoder;
    None when the Pillow path must do it (see ``_fast_jpeg_rgb``; tensor mode enlarging)."""
    size = cast(int, opts.size)  # resize and tensor modes: PackOptions made it an int
    im = _open(item, data, opts.max_pixels)
    arr = _fast_jpeg_rgb(im, data, size)
    if arr is None:
        return None
    orig = list(im.size)
    short = min(arr.shape[:2])
    if opts.mode == "resize":
        if short > size:
            arr = _shorter_side_to(arr, size)
        jpg = _sj.encode_jpeg(np.ascontiguousarray(arr), quality=opts.quality, colorspace="RGB",
                              colorsubsampling="420")
        return "jpg", jpg, {"size": orig}
    if short < size:
        return None  # tensor mode enlarges small images: Pillow's bicubic
    arr = _shorter_side_to(arr, size)
    h, w = arr.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return "npy", _npy_bytes(arr[top:top + size, left:left + size]), {"size": orig}


def _encode_image(item: Item, data: bytes, opts: EncodeOptions) -> tuple[str, bytes, dict]:
    fast = _encode_image_fast(item, data, opts)
    if fast is not None:
        return fast
    size = cast(int, opts.size)  # resize and tensor modes: PackOptions made it an int
    im, orig = _decode_rgb(item, data, opts, size)
    if opts.mode == "resize":
        im = _resize_short(im, size, upscale=False)
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=opts.quality)
        return "jpg", out.getvalue(), {"size": list(orig)}
    # tensor: shorter side to size, center crop size x size, uint8 HWC .npy
    im = _resize_short(im, size, upscale=True)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    arr = np.asarray(im, dtype=np.uint8)
    return "npy", _npy_bytes(arr), {"size": list(orig)}


def _npy_bytes(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(arr), allow_pickle=False)
    return out.getvalue()


def _encode_array(item: Item, data: bytes) -> tuple[str, bytes, dict, dict]:
    """A preprocessed ``.npy`` array or a ``.pt`` file holding one tensor (``torch.save(t)``)."""
    if item.relpath.lower().endswith(".npy"):
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        source_layout_hint = "HWC"
    else:
        import torch  # only needed for .pt sources

        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # weights_only refused a global: nothing was run
            raise SourceError(item.relpath, f"not a plain tensor file, refused to unpickle: "
                                            f"{str(exc).splitlines()[0]}") from exc
        except Exception as exc:  # torch's parser of untrusted bytes: any failure is the file's
            raise SourceError(item.relpath, f"not a readable torch.save file: {type(exc).__name__}: "
                                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        if not isinstance(obj, torch.Tensor):
            raise SourceError(item.relpath, f"holds a {type(obj).__name__}, not a plain tensor")
        if obj.is_sparse or obj.is_quantized or obj.is_complex():
            raise SourceError(item.relpath, "holds a sparse, quantized or complex tensor")
        if obj.dtype == torch.bfloat16:
            raise SourceError(item.relpath, f"tensor dtype {obj.dtype} cannot be stored as .npy")
        try:
            arr = obj.detach().contiguous().numpy()
        except TypeError as exc:  # a dtype numpy has no equivalent for (e.g. float8)
            raise SourceError(item.relpath, f"tensor dtype {obj.dtype} cannot be stored as .npy: "
                                            f"{exc}") from exc
        source_layout_hint = "CHW"
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf" or arr.ndim == 0:
        raise SourceError(item.relpath, "not a plain numeric array")
    layout = _layout(arr.shape, source_layout_hint)
    if layout == "CHW" and arr.dtype == np.uint8:
        arr = arr.transpose(1, 2, 0)  # stored as uint8 HWC like images packed in tensor mode
        layout = "HWC"
    info = {"dtype": arr.dtype.str, "layout": layout, "ndim": arr.ndim}
    return "npy", _npy_bytes(arr), {"shape": list(arr.shape)}, info


def _layout(shape: tuple, hint: str) -> str:
    if len(shape) != 3:
        return "HW" if len(shape) == 2 else f"{len(shape)}d"
    channels_last = shape[-1] in (1, 3, 4)
    channels_first = shape[0] in (1, 3, 4)
    if channels_last and channels_first:
        return hint
    if channels_last:
        return "HWC"
    if channels_first:
        return "CHW"
    return "3d"
