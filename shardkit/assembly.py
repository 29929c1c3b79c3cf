"""Sample and batch assembly: raw samples in read order -> items in the plan's order -> batches.

:class:`SampleDecoder` turns a raw sample dict into ``(image, label[, key])``: the label from
``cls``, the image decoded (with the decode-fused crop, seeded per sample from ``seed/epoch/key``)
and transformed. :func:`emit` holds read samples until the plan emits them (the worker's shuffle
buffer) and replaces a bad one by the last good one, so that every rank still yields the same
number of samples and batches. :class:`Sink` puts each emitted uint8 image straight into its slot
of a channels-last batch (decoded into it with a crop), :func:`collate` makes the batch.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .decode import (ImageDecodeError, crop_rng, decode_array, decode_array_hwc, decode_image,
                     decode_image_hwc)
from .errors import DecodeError, ShardError
from .plan import WorkerPlan, resume_position
from .reader import BadSample
from .skiplog import Region
from .recycle import flat_tensor
from .shardformat import IMAGE_FIELDS


# Fields delivered as text (str) by ``fields=``; any other field comes as bytes.
TEXT_FIELDS = frozenset({"txt", "text", "caption", "json", "cls", "cls2", "label", "csv", "tsv",
                         "html", "xml", "md", "yaml", "yml", "url"})


class SampleDecoder:
    """A raw sample dict -> ``(image, label, *fields)`` (and the key last, ``with_keys``), or
    with ``decode="wds"`` the sample dict itself (webdataset's form: ``__key__``, ``__url__``
    and one bytes value per member).

    ``fast``: uint8 batches without a transform: images come as H×W×C arrays (views of the read
    buffer when uncropped) and go straight into a channels-last batch. Where labels come from
    is the manifest's say (:meth:`configure`): ``.cls`` as a number unless it says otherwise.
    ``fields``: other members to deliver, ``{field: "text" | "bytes"}`` (None when a sample
    has no such member)."""

    def __init__(self, *, decode: str, crop, transform: Callable | None, with_keys: bool,
                 max_pixels: int, fast: bool, fields: dict[str, str] | None = None):
        self.decode, self.crop, self.transform = decode, crop, transform
        self.with_keys, self.max_pixels, self.fast = with_keys, max_pixels, fast
        self.fields = tuple((fields or {}).items())
        self.crop_seed = ""  # "seed/epoch/" of the running iteration: crops follow the plan's epoch
        self.label_field: str | None = "cls"  # the member labels come from; None: no labels
        self.label_key: str | None = None  # a key of that (JSON) member
        self.label_names: dict[str, int] | None = None  # labels that are class names -> index

    def configure(self, labels: dict | None, classes: list[str] | None) -> None:
        """Where labels come from (a manifest's ``labels`` and ``classes``)."""
        labels = labels or {"field": "cls"}
        if "json" in labels:
            self.label_field, self.label_key = "json", labels["json"]
        else:
            self.label_field, self.label_key = labels.get("field"), None
        self.label_names = ({name: i for i, name in enumerate(classes or [])}
                            if labels.get("names") else None)

    def label(self, sample: dict) -> int:
        """The sample's class index; -1 without labels. ImageDecodeError for one that is not
        usable (not a number, not a known class name)."""
        raw = None if self.label_field is None else sample.get(self.label_field)
        if raw is None:
            return -1
        if self.label_key is not None:
            try:
                value = json.loads(bytes(raw))[self.label_key]
            except (ValueError, KeyError, TypeError, IndexError):
                raise ImageDecodeError(f"its .json has no {self.label_key!r} label") from None
            if isinstance(value, int) and not isinstance(value, bool) and self.label_names is None:
                return value
            text = str(value)
        else:
            raw = bytes(raw).strip()
            if self.label_names is None:
                return _number(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ImageDecodeError(f"its .{self.label_field} is not text") from None
        if self.label_names is None:
            return _number(text)
        index = self.label_names.get(text)
        if index is None:
            raise ImageDecodeError(f"label {text[:40]!r} is not one of the manifest's classes")
        return index

    def extras(self, sample: dict) -> tuple:
        """The ``fields`` of a sample: text, bytes, or None where it has no such member."""
        out = []
        for name, kind in self.fields:
            value = sample.get(name)
            if value is not None:
                if kind == "text":
                    try:
                        value = bytes(value).decode("utf-8")
                    except UnicodeDecodeError:
                        raise ImageDecodeError(f"its .{name} is not UTF-8 text") from None
                else:
                    value = bytes(value)
            out.append(value)
        return tuple(out)

    def __call__(self, sample: dict, out: np.ndarray | None = None):
        key, url = sample["__key__"], sample["__url__"]
        if self.decode == "wds":  # webdataset's sample dict, for a webdataset pipeline
            return {k: (bytes(v) if isinstance(v, memoryview) else v) for k, v in sample.items()}
        field = next((f for f in IMAGE_FIELDS if f in sample), None)
        try:
            label = self.label(sample)
            extras = self.extras(sample) if self.fields else ()
            crop = self.crop
            rng = None if crop is None else crop_rng(self.crop_seed, key)
            if self.decode == "gpu":  # JPEGs stay encoded: decoded on the device (gpudecode)
                from .gpudecode import JpegItem, encode_item

                if field is not None:
                    image = encode_item(sample[field], crop, rng, self.max_pixels, key, url)
                elif "npy" in sample:
                    image = JpegItem(key, url, image=decode_array_hwc(sample["npy"], crop=crop,
                                                                      rng=rng))
                else:
                    raise ImageDecodeError("sample has no image (no jpg/png/webp/npy member)")
            elif field is not None:
                if self.fast and crop is not None:
                    image = decode_image_hwc(sample[field], crop=crop, rng=rng,
                                             max_pixels=self.max_pixels, out=out)
                else:
                    image = decode_image(bytes(sample[field]), mode=self.decode, crop=crop,
                                         rng=rng, max_pixels=self.max_pixels)
            elif "npy" in sample and self.fast:
                image = decode_array_hwc(sample["npy"], crop=crop, rng=rng, out=out)
            elif "npy" in sample:
                image = decode_array(sample["npy"], crop=crop, rng=rng)
                if self.decode == "pil":
                    from PIL import Image

                    image = Image.fromarray(image.permute(1, 2, 0).numpy())
                elif self.decode == "raw":
                    image = sample["npy"]
            else:
                raise ImageDecodeError("sample has no image (no jpg/png/webp/npy member)")
        except ImageDecodeError as exc:
            raise DecodeError(url, exc.reason, key=key) from None
        if self.transform is not None:
            image = self.transform(image)
        if self.with_keys:
            return (image, label, *extras, key)
        return (image, label, *extras)


def _number(text: str | bytes) -> int:
    """A class label written as a number: 1-10 ASCII digits (``str.isdigit`` alone would take
    other scripts' digits)."""
    if not (0 < len(text) <= 10 and text.isascii() and text.isdigit()):
        raise ImageDecodeError(f"class label {text[:20]!r} is not a number")
    return int(text)


def field_kinds(fields) -> dict[str, str]:
    """``fields=`` of a dataset as ``{field: "text" | "bytes"}``: a tuple of field names (text
    for the text fields, bytes otherwise) or such a dict already."""
    if fields is None:
        return {}
    if isinstance(fields, str):
        raise TypeError(f"fields must be a tuple of field names, got the string {fields!r} "
                        f"(write fields=({fields!r},))")
    pairs = fields.items() if isinstance(fields, dict) else \
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


def emit(plan: WorkerPlan, consumed: int, read: Callable[[Any, int], Iterator], process,
         on_error: str, skips: Region, sink: "Sink | None" = None,
         nothing_readable: Callable[[], Exception] | None = None) -> Iterator:
    """Processed samples in the plan's order from its ``consumed``-th on; a bad one is replaced
    by the last good one (``on_error="skip"``) or raised.

    ``read(spans, start)`` yields ``(stream position, raw sample or BadSample)`` (``spans`` None:
    the whole dataset); ``process`` is a :class:`SampleDecoder`; ``nothing_readable()`` is the
    error when no sample of the dataset can be read.
    With a ``sink``, each image is decoded into the sink's next slot; the last good sample is then
    kept raw and decoded again into the slot of the bad one it replaces."""
    order = plan.order
    start = resume_position(order, consumed)
    already = set(order[:consumed].tolist()) if consumed else set()
    reader = read(plan.spans, start)
    held: dict[int, Any] = {}
    last_good = None  # processed; raw with a sink
    for idx in order[consumed:].tolist():
        while idx not in held:
            pos, sample = next(reader)
            if pos not in already:
                held[pos] = sample
        raw = held.pop(idx)
        out = None if sink is None else sink.slot()
        sample = raw
        if not isinstance(sample, BadSample):
            try:
                sample = process(sample, out)
            except DecodeError as exc:
                sample = BadSample(exc)
        if isinstance(sample, BadSample):
            if on_error == "raise":
                raise sample.error
            skips.sample(raw.shard if isinstance(raw, BadSample) else None)
            if last_good is None:
                last_good = _first_good(reader, held, process, read, nothing_readable,
                                        raw=sink is not None)
            if sink is None:
                sample = last_good
            else:
                sample, raw = process(last_good, out), last_good
        last_good = sample if sink is None else raw
        yield sample if sink is None else sink.settle(sample)


def _first_good(reader, held: dict, process, read, nothing_readable, raw: bool = False):
    """A replacement for a bad first sample: the next good one of this worker's stream
    (processed, or with ``raw`` as read, once it is known to process)."""
    def good(cand):
        if isinstance(cand, BadSample):
            return None
        try:
            processed = process(cand)
        except DecodeError:
            return None
        return cand if raw else processed

    for pos in sorted(held):
        found = good(held[pos])
        if found is not None:
            return found
    for pos, cand in reader:
        held[pos] = cand
        found = good(cand)
        if found is not None:
            return found
    # Every sample of this worker's share is bad: borrow the dataset's first good sample, so
    # that this rank still yields as many samples as the others.
    for _, cand in read(None, 0):
        found = good(cand)
        if found is not None:
            return found
    if nothing_readable is not None:
        raise nothing_readable()
    raise ShardError("the dataset", "no sample of the dataset can be read")


class Sink:
    """The batch being made, slot by slot (H×W×C), as its images are emitted.

    With a crop (``size`` known) the buffer is taken when the batch starts and images are decoded
    straight into their slots. Without one it is taken with the first image's shape, and each
    image is copied in as it comes (``settle``): a sample read just before is still in the CPU
    cache, and its read buffer is freed at once instead of at the end of the batch."""

    def __init__(self, size: tuple[int, int] | None = None):
        self.size = size
        self.out: torch.Tensor | None = None
        self.slots: list = []
        self.i = self.n = 0
        self.ring = None

    def start(self, n: int, ring=None) -> None:
        self.n, self.ring, self.i, self.out, self.slots = n, ring, 0, None, []
        if self.size is not None:
            self._take((n, *self.size, 3))

    def _take(self, shape: tuple) -> None:
        self.out = batch_buffer(shape, self.ring)
        self.slots = list(self.out.numpy())

    def slot(self) -> np.ndarray | None:
        i = self.i
        self.i += 1
        return self.slots[i] if i < len(self.slots) else None

    def settle(self, item):
        """The emitted ``item`` (image, label, ...) with its image in its slot when it fits."""
        im = item[0]
        if self.size is not None or not isinstance(im, np.ndarray) or im.dtype != np.uint8 \
                or im.ndim != 3:
            return item  # no buffer is taken for what cannot go into one
        if self.out is None:
            self._take((self.n, *im.shape))
        slot = self.slots[self.i - 1] if self.i - 1 < len(self.slots) else None
        if slot is None or not _put(slot, im):
            return item  # another size or type: fill() gives up, the batch is made the old way
        return (slot, *item[1:])

    def fill(self, images: list) -> torch.Tensor | None:
        """The N×C×H×W batch once every image is in its slot: most were decoded there; one a
        fallback decoder (Pillow) returned on its own is copied in. None when an image does not
        fit a slot (another size or channel count): the caller batches them another way."""
        if len(images) != len(self.slots):
            return None
        for im, slot in zip(images, self.slots):
            # decoded or copied in place already (the decoders return the ``out`` they were given)
            if im is not slot and not _put(slot, im):
                return None
        return self.out.permute(0, 3, 1, 2)


def collate(items: list, with_keys: bool, ring=None, sink: Sink | None = None,
            nfields: int = 0):
    """One batch ``(images, int64 labels, *field lists[, keys])`` of emitted items."""
    images = [it[0] for it in items]
    labels = small_tensor(np.fromiter((it[1] for it in items), dtype=np.int64,
                                      count=len(items)))
    batch = None if sink is None else sink.fill(images)
    if batch is not None:
        images = batch
    elif isinstance(images[0], (torch.Tensor, np.ndarray)):
        # H×W×C arrays (fast path) or C×H×W tensors (Pillow path, user transforms)
        shapes = {tuple(im.shape) if isinstance(im, torch.Tensor)
                  else (im.shape[2], im.shape[0], im.shape[1]) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"batch_size needs images of one size, got {sorted(shapes)[:3]}; "
                             "pass crop=shardkit.RandomResizedCrop(...) or CenterCrop(...)")
        # (a sink that took a buffer took this batch's turn of the ring: not taken twice)
        taken = sink is not None and sink.out is not None
        images = stack(images, next(iter(shapes)), None if taken else ring)
    if ring is not None:
        images = ring.seal(images)  # leaves the worker as a reference to its buffer
    extras = [[it[2 + j] for it in items] for j in range(nfields)]
    if with_keys:
        return (images, labels, *extras, [it[2 + nfields] for it in items])
    return (images, labels, *extras)


class _SmallTensor(torch.Tensor):
    """A small tensor made in a DataLoader worker that crosses to the main process inside the
    result's pickle and is a plain tensor there (``torch.from_numpy``, no copy). A plain tensor
    would be moved to shared memory and its file descriptor handed over through the worker's
    ``resource_sharer`` thread: a round trip to the worker per tensor (about 0.4 ms in the main
    process, between two training steps) for 2 KB of labels. In the worker it is a tensor like
    any other (a ``collate_fn`` or a wrapping dataset may compute with it)."""

    def __reduce_ex__(self, protocol):
        return torch.from_numpy, (self.detach().numpy().copy(),)


def small_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy(array)``; inside a DataLoader worker one that pickles by value
    (:class:`_SmallTensor`)."""
    tensor = torch.from_numpy(array)
    return tensor if get_worker_info() is None else tensor.as_subclass(_SmallTensor)


def _put(slot: np.ndarray, im) -> bool:
    """Copy an H×W×C uint8 array, or a C×H×W uint8 tensor, into ``slot`` if it fits."""
    if isinstance(im, torch.Tensor) and im.dim() == 3:
        im = im.permute(1, 2, 0).numpy()
    if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.shape != slot.shape:
        return False
    slot[...] = im
    return True


def batch_buffer(shape: tuple, ring=None) -> torch.Tensor:
    """An uninitialised uint8 N×H×W×C tensor for a batch: in shared memory inside a DataLoader
    worker (from ``ring`` when there is one), so sending it to the main process copies nothing."""
    numel = int(np.prod(shape))
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    if ring is not None:
        return ring.take(numel).view(shape)
    return flat_tensor(torch.UntypedStorage._new_shared(numel)).view(shape)


def stack(images: list, chw: tuple, ring=None) -> torch.Tensor:
    """Stack images into one N×C×H×W uint8 batch whose memory is channels-last (N×H×W×C).

    H×W×C arrays land with one contiguous copy each; inside a DataLoader worker the batch is
    allocated in shared memory, so sending it to the main process copies nothing more; with a
    ``ring`` (recycle.py), in a buffer of an earlier batch that the main process is done with.
    """
    if not all(isinstance(im, np.ndarray) for im in images):
        images = [torch.as_tensor(im) if isinstance(im, torch.Tensor)
                  else torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1) for im in images]
        if images[0].dtype != torch.uint8 or not all(im.dtype == images[0].dtype for im in images):
            return torch.stack(images)
    c, h, w = chw
    out = batch_buffer((len(images), h, w, c), ring)
    if isinstance(images[0], np.ndarray):
        dst = out.numpy()
        for i, im in enumerate(images):
            dst[i] = im
    else:
        nchw = out.permute(0, 3, 1, 2)
        for i, im in enumerate(images):
            nchw[i].copy_(im)
    return out.permute(0, 3, 1, 2)
