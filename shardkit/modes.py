"""Decode modes: what ``decode=`` makes of a sample, one strategy object per mode, from one table.

A :class:`DecodeMode` says what one value of ``StreamingDataset(decode=...)`` needs (its checks),
how a sample's encoded image (``jpg``, ``png``, …) or ``.npy`` array becomes the item's image, and
how a batch of such items is made. :data:`MODES` is the table of the public values
(``"uint8"``, ``"pil"``, ``"raw"``, ``"gpu"``); a caller with its own form of items passes a mode
object instead of a name (the webdataset source passes :data:`SAMPLE_DICTS`).

:class:`DecodeConfig` is the decoding half of the dataset's arguments (mode, crop, transform,
keys, fields, pixel limit), checked once when it is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

from .batching import Sink, collate, collate_gpu
from .decode import (
    CropRecipe,
    decode_array,
    decode_array_hwc,
    decode_image,
    decode_image_hwc,
)
from .errors import OnError
from .gpudecode import JpegItem, encode_item
from .shardformat import IMAGE_FIELDS, MAX_PIXELS

# Fields delivered as text (str) by ``fields=``; any other field comes as bytes.
TEXT_FIELDS = frozenset({"txt", "text", "caption", "json", "cls", "cls2", "label", "csv", "tsv",
                         "html", "xml", "md", "yaml", "yml", "url"})


class DecodeMode:
    """One ``decode=`` value (see the module docstring). The base class decodes to what
    :func:`shardkit.decode.decode_image` gives for :attr:`name` and batches with
    :func:`shardkit.batching.collate`."""

    name = ""
    sample_dicts = False  # items are webdataset sample dicts, not (image, label, ...)

    def check(self, config: DecodeConfig) -> None:
        """Raise for arguments this mode cannot honour."""

    def fast(self, config: DecodeConfig) -> bool:
        """Whether uint8 images go straight into a channels-last batch (the batch fast path)."""
        return False

    def image(self, data: Any, config: DecodeConfig, rng: Any, out: Optional[np.ndarray],
              key: str, url: str) -> Any:
        """The item's image from an encoded image member."""
        return decode_image(bytes(data), mode=self.name, crop=config.crop, rng=rng,
                            max_pixels=config.max_pixels)

    def array(self, data: Any, config: DecodeConfig, rng: Any, out: Optional[np.ndarray],
              key: str, url: str) -> Any:
        """The item's image from a ``.npy`` member (uint8 H×W×C)."""
        return decode_array(data, crop=config.crop, rng=rng)

    def collate(self, items: list, config: DecodeConfig, ring: Any, sink: Optional[Sink],
                on_error: OnError) -> tuple:
        """One batch of emitted items."""
        return collate(items, config.with_keys, ring, sink, len(config.fields),
                       config.with_source)


class Uint8(DecodeMode):
    """``decode="uint8"``: uint8 3×H×W tensors; batches N×3×H×W made in the worker. Without a
    transform, batches take the fast path: images decode (with a crop) or are copied straight
    into their slot of a channels-last batch."""

    name = "uint8"

    def fast(self, config: DecodeConfig) -> bool:
        return config.batch_size is not None and config.transform is None

    def image(self, data, config, rng, out, key, url):
        if config.fast and config.crop is not None:
            return decode_image_hwc(data, crop=config.crop, rng=rng,
                                    max_pixels=config.max_pixels, out=out)
        return super().image(data, config, rng, out, key, url)

    def array(self, data, config, rng, out, key, url):
        if config.fast:
            return decode_array_hwc(data, crop=config.crop, rng=rng, out=out)
        return super().array(data, config, rng, out, key, url)


class Pil(DecodeMode):
    """``decode="pil"``: RGB ``PIL.Image`` objects (for torchvision transforms)."""

    name = "pil"

    def array(self, data, config, rng, out, key, url):
        from PIL import Image

        return Image.fromarray(super().array(data, config, rng, out, key, url)
                               .permute(1, 2, 0).numpy())


class Raw(DecodeMode):
    """``decode="raw"``: the image member's bytes as stored (a ``.npy`` member is checked to be
    an array first); no crop."""

    name = "raw"

    def check(self, config: DecodeConfig) -> None:
        if config.crop is not None:
            raise ValueError("crop needs decoding; it cannot be used with decode='raw'")

    def array(self, data, config, rng, out, key, url):
        super().array(data, config, rng, out, key, url)
        return data


class Gpu(DecodeMode):
    """``decode="gpu"``: JPEGs travel encoded with their crop boxes and are decoded batched on
    the device by :class:`~shardkit.GpuPrefetcher` (:mod:`shardkit.gpudecode`)."""

    name = "gpu"

    def check(self, config: DecodeConfig) -> None:
        crop = config.crop
        if config.batch_size is None or crop is None or config.transform is not None:
            raise ValueError("decode='gpu' makes batches of JPEGs that GpuPrefetcher decodes on "
                             "its device: it needs batch_size and a crop (RandomResizedCrop or "
                             "CenterCrop, for one output size), and no transform (which would "
                             "run on the CPU)")
        interpolation = getattr(crop, "interpolation", "bilinear")
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"decode='gpu' resizes on the device with bilinear, bicubic or "
                             f"nearest interpolation; the crop asks for "
                             f"{interpolation!r}")

    def image(self, data, config, rng, out, key, url):
        return encode_item(data, config.crop, rng, config.max_pixels, key, url)

    def array(self, data, config, rng, out, key, url):
        return JpegItem(key, url, image=decode_array_hwc(data, crop=config.crop, rng=rng))

    def collate(self, items, config, ring, sink, on_error):
        crop = config.crop
        assert crop is not None  # checked
        return collate_gpu(items, crop.size, on_error, getattr(crop, "interpolation", "bilinear"),
                           config.with_source,
                           len(config.fields), config.with_keys)


class SampleDicts(DecodeMode):
    """Webdataset's sample dicts (``__key__``, ``__url__``, one bytes value per member), for a
    webdataset pipeline that decodes in its own stages (:mod:`shardkit.wds`)."""

    name = "wds"
    sample_dicts = True

    def check(self, config: DecodeConfig) -> None:
        if config.fields:
            raise ValueError("fields: a webdataset source yields every member already")


MODES: dict[str, DecodeMode] = {m.name: m for m in (Uint8(), Pil(), Raw(), Gpu())}
SAMPLE_DICTS = SampleDicts()


def field_kinds(fields: Union[None, tuple, list, Mapping[str, str]]) -> dict[str, str]:
    """``fields=`` of a dataset as ``{field: "text" | "bytes"}``: a tuple of field names (text
    for the text fields, bytes otherwise) or such a dict already."""
    if fields is None:
        return {}
    if isinstance(fields, str):
        raise TypeError(f"fields must be a tuple of field names, got the string {fields!r} "
                        f"(write fields=({fields!r},))")
    pairs = fields.items() if isinstance(fields, Mapping) else \
        ((f, "text" if isinstance(f, str) and f.lower() in TEXT_FIELDS else "bytes")
         for f in fields)
    out = {}
    for name, kind in pairs:
        if not isinstance(name, str) or not name or name.startswith("__") \
                or name != name.lower() or "/" in name:
            raise ValueError(f"fields: {name!r} is not a field name (the lower-case extension "
                             "of a member, such as 'txt' or 'seg.png')")
        if kind not in ("text", "bytes"):
            raise ValueError(f"fields: {name!r} must be delivered as 'text' or 'bytes', "
                             f"got {kind!r}")
        out[name] = kind
    return out


def check_fields(fields: Mapping[str, str], manifests: list) -> None:
    """``fields=`` against what the manifests say their samples hold
    (:attr:`~shardkit.Manifest.member_fields`): a field no sample of any of them holds is a
    ``ValueError`` naming the fields there are (silent Nones otherwise). Nothing to check when a
    manifest does not say (shards listed by URL)."""
    known: set[str] = set()
    for m in manifests:
        held = getattr(m, "member_fields", None)
        if held is None:
            return
        known |= held
    missing = [f for f in fields if f not in known]
    if missing:
        where = ", ".join(getattr(m, "base_url", None) or "the listed shards" for m in manifests)
        images = sorted(known & set(IMAGE_FIELDS))
        held = sorted(known - set(IMAGE_FIELDS)) if len(images) > 2 else sorted(known)
        if len(images) > 2:  # a raw pack: the images' own formats
            held.append(f"an image ({'/'.join(images)})")
        raise ValueError(f"fields: no sample of {where} holds {', '.join(missing)}; its samples "
                         f"hold {', '.join(held)}")


@dataclass(frozen=True)
class DecodeConfig:
    """How samples become items: the ``mode`` (a :class:`DecodeMode`), a decode-fused ``crop``,
    a ``transform`` run after it, keys last with ``with_keys``, other members ``fields``
    (``{field: "text" | "bytes"}``), the pixel limit, and the batch size (which some modes
    need). Make it with :meth:`of` from the dataset's arguments."""

    mode: DecodeMode = MODES["uint8"]
    crop: Optional[CropRecipe] = None
    transform: Optional[Callable] = None
    with_keys: bool = False
    fields: Mapping[str, str] = field(default_factory=dict)
    max_pixels: int = MAX_PIXELS
    batch_size: Optional[int] = None
    with_source: bool = False

    @classmethod
    def of(cls, decode: Union[str, DecodeMode] = "uint8", *, crop: Optional[CropRecipe] = None,
           transform: Optional[Callable] = None, with_keys: bool = False,
           fields: Union[None, tuple, list, Mapping[str, str]] = None,
           max_pixels: int = MAX_PIXELS, batch_size: Optional[int] = None,
           with_source: bool = False) -> DecodeConfig:
        """From the dataset's arguments: ``decode`` a name of :data:`MODES` or a mode object."""
        if isinstance(decode, DecodeMode):
            mode = decode
        elif isinstance(decode, str) and decode in MODES:
            mode = MODES[decode]
        else:
            raise ValueError(f"decode must be one of {tuple(MODES)}, got {decode!r}")
        return cls(mode=mode, crop=crop, transform=transform, with_keys=bool(with_keys),
                   fields=field_kinds(fields), max_pixels=max_pixels, batch_size=batch_size,
                   with_source=bool(with_source))

    def __post_init__(self) -> None:
        self.mode.check(self)
        crop = self.crop
        if crop is not None and not (callable(getattr(crop, "params", None))
                                     and isinstance(getattr(crop, "size", None), tuple)):
            raise TypeError(
                f"crop must be shardkit.RandomResizedCrop(...) or shardkit.CenterCrop(...) (a "
                f"crop fused into decoding), got {type(crop).__module__}.{type(crop).__name__}; "
                "pass torchvision transforms as transform=, which runs on the decoded image")

    @property
    def fast(self) -> bool:
        """uint8 batches without a transform: image bytes stay views of the read buffer and
        decode to H×W×C arrays that land in a channels-last batch."""
        return self.mode.fast(self)


__all__ = ["DecodeConfig", "DecodeMode", "MODES", "SAMPLE_DICTS", "TEXT_FIELDS", "check_fields",
           "field_kinds"]
