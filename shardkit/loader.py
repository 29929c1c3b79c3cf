"""``make_loader`` (a DataLoader with the right defaults) and ``GpuPrefetcher``."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence, cast

import torch
from torch.utils.data import DataLoader, Dataset

from . import jpegregion
from .common import available_cpus
from .dataset import StreamingDataset
from .eagerqueue import eager_context
from .gpudecode import GpuBatch
from .loaderlink import LoaderLink
from .recycle import MainRings, ring_slots
from .wds import WdsSource

if TYPE_CHECKING:
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

# Buffers a worker keeps beyond prefetch_factor: the batch it makes, the one the user holds while
# asking for the next (a for loop's variables), and one released a batch late.
RING_SPARE = 3


class ShardkitLoader(DataLoader):
    """A DataLoader that tells its ``StreamingDataset`` how many items the user has consumed.

    That count is what makes ``dataset.state_dict()`` exact with worker processes: the loader hands
    out worker results round-robin, so the items consumed per worker follow from the total.
    With ``recycle_batches`` it keeps the workers' batch buffers mapped and, before each item,
    releases those nothing here uses any more, for the workers to write again (``MainRings``;
    see ``shardkit/recycle.py``). It talks to the dataset through one object,
    :meth:`StreamingDataset.link_loader`'s :class:`~shardkit.loaderlink.LoaderLink`.
    """

    recycle_batches: bool | None = None
    _link: LoaderLink | None = None
    _rings: MainRings | None = None  # of persistent workers

    def _recycles(self) -> bool:
        if self.num_workers == 0 or not getattr(self, "in_order", True):
            return False
        if self.recycle_batches is not None:
            return bool(self.recycle_batches)
        # Pinned: the pin-memory thread copies each batch, the user never holds the shared one.
        return bool(self.pin_memory) and torch.cuda.is_available()

    def __iter__(self) -> Iterator:  # type: ignore[override]  # a generator around DataLoader's iterator
        if self.num_workers > 0:  # requests and results skip the feeder threads (eagerqueue.py);
            # the default start method is resolved now, as the DataLoader would
            self.multiprocessing_context = eager_context(self.multiprocessing_context)
        ds = streaming_dataset_of(self.dataset)
        if ds is None:
            yield from super().__iter__()
            return
        if self._link is None:
            self._link = ds.link_loader(self.num_workers)
        link = self._link
        rings, spec = self._main_rings(ds)
        # A pending global state becomes an exact resume or an elastic rest plan now that the
        # number of workers is known, before the workers copy the dataset.
        # a pipeline between the dataset and this loader (webdataset's, on wds_source) reads
        # ahead of what it hands out: its items are counted here, also without workers
        with link.iteration(spec, count_items=ds is not self.dataset) as progress:
            it = super().__iter__()  # starts (or reuses) the workers, which copy the dataset
        if progress is None:  # no worker processes: the dataset counts for itself
            yield from it
            return
        if rings is not None:  # as long as the iterator: its pin thread may unpickle batches
            it._shardkit_rings = rings  # type: ignore[attr-defined]  # deliberate: until it is shut down
        release = rings.release if rings is not None and self._recycles() else None
        try:
            while True:
                if release is not None:  # buffers of batches the user dropped: the workers'
                    release()
                try:
                    item = next(it)
                except StopIteration:
                    break
                progress.handed_out()
                yield item
        finally:  # also when the user stops early
            progress.finish()

    def _main_rings(self, ds):
        """The :class:`~shardkit.recycle.MainRings` of this iteration's workers, and the spec
        for workers started now (None when they are running already or recycle nothing).
        Persistent workers keep the rings they were started with for their life (also through an
        iteration that recycles nothing: their batches still arrive as ring references)."""
        starting = not self.persistent_workers or getattr(self, "_iterator", None) is None
        if not starting:
            return self._rings, None
        rings = None
        if self.num_workers and self._recycles() and ds is self.dataset:
            slots = ring_slots(self.num_workers, self.prefetch_factor + RING_SPARE)
            rings = MainRings(self.num_workers, slots) if slots else None
        if self.persistent_workers:
            self._rings = rings
        return rings, None if rings is None else rings.spec()

    def state_dict(self) -> dict:
        """Where this loader's epoch stands (the ``state_dict`` / ``load_state_dict`` protocol that
        PyTorch Lightning and torchdata use): its dataset's :meth:`StreamingDataset.state_dict`,
        exact with worker processes."""
        return self._streaming_dataset().state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`: the next iteration yields exactly what was not consumed
        (the next epoch when the state was taken at an epoch's end). Persistent workers that
        already run are replaced, so that they start from the state."""
        ds = self._streaming_dataset()
        ds.load_state_dict(state)
        if getattr(self, "_iterator", None) is not None:  # persistent workers hold old copies
            # only persistent workers leave an iterator here: the multiprocessing one
            cast("_MultiProcessingDataLoaderIter", self._iterator)._shutdown_workers()
            self._iterator = None
            self._rings = None
        self._link = ds.link_loader(self.num_workers)

    def _streaming_dataset(self) -> StreamingDataset:
        ds = streaming_dataset_of(self.dataset)
        if ds is None:
            raise TypeError(f"state_dict() needs a shardkit.StreamingDataset (or a webdataset "
                            f"pipeline on shardkit.wds_source), this loader reads a "
                            f"{type(self.dataset).__name__}")
        return ds


def streaming_dataset_of(dataset) -> StreamingDataset | None:
    """The ``StreamingDataset`` a loader reads: the dataset itself, or the source of a
    webdataset pipeline (``wds.DataPipeline(shardkit.wds_source(...), ...)``); else None."""
    if isinstance(dataset, StreamingDataset):
        return dataset
    stages = getattr(dataset, "pipeline", None)
    if isinstance(stages, list) and stages and isinstance(stages[0], StreamingDataset):
        return stages[0]
    return None


def make_loader(dataset: Dataset, num_workers: int | None = None, *, pin_memory: bool | None = None,
                persistent_workers: bool | None = None, prefetch_factor: int | None = None,
                recycle_batches: bool | None = None, **kwargs: Any) -> DataLoader:
    """A DataLoader for ``dataset`` (a ``StreamingDataset``, or a webdataset pipeline whose source
    is ``wds_source``) that batches inside its workers and counts what it hands out, so that
    ``loader.state_dict()`` is exact.

    Defaults: ``num_workers`` = the CPUs this process may use, ``pin_memory`` when CUDA is present,
    ``persistent_workers`` (workers and their open shards live across epochs),
    ``prefetch_factor=2``. Every one can be overridden; ``kwargs`` go to
    ``DataLoader``. With ``in_memory=True`` the shards are loaded into shared memory first, once.

    ``recycle_batches``: workers write a batch into the shared memory of an earlier one once
    nothing in the main process uses it any more, and the main process keeps those buffers mapped
    (a batch then crosses as a few numbers: no file descriptor round trip to the worker, no
    ``mmap``, no page faults; see ``shardkit/recycle.py``). The default is on when memory is
    pinned (the pin thread copies every batch) and off otherwise; ``True`` is safe as long as CPU
    batches are not sent on to other processes.
    """
    if num_workers is None:
        num_workers = available_cpus()
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    dataset_batch_size = getattr(dataset, "batch_size", None)
    if dataset_batch_size is not None and kwargs.get("batch_size") is not None \
            and not isinstance(dataset, WdsSource):
        raise ValueError(f"the dataset makes batches of {dataset_batch_size} in the workers; "
                         f"make_loader(batch_size={kwargs['batch_size']}) would batch those "
                         "batches again: leave batch_size out (or give the dataset batch_size=None)")
    link = None
    source = streaming_dataset_of(dataset)
    if source is not None:
        if source.in_memory:
            source.preload()
        link = source.link_loader(num_workers)  # a loaded state: exact or elastic, len() knows
    kwargs.setdefault("batch_size", None)  # batches are made inside the workers
    if num_workers > 0:
        if source is not None:
            # The manifests, loaded here once: each worker would load its own (a GET, and
            # the storage library's import: ~0.25 s for s3fs) before its first batch, every
            # epoch without persistent workers. Forked workers inherit them; spawned ones get
            # them pickled (a large shard table travels as its file's name). A missing dataset
            # is then an error here, not in a worker.
            source.manifests  # noqa: B018 - loads them
            if source.decoding.crop is not None:
                # Load the JPEG region decoder here, once, before the workers fork: each would
                # import it (~0.1 s, more on busy cores) before its first batch, every epoch
                # without persistent workers. (Spawned workers still import their own.)
                jpegregion.available()
        kwargs["prefetch_factor"] = 2 if prefetch_factor is None else prefetch_factor
        kwargs["persistent_workers"] = persistent_workers
    loader = ShardkitLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
    loader.recycle_batches = recycle_batches
    loader._link = link
    return loader


class GpuPrefetcher:
    """Copy the next batch to ``device`` while the current one is in use; uint8 -> normalized float.

    ``loader``: any iterable of ``(images, labels, ...)`` batches (``make_loader``'s). ``mean`` /
    ``std``: per channel, on the 0-1 scale (None: no normalization). ``dtype``: of the images
    handed out. ``channels_last``: keep the batch's channels-last memory layout (else
    contiguous N×C×H×W).

    Images travel as uint8 (4x fewer bytes than float32) and become ``(x / 255 - mean) / std`` on
    the device. On CUDA the copy runs on a side stream (``non_blocking``) and the main stream waits
    for it only when the batch is handed out. On other devices it converts in order.

    Batches of a ``decode="gpu"`` dataset hold encoded JPEGs (:class:`shardkit.gpudecode.GpuBatch`):
    they are decoded here, on ``device``, batched (nvJPEG on CUDA), with the crop boxes the workers
    drew. ``cpu_decoded`` counts the images a worker decoded because nvJPEG cannot take them,
    ``fallbacks`` the JPEGs the device refused and Pillow decoded, ``skipped`` the unreadable ones
    replaced (``on_error="skip"``).

    ``max_ahead`` (CUDA): before handing out a batch, wait (without the GIL) until the GPU has
    finished the work queued before the batch ``max_ahead`` batches back. A training loop that
    never synchronizes otherwise queues steps until CUDA's launch queue is full, and then blocks
    inside a kernel launch holding the GIL, which starves the DataLoader's pin-memory thread
    and result handling; bounded, the main thread waits where the GIL is free. None: unbounded.
    """

    def __init__(self, loader: Iterable, device: str | torch.device = "cuda", *,
                 mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32, max_ahead: int | None = 2) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.dtype = dtype
        if max_ahead is not None and (not isinstance(max_ahead, int) or max_ahead < 1):
            raise ValueError(f"max_ahead must be a positive int or None, got {max_ahead!r}")
        self.max_ahead = max_ahead
        mean = [0.0, 0.0, 0.0] if mean is None else list(mean)
        std = [1.0, 1.0, 1.0] if std is None else list(std)
        if len(mean) != len(std) or any(s == 0 for s in std):
            raise ValueError("mean and std must have the same length and std no zeros")
        # (x / 255 - mean) / std == x * scale + shift
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=self.device,
                                   dtype=dtype).view(1, -1, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=self.device,
                                   dtype=dtype).view(1, -1, 1, 1)
        self._cuda = self.device.type == "cuda"
        self.cpu_decoded = self.fallbacks = self.skipped = 0

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]  # TypeError for a loader without len()

    def _convert(self, batch):
        images, *rest = batch
        if isinstance(images, GpuBatch):  # decode="gpu": JPEGs decoded on this device
            encoded = images
            images = encoded.decode(self.device)
            self.cpu_decoded += encoded.cpu_decoded
            self.fallbacks += encoded.fallbacks
            self.skipped += encoded.skipped
            if encoded.skipped and rest:  # labels of replaced images: the batch's own tensor
                rest[0] = encoded.labels  # (a pin-memory thread handed on a pinned copy)
        else:
            images = images.to(self.device, non_blocking=True)
        # Batches arrive channels-last (see StreamingDataset); the layout change happens here, on
        # the device, on uint8 — never on the CPU.
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        else:
            images = images.contiguous()
        images = images.to(self.dtype).mul_(self._scale).add_(self._shift)
        rest = [r.to(self.device, non_blocking=True) if isinstance(r, torch.Tensor) else r
                for r in rest]
        return (images, *rest)

    def __iter__(self) -> Iterator[tuple]:
        if not self._cuda:
            for batch in self.loader:
                yield self._convert(batch)
            return
        stream = torch.cuda.Stream(device=self.device)
        pending = None
        done: deque = deque()  # events: the end of the user's work before each hand-out
        for batch in self.loader:
            with torch.cuda.stream(stream):
                nxt = self._convert(batch)
            if pending is not None:
                self._bound(done)
                yield self._handout(pending, stream)
            pending = nxt
        if pending is not None:
            self._bound(done)
            yield self._handout(pending, stream)

    def _bound(self, done: deque) -> None:
        """Record where the user's queued work ends; wait for the one ``max_ahead`` back
        (``Event.synchronize`` waits without the GIL)."""
        if self.max_ahead is None:
            return
        event = torch.cuda.Event(blocking=True)  # waits asleep: the cores belong to workers
        event.record(torch.cuda.current_stream(self.device))
        done.append(event)
        while len(done) > self.max_ahead:
            done.popleft().synchronize()

    def _handout(self, batch, stream):
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(stream)
        for t in batch:
            if isinstance(t, torch.Tensor):
                t.record_stream(current)
        return batch
