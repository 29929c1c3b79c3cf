"""``StreamingDataset``: shards -> (image, label) samples or whole batches, exactly once per epoch.

Per worker and epoch, :func:`shardkit.plan.epoch_plan` says which sample spans to read and in which
order to emit them. The worker reads its spans sequentially (a range read from the byte offset in
the shard's index file), parses tar members with :mod:`tarfile` in stream mode and groups them into
samples at the index's byte boundaries (so a bad sample costs only itself: reading restarts at the
next offset), holds read samples until the plan emits them (at most ``shuffle_buffer``), then
decodes (with a decode-fused crop), transforms and batches them. The epoch is kept in shared memory
so that persistent DataLoader workers see ``set_epoch``.

Exactness: each span must yield exactly the samples the manifest and index promise. A shard that
ends early, holds more, or has a bad member is an error naming the shard URL and key
(``on_error="raise"``) or, with ``on_error="skip"``, the bad sample is replaced by a copy of the
previous good one so that every rank still yields the same number of samples and batches; skips
are counted and logged at the end of the epoch.

Resume: ``state_dict()`` says how many samples each plan worker ("role") of this rank emitted and
which DataLoader worker plays which role (``shift``). Under ``torch.distributed`` with more than one
rank it is a collective that returns the *global* state, every rank's progress (see
:meth:`StreamingDataset.state_dict`). A global state resumes exactly (same keys, same order) with
the same world size, number of workers and plan settings; with any other it resumes *elastically*:
the samples of the epoch not yet emitted follow from the old plan and the counts
(:func:`shardkit.plan.rest_stream`) and are dealt afresh to the new ranks and workers
(:func:`shardkit.plan.rest_plan`). A state taken during such a resumed epoch records the state it
came from (``"base"``), so it can be resumed again, exactly or elastically.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tarfile
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import plan as planlib
from .decode import (MAX_PIXELS, ImageDecodeError, decode_array, decode_array_hwc, decode_image,
                     decode_image_hwc)
from .errors import DecodeError, ShardError
from .manifest import ManifestError, decode_index
from .recycle import BatchRing, _flat
from .storage import LocalStore, load_manifest, store_for
from .writer import parse_bytes

log = logging.getLogger("shardkit")

DECODE_MODES = ("uint8", "pil", "raw")
REMAINDER = planlib.REMAINDER_POLICIES
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_MEMBER = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_.-]+")
STATE_VERSION = 1
# Settings that decide a plan besides (seed, epoch, world size, workers); recorded in global states.
_PLAN_SETTINGS = ("shuffle", "block_size", "shuffle_buffer", "remainder", "batch_size", "drop_last")


class _BadSample:
    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def _dist_rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except (ImportError, RuntimeError):
        pass
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is not None and world is not None:
        return int(rank), int(world)
    return 0, 1


class StreamingDataset(IterableDataset):
    """Stream a shardkit dataset. See the README for every argument; constructors do no I/O.

    ``source``: a dataset folder, a manifest path, ``s3://`` / ``http(s)://`` URL of either, a
    :class:`~shardkit.Manifest`, or a list or tuple of shard paths or URLs, each with its
    ``.idx`` file beside it (:meth:`shardkit.Manifest.from_urls`; the only way to read shards
    outside one dataset's folder or prefix). ``timeout`` (seconds without a byte) bounds every
    read, local files included.
    """

    def __init__(self, source, *, shuffle: bool = True, seed: int = 0, batch_size: int | None = None,
                 decode: str = "uint8", crop=None, transform: Callable | None = None,
                 with_keys: bool = False, rank: int | None = None, world_size: int | None = None,
                 cache_dir=None, cache_limit=None, in_memory: bool = False,
                 memory_limit: int | str | None = None, on_error: str = "raise",
                 storage_options: dict | None = None, remainder: str = "drop",
                 drop_last: bool = False, block_size: int = 64, shuffle_buffer: int = 1000,
                 max_pixels: int = MAX_PIXELS, timeout: float = 60.0, retries: int = 6):
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if remainder not in REMAINDER:
            raise ValueError(f"remainder must be one of {REMAINDER}, got {remainder!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if decode == "raw" and crop is not None:
            raise ValueError("crop needs decoding; it cannot be used with decode='raw'")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        for name, value in (("block_size", block_size), ("shuffle_buffer", shuffle_buffer)):
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
        self._rank_arg, self._world_arg = rank, world_size
        self.in_memory = in_memory
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.cache_limit = None if cache_limit is None else parse_bytes(cache_limit)
        self._cache = None
        self.memory_limit = None if memory_limit is None else parse_bytes(memory_limit)
        self.on_error, self.storage_options = on_error, storage_options
        self.remainder, self.drop_last = remainder, drop_last
        self.block_size, self.shuffle_buffer, self.max_pixels = block_size, shuffle_buffer, max_pixels
        self.timeout, self.retries = float(timeout), retries
        self._manifest = None
        # The epoch lives in shared memory: DataLoader workers (persistent ones included) hold a
        # copy of the dataset made when they start, and must still see later ``set_epoch`` calls.
        self._epoch_cell = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._resume: dict | None = None  # applied to the next iteration of its epoch
        self._rest: dict | None = None  # an elastic resume's rest plan, in force for its epoch
        self._emitted = 0  # samples this process's iterator has emitted (worker state)
        self._role = 0
        self._progress: dict | None = None  # set by shardkit's loader: items consumed by the user
        self._memory: dict[int, torch.Tensor] | None = None
        self._offsets_cache: dict[int, np.ndarray] = {}  # filled by preload (in_memory=True)
        self._recent_offsets: dict[int, np.ndarray] = {}  # LRU of indexes read by this process
        self._recycle: dict | None = None  # set by shardkit's loader for its workers (recycle.py)
        self._ring = None  # this worker's BatchRing
        self._crop_seed: str | None = None  # "seed/epoch/" of the running iteration
        self._prefetched: set[int] = set()  # shards whose cache download this process started
        self.skipped = 0

    @property
    def _epoch(self) -> int:
        return int(self._epoch_cell[0])

    @_epoch.setter
    def _epoch(self, epoch: int) -> None:
        self._epoch_cell[0] = epoch

    def __getstate__(self) -> dict:
        # Pickled for a spawned DataLoader worker: torch.distributed is not initialized there, so
        # the rank and world size are fixed now, in the process that knows them.
        state = self.__dict__.copy()
        state["_recent_offsets"] = {}  # each process keeps its own
        state["_ring"] = None
        state["_prefetched"] = set()
        if state["_world_arg"] is None:
            state["_rank_arg"], state["_world_arg"] = self.rank_world()
        return state

    # ----------------------------------------------------------------- setup
    @property
    def manifest(self):
        if self._manifest is None:
            self._manifest = load_manifest(self.source, self.storage_options,
                                           timeout=self.timeout, retries=self.retries)
        return self._manifest

    def rank_world(self) -> tuple[int, int]:
        if self._world_arg is not None:
            return self._rank_arg, self._world_arg
        return _dist_rank_world()

    @property
    def _views(self) -> bool:
        """Whether samples go the batch fast path: image bytes stay views of the read buffer and
        decode to H×W×C arrays that land in a channels-last batch."""
        return self.batch_size is not None and self.decode == "uint8" and self.transform is None

    def _sizes(self):
        return self.manifest.shard_sizes()

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None
        if self._rest is not None and self._rest["epoch"] != epoch:
            self._rest = None
        if epoch != self._epoch:  # progress counts belong to the previous epoch
            self._emitted, self._progress = 0, None
        self._epoch = epoch

    def __len__(self) -> int:
        """Samples (or, with ``batch_size``, batches) this rank yields per epoch.

        That is the count of the plan in force for the current epoch, the same on every rank: the
        whole epoch's, or after an elastic resume (another world size, number of workers or plan
        settings) the rest plan's. An iteration resumed from a state yields it less what was
        consumed before the state was taken; it never yields more, so ``len(loader)`` is safe for
        a DataLoader.
        """
        _, world = self.rank_world()
        kw = dict(remainder=self.remainder, batch_size=self.batch_size, drop_last=self.drop_last)
        sizes = self._sizes()
        rest = self._rest_in_force()
        if rest is not None:
            stream = self._rest_stream(rest)
            sizes = [int((stream[:, 1] - stream[:, 0]).sum())]
            if sizes[0] == 0:
                return 0
        if self.batch_size is None:
            return planlib.rank_num_samples(sizes, world, **kw)
        return planlib.rank_num_batches(sizes, world, **kw)

    def preload(self) -> None:
        """Load every shard into shared memory (``in_memory=True``); later epochs open no files."""
        if self._memory is not None:
            return
        m = self.manifest
        limit = self.memory_limit if self.memory_limit is not None else _default_memory_limit()
        if m.num_bytes > limit:
            raise MemoryError(f"{m.base_url or 'the listed shards'}: dataset is {m.num_bytes} "
                              f"bytes, over the in-memory limit of {limit} bytes "
                              "(memory_limit=...); use in_memory=False")
        store = store_for(m)
        memory, offsets = {}, {}
        for i, shard in enumerate(m.shards):
            data = store.read_bytes(shard.url)
            if len(data) != shard.num_bytes:
                raise ShardError(store.url(shard.url), f"{len(data)} bytes, manifest says {shard.num_bytes}")
            memory[i] = torch.frombuffer(bytearray(data), dtype=torch.uint8).share_memory_()
            offsets[i] = self._index(store, shard)
        self._memory, self._offsets_cache = memory, offsets

    # ----------------------------------------------------------------- plan
    def _plan(self, worker: int, num_workers: int) -> planlib.WorkerPlan:
        rank, world = self.rank_world()
        rest = self._rest_in_force()
        if rest is not None:
            return planlib.rest_plan(self._sizes(), self._rest_stream(rest), seed=self.seed,
                                     epoch=self._epoch, rank=rank, world_size=world, worker=worker,
                                     num_workers=num_workers, level=rest["level"],
                                     **self._settings())
        return planlib.epoch_plan(self._sizes(), seed=self.seed, epoch=self._epoch, rank=rank,
                                  world_size=world, worker=worker, num_workers=num_workers,
                                  shuffle=self.shuffle, block_size=self.block_size,
                                  shuffle_buffer=self.shuffle_buffer, remainder=self.remainder,
                                  batch_size=self.batch_size, drop_last=self.drop_last)

    # ----------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            _tune_worker_malloc()
        if self.in_memory and self._memory is None:
            self.preload()
        self._resolve_resume(num_workers)
        consumed, shift = 0, 0
        if self._resume is not None and self._resume["epoch"] == self._epoch:
            state, self._resume = self._resume, None
            if state["num_workers"] != num_workers and any(state["consumed"].values()):
                raise ValueError(f"the state of rank {state.get('rank')} was saved with "
                                 f"{state['num_workers']} loader workers; resume it with the same "
                                 f"number (got {num_workers}), or resume from the global state "
                                 "(state_dict() under torch.distributed, or merge_states()), which "
                                 "takes any number")
            shift = state.get("shift", 0)
            role = (worker + shift) % num_workers
            consumed = state["consumed"].get(str(role), 0)
        role = (worker + shift) % num_workers
        self._role, self._emitted = role, consumed
        plan = self._plan(role, num_workers)
        self._crop_seed = f"{self.seed}/{self._epoch}/"  # crops follow the plan's epoch
        self.skipped = 0
        # uint8 batches: each image goes to its slot of the batch as it is emitted (decoded
        # straight into it with a crop; copied while its bytes are fresh in the cache without)
        sink = _Sink(None if self.crop is None else self.crop.size) if self._views else None
        samples = self._emit(plan, consumed, sink)
        ring = None
        if (self._recycle and info is not None and self.batch_size is not None and not consumed
                and self._rest_in_force() is None):
            if self._ring is None:
                rc = self._recycle
                self._ring = BatchRing(rc["prefetch"], rc["consumer"], rc.get("received"), worker,
                                       rc.get("consumer_start"))
            ring = self._ring
            ring.begin(len(self) // num_workers)
        if self.batch_size is None:
            for sample in samples:
                self._emitted += 1
                yield sample
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
                self._emitted += take
                yield self._collate(items, ring, sink)
        if self.skipped:
            log.warning("shardkit: %d bad samples skipped (replaced) in epoch %d by worker %d",
                        self.skipped, self._epoch, worker)

    def _emit(self, plan: planlib.WorkerPlan, consumed: int, sink: _Sink | None = None) -> Iterator:
        """Processed samples in the plan's order; a bad one is replaced by the last good one.

        With a ``sink``, each image is decoded into the sink's next slot; the last good sample is
        then kept raw and decoded again into the slot of the bad one it replaces."""
        order = plan.order
        start = planlib.resume_position(order, consumed)
        already = set(order[:consumed].tolist()) if consumed else set()
        reader = self._read(plan.spans, start)
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
            if not isinstance(sample, _BadSample):
                try:
                    sample = self._process(sample, out)
                except DecodeError as exc:
                    sample = _BadSample(exc)
            if isinstance(sample, _BadSample):
                if self.on_error == "raise":
                    raise sample.error
                self.skipped += 1
                if last_good is None:
                    last_good = self._first_good(plan, reader, held, raw=sink is not None)
                if sink is None:
                    sample = last_good
                else:
                    sample, raw = self._process(last_good, out), last_good
            last_good = sample if sink is None else raw
            yield sample if sink is None else sink.settle(sample)

    def _first_good(self, plan, reader, held, raw: bool = False):
        """A replacement for a bad first sample: the next good one of this worker's stream
        (processed, or with ``raw`` as read, once it is known to process)."""
        def good(cand):
            if isinstance(cand, _BadSample):
                return None
            try:
                processed = self._process(cand)
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
        spans = tuple(planlib.Span(i, 0, int(n)) for i, n in enumerate(self._sizes()) if n)
        for _, cand in self._read(spans, 0):
            found = good(cand)
            if found is not None:
                return found
        raise ShardError(self.manifest.base_url or "the listed shards",
                         "every sample of the dataset is bad")

    # ----------------------------------------------------------------- reading
    def _read(self, spans, start: int) -> Iterator[tuple[int, Any]]:
        """Yield ``(stream position, raw sample dict or _BadSample)`` from ``start`` on.

        A failure costs only the sample it hits: reading restarts at the next sample's byte offset
        from the index, so under ``on_error="skip"`` every other sample of the shard still comes.
        """
        m = self.manifest
        store = store_for(m)
        pos = 0
        for k, span in enumerate(spans):
            n = span.stop - span.start
            if pos + n <= start:
                pos += n
                continue
            self._prefetch(store, spans[k + 1:k + 1 + _PREFETCH_SPANS])
            offsets = self._shard_offsets(store, span.shard)
            j = span.start + max(0, start - pos)
            while j < span.stop:
                try:
                    for sample in self._samples(store, span.shard, offsets, j, span.stop):
                        yield pos + j - span.start, sample
                        j += 1
                except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                    if not isinstance(exc, ShardError):
                        exc = ShardError(store.url(m.shards[span.shard].url),
                                         f"corrupt tar data at sample {j}: {exc}")
                    if self.on_error == "raise":
                        raise exc from None
                    if j < span.stop:
                        yield pos + j - span.start, _BadSample(exc)
                    else:  # extra data after the shard's last sample: no slot to fill
                        self.skipped += 1
                        log.warning("shardkit: %s", exc)
                    j += 1
            pos += n

    def _prefetch(self, store, spans) -> None:
        """Start the cache's downloads of the shards the next spans read (remote, cached only).

        A worker's plan visits many shards early on (its shuffle buffer fills from 64-sample
        blocks all over the dataset); downloading them one at a time, each only once the reader
        asks, left the network idle while it decoded. Downloads go on in the background, once per
        machine, as for any reader; nothing is prefetched when the cache is too small to hold
        the shards in flight."""
        if self.cache_dir is None or self._memory is not None or isinstance(store, LocalStore):
            return
        m = self.manifest
        for span in spans:
            shard = m.shards[span.shard]
            if span.shard in self._prefetched:
                continue
            if self.cache_limit is not None and self.cache_limit < 4 * shard.num_bytes:
                return
            self._prefetched.add(span.shard)
            try:
                opened = self._open_stream(store, shard, 0, 0, prefetch=True)
            except (OSError, ShardError):  # only a head start: reading it will say what is wrong
                continue
            if opened is not None:
                opened.close()  # the download goes on

    def _shard_offsets(self, store, shard_no: int) -> np.ndarray:
        if shard_no in self._offsets_cache:
            return self._offsets_cache[shard_no]
        # A worker's plan visits a shard in several 64-sample spans: keep the last few indexes
        # (8 bytes per sample) instead of fetching the .idx again for each span.
        recent = self._recent_offsets
        if shard_no in recent:
            recent[shard_no] = recent.pop(shard_no)  # most recent last
            return recent[shard_no]
        offsets = self._index(store, self.manifest.shards[shard_no])
        recent[shard_no] = offsets
        while len(recent) > 32:
            del recent[next(iter(recent))]
        return offsets

    def _index(self, store, shard) -> np.ndarray:
        data = store.read_bytes(shard.index_url)
        import hashlib

        if hashlib.sha256(data).hexdigest() != shard.index_sha256:
            raise ShardError(store.url(shard.index_url), "index sha256 differs from the manifest")
        try:
            return decode_index(data, shard.num_samples, shard.num_bytes, store.url(shard.index_url))
        except ManifestError as exc:
            raise ShardError(store.url(shard.index_url), str(exc)) from None

    def _samples(self, store, shard_no: int, offsets: np.ndarray, first: int,
                 stop: int) -> Iterator[dict]:
        """Samples ``first .. stop-1`` of a shard, each exactly the bytes the index gives it.

        The fast path reads each sample's bytes in one call and parses its plain USTAR headers
        directly (what shardkit writes). Anything else — a checksum that does not match, a pax or
        GNU header, a member crossing the boundary, a short read, a non-zero archive end — hands
        over to the strict ``tarfile``-based path at that sample, which decides and names the
        error; so both paths accept and refuse exactly the same shards.
        """
        shard = self.manifest.shards[shard_no]
        lo = int(offsets[first])
        hi = shard.num_bytes if stop == len(offsets) - 1 else int(offsets[stop])
        ends = (offsets[first + 1:stop + 1] - lo).tolist()
        url = store.url(shard.url)
        views = self._views
        if self._memory is not None:
            import io

            stream = io.BytesIO(memoryview(self._memory[shard_no].numpy())[lo:hi])
        else:
            stream = self._open_stream(store, shard, lo, hi)
        k, prev, sample_key = 0, 0, None
        try:
            for k, end in enumerate(ends):  # noqa: B007 - k is where the strict path takes over
                buf = _read_exact(stream, end - prev)
                sample = None if buf is None else _parse_sample(buf, url, views)
                if sample is None:
                    break
                if k == len(ends) - 1 and hi - lo > end:  # the archive's end: zero blocks only
                    if hi - lo - end > _MAX_TAIL:  # not what a writer leaves: the strict path
                        break                      # streams it (no buffer of a claimed size)
                    tail = _read_exact(stream, hi - lo - end)
                    # and the stream's end, where a streamed download is checked (sha256)
                    if tail is None or stream.read(1) or bytes(tail).count(0) != len(tail):
                        break
                prev, sample_key = end, sample["__key__"]
                yield sample
            else:
                return
        finally:
            stream.close()
        yield from self._samples_strict(store, shard_no, offsets, first + k, stop,
                                        prev_key=sample_key)

    def _samples_strict(self, store, shard_no: int, offsets: np.ndarray, first: int,
                        stop: int, prev_key: str | None = None) -> Iterator[dict]:
        """Samples ``first .. stop-1`` of a shard, each checked against the index's boundaries.

        Reads the byte range from ``offsets[first]`` (to the end of the archive when ``stop`` is
        the shard's last sample, so extra members are noticed). A sample is complete, and yielded,
        when a member ends exactly at the next offset; anything else is a ``ShardError`` naming
        the shard URL and the key.
        """
        shard = self.manifest.shards[shard_no]
        url = store.url(shard.url)
        lo = int(offsets[first])
        hi = shard.num_bytes if stop == len(offsets) - 1 else int(offsets[stop])
        ends = (offsets[first + 1:stop + 1] - lo).tolist()
        if self._memory is not None:
            import io

            stream = io.BytesIO(memoryview(self._memory[shard_no].numpy())[lo:hi])
        else:
            stream = self._open_stream(store, shard, lo, hi)
        current: dict | None = None
        k, prev = 0, prev_key
        try:
            try:
                tar = tarfile.open(fileobj=stream, mode="r|")
            except tarfile.ReadError as exc:
                if "empty file" not in str(exc):
                    raise
                raise ShardError(url, f"ended early at sample {first} of {len(offsets) - 1} "
                                      f"(after {prev!r}): truncated or corrupt tar header") from None
            for info in tar:
                key, field = _split_member(info.name, url)
                if k >= len(ends):
                    raise ShardError(url, f"holds more samples than its index says ({info.name!r} "
                                          "after the last one)", key=key)
                if not info.isreg() or info.sparse is not None:
                    raise ShardError(url, f"member {info.name!r} is not a regular file", key=key)
                # Checked before reading: a header may claim any size (a GNU sparse one, data
                # that is mostly never stored), and tarfile would allocate all of it.
                if not 0 <= info.size <= hi - lo - info.offset_data:
                    raise ShardError(url, f"member {info.name!r} claims {info.size} bytes, more "
                                          "than the shard holds after it", key=key)
                if current is None:
                    current = {"__key__": key, "__url__": url}
                elif key != current["__key__"]:
                    raise ShardError(url, f"member {info.name!r} lies inside sample "
                                          f"{current['__key__']!r} by the index", key=key)
                if field in current:
                    raise ShardError(url, f"duplicate member {info.name!r}", key=key)
                try:
                    current[field] = tar.extractfile(info).read()
                except (tarfile.TarError, EOFError) as exc:
                    raise ShardError(url, f"member {info.name!r} is truncated: {exc}",
                                     key=key) from None
                if tar.offset >= ends[k]:
                    if tar.offset != ends[k]:
                        raise ShardError(url, f"member {info.name!r} crosses the index's sample "
                                              "boundary", key=key)
                    yield current
                    prev, current, k = key, None, k + 1
            if k < len(ends):
                key = None if current is None else current["__key__"]
                raise ShardError(url, f"ended early at sample {first + k} of {len(offsets) - 1} "
                                      f"(after {prev!r}): truncated or corrupt tar header", key=key)
        except tarfile.TarError as exc:
            raise ShardError(url, f"corrupt tar data at sample {first + k} (after {prev!r}): "
                                  f"{exc}") from None
        finally:
            stream.close()

    def _open_stream(self, store, shard, lo: int, hi: int, prefetch: bool = False):
        """Bytes ``[lo, hi)`` of a shard: through the shared on-disk cache when there is one
        (``prefetch``: see ``ShardCache.open``)."""
        if self.cache_dir is None:
            return store.open_range(shard.url, lo, hi)
        if self._cache is None:
            from .cache import ShardCache

            self._cache = ShardCache(self.cache_dir, self.cache_limit)
        return self._cache.open(store.url(shard.url), size=shard.num_bytes, sha256=shard.sha256,
                                fetch=lambda offset: store.iter_bytes(shard.url, offset,
                                                                      shard.num_bytes),
                                start=lo, stop=hi, prefetch=prefetch)

    # ----------------------------------------------------------------- decoding
    def _process(self, sample: dict, out: np.ndarray | None = None):
        key, url = sample["__key__"], sample["__url__"]
        field = next((f for f in IMAGE_FIELDS if f in sample), None)
        try:
            if "cls" in sample:
                text = sample["cls"]
                if not (0 < len(text) <= 10 and text.isdigit()):
                    raise ImageDecodeError(f"class label {text[:20]!r} is not a number")
                label = int(text)
            else:
                label = -1
            rng = None
            if self.crop is not None:
                rng = random.Random(self._crop_seed + key)  # set by __iter__
            # Batches of uint8 images without a user transform take the fast path: images come
            # as H×W×C arrays and go straight into a channels-last batch (see _collate).
            fast = self._views
            if field is not None:
                if fast and self.crop is not None:
                    image = decode_image_hwc(sample[field], crop=self.crop, rng=rng,
                                             max_pixels=self.max_pixels, out=out)
                else:
                    image = decode_image(bytes(sample[field]), mode=self.decode, crop=self.crop,
                                         rng=rng, max_pixels=self.max_pixels)
            elif "npy" in sample and fast:
                image = decode_array_hwc(sample["npy"], crop=self.crop, rng=rng, out=out)
            elif "npy" in sample:
                image = decode_array(sample["npy"], crop=self.crop, rng=rng)
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
            return image, label, key
        return image, label

    def _collate(self, items: list, ring=None, sink: _Sink | None = None):
        images = [it[0] for it in items]
        labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
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
            images = _batch(images, next(iter(shapes)), None if taken else ring)
        if self.with_keys:
            return images, labels, [it[2] for it in items]
        return images, labels

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
        local = self._local_state(info)
        if info is not None or gather is False:
            return local
        dist = _initialized_dist()
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

    def _local_state(self, info) -> dict:
        rank, world = self.rank_world()
        base = {"version": STATE_VERSION, "seed": self.seed, "epoch": self._epoch, "rank": rank,
                "world_size": world}
        if info is not None:  # inside a worker
            state = {**base, "num_workers": info.num_workers, "shift": 0,
                     "consumed": {str(self._role): self._emitted}}
        elif self._progress is not None:
            state = {**base, **self._progress_state()}
        else:
            state = {**base, "num_workers": 1, "shift": 0, "consumed": {"0": self._emitted}}
        rest = self._rest_in_force()
        if rest is not None:
            state["base"] = rest["state"]
        return state

    def merge_states(self, states) -> dict:
        """The global state of a job from its ranks' own states (``state_dict(gather=False)``).

        ``states`` holds one state per rank, in any order (copies from processes that share a
        rank, such as tensor-parallel peers, must be equal). The result records this dataset's
        plan settings under ``"plan"``, so it must be called with the dataset that made them.
        """
        states = list(states)
        if not states:
            raise ValueError("merge_states needs at least one state")
        first = states[0]
        fields = ("version", "seed", "epoch", "world_size", "num_workers")
        ranks: dict[str, dict] = {}
        for state in states:
            if "ranks" in state:
                raise ValueError("merge_states takes per-rank states; this one is already global")
            for name in (*fields, "base"):
                if state.get(name) != first.get(name):
                    raise ValueError(f"the states disagree on {name!r}: {first.get(name)!r} and "
                                     f"{state.get(name)!r} (every rank must use the same "
                                     "settings and number of loader workers)")
            entry = {"shift": state.get("shift", 0), "consumed": dict(state["consumed"])}
            rank = str(state["rank"])
            if ranks.setdefault(rank, entry) != entry:
                raise ValueError(f"two different states for rank {rank}")
        world = first["world_size"]
        missing = sorted(set(range(world)) - {int(r) for r in ranks})
        if missing:
            raise ValueError(f"no state for ranks {missing} of world_size {world}")
        out = {name: first[name] for name in fields}
        out["plan"] = {"num_samples": int(sum(self._sizes())), **self._settings()}
        out["ranks"] = {r: ranks[r] for r in sorted(ranks, key=int)}
        if first.get("base") is not None:
            out["base"] = first["base"]
        return out

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`'s state; call it before creating the loader.

        A rank's own state resumes exactly on that rank with the same world size and number of
        loader workers. A global state (or a single-process one) resumes with anything: exactly
        when the world size, number of workers and plan settings are those it was taken with
        (decided when the loader starts, as only then is the number of workers known), else
        elastically, every sample of the epoch not yet consumed once over the new ranks.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported state version {state.get('version')!r}")
        rank, world = self.rank_world()
        if state["seed"] != self.seed:
            raise ValueError(f"state is from seed={state['seed']}; this dataset has seed={self.seed}")
        info = get_worker_info()
        self._epoch = state["epoch"]
        if "ranks" not in state:  # one rank's state
            if info is not None and self._resume is not None:  # merge per-worker states
                self._resume["consumed"].update(state["consumed"])
                return
            if info is None and state["world_size"] == 1 and "rank" in state:
                state = self.merge_states([state])  # a whole job's state: resumes with anything
            elif state["world_size"] != world or state.get("rank", rank) != rank:
                raise ValueError(
                    f"this state holds only rank {state.get('rank')}'s progress (of world_size="
                    f"{state['world_size']}); this dataset is rank {rank} of {world}. Resuming "
                    "with another world size needs every rank's state: call state_dict() on every "
                    "rank with the process group initialized (it gathers them), or combine the "
                    "ranks' states with merge_states()")
            else:
                self._rest = None
                if state.get("base") is not None:
                    self._rest = self._new_rest(state["epoch"], state["base"])
                self._resume = {"epoch": state["epoch"], "num_workers": state["num_workers"],
                                "shift": state.get("shift", 0),
                                "consumed": dict(state["consumed"])}
                return
        self._check_plan(state)
        self._rest, self._resume = None, dict(state)
        self._resolve_resume(None)

    def _resolve_resume(self, num_workers: int | None) -> None:
        """Turn a pending global state into this rank's exact resume or an elastic rest plan.

        ``num_workers`` is the loader's (None: not known yet; then only a world size change can
        be decided).
        """
        state = self._resume
        if state is None or "ranks" not in state or state["epoch"] != self._epoch:
            return
        rank, world = self.rank_world()
        same_plan = (state["world_size"] == world and
                     all(state["plan"].get(k) == v for k, v in self._settings().items()))
        if same_plan and num_workers is None:
            return
        epoch, base = state["epoch"], state.get("base")
        if same_plan and state["num_workers"] == num_workers:
            own = state["ranks"][str(rank)]
            self._rest = None if base is None else self._new_rest(epoch, base)
            self._resume = {"epoch": epoch, "num_workers": num_workers, "rank": rank,
                            "shift": own["shift"], "consumed": dict(own["consumed"])}
            return
        self._resume = None
        started = any(any(r["consumed"].values()) for r in state["ranks"].values())
        self._rest = self._new_rest(epoch, state) if started or base is not None else None

    def _new_rest(self, epoch: int, state: dict) -> dict:
        rest = {"epoch": epoch, "state": state, "stream": None, "level": None}
        self._rest_stream(rest)  # computed once here, before workers copy the dataset
        return rest

    def _rest_in_force(self) -> dict | None:
        rest = self._rest
        return rest if rest is not None and rest["epoch"] == self._epoch else None

    def _rest_stream(self, rest: dict):
        if rest["stream"] is None:
            rest["stream"], rest["level"] = self._stream_of(rest["state"])
        return rest["stream"]

    def _stream_of(self, state: dict):
        """The rest stream left by global state ``state`` and the level of its rest plan."""
        base = state.get("base")
        stream, level = (None, 0) if base is None else self._stream_of(base)
        self._check_plan(state)
        plan = state["plan"]
        world, workers = state["world_size"], state["num_workers"]
        consumed = [[int(state["ranks"][str(r)]["consumed"].get(str(w), 0)) for w in range(workers)]
                    for r in range(world)]
        out = planlib.rest_stream(self._sizes(), consumed, seed=state["seed"],
                                  epoch=state["epoch"], world_size=world, num_workers=workers,
                                  stream=stream, level=level, shuffle=plan["shuffle"],
                                  shuffle_buffer=plan["shuffle_buffer"],
                                  remainder=plan["remainder"], batch_size=plan["batch_size"],
                                  drop_last=plan["drop_last"])
        return out, level + 1

    def _settings(self) -> dict:
        return {name: getattr(self, name) for name in _PLAN_SETTINGS}

    def _check_plan(self, state: dict) -> None:
        """A global state's plan must be over this dataset's samples and global stream."""
        plan, total = state.get("plan", {}), int(sum(self._sizes()))
        if plan.get("num_samples") != total:
            raise ValueError(f"the state is of a dataset of {plan.get('num_samples')} samples; "
                             f"this one has {total}: a changed dataset cannot resume mid-epoch")
        for name in ("shuffle", "block_size"):
            if plan.get(name) != getattr(self, name):
                raise ValueError(f"the state was taken with {name}={plan.get(name)!r}; it decides "
                                 f"the epoch's order, so resume with the same (got "
                                 f"{getattr(self, name)!r})")

    def _progress_state(self) -> dict:
        """Per-role samples consumed, from the number of items the loader handed to the user."""
        p = self._progress
        W = p["num_workers"]
        if W == 0:
            return {"num_workers": 1, "shift": 0, "consumed": {"0": p["base"].get("0", 0) + p["samples"]}}
        counts = []  # per DataLoader worker: remaining item sizes in order
        for j in range(W):
            role = (j + p["shift"]) % W
            sizes = self._item_sizes(role, W)
            done = p["base"].get(str(role), 0)
            k = 0
            while k < len(sizes) and done > 0:
                done -= sizes[k]
                k += 1
            counts.append(sizes[k:])
        taken = [0] * W
        consumed = {str((j + p["shift"]) % W): p["base"].get(str((j + p["shift"]) % W), 0)
                    for j in range(W)}
        k, j, next_j = p["items"], 0, 0
        while k > 0:
            active = [w for w in range(W) if taken[w] < len(counts[w])]
            if not active:
                break
            for w in range(W):
                if k == 0:
                    break
                if taken[w] < len(counts[w]):
                    role = str((w + p["shift"]) % W)
                    consumed[role] += counts[w][taken[w]]
                    taken[w] += 1
                    k -= 1
                    next_j = (w + 1) % W
        return {"num_workers": W, "shift": (next_j + p["shift"]) % W if p["items"] else p["shift"],
                "consumed": consumed}

    def _item_sizes(self, role: int, num_workers: int) -> list[int]:
        plan = self._plan(role, num_workers)
        return list(plan.batch_sizes) if self.batch_size else [1] * plan.num_samples


class _Sink:
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
        self.out = _batch_buffer(shape, self.ring)
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


def _put(slot: np.ndarray, im) -> bool:
    """Copy an H×W×C uint8 array, or a C×H×W uint8 tensor, into ``slot`` if it fits."""
    if isinstance(im, torch.Tensor) and im.dim() == 3:
        im = im.permute(1, 2, 0).numpy()
    if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.shape != slot.shape:
        return False
    slot[...] = im
    return True


def _batch_buffer(shape: tuple, ring=None) -> torch.Tensor:
    """An uninitialised uint8 N×H×W×C tensor for a batch: in shared memory inside a DataLoader
    worker (from ``ring`` when there is one), so sending it to the main process copies nothing."""
    numel = int(np.prod(shape))
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    if ring is not None:
        return ring.take(numel).view(shape)
    return _flat(torch.UntypedStorage._new_shared(numel)).view(shape)


def _batch(images: list, chw: tuple, ring=None) -> torch.Tensor:
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
    out = _batch_buffer((len(images), h, w, c), ring)
    if isinstance(images[0], np.ndarray):
        dst = out.numpy()
        for i, im in enumerate(images):
            dst[i] = im
    else:
        nchw = out.permute(0, 3, 1, 2)
        for i, im in enumerate(images):
            nchw[i].copy_(im)
    return out.permute(0, 3, 1, 2)


_MALLOC_TUNED_PID = None


def _tune_worker_malloc() -> None:
    """Keep a DataLoader worker's freed sample buffers for the next samples (glibc only).

    Each sample's bytes get a buffer of their own (100-200 KB), and a batch's worth (~40 MB) is
    freed at once. glibc serves such sizes with a fresh mmap, or from a heap whose free top it
    gives back past 128 KB-64 MB: either way buffers keep arriving as new pages, a page fault
    per 4 KiB — in a worker the costliest line of the read path (2 workers, 224 tensor shards:
    12,100 samples/s with a 64 MB trim threshold, 18,600 with 256 MB). Raising the mmap and trim
    thresholds to 32 / 256 MB lets freed buffers be reused. Once per worker process.
    """
    global _MALLOC_TUNED_PID
    if _MALLOC_TUNED_PID == os.getpid():
        return
    _MALLOC_TUNED_PID = os.getpid()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: its allocator decides


def _initialized_dist():
    """``torch.distributed`` when a process group is initialized, else None."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def _read_exact(stream, n: int) -> memoryview | None:
    """Exactly ``n`` bytes from ``stream``, or None when it ends first.

    ``readinto`` a buffer of our own: ``RawIOBase.read`` would read into a temporary buffer and
    copy it into a new ``bytes`` (an extra copy of every image, ~15 % slower measured). The
    buffer is not zeroed first (``bytearray(n)`` would write every byte once more)."""
    view, got = memoryview(np.empty(n, dtype=np.uint8)), 0
    while got < n:
        r = stream.readinto(view[got:])
        if not r:
            return None
        got += r
    return view


_MAX_TAIL = 64 << 10  # archive end the fast path reads at once (writers leave 1-10 KiB of zeros)
_USTAR_REGULAR = (0x30, 0)  # typeflag '0' or NUL


def _parse_sample(buf, url: str, views: bool) -> dict | None:
    """The members of one sample's bytes when they are plain USTAR members named
    ``<key>.<field>`` with one key, filling ``buf`` exactly; else None (the strict path decides).
    With ``views``, image and array fields are memoryviews of ``buf`` (no copy)."""
    mv = memoryview(buf)
    n, off = len(buf), 0
    sample: dict = {}
    key = None
    while off < n:
        if n - off < 512:
            return None
        h = mv[off:off + 512]
        if h[156] not in _USTAR_REGULAR or h[345] != 0 or h[124] & 0x80:
            return None  # not a plain file, a prefixed name, or a base-256 size
        try:
            size = int(bytes(h[124:136]).rstrip(b"\0 ") or b"0", 8)
            checksum = int(bytes(h[148:156]).rstrip(b"\0 "), 8)
            name = bytes(h[0:100]).split(b"\0", 1)[0].decode("ascii")
        except ValueError:
            return None
        if sum(h) - sum(h[148:156]) + 256 != checksum or not _MEMBER.fullmatch(name):
            return None
        start = off + 512
        end = start + size
        if end > n:
            return None
        k, field = name.split(".", 1)
        field = field.lower()
        if key is None:
            key = k
            sample = {"__key__": key, "__url__": url}
        elif k != key or field in sample:
            return None
        if views and (field == "npy" or field in IMAGE_FIELDS):
            sample[field] = mv[start:end]
        else:
            sample[field] = bytes(mv[start:end])
        off = start + ((size + 511) & ~511)
    if off != n or key is None:
        return None
    return sample


_PREFETCH_SPANS = 2  # a remote shard cache downloads the shards of this many spans ahead


def _split_member(name: str, url: str) -> tuple[str, str]:
    """``<key>.<field>`` of a member name (field lower-cased); anything else is a ShardError."""
    if not _MEMBER.fullmatch(name):
        key = name.split(".", 1)[0][:64]
        raise ShardError(url, f"member name {name[:80]!r} is not <key>.<field> (unsafe or foreign)",
                         key=key)
    key, field = name.split(".", 1)
    return key, field.lower()


def _default_memory_limit() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 8 * 10**9
