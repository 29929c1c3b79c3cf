"""Batches made inside the workers: the plan's batch sizes, and one batch from its items.

:func:`batches` cuts a worker's emitted samples into the plan's batches (skipping those a resume
consumed before), :class:`Sink` puts each emitted uint8 image straight into its slot of a
channels-last batch (decoded into it with a crop), :func:`collate` makes a batch of decoded
items and :func:`collate_gpu` one of ``decode="gpu"`` items (encoded JPEGs with crop boxes).
Batch memory is shared memory in a worker, from a recycled buffer when there is a ring
(:mod:`shardkit.recycle`); labels and other small tensors cross to the main process by value.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .errors import OnError
from .gpudecode import GpuBatch
from .plan import WorkerPlan
from .recycle import flat_tensor


def batches(plan: WorkerPlan, consumed: int, samples: Iterator, make: Callable[[list, Any], Any],
            sink: Optional[Sink], ring: Any, count: Callable[[int], None],
            one_by_one: bool = False) -> Iterator:
    """The batches of ``plan`` from its ``consumed``-th sample on: ``make(items, sink)`` of each
    batch's emitted ``samples`` (the first one resumed may be partial); ``count(n)`` is told of
    the samples each took. ``one_by_one``: the plan's batches one sample at a time (a webdataset
    pipeline batches them itself)."""
    done = 0
    for size in plan.batch_sizes:
        if done + size <= consumed:
            done += size
            continue
        take = size - max(0, consumed - done)
        done += size
        if one_by_one:
            for _ in range(take):
                count(1)
                yield next(samples)
            continue
        if sink is not None:
            sink.start(take, ring)
        items = [next(samples) for _ in range(take)]
        count(take)
        yield make(items, sink)


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
        # a batch has at least one image, so len(slots) >= 1: the buffer was taken
        assert self.out is not None
        return self.out.permute(0, 3, 1, 2)


def collate(items: list, with_keys: bool, ring=None, sink: Sink | None = None,
            nfields: int = 0, with_source: bool = False):
    """One batch ``(images, int64 labels[, int64 sources], *field lists[, keys])`` of emitted
    items."""
    images: Any = [it[0] for it in items]  # the images, then the batch (a tensor, or ring.seal's)
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
    return (images, labels, *_after_labels(items, nfields, with_source, with_keys))


def _after_labels(items: list, nfields: int, with_source: bool, with_keys: bool) -> list:
    """A batch's columns after the labels: sources (an int64 tensor), fields (lists), keys."""
    first = 3 if with_source else 2
    out: list = [small_tensor(np.fromiter((it[2] for it in items), dtype=np.int64,
                                          count=len(items)))] if with_source else []
    out += [[it[first + j] for it in items] for j in range(nfields)]
    if with_keys:
        out.append([it[first + nfields] for it in items])
    return out


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


def collate_gpu(items: list, size: tuple[int, int], on_error: OnError, interpolation: str,
                with_source: bool, nfields: int, with_keys: bool):
    """One batch of ``decode="gpu"`` items (``(JpegItem, label[, source], *fields[, key])``):
    ``(GpuBatch, labels[, sources], *field lists[, keys])``."""
    n = len(items)
    labels = torch.from_numpy(np.fromiter((it[1] for it in items), dtype=np.int64, count=n))
    jpegs = [(i, it[0]) for i, it in enumerate(items) if it[0].data is not None]
    decoded = [(i, it[0].image) for i, it in enumerate(items) if it[0].data is None]
    lengths = [len(j.data) for _, j in jpegs]
    offsets = np.zeros(len(jpegs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = torch.empty(int(offsets[-1]), dtype=torch.uint8)
    buf = data.numpy()
    for (_, j), lo, hi in zip(jpegs, offsets[:-1], offsets[1:]):
        buf[lo:hi] = np.frombuffer(j.data, dtype=np.uint8)
    params = [j.params for _, j in jpegs]
    h, w = size
    dec = None
    if decoded:
        dec = torch.empty((len(decoded), h, w, 3), dtype=torch.uint8)
        for k, (_, im) in enumerate(decoded):
            if isinstance(im, torch.Tensor):  # C×H×W from the Pillow path
                im = im.permute(1, 2, 0).numpy()
            dec[k] = torch.from_numpy(np.ascontiguousarray(im))
    keys = [it[0].key for it in items]
    urls = [it[0].url for it in items]
    batch = GpuBatch(
        data=data, offsets=small_tensor(offsets),
        where=small_tensor(np.array([i for i, _ in jpegs], dtype=np.int64)),
        boxes=small_tensor(np.array([p.box for p in params], dtype=np.int64).reshape(-1, 4)),
        pads=small_tensor(np.array([p.pad for p in params], dtype=np.int64).reshape(-1, 4)),
        flips=small_tensor(np.array([p.flip for p in params], dtype=bool)),
        decoded=dec, decoded_where=small_tensor(np.array([i for i, _ in decoded],
                                                         dtype=np.int64)),
        size=(h, w), labels=labels, keys=keys, urls=urls, on_error=on_error,
        interpolation=interpolation)
    return (batch, labels, *_after_labels(items, nfields, with_source, with_keys))
