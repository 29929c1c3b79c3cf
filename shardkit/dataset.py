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
from typing import Callable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from . import plan as planlib
from .assembly import SampleDecoder, Sink, collate, emit, field_kinds
from .common import parse_bytes
from .decode import MODES as DECODE_MODES
from .errors import ShardError
from .manifest import load_manifest
from .reader import ShardFault, ShardReader, default_memory_limit, tune_worker_malloc
from .shardformat import MAX_PIXELS
from .skiplog import NEW, UNLISTED, Region, SkipLog
from .state import PLAN_SETTINGS, EpochState, LoaderLink, initialized_dist

log = logging.getLogger("shardkit")

REMAINDER = planlib.REMAINDER_POLICIES


class StreamingDataset(IterableDataset):
    """Stream a shardkit dataset. See the README for every argument; constructors do no I/O.

    ``source``: a dataset folder, a manifest path, a URL of either (``s3://``, ``http(s)://``,
    or any other protocol fsspec knows: ``gs://``, ``az://``, ``hf://``, …), a
    :class:`~shardkit.Manifest`, or a list or tuple of shard paths or URLs, each with its
    ``.idx`` file beside it (:meth:`shardkit.Manifest.from_urls`; the only way to read shards
    outside one dataset's folder or prefix). ``timeout`` (seconds without a byte) bounds every
    read, local files included.

    ``fields``: other members to deliver after the label (``("txt", "json")``: text for text
    fields, bytes otherwise, None when missing; lists in batches). ``block_size`` None: 64 when
    the manifest says the samples were shuffled at pack time, else 8 (``Manifest.shuffled``).
    Webdataset shards that shardkit did not write are read once indexed (``shardkit index``).
    """

    def __init__(self, source, *, shuffle: bool = True, seed: int = 0, batch_size: int | None = None,
                 decode: str = "uint8", crop=None, transform: Callable | None = None,
                 with_keys: bool = False, rank: int | None = None, world_size: int | None = None,
                 cache_dir=None, cache_limit=None, in_memory: bool = False,
                 memory_limit: int | str | None = None, on_error: str = "raise",
                 storage_options: dict | None = None, remainder: str = "drop",
                 drop_last: bool = False, block_size: int | None = None,
                 shuffle_buffer: int = 1000, fields=None, max_pixels: int = MAX_PIXELS,
                 timeout: float = 60.0, retries: int = 6):
        if decode not in DECODE_MODES + ("gpu",) and not (decode == "wds" and self._sample_dicts):
            raise ValueError(f"decode must be one of {DECODE_MODES + ('gpu',)}, got {decode!r}")
        if decode == "gpu" and (batch_size is None or crop is None or transform is not None):
            raise ValueError("decode='gpu' makes batches of JPEGs that GpuPrefetcher decodes on "
                             "its device: it needs batch_size and a crop (RandomResizedCrop or "
                             "CenterCrop, for one output size), and no transform (which would "
                             "run on the CPU)")
        if decode == "gpu" and getattr(crop, "interpolation", "bilinear") not in (
                "bilinear", "bicubic", "nearest"):
            raise ValueError(f"decode='gpu' resizes on the device with bilinear, bicubic or "
                             f"nearest interpolation; the crop asks for "
                             f"{crop.interpolation!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if remainder not in REMAINDER:
            raise ValueError(f"remainder must be one of {REMAINDER}, got {remainder!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if decode == "raw" and crop is not None:
            raise ValueError("crop needs decoding; it cannot be used with decode='raw'")
        if crop is not None and not (callable(getattr(crop, "params", None))
                                     and isinstance(getattr(crop, "size", None), tuple)):
            raise TypeError(
                f"crop must be shardkit.RandomResizedCrop(...) or shardkit.CenterCrop(...) (a "
                f"crop fused into decoding), got {type(crop).__module__}.{type(crop).__name__}; "
                "pass torchvision transforms as transform=, which runs on the decoded image")
        if drop_last and batch_size is None:
            raise ValueError("drop_last drops a rank's last partial batch: it needs batch_size")
        if memory_limit is not None and not in_memory:
            raise ValueError("memory_limit bounds in_memory=True; it does nothing without it")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        for name, value in (("block_size", block_size), ("shuffle_buffer", shuffle_buffer)):
            if name == "block_size" and value is None:
                continue  # the manifest decides (_default_block_size)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if cache_limit is not None and cache_dir is None:
            raise ValueError("cache_limit needs a cache_dir")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative int, got {retries!r}")
        self.source = tuple(source) if isinstance(source, list) else source  # a caller's copy
        self.shuffle, self.seed, self.batch_size = bool(shuffle), seed, batch_size
        self.decode, self.crop, self.transform, self.with_keys = decode, crop, transform, with_keys
        self.in_memory = in_memory
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.cache_limit = None if cache_limit is None else parse_bytes(cache_limit, "cache_limit")
        self.memory_limit = (None if memory_limit is None
                             else parse_bytes(memory_limit, "memory_limit"))
        self.on_error, self.storage_options = on_error, storage_options
        self.remainder, self.drop_last = remainder, drop_last
        self.block_size, self.shuffle_buffer, self.max_pixels = block_size, shuffle_buffer, max_pixels
        self.timeout, self.retries = float(timeout), retries
        # Batches of uint8 images without a user transform take the fast path: image bytes stay
        # views of the read buffer and decode to H×W×C arrays that land in a channels-last batch.
        self._fast = batch_size is not None and decode == "uint8" and transform is None
        self.fields = field_kinds(fields)
        if self.fields and decode == "wds":
            raise ValueError("fields: a webdataset source yields every member already")
        self._decoder = SampleDecoder(decode=decode, crop=crop, transform=transform,
                                      with_keys=with_keys, max_pixels=max_pixels, fast=self._fast,
                                      fields=self.fields)
        self._state = EpochState(seed=seed, settings={n: getattr(self, n) for n in PLAN_SETTINGS},
                                 rank=rank, world_size=world_size, sizes=self._shard_sizes,
                                 block_default=self._default_block_size)
        self._manifest = None
        self._reader: ShardReader | None = None
        self._ring = None  # this worker's BatchRing (recycle.py)
        self._skiplog = SkipLog()  # shared: what skip mode cost, seen from every process

    _sample_dicts = False  # WdsSource: webdataset sample dicts, never batches (wds.py)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_ring"] = None  # each worker keeps its own
        return state

    # ----------------------------------------------------------------- setup
    @property
    def manifest(self):
        if self._manifest is None:
            self._manifest = load_manifest(self.source, self.storage_options,
                                           timeout=self.timeout, retries=self.retries)
        return self._manifest

    @property
    def reader(self) -> ShardReader:
        """The shard reader (made with the manifest, on first use)."""
        if self._reader is None:
            m = self.manifest
            self._decoder.configure(m.labels, m.classes)
            self._reader = ShardReader(self.manifest, on_error=self.on_error, views=self._fast,
                                       cache_dir=self.cache_dir, cache_limit=self.cache_limit)
        return self._reader

    def _shard_sizes(self) -> np.ndarray:
        return self.manifest.shard_sizes()

    def _default_block_size(self) -> int:
        """``block_size=None``: large reads where the manifest says the samples are shuffled
        already, small blocks (a better shuffle at more reads) where they may be in order."""
        return planlib.BLOCK_SIZE if self.manifest.shuffled else planlib.SMALL_BLOCK_SIZE

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
            entry["url"] = self.manifest.shard_store().url(self.manifest.shards[entry["shard"]].url)
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
        limit = self.memory_limit if self.memory_limit is not None else default_memory_limit()
        self.reader.preload(limit)

    def plan(self, worker: int = 0, num_workers: int = 1) -> planlib.WorkerPlan:
        """What DataLoader worker ``worker`` of ``num_workers`` of this rank reads in the current
        epoch, and in which order (:class:`shardkit.plan.WorkerPlan`; for inspection)."""
        return self._state.plan(worker, num_workers)

    def link_loader(self, num_workers: int) -> LoaderLink:
        """How shardkit's loader (``make_loader``) talks to this dataset: a loaded state is
        resolved for ``num_workers`` now, and :meth:`LoaderLink.iteration` wraps the start of
        each iteration's workers (see :class:`shardkit.state.LoaderLink`)."""
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
            tune_worker_malloc()
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
        sink = Sink(None if self.crop is None else self.crop.size) if self._fast else None
        samples = emit(plan, consumed, partial(self._read, skips=skips, report=report),
                       self._decoder, self.on_error, skips, sink, nothing_readable=self._unreadable)
        ring = None
        if (st.recycle is not None and info is not None and self.batch_size is not None
                and not self._sample_dicts):
            if self._ring is None:
                self._ring = st.recycle.ring(worker)
            ring = self._ring
        return self._items(plan, consumed, samples, sink, ring, skips, worker)

    def _items(self, plan, consumed: int, samples: Iterator, sink, ring, skips: Region,
               worker: int) -> Iterator:
        """The items of an iteration set up by ``__iter__``: samples, or batches of them."""
        st = self._state
        if self.batch_size is None:
            for sample in samples:
                st.emitted += 1
                yield sample
        elif self._sample_dicts:  # the plan's batches, one sample at a time (wds.py)
            done = 0
            for size in plan.batch_sizes:
                for _ in range(size):
                    done += 1
                    if done > consumed:
                        st.emitted += 1
                        yield next(samples)
        else:
            done = 0
            for size in plan.batch_sizes:
                if done + size <= consumed:
                    done += size
                    continue
                take = size - max(0, consumed - done)
                if sink is not None:
                    sink.start(take, ring)
                items = [next(samples) for _ in range(take)]
                done += size
                st.emitted += take
                if self.decode == "gpu":
                    from .gpudecode import collate_gpu

                    yield collate_gpu(items, self.crop.size, self.on_error,
                                      getattr(self.crop, "interpolation", "bilinear"),
                                      len(self.fields), self.with_keys)
                else:
                    yield collate(items, self.with_keys, ring, sink, len(self.fields))
        if skips.samples:
            log.warning("shardkit: %d bad samples skipped (replaced) in epoch %d by worker %d",
                        skips.samples, st.epoch, worker)

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
        where = self.manifest.base_url or "the listed shards"
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
        "consumed"}``. When a process group with more than one process is initialized and this
        dataset has more than one rank, it is a **collective** (``all_gather_object``): call it
        on every rank, like a DDP/FSDP state dict, and every rank gets the same global state
        ``{"version", "seed", "epoch", "world_size", "num_workers", "plan", "ranks": {rank:
        {"shift", "consumed"}}}`` (see :meth:`merge_states`), which can resume with any world
        size. Inside a DataLoader worker (torchdata's ``StatefulDataLoader`` asks there) it is
        that worker's own state and never a collective. A state taken during an elastically
        resumed epoch also holds the state that epoch resumed from, under ``"base"``.
        """
        info = get_worker_info()
        local = self._state.local_state(info)
        if info is not None or gather is False:
            return local
        dist = initialized_dist()
        if gather is None:
            gather = dist is not None and dist.get_world_size() > 1 and local["world_size"] > 1
        if not gather:
            return local
        if dist is None:
            raise ValueError("state_dict(gather=True) needs an initialized torch.distributed "
                             "process group")
        states: list = [None] * dist.get_world_size()
        dist.all_gather_object(states, local)
        return self.merge_states(states)

    def merge_states(self, states) -> dict:
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
