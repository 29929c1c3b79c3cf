"""``decode="gpu"``: JPEGs travel encoded from the workers and are decoded on the device.

A worker does not decode a JPEG: it reads its header (size, colour space), draws the crop box
with the same ``random.Random(seed/epoch/key)`` the CPU path would use, and puts the encoded
bytes into the batch. A batch is a :class:`GpuBatch`: every JPEG's bytes in one uint8 buffer
with their offsets, the crop boxes, flips and zero borders, and the images a worker decoded itself
because nvJPEG cannot take them (not a JPEG, CMYK, over the pixel limit: they take the CPU path,
counted in ``cpu_decoded``). :meth:`GpuBatch.decode` decodes the JPEGs batched with
``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA; libjpeg on the CPU, which is
how CI runs this code), then crops, resizes (bilinear, antialiased), flips and pads each on the
device into one uint8 N×3×H×W batch. :class:`~shardkit.GpuPrefetcher` calls it on its device.

A JPEG that the device decoder refuses is decoded again on the CPU (Pillow) with the same box,
counted in ``fallbacks``; one that no decoder can read is a ``DecodeError`` naming the shard and
key, or under ``on_error="skip"`` is replaced by the batch's previous good image and label, as
the CPU path replaces a bad sample by the previous good one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from .decode import CropParams, ImageDecodeError, _crop_params, decode_image, decode_image_hwc
from .errors import DecodeError, OnError
from .jpegheader import jpeg_frame

_NVJPEG_FRAMES = {0xC0, 0xC2}  # baseline, progressive Huffman (8-bit); SOF1 may be 12-bit


def jpeg_header(data) -> tuple[int, int, int] | None:
    """``(width, height, components)`` of a JPEG nvJPEG can decode (baseline or progressive
    Huffman; 1 or 3 components), from its frame header; None for anything else (another
    format, extended (maybe 12-bit), arithmetic or lossless coding, CMYK, a damaged header)."""
    frame = jpeg_frame(memoryview(data))
    if frame is None or frame[0] not in _NVJPEG_FRAMES or frame[3] not in (1, 3):
        return None
    return frame[1], frame[2], frame[3]


@dataclass
class JpegItem:
    """One sample's image as a worker hands it on: a JPEG not decoded (``data``, with where to
    crop it) or, for what nvJPEG cannot take, the image decoded by the CPU path (``image``)."""

    key: str
    url: str
    data: memoryview | bytes | None = None
    params: CropParams | None = None
    image: np.ndarray | torch.Tensor | None = None  # H×W×3 array or 3×H×W tensor


def encode_item(data, crop, rng: random.Random | None, max_pixels: int, key: str,
                url: str) -> JpegItem:
    """What a worker makes of one image for ``decode="gpu"``: its bytes and the box drawn as
    the CPU path draws it, or for what nvJPEG cannot take (not a JPEG, CMYK, arithmetic coding,
    over the pixel limit) the image decoded here by the CPU path."""
    header = jpeg_header(data)
    if header is not None and header[0] * header[1] <= max_pixels:
        return JpegItem(key, url, data, _crop_params(crop, header[0], header[1], rng))
    return JpegItem(key, url, image=decode_image_hwc(data, crop=crop, rng=rng,
                                                     max_pixels=max_pixels))


@dataclass
class GpuBatch:
    """A batch of encoded JPEGs and worker-decoded images (see the module docstring); the
    labels are the batch's own tensor, patched in place when a bad image is replaced."""

    data: torch.Tensor  # uint8, every JPEG's bytes
    offsets: torch.Tensor  # int64 (J + 1)
    where: torch.Tensor  # int64 (J): each JPEG's position in the batch
    boxes: torch.Tensor  # int64 J×4 (left, top, right, bottom), original pixels
    pads: torch.Tensor  # int64 J×4 zero borders (left, top, right, bottom)
    flips: torch.Tensor  # bool J
    decoded: torch.Tensor | None  # uint8 K×H×W×3, decoded in a worker
    decoded_where: torch.Tensor  # int64 (K)
    size: tuple[int, int]  # (height, width) of the output
    labels: torch.Tensor
    keys: list[str]
    urls: list[str]
    on_error: OnError = OnError.RAISE
    interpolation: str = "bilinear"
    fallbacks: int = 0  # set by decode: JPEGs the device refused, decoded on the CPU
    skipped: int = 0  # set by decode: images no decoder could read, replaced
    extra: dict = field(default_factory=dict)

    @property
    def cpu_decoded(self) -> int:
        return 0 if self.decoded is None else int(self.decoded.shape[0])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def decode(self, device="cuda") -> torch.Tensor:
        """The batch as uint8 N×3×H×W on ``device``: JPEGs decoded there (batched), cropped,
        resized, flipped and padded there; worker-decoded images copied in."""
        from torchvision.io import ImageReadMode, decode_jpeg

        device = torch.device(device)
        n, (h, w) = len(self), self.size
        out = torch.empty((n, 3, h, w), dtype=torch.uint8, device=device)
        good = torch.zeros(n, dtype=torch.bool)
        if self.decoded is not None and self.decoded.shape[0]:
            dec = self.decoded.to(device, non_blocking=True).permute(0, 3, 1, 2)
            out[self.decoded_where.to(device)] = dec
            good[self.decoded_where] = True
        offs = self.offsets.tolist()
        blobs = [self.data[offs[j]:offs[j + 1]] for j in range(len(offs) - 1)]
        if blobs:
            try:
                images = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:  # one bad image fails the whole call: one at a time
                images = [self._one(b, device) for b in blobs]
            where, boxes = self.where.tolist(), self.boxes.tolist()
            pads, flips = self.pads.tolist(), self.flips.tolist()
            for j, image in enumerate(images):
                i = where[j]
                if image is None:
                    image = self._on_cpu(j, i, boxes[j], pads[j], flips[j])
                    if image is None:
                        continue
                    out[i] = image.to(device)
                else:
                    out[i] = self._crop(image, boxes[j], pads[j], flips[j])
                good[i] = True
        if not bool(good.all()):
            self._replace(out, good)
        return out

    # -- per image
    def _one(self, blob: torch.Tensor, device):
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(blob, mode=ImageReadMode.RGB, device=device)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            return None

    def _crop(self, image: torch.Tensor, box, pad, flip: bool) -> torch.Tensor:
        """3×h×w on the device -> the output slot's 3×H×W: crop, resize, flip, pad."""
        left, top, right, bottom = box
        h, w = self.size
        inner_w, inner_h = w - pad[0] - pad[2], h - pad[1] - pad[3]
        region = image[:, top:bottom, left:right]
        if region.shape[1:] != (inner_h, inner_w):
            shrink = region.shape[1] > inner_h or region.shape[2] > inner_w
            region = torch.nn.functional.interpolate(
                region[None].float(), size=(inner_h, inner_w), mode=self.interpolation,
                antialias=shrink and self.interpolation in ("bilinear", "bicubic"),
                align_corners=False if self.interpolation != "nearest" else None)[0]
            region = region.round_().clamp_(0, 255).to(torch.uint8)
        if any(pad):
            canvas = torch.zeros((3, h, w), dtype=torch.uint8, device=image.device)
            canvas[:, pad[1]:h - pad[3], pad[0]:w - pad[2]] = region
            region = canvas
        return region.flip(-1) if flip else region

    def _on_cpu(self, j: int, i: int, box, pad, flip: bool) -> torch.Tensor | None:
        """A JPEG the device decoder refused, decoded by Pillow with the same box; None (and the
        error raised or the image marked for replacement) when no decoder can read it."""
        params = CropParams(tuple(box), (self.size[1], self.size[0]), bool(flip), tuple(pad))
        blob = bytes(self.data[int(self.offsets[j]):int(self.offsets[j + 1])].numpy())
        try:
            image = decode_image(blob, crop=_Fixed(params, self.interpolation))
        except ImageDecodeError as exc:
            if self.on_error.raises:
                raise DecodeError(self.urls[i], exc.reason, key=self.keys[i]) from None
            return None
        self.fallbacks += 1
        return image

    def _replace(self, out: torch.Tensor, good: torch.Tensor) -> None:
        """Bad images (and their labels) replaced by the previous good one of the batch (the
        next good one for a bad first image), as the CPU path replaces bad samples."""
        ok = good.nonzero().flatten().tolist()
        if not ok:
            raise DecodeError(self.urls[0], "no image of the batch could be decoded",
                              key=self.keys[0])
        last = ok[0]
        for i in range(len(self)):
            if good[i]:
                last = i
                continue
            out[i] = out[last]
            self.labels[i] = self.labels[last]
            self.skipped += 1


class _Fixed:
    """A crop recipe that returns given params (Pillow's fallback for one image)."""

    def __init__(self, params: CropParams, interpolation: str):
        self._params, self.interpolation = params, interpolation

    def params(self, width: int, height: int, rng=None) -> CropParams:
        return self._params


__all__ = ["GpuBatch", "JpegItem", "encode_item", "jpeg_header"]
