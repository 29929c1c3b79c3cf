"""``StreamingDataset``: shards -> (image, label) samples or whole batches, exactly once per epoch.

The public object wires the read path's parts, one idea each:

- :mod:`shardkit.state` — the epoch (shared with DataLoader workers), the plan in force for it,
  state dicts and exact or elastic resume;
- :mod:`shardkit.plan` — which samples a worker reads and in which order (pure);
- :mod:`shardkit.reader` — spans of shards -> raw samples (fast and strict tar parsers, index
  files, cache, prefetch, preload);
- :mod:`shardkit.assembly` — decoding, the plan's order, bad-sample replacement, batches made in
  the worker.

Exactness: each span must yield exactly the samples the manifest and index promise. A shard that
ends early, holds more, or has a bad member is an error naming the shard URL and key
(``on_error="raise"``) or, with ``on_error="skip"``, the bad sample is replaced by a copy of the
previous good one so that every rank still yields the same number of samples and batches; skips
are counted and logged at the end of the epoch.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, cast

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from . import plan as planlib
from .assembly import SampleDecoder, emit
from .batching import Sink, batches
from .config import MixConfig, PlanConfig, Source, StorageConfig
from .decode import CropRecipe, SizedCropRecipe
from .diagnosis import ShardFault
from .distributed import gather_states
from .errors import OnError, ShardError
from .layout import Layout, epoch_shares
from .loaderlink import LoaderLink
from .locations import check_location
from .manifest import Location, Manifest, load_manifest
from .modes import DecodeConfig, DecodeMode, check_fields
from .reader import ShardReader, default_memory_limit, tune_worker
from .shardformat import MAX_PIXELS
from .skiplog import NEW, UNLISTED, Region, SkipLog
from .state import EpochState

if TYPE_CHECKING:
    from .recycle import BatchRing

log = logging.getLogger("shardkit")


def _counted(items: Iterator, count: Callable[[int], None]) -> Iterator:
    """``items``, telling ``count`` of each before it is handed on."""
    for item in items:
        count(1)
        yield item


class StreamingDataset(IterableDataset):
    """Stream a shardkit dataset: ``(image, label)`` items, or whole batches made in the workers,
    every sample exactly once per epoch over ranks × DataLoader workers. The constructor checks
    its arguments (and that a local path exists) and reads nothing else: the manifest loads on
    first use (at once with ``fields=``, to check them). Longer explanations, with
    measured numbers: ``docs/reading.md``.

    Source and storage:
      ``source``: a dataset folder, a manifest path, a URL of either (``s3://``, ``http(s)://``,
      or any other protocol fsspec knows: ``gs://``, ``az://``, ``hf://``, …), a
      :class:`~shardkit.Manifest`, or a list or tuple of shard paths or URLs, each with its
      ``.idx`` file beside it (:meth:`shardkit.Manifest.from_urls`; the only way to read shards
      outside one dataset's folder or prefix; one ``.tar`` path or a brace pattern such as
      ``shard-{000000..000099}.tar`` is such a list). Webdataset shards that shardkit did not
      write are read once indexed (``shardkit index``).
      ``storage_options``: fsspec options of the source's protocol (credentials, endpoint).
      ``timeout``: seconds without a byte before a read fails (local files included);
      ``retries``: tries of a failing remote read, with backoff, resumed at the right byte.
      ``cache_dir`` / ``cache_limit`` (bytes or ``"50GB"``): a shared on-disk cache of remote
      shards (whole shards, checked by sha256 or BLAKE3, safe for many processes).
      ``in_memory``: load every shard into shared memory once (up to ``memory_limit``, default
      half the machine's memory); later epochs open no file.

    Mixtures and epochs (``docs/mixtures.md``):
      ``source`` may be a list of :class:`~shardkit.Source` (each a location as above with its
      ``weight``, ``repeat`` or ``choose`` share and its ``storage_options``): one stream of
      them, each source walked through pass after pass before it repeats. ``epoch_size``:
      samples per epoch over all ranks (one dataset or a mixture; default: the sum of the
      shares). ``mix``: ``"random"`` (one shuffle of all sources), ``"stratified"`` (each batch
      but a worker's last holds each source in proportion, to within one sample) or
      ``"per_source"`` (each batch from one source; needs ``batch_size``). ``with_source``: the
      source's index right after the label. ``label_space``: ``"per_source"`` (each source's
      own classes) or ``"by_name"`` (one space, the sorted union of the class names).

    Plan (who reads what, in which order):
      ``shuffle`` and ``seed``: a new, reproducible order each epoch (``set_epoch`` or the next
      iteration). ``block_size``: samples per read; None: 64 when the manifest says the samples
      were shuffled at pack time, else 8 (``Manifest.shuffled``); ``"shard"``: whole shards
      (the largest shard's samples; for HDDs, at a mixing cost: docs/reading.md).
      ``shuffle_buffer``: samples a worker shuffles among; ``shuffle_start``: how many it holds
      when it emits its first (then it grows by one per emission; None: a tenth;
      ``shuffle_buffer``: filled whole first).
      ``rank`` / ``world_size``: this process's place (default: from ``torch.distributed`` or
      ``RANK``/``WORLD_SIZE``). ``remainder``: ``"drop"`` (the last
      ``N % world_size`` samples of an epoch) or ``"pad"`` (repeat the first ones) so that
      every rank yields as many. ``batch_size``: yield batches ``(uint8 N×3×H×W, int64 N, …)``
      made in the workers; ``drop_last``: drop a rank's last partial batch.

    Items:
      ``decode``: ``"uint8"`` (3×H×W tensors), ``"pil"`` (RGB images), ``"raw"`` (the bytes as
      stored) or ``"gpu"`` (JPEG batches that :class:`~shardkit.GpuPrefetcher` decodes on its
      device; needs ``batch_size`` and ``crop``). ``crop``: a crop fused into decoding,
      :class:`~shardkit.RandomResizedCrop` (train) or :class:`~shardkit.CenterCrop` (eval).
      ``transform``: any callable on the decoded image (e.g. torchvision v2), after the crop.
      ``fields``: other members to deliver after the label (``("txt", "json")``: text for text
      fields, bytes otherwise, None when missing; lists in batches; or ``{field: "text" |
      "bytes"}``). ``with_keys``: the sample's key last. ``max_pixels``: larger images are
      refused from their header (decompression bombs).

    Errors:
      ``on_error``: ``"raise"`` (the first bad sample or shard stops with an error naming shard
      URL and key) or ``"skip"`` (bad samples are replaced by good ones, bad shards read as far
      as they are intact; counted in :attr:`skipped` and :attr:`bad_shards`, logged once per
      epoch). Code bugs are never skipped.
    """

    def __init__(self, source: Location | Source | Sequence[Source], *, shuffle: bool = True, seed: int = 0,
                 batch_size: int | None = None, decode: str | DecodeMode = "uint8",
                 crop: CropRecipe | None = None, transform: Callable | None = None,
                 with_keys: bool = False, rank: int | None = None, world_size: int | None = None,
                 cache_dir: str | os.PathLike | None = None, cache_limit: int | str | None = None,
                 in_memory: bool = False, memory_limit: int | str | None = None,
                 on_error: str = "raise", storage_options: dict | None = None,
                 remainder: str = "drop", drop_last: bool = False,
                 block_size: int | str | None = None,
                 shuffle_buffer: int = 1000, shuffle_start: int | None = None,
                 fields: tuple[str, ...] | list[str] | dict[str, str] | None = None,
                 max_pixels: int = MAX_PIXELS, timeout: float = 60.0, retries: int = 6,
                 epoch_size: int | None = None, mix: str = "random", with_source: bool = False,
                 label_space: str = "per_source") -> None:
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.on_error = OnError.of(on_error)
        # Each group of settings is checked once, where it is made.
        self.decoding = DecodeConfig.of(decode, crop=crop, transform=transform,
                                        with_keys=with_keys, fields=fields,
                                        max_pixels=max_pixels, batch_size=batch_size,
                                        with_source=with_source)
        self.plan_config = PlanConfig.of(seed=seed, shuffle=shuffle, block_size=block_size,
                                      shuffle_buffer=shuffle_buffer, remainder=remainder,
                                      batch_size=batch_size, drop_last=drop_last,
                                      shuffle_start=shuffle_start)
        self.storage = StorageConfig.of(storage_options=storage_options, timeout=timeout,
                                        retries=retries, cache_dir=cache_dir,
                                        cache_limit=cache_limit, in_memory=in_memory,
                                        memory_limit=memory_limit)
        self.mixing = MixConfig.of(source, epoch_size=epoch_size, mix=mix,
                                   label_space=label_space, storage_options=storage_options,
                                   batch_size=batch_size)
        # what the caller gave (a caller's copy): a location, or the sources of a mixture
        self.source = self.mixing.sources if self.mixing.mixture else self.mixing.sources[0].location
        for src in self.mixing.sources:  # a typo or an unpacked folder: said here, not in a worker
            check_location(src.location)
        self._decoder = SampleDecoder(self.decoding)
        self._state = EpochState(plan=self.plan_config, rank=rank, world_size=world_size,
                                 layout=self._layout, num_samples=self._num_samples,
                                 mixture=self._mixture_settings,
                                 block_default=self._default_block_size)
        self._manifests: list[Manifest] | None = None
        self._shares: list[int] | None = None
        self._layouts: dict[int, Layout] = {}
        self._classes: list[str] | None = None
        self._reader: ShardReader | None = None
        self._ring: BatchRing | None = None  # this worker's BatchRing (recycle.py)
        self._skiplog = SkipLog()  # shared: what skip mode cost, seen from every process
        if self.decoding.fields:  # fields no sample holds: said here too (the manifests load)
            self.manifests  # noqa: B018

    # The settings users most often look at, read from where they live.
    @property
    def batch_size(self) -> int | None:
        return self.plan_config.batch_size

    @property
    def seed(self) -> int:
        return self.plan_config.seed

    @property
    def in_memory(self) -> bool:
        return self.storage.in_memory

    @property
    def decode(self) -> str:
        return self.decoding.mode.name

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_ring"] = None  # each worker keeps its own
        state["_layouts"] = {}  # O(shards) each: a worker computes its own
        return state

    # ----------------------------------------------------------------- setup
    @property
    def manifests(self) -> list[Manifest]:
        """The manifest of each source (one for a single dataset), loaded on first use."""
        if self._manifests is None:
            s = self.storage
            manifests = [load_manifest(src.location, src.storage_options,
                                       timeout=s.timeout, retries=s.retries)
                         for src in self.mixing.sources]
            check_fields(self.decoding.fields, manifests)  # (refused each time, not kept)
            self._manifests = manifests
        return self._manifests

    @property
    def manifest(self) -> Manifest:
        """The dataset's manifest (a mixture has one per source: :attr:`manifests`)."""
        if self.mixing.mixture:
            raise AttributeError("a mixture of sources has one manifest per source: use "
                                 "ds.manifests")
        return self.manifests[0]

    @property
    def classes(self) -> list:
        """Class names: the dataset's; for a mixture, each source's list (its own label space),
        or with ``label_space="by_name"`` the one list all labels index."""
        self.reader  # noqa: B018 - configures the labels
        if self._classes is not None:
            return self._classes
        if not self.mixing.mixture:
            return list(self.manifests[0].classes or [])
        return [list(m.classes or []) for m in self.manifests]

    @property
    def reader(self) -> ShardReader:
        """The shard reader (made with the manifests, on first use)."""
        if self._reader is None:
            manifests = self.manifests
            self._classes = self._decoder.configure_sources(
                manifests, by_name=self.mixing.label_space == "by_name")
            self._reader = ShardReader(manifests, on_error=self.on_error,
                                       views=self.decoding.fast, cache_dir=self.storage.cache_dir,
                                       cache_limit=self.storage.cache_limit)
        return self._reader

    def _shard_sizes(self) -> np.ndarray:
        return np.concatenate([m.shard_sizes() for m in self.manifests])

    def _num_samples(self) -> int:
        return sum(int(m.num_samples) for m in self.manifests)

    def shares(self) -> list[int]:
        """Samples of each source per epoch, over all ranks (see :class:`shardkit.Source`)."""
        if self._shares is None:
            mixing, names = self.mixing, [repr(s.location) for s in self.mixing.sources]
            sizes = [int(m.shard_sizes().sum()) for m in self.manifests]
            for name, n in zip(names, sizes):
                if n == 0:
                    raise ValueError(f"source {name} holds no sample")
            unit = self.batch_size if mixing.mix == "per_source" and self.batch_size else 1
            self._shares = epoch_shares(sizes, [s.spec for s in mixing.sources],
                                        epoch_size=mixing.epoch_size, unit=unit, names=names)
        return self._shares

    def _layout(self, epoch: int) -> Layout:
        """The global stream of ``epoch`` (what each source gives it, in which order)."""
        layout = self._layouts.get(epoch)
        if layout is None:
            layout = Layout.of_sources([m.shard_sizes() for m in self.manifests], self.shares(),
                                       seed=self.seed, epoch=epoch,
                                       shuffle=self.plan_config.shuffle,
                                       mix=self.mixing.mix, unit=self.batch_size or 1)
            if len(self._layouts) >= 4:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[epoch] = layout
        return layout

    def _mixture_settings(self) -> dict | None:
        """What a state records of the sources and shares (None: one dataset read whole)."""
        if self.mixing.plain:
            return None
        return {"sizes": [int(m.num_samples) for m in self.manifests],
                "shares": [int(k) for k in self.shares()], "mix": self.mixing.mix}

    def _default_block_size(self) -> int:
        """``block_size=None``: large reads where the manifests say the samples are shuffled
        already, small blocks (a better shuffle at more reads) where they may be in order;
        ``"shard"``: the largest shard's samples (whole shards, one read each)."""
        def largest() -> int:
            return max(int(m.shard_sizes().max(initial=1)) for m in self.manifests)

        if self.plan_config.whole_shards:
            return largest()
        # .tar.gz: whole shards too (each span is decompressed from its shard's start), as
        # webdataset reads them (docs/reading.md)
        if any(m.compressed for m in self.manifests):
            return max(planlib.BLOCK_SIZE, largest())
        shuffled = all(m.shuffled for m in self.manifests)
        return planlib.BLOCK_SIZE if shuffled else planlib.SMALL_BLOCK_SIZE

    def rank_world(self) -> tuple[int, int]:
        return self._state.rank_world()

    @property
    def skipped(self) -> int:
        """Bad samples replaced or dropped (``on_error="skip"``) in this rank's current or last
        epoch, by this process and its DataLoader workers."""
        return self._skiplog.skipped(self._last_tag())

    @property
    def bad_shards(self) -> list[dict]:
        """The bad shards of this rank's current or last epoch (``on_error="skip"``), by shard:
        ``url``, ``reason``, ``first_lost`` (its first sample that could not be read) and
        ``samples_lost`` (how many of its samples this rank lost)."""
        out = self._skiplog.bad_shards(self._last_tag())
        for entry in out:
            entry["url"] = self.reader.url(entry["shard"])
            if self.mixing.mixture:
                entry["source"] = self.reader.source_of(entry["shard"])
        return out

    def _last_tag(self) -> int:
        """The iteration the skip log speaks of: the latest one of the current generation (a
        plain DataLoader's workers advance epochs without this process)."""
        return self._skiplog.latest(self._state.tag)

    def log_bad_shards(self, logged: set) -> None:
        """Log the bad shards of the current iteration not in ``logged`` (shardkit's loader does,
        in the main process, for its workers), and add them to it."""
        for entry in self.bad_shards:
            if entry["shard"] not in logged:
                logged.add(entry["shard"])
                log.warning("shardkit: bad shard %s: %s", entry["url"], entry["reason"])
        # (bad shards past what the shared table lists are logged by the workers that found them)

    def set_epoch(self, epoch: int) -> None:
        self._state.set_epoch(epoch)

    def __len__(self) -> int:
        """Samples (or, with ``batch_size``, batches) this rank yields per epoch.

        That is the count of the plan in force for the current epoch, the same on every rank: the
        whole epoch's, or after an elastic resume (another world size, number of workers or plan
        settings) the rest plan's. An iteration resumed from a state yields it less what was
        consumed before the state was taken; it never yields more, so ``len(loader)`` is safe for
        a DataLoader.
        """
        return self._state.num_items()

    def preload(self) -> None:
        """Load every shard into shared memory (``in_memory=True``); later epochs open no files."""
        limit = self.storage.memory_limit
        limit = default_memory_limit() if limit is None else limit
        self.reader.preload(limit)

    def plan(self, worker: int = 0, num_workers: int = 1) -> planlib.WorkerPlan:
        """What DataLoader worker ``worker`` of ``num_workers`` of this rank reads in the current
        epoch, and in which order (:class:`shardkit.plan.WorkerPlan`; for inspection)."""
        return self._state.plan(worker, num_workers)

    def link_loader(self, num_workers: int) -> LoaderLink:
        """How shardkit's loader (``make_loader``) talks to this dataset: a loaded state is
        resolved for ``num_workers`` now, and :meth:`LoaderLink.iteration` wraps the start of
        each iteration's workers (see :class:`shardkit.loaderlink.LoaderLink`)."""
        return LoaderLink(self._state, num_workers, report=self.log_bad_shards)

    # ----------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator:
        """One epoch of this rank's share, from this process or DataLoader worker.

        The epoch is fixed here, when the iterator is made, not when the first item is asked
        for: a DataLoader calls ``iter()`` in every worker as each of its iterations starts (and
        in a persistent worker at each reset), so all the workers of an iteration take the same
        epoch even when it is abandoned before some of them produced anything."""
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            tune_worker()
        if self.in_memory:
            self.preload()
        st = self._state
        consumed = st.begin(worker, num_workers, in_worker=info is not None)
        plan = st.plan(st.role, num_workers)
        self._decoder.crop_seed = f"{self.seed}/{st.epoch}/"  # crops follow the plan's epoch
        skips = self._skiplog.begin(worker, st.tag)
        self.reader.begin()
        # the main process logs what its loader's workers find (ShardkitLoader polls)
        report = partial(self._report, skips, quiet=info is not None and st.managed is not None)
        # uint8 batches: each image goes to its slot of the batch as it is emitted (decoded
        # straight into it with a crop; copied while its bytes are fresh in the cache without)
        decoding = self.decoding
        crop = decoding.crop
        # DecodeConfig checked that a crop has a size tuple
        sink = Sink(None if crop is None else cast(SizedCropRecipe, crop).size) if decoding.fast else None
        # Crops of a fixed size (no transform) are decoded ahead of their turn while reads wait
        # (emit); at most a shuffle buffer of them, and not from memory, where reads never wait.
        ahead = st.shuffle_buffer if sink is not None and sink.size is not None \
            and not self.in_memory else 0
        samples = emit(plan, consumed, partial(self._read, skips=skips, report=report),
                       self._decoder, self.on_error, skips, sink, nothing_readable=self._unreadable,
                       ahead=ahead)
        if self.batch_size is None:
            items = _counted(samples, st.count)
        else:
            ring = None
            if st.recycle is not None and info is not None and not decoding.mode.sample_dicts:
                if self._ring is None:
                    self._ring = st.recycle.ring(worker)
                ring = self._ring

            def collate(got: list, sink: Sink | None) -> tuple:
                return decoding.mode.collate(got, decoding, ring, sink, self.on_error)

            items = batches(plan, consumed, samples, collate, sink, ring, st.count,
                            one_by_one=decoding.mode.sample_dicts)
        return self._logged(items, skips, worker)

    def _logged(self, items: Iterator, skips: Region, worker: int) -> Iterator:
        """The items of an iteration, then a warning when skip mode replaced samples in it."""
        yield from items
        if skips.samples:
            log.warning("shardkit: %d bad samples skipped (replaced) in epoch %d by worker %d",
                        skips.samples, self._state.epoch, worker)

    def _read(self, spans, start: int, skips: Region, report):
        """Raw samples of ``spans`` (None: every shard) from stream position ``start`` on."""
        if spans is None:
            spans = tuple(planlib.Span(i, 0, int(n)) for i, n in enumerate(self._shard_sizes()) if n)
        return self.reader.read(spans, start, skips, report)

    def _report(self, skips: Region, shard: int, fault: ShardFault, quiet: bool) -> None:
        """A bad shard: listed in the skip log, and logged once per iteration of this rank (by
        the main process when it looks, unless the table is full)."""
        status = skips.shard(shard, fault.first_lost, fault.error.reason)
        if status == UNLISTED or (status == NEW and not quiet):
            log.warning("shardkit: bad shard %s", fault.error)

    def _unreadable(self) -> Exception:
        where = ", ".join(m.base_url or "the listed shards" for m in self.manifests)
        bad = self.bad_shards
        total = len(bad) + self._skiplog.unlisted(self._last_tag())
        listed = "; ".join(f"{b['url']}: {b['reason']}" for b in bad[:5])
        more = f" (and {total - len(bad[:5])} more)" if total > len(bad[:5]) else ""
        return ShardError(where, "no sample of the dataset can be read" +
                          (f": {total} bad shards: {listed}{more}" if bad else ""))

    # ----------------------------------------------------------------- resume
    def state_dict(self, *, gather: bool | None = None) -> dict:
        """Where this epoch stands: small, JSON-serialisable, holds no sample data.

        Without ``torch.distributed`` (or with ``gather=False``) this is this rank's state:
        ``{"version", "seed", "epoch", "rank", "world_size", "num_workers", "shift",
        "consumed", "shuffle_start"}``. When a process group with more than one process is
        initialized and this dataset has more than one rank, it is a **collective**
        (``all_gather_object``): call it on every rank, like a DDP/FSDP state dict, and every
        rank gets the same global state
        ``{"version", "seed", "epoch", "world_size", "num_workers", "plan", "ranks": {rank:
        {"shift", "consumed"}}}`` (see :meth:`merge_states`), which can resume with any world
        size. Inside a DataLoader worker (torchdata's ``StatefulDataLoader`` asks there) it is
        that worker's own state and never a collective. A state taken during an elastically
        resumed epoch also holds the state that epoch resumed from, under ``"base"``.
        """
        info = get_worker_info()
        local = self._state.local_state(info)
        if info is not None:
            return local
        return gather_states(local, self.merge_states, gather=gather)

    def merge_states(self, states: Iterable[dict]) -> dict:
        """The global state of a job from its ranks' own states (``state_dict(gather=False)``).

        ``states`` holds one state per rank, in any order (copies from processes that share a
        rank, such as tensor-parallel peers, must be equal). The result records this dataset's
        plan settings under ``"plan"``, so it must be called with the dataset that made them.
        """
        return self._state.merge_states(states)

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`'s state; call it before creating the loader.

        A rank's own state resumes exactly on that rank with the same world size and number of
        loader workers. A global state (or a single-process one) resumes with anything: exactly
        when the world size, number of workers and plan settings are those it was taken with
        (decided when the loader starts, as only then is the number of workers known), else
        elastically, every sample of the epoch not yet consumed once over the new ranks.
        """
        self._state.load_state_dict(state, get_worker_info())
