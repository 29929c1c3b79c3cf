"""Decode one sample's image bytes into what the dataset yields, with decode-fused crops.

``decode_image`` turns encoded image bytes (JPEG, PNG, WebP, ...) into a ``uint8`` C×H×W RGB tensor,
an RGB ``PIL.Image`` or leaves them as they are.  With a ``crop`` recipe (:class:`RandomResizedCrop`
for training, :class:`CenterCrop` for evaluation) the crop is fused into decoding: the crop box is
chosen on the full-size image from the header alone, JPEGs are decoded at a reduced DCT scale
(1/2, 1/4, 1/8) whenever the box is still at least the output size after that reduction, and the
crop and resize happen in one ``Image.resize(box=...)`` pass.  The result matches "full decode ->
crop -> resize" up to small filtering differences, at a fraction of the cost for large images.

``decode_array`` does the same for ``.npy`` members (uint8 H×W×C, never unpickled).

Notes:
  * EXIF orientation is *not* applied: "resize" and "tensor" shards are oriented at pack time;
    "raw" shards yield the stored pixels as they are.
  * Alpha is dropped (RGBA -> RGB keeps the colour channels, no compositing); CMYK and palette
    images go through Pillow's ``convert("RGB")``.
  * Images over ``max_pixels`` are refused from the header, before any pixel is decoded.  Pillow's own
    ``Image.MAX_IMAGE_PIXELS`` guard still applies on top (it warns above ~89 MP and refuses above
    ~179 MP); raise it as well to accept larger images.
  * Failures of the *data* raise :class:`ImageDecodeError`; bugs (TypeError, AttributeError, ...)
    propagate untouched so that ``on_error="skip"`` never hides them.
"""

from __future__ import annotations

import io
import math
import random
import struct
import warnings
from dataclasses import dataclass
from typing import Literal, Optional, Protocol, Sequence, Tuple, Union, cast, overload

import numpy as np
import torch
from PIL import Image

from . import jpegregion
from .errors import ShardkitError
from .shardformat import MAX_PIXELS  # default limit on width × height (decompression bombs)

__all__ = ["MAX_PIXELS", "CenterCrop", "CropParams", "ImageDecodeError", "RandomResizedCrop",
           "decode_array", "decode_image", "pil_to_tensor"]


MODES = ("uint8", "pil", "raw")

_PIL_FILTERS = {name: Image.Resampling[name.upper()]
                for name in ("nearest", "bilinear", "bicubic", "lanczos")}

# Exceptions Pillow / numpy raise on bad *data*.  TypeError and AttributeError are deliberately absent.
_DATA_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class ImageDecodeError(ShardkitError, ValueError):
    """Image or array bytes cannot be decoded; ``reason`` says why.

    The dataset wraps it in :class:`shardkit.errors.DecodeError` with the shard URL and sample key.
    """

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class CropParams:
    """Where to crop and how big the result is.

    ``box`` is ``(left, top, right, bottom)`` in pixels of the original (full-size) image,
    ``out_size`` is ``(width, height)`` of the output, ``flip`` asks for a horizontal flip.
    ``pad`` is ``(left, top, right, bottom)``: zero borders of the output around the resized box
    (a centre crop larger than the resized image, as torchvision pads it).
    """

    box: Tuple[int, int, int, int]
    out_size: Tuple[int, int]
    flip: bool = False
    pad: Tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def inner_size(self) -> Tuple[int, int]:
        """``(width, height)`` the box is resized to: the output without its zero borders."""
        left, top, right, bottom = self.pad
        return self.out_size[0] - left - right, self.out_size[1] - top - bottom


class CropRecipe(Protocol):
    """Anything with ``params(width, height, rng) -> CropParams`` (optionally ``.interpolation``)."""

    def params(self, width: int, height: int, rng: Optional[random.Random]) -> CropParams: ...


class SizedCropRecipe(CropRecipe, Protocol):
    """A crop recipe of one output ``size``, ``(height, width)``: the crops a dataset takes
    (:class:`RandomResizedCrop`, :class:`CenterCrop`; ``DecodeConfig`` checks for the tuple)."""

    size: Tuple[int, int]


def _size_hw(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """torchvision's convention: an int means square, a pair means (height, width)."""
    if isinstance(size, bool):
        raise TypeError(f"size must be an int or a (height, width) pair, got {size!r}")
    if isinstance(size, int):
        h = w = size
    else:
        h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def _check_interpolation(interpolation: str) -> str:
    if interpolation not in _PIL_FILTERS:
        raise ValueError(f"interpolation must be one of {sorted(_PIL_FILTERS)}, got {interpolation!r}")
    return interpolation


class RandomResizedCrop:
    """Training crop: random area fraction ``scale`` and aspect ratio ``ratio``, resized to ``size``.

    ``size`` is an int or ``(height, width)``.  The box follows
    ``torchvision.transforms.v2.RandomResizedCrop`` (10 tries, then a centred fallback), drawing
    from the given ``random.Random``; with ``flip`` the image is mirrored with probability 1/2.
    ``interpolation``: ``"bilinear"`` (default), ``"bicubic"``, ``"nearest"`` or ``"lanczos"``.
    """

    def __init__(self, size: Union[int, Sequence[int]], *, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                 interpolation: str = "bilinear") -> None:
        self.size = _size_hw(size)
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"need 0 < min <= max for scale {scale!r} and ratio {ratio!r}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip = bool(flip)
        self.interpolation = _check_interpolation(interpolation)

    def __repr__(self) -> str:
        return (f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"flip={self.flip}, interpolation={self.interpolation!r})")

    def params(self, width: int, height: int, rng: Optional[random.Random]) -> CropParams:
        """Draw a crop box for a ``width`` × ``height`` image (``rng`` is required)."""
        if rng is None:
            raise TypeError("RandomResizedCrop.params needs a random.Random, got None")
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                break
        else:  # fallback: central crop with the aspect ratio clamped into range
            in_ratio = width / height
            if in_ratio < self.ratio[0]:
                w, h = width, int(round(width / self.ratio[0]))
            elif in_ratio > self.ratio[1]:
                w, h = int(round(height * self.ratio[1])), height
            else:
                w, h = width, height
            top, left = (height - h) // 2, (width - w) // 2
        flip = self.flip and rng.random() < 0.5
        return CropParams((left, top, left + w, top + h), (self.size[1], self.size[0]), flip)


class CenterCrop:
    """Eval crop: resize the shorter side to ``resize`` (default ``round(size / 0.875)``), then take
    the central ``size`` (an int or ``(height, width)``).  Deterministic; ``rng`` is ignored.

    The same as torchvision's ``v2.Resize(resize)`` then ``v2.CenterCrop(size)``, fused into
    decoding: an image smaller than ``resize`` is enlarged (as ``Resize`` does; a warning says so
    when it is more than twice), and where ``size`` is larger than the resized image the output
    gets zero borders (as ``CenterCrop`` pads), never a stretched image. ``interpolation``: as
    for :class:`RandomResizedCrop`."""

    def __init__(self, size: Union[int, Sequence[int]], *, resize: Optional[int] = None,
                 interpolation: str = "bilinear") -> None:
        self.size = _size_hw(size)
        self.resize = int(round(max(self.size) / 0.875)) if resize is None else int(resize)
        if self.resize <= 0:
            raise ValueError(f"resize must be positive, got {resize!r}")
        self.interpolation = _check_interpolation(interpolation)
        self._warned = False

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size}, resize={self.resize}, interpolation={self.interpolation!r})"

    def params(self, width: int, height: int, rng: Optional[random.Random] = None) -> CropParams:
        """The central box, in original pixels, that becomes the output after resize + crop."""
        out_h, out_w = self.size
        factor = min(width, height) / self.resize  # original pixels per resized pixel
        if factor < 0.5 and not self._warned:
            self._warned = True  # once per crop and process: images of many sizes would repeat it
            warnings.warn(f"{self!r} enlarges a {width}x{height} image {1 / factor:.1f}x (it "
                          f"resizes the shorter side to {self.resize}); pass resize= to change "
                          "that", stacklevel=2)

        # the resized image's size as v2.Resize makes it: the longer side is truncated
        longer = int(self.resize * max(width, height) / min(width, height))
        rw, rh = (self.resize, longer) if width <= height else (longer, self.resize)

        def axis(out: int, size: int, resized: int) -> tuple[int, int, int]:
            """The box's length in original pixels and the zero borders before and after."""
            box = max(1, int(round(out * factor)))
            if box <= size and out <= resized:
                return box, 0, 0
            inner = max(1, min(out, resized))  # the whole resized image, centred as v2 pads
            return size, (out - inner) // 2, out - inner - (out - inner) // 2

        bw, pad_l, pad_r = axis(out_w, width, rw)
        bh, pad_t, pad_b = axis(out_h, height, rh)
        left = int(round((width - bw) / 2.0))
        top = int(round((height - bh) / 2.0))
        return CropParams((left, top, left + bw, top + bh), (out_w, out_h), False,
                          (pad_l, pad_t, pad_r, pad_b))


def crop_rng(prefix: str, key: str) -> random.Random:
    """The generator of one sample's crop box: seeded from ``prefix + key`` (``prefix`` is
    ``"seed/epoch/"``), so a sample's box depends on nothing but the run's seed, the epoch and
    its key.

    Seeded from the key's bytes as its tar member name holds them: a name that is not UTF-8 (a
    Latin-1 ``é``) comes as a key with surrogate escapes, which ``random.Random(str)`` refuses;
    for a valid UTF-8 key the seed (and so the box) is the same as ``random.Random(str)``'s."""
    return random.Random((prefix + key).encode("utf-8", "surrogateescape"))


def _crop_params(crop: CropRecipe, width: int, height: int, rng: Optional[random.Random]) -> CropParams:
    p = crop.params(width, height, rng)
    left, top, right, bottom = p.box
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise ValueError(f"crop box {p.box} is not inside a {width}x{height} image")
    return p


def _dct_scale(box: Tuple[int, int, int, int], out_size: Tuple[int, int]) -> int:
    """Largest JPEG DCT reduction (1, 2, 4, 8) that keeps the box at least ``out_size``."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    for s in (8, 4, 2):
        if bw / s >= out_size[0] and bh / s >= out_size[1]:
            return s
    return 1


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # avoids Pillow's palette-transparency warning
    return im.convert("RGB")


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """A contiguous uint8 C×H×W tensor from an RGB (or L) PIL image.

    Splitting into planes in Pillow is faster than ``torch.from_numpy(np.asarray(im))`` followed by
    ``permute(2, 0, 1).contiguous()``, whose strided copy dominates for 3 channels.
    """
    w, h = im.size
    planes = b"".join(band.tobytes() for band in im.split())
    return torch.frombuffer(bytearray(planes), dtype=torch.uint8).view(len(im.getbands()), h, w)


def _data_error(exc: BaseException) -> ImageDecodeError:
    msg = str(exc) or type(exc).__name__
    kind = "truncated" if "truncated" in msg.lower() or isinstance(exc, EOFError) else "corrupt"
    return ImageDecodeError(f"{kind} image: {msg}")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image (format not recognised)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image is over the pixel limit ({exc})") from exc
    except _DATA_ERRORS as exc:
        raise _data_error(exc) from exc
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageDecodeError(f"image has {w}x{h}={w * h} pixels, over the limit of {max_pixels}")
    return im


def _decode_pil(im: Image.Image, p: Optional[CropParams], resample: int) -> Image.Image:
    """Decode an opened image to RGB, fusing the crop ``p`` when given."""
    if p is None:
        im.load()
        return _to_rgb(im)
    scale = 1  # DCT reduction actually applied
    if im.format == "JPEG":
        want = _dct_scale(p.box, p.inner_size)
        if want > 1:
            # Pillow picks the largest s in (8, 4, 2, 1) with s <= min(W // req_w, H // req_h);
            # requesting (W // want, H // want) makes that exactly ``want``.
            full_w = im.width
            res = im.draft("RGB", (full_w // want, im.height // want))
            if res is not None:  # res[1] is the full image's box in reduced pixels: (0, 0, W/s, H/s)
                scale = round(full_w / res[1][2])
    im.load()
    # Reduced pixel i covers original pixels [i*s, (i+1)*s), so the box maps by plain division.
    box = cast("tuple[float, float, float, float]", tuple(v / scale for v in p.box))
    out = _to_rgb(im).resize(p.inner_size, resample=resample, box=box, reducing_gap=None)
    if p.inner_size != p.out_size:  # zero borders around it
        canvas = Image.new("RGB", p.out_size)
        canvas.paste(out, p.pad[:2])
        out = canvas
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if p.flip else out


@overload
def decode_image(data: bytes, *, mode: Literal["uint8"] = "uint8", crop: Optional[CropRecipe] = None,
                 rng: Optional[random.Random] = None, max_pixels: int = MAX_PIXELS,
                 ) -> torch.Tensor: ...
@overload
def decode_image(data: bytes, *, mode: Literal["pil"], crop: Optional[CropRecipe] = None,
                 rng: Optional[random.Random] = None, max_pixels: int = MAX_PIXELS,
                 ) -> Image.Image: ...
@overload
def decode_image(data: bytes, *, mode: Literal["raw"], crop: Optional[CropRecipe] = None,
                 rng: Optional[random.Random] = None, max_pixels: int = MAX_PIXELS,
                 ) -> bytes: ...
@overload
def decode_image(data: bytes, *, mode: str, crop: Optional[CropRecipe] = None,
                 rng: Optional[random.Random] = None, max_pixels: int = MAX_PIXELS,
                 ) -> Union[torch.Tensor, Image.Image, bytes]: ...


def decode_image(data: bytes, *, mode: str = "uint8", crop: Optional[CropRecipe] = None,
                 rng: Optional[random.Random] = None, max_pixels: int = MAX_PIXELS,
                 ) -> Union[torch.Tensor, Image.Image, bytes]:
    """Decode one encoded image.

    ``mode="uint8"``: contiguous ``torch.uint8`` tensor 3×H×W (RGB); ``"pil"``: RGB ``PIL.Image``;
    ``"raw"``: ``data`` itself, untouched (``crop`` is not allowed then).  ``crop`` is a recipe such
    as :class:`RandomResizedCrop` / :class:`CenterCrop` whose box is drawn from ``rng``.
    Raises :class:`ImageDecodeError` for data that is not a decodable image or is over ``max_pixels``
    (checked from the header, before decoding).  EXIF orientation is not applied.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "raw":
        if crop is not None:
            raise ValueError("crop cannot be used with mode='raw'")
        return data
    if not data:
        raise ImageDecodeError("empty data")
    im = _open(data, max_pixels)
    # Outside the try: a bad recipe is a bug, never an ImageDecodeError.
    p = None if crop is None else _crop_params(crop, im.width, im.height, rng)
    resample = _PIL_FILTERS[getattr(crop, "interpolation", "bilinear")]
    try:
        out = _decode_pil(im, p, resample)
        return out if mode == "pil" else pil_to_tensor(out)
    except _DATA_ERRORS as exc:
        raise _data_error(exc) from exc


def _tv_resize(chw: torch.Tensor, out_hw: Tuple[int, int], interpolation: str) -> torch.Tensor:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    return F.resize(chw, list(out_hw), interpolation=InterpolationMode(interpolation), antialias=True)


def _load_npy(data: bytes) -> np.ndarray:
    """Parse a ``.npy`` header and view the uint8 payload in place (read-only, no copy).

    Safer than ``np.load``: nothing is unpickled, and a header claiming a huge shape allocates
    nothing, since the payload must be exactly the bytes present.
    """
    if not data:
        raise ImageDecodeError("empty data")
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in reader:
            raise ImageDecodeError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = reader[version](fp)
    except _DATA_ERRORS as exc:
        if isinstance(exc, ImageDecodeError):
            raise
        raise ImageDecodeError(f"not a valid .npy array: {exc}") from exc
    if dtype.hasobject:
        raise ImageDecodeError("array holds Python objects (pickle); refused")
    if dtype != np.uint8:
        raise ImageDecodeError(f"array dtype is {dtype}, expected uint8")
    count, offset = math.prod(shape), fp.tell()
    if len(data) - offset != count:
        kind = "truncated" if len(data) - offset < count else "trailing bytes after"
        raise ImageDecodeError(f"{kind} array data: shape {shape} needs {count} bytes, "
                               f"found {len(data) - offset}")
    arr = np.frombuffer(data, dtype=np.uint8, count=count, offset=offset)
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


def decode_array(data: bytes, *, crop: Optional[CropRecipe] = None,
                 rng: Optional[random.Random] = None) -> torch.Tensor:
    """Load a ``.npy`` member (uint8 H×W×C, C in 1/3/4) as a contiguous uint8 C×H×W tensor.

    Never unpickles: the header is parsed without ``np.load`` and object arrays are refused.  With
    ``crop`` the box is sliced first, then resized on uint8 (antialiased, torchvision's fast path)
    and flipped. Channel count is kept as stored (no RGB conversion); "lanczos" is not supported here.
    """
    arr = _load_npy(data)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(f"array shape is {arr.shape}, expected H x W x C with C in 1/3/4")
    if crop is None:
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # one copy, writable, contiguous
    height, width = arr.shape[:2]
    p = _crop_params(crop, width, height, rng)
    left, top, right, bottom = p.box
    # A channels-last view: torchvision's uint8 antialiased bilinear kernel works on it directly.
    hwc = torch.from_numpy(arr[top:bottom, left:right].copy())
    out_w, out_h = p.inner_size
    chw = hwc.permute(2, 0, 1)
    if (out_h, out_w) != (bottom - top, right - left):
        chw = _tv_resize(chw, (out_h, out_w), getattr(crop, "interpolation", "bilinear"))
    if p.inner_size != p.out_size:
        pad_l, pad_t, pad_r, pad_b = p.pad
        chw = torch.nn.functional.pad(chw, (pad_l, pad_r, pad_t, pad_b))
    if p.flip:
        chw = chw.flip(-1)
    return chw.contiguous()


# --------------------------------------------------------------------------- the batch fast path
#
# Batches are assembled channels-last (N×H×W×C memory, N×C×H×W shape), so a sample that is already
# H×W×C — an .npy member, or a JPEG decoded by libjpeg-turbo — lands in its batch slot with one
# contiguous copy and no transpose. JPEGs are decoded with simplejpeg (libjpeg-turbo; at 1/2, 1/4
# or 1/8 scale when the crop box allows, like Pillow's draft mode, without Pillow's overhead) or,
# at full scale, only the crop box's rows and columns (jpegregion, when installed); crops are
# shrunk with torch's antialiased bilinear filter (Pillow's, within a level; ~5× faster than
# OpenCV's area filter) and enlarged or barely shrunk with OpenCV's bilinear. All optional:
# without them, or for anything they refuse (not a JPEG, CMYK, a warning such as a truncated
# file), the Pillow path above decides, so errors and odd images are handled in one place.

try:  # pragma: no cover - exercised when installed (they are dependencies)
    import cv2 as _cv2
    import simplejpeg as _sj
except ImportError:  # pragma: no cover
    _cv2 = _sj = None  # type: ignore[assignment]  # optional modules: None when not installed

_cv2_threads_set = False


def fast_path_available() -> bool:
    return _cv2 is not None and _sj is not None


def _cv2_ready():
    global _cv2_threads_set
    if not _cv2_threads_set:
        # One thread per process: DataLoader workers already use every core, and OpenCV's pool
        # costs more than it gives on 224-pixel images.
        _cv2.setNumThreads(1)
        _cv2_threads_set = True
    return _cv2


_AREA_FROM = 1.2  # shrink factor from which _resize_hwc uses the antialiased filter


def _shrink_antialiased(region: np.ndarray, out_w: int, out_h: int,
                        out: Optional[np.ndarray]) -> np.ndarray:
    """Shrink an H×W×C uint8 region with torch's antialiased bilinear filter, the one Pillow's
    ``resize(BILINEAR)`` uses (within 1 level), on channels-last memory: ~0.13 ms for a 290² →
    224² crop, where OpenCV's area filter took ~0.6 ms (more than decoding the crop's rows)."""
    src = torch.from_numpy(region if region.flags.writeable else region.copy())
    # N×C×H×W over H×W×C memory with the batch stride of a real channels-last tensor: with an
    # ambiguous one, interpolate returns planar memory and the copy back costs as much again.
    x = src[None].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    y = torch.nn.functional.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True,
                                        align_corners=False)
    hwc = y[0].permute(1, 2, 0)  # channels-last memory: a contiguous H×W×C view
    if out is None:
        return hwc.contiguous().numpy()
    torch.from_numpy(out).copy_(hwc)
    return out


def _resize_hwc(region: np.ndarray, out_size: Tuple[int, int], flip: bool,
                out: Optional[np.ndarray] = None,
                pad: Tuple[int, int, int, int] = (0, 0, 0, 0)) -> np.ndarray:
    """Resize (and flip) an H×W×C region to ``out_size``; into ``out`` (a batch slot) when it is
    an out_h×out_w×C array, with no intermediate image. ``pad``: zero borders (left, top, right,
    bottom) of the output around the resized region."""
    cv2 = _cv2_ready()
    if any(pad):
        left, top, right, bottom = pad
        w, h = out_size
        inner = _resize_hwc(region, (w - left - right, h - top - bottom), False)
        shape = (h, w, inner.shape[2])
        if out is None or out.shape != shape:
            out = np.zeros(shape, dtype=inner.dtype)
        else:
            out[...] = 0
        out[top:h - bottom, left:w - right] = inner
        if flip:
            cv2.flip(out, 1, dst=out)
        return out
    out_w, out_h = out_size
    h, w = region.shape[:2]
    if out is not None and out.shape != (out_h, out_w, region.shape[2]):
        out = None
    if (w, h) == (out_w, out_h):
        if out is None:
            out = np.array(region)  # a copy: the region is the sample's own bytes
        else:
            out[...] = region
    elif out_w <= w and out_h <= h and max(w / out_w, h / out_h) >= _AREA_FROM:
        out = _shrink_antialiased(region, out_w, out_h, out)
    else:
        # Below _AREA_FROM (and when enlarging) plain bilinear: it differs from Pillow's
        # antialiased filter by < 2 levels on photos (1.14×: 1.5) and costs half of it.
        if out is None:
            out = cv2.resize(region, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
            if out.ndim == 2:  # OpenCV drops a channel axis of size 1
                out = out[:, :, None]
        else:
            cv2.resize(region, (out_w, out_h), dst=out, interpolation=cv2.INTER_LINEAR)
    if flip:
        # in place, contiguous: a negative-stride view would copy slowly later
        cv2.flip(out, 1, dst=out)
    return out


def decode_image_hwc(data, *, crop: CropRecipe, rng: Optional[random.Random],
                     max_pixels: int = MAX_PIXELS,
                     out: Optional[np.ndarray] = None) -> Union[np.ndarray, torch.Tensor]:
    """Decode + crop for a batch slot: an H×W×3 uint8 array on the fast path (written into
    ``out`` when given and of that shape), else what :func:`decode_image` returns (a contiguous
    3×H×W tensor). Same crop box as ``decode_image`` for the same ``rng``; pixels agree within
    resampling differences."""
    if _sj is None or _cv2 is None or bytes(data[:3]) != b"\xff\xd8\xff" \
            or getattr(crop, "interpolation", "bilinear") != "bilinear":
        return decode_image(bytes(data), crop=crop, rng=rng, max_pixels=max_pixels)
    try:
        height, width, colorspace, _ = _sj.decode_jpeg_header(data)
    except ValueError:
        return decode_image(bytes(data), crop=crop, rng=rng, max_pixels=max_pixels)
    if colorspace not in ("Gray", "YCbCr", "RGB") or width * height > max_pixels \
            or width == 0 or height == 0:
        return decode_image(bytes(data), crop=crop, rng=rng, max_pixels=max_pixels)
    state = rng.getstate() if rng is not None else None
    p = _crop_params(crop, width, height, rng)
    left, top, right, bottom = p.box
    out_w, out_h = p.out_size
    # DCT reduction 1/2, 1/4 or 1/8 when the box stays at least the output size (as Pillow's draft
    # mode); libjpeg-turbo's other M/8 scales decode slower than full size, so they are not used.
    s = _dct_scale(p.box, p.inner_size)
    if s == 1 and bottom <= jpegregion.WORTH_BELOW * height:
        # At full scale, decode only the box's rows and columns when that saves (see jpegregion).
        region = jpegregion.decode_region(data, p.box)
        if region is not None:
            return _resize_hwc(region, p.out_size, p.flip, out, p.pad)
    try:
        arr = _sj.decode_jpeg(data, "RGB", min_height=math.ceil(height / s),
                              min_width=math.ceil(width / s))
    except ValueError:  # libjpeg-turbo warned (e.g. truncated data) or failed: Pillow decides
        if state is not None and rng is not None:  # state is None exactly when rng is
            rng.setstate(state)
        return decode_image(bytes(data), crop=crop, rng=rng, max_pixels=max_pixels)
    dh, dw = arr.shape[:2]
    sx, sy = dw / width, dh / height
    x0, y0 = min(dw - 1, round(left * sx)), min(dh - 1, round(top * sy))
    x1, y1 = max(x0 + 1, min(dw, round(right * sx))), max(y0 + 1, min(dh, round(bottom * sy)))
    return _resize_hwc(arr[y0:y1, x0:x1], p.out_size, p.flip, out, p.pad)


_NPY_HEADERS: dict = {}


def _npy_view(data) -> np.ndarray:
    """``_load_npy`` with the header parse memoised: samples of a dataset share one header."""
    mv = memoryview(data)
    if len(mv) >= 10 and bytes(mv[:8]) == b"\x93NUMPY\x01\x00":
        end = 10 + int.from_bytes(mv[8:10], "little")
        header = bytes(mv[:end])
        hit = _NPY_HEADERS.get(header)
        if hit is not None:
            shape, count = hit
            if len(mv) - end == count:
                return np.frombuffer(mv, dtype=np.uint8, count=count, offset=end).reshape(shape)
    arr = _load_npy(bytes(data))
    if arr.flags.c_contiguous and len(_NPY_HEADERS) < 64 and bytes(mv[:8]) == b"\x93NUMPY\x01\x00":
        _NPY_HEADERS[bytes(mv[:10 + int.from_bytes(mv[8:10], "little")])] = (arr.shape, arr.size)
    return arr


def decode_array_hwc(data, *, crop: Optional[CropRecipe] = None,
                     rng: Optional[random.Random] = None,
                     out: Optional[np.ndarray] = None) -> Union[np.ndarray, torch.Tensor]:
    """:func:`decode_array` for a batch slot: an H×W×C uint8 array (a view when uncropped;
    written into ``out`` when cropped and ``out`` has its shape)."""
    if _cv2 is None or getattr(crop, "interpolation", "bilinear") != "bilinear":
        return decode_array(bytes(data), crop=crop, rng=rng)
    arr = _npy_view(data)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(f"array shape is {arr.shape}, expected H x W x C with C in 1/3/4")
    if crop is None:
        return arr
    height, width = arr.shape[:2]
    p = _crop_params(crop, width, height, rng)
    left, top, right, bottom = p.box
    return _resize_hwc(arr[top:bottom, left:right], p.out_size, p.flip, out, p.pad)
