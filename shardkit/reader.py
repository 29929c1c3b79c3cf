"""Shard reader: a worker's spans (shard, first sample, stop) -> raw sample dicts, in read order.

Each span is one sequential range read from the sample's byte offset in the shard's index file
(:mod:`shardkit.shardformat`): through the store the manifest was loaded with, the shared on-disk
shard cache (remote shards; :mod:`shardkit.fetching` opens both and starts what the next spans
need), or shared memory (``preload``). Members are parsed by the fast parser
and, at the first sample it does not take, by the strict one from that sample on; both accept and
refuse exactly the same bytes. Samples are grouped at the index's byte boundaries, so a bad
sample costs only itself: reading restarts at the next sample's offset.

Per process (never pickled into DataLoader workers): the last few index files read, the shard
faults of the iteration, compressed shards' open decompressors.
"""

from __future__ import annotations

import bisect
import gc
import hashlib
import io
import logging
import os
import tarfile
from functools import partial
from typing import BinaryIO, Callable, Iterator, cast

import numpy as np
import torch

from .diagnosis import ShardFault, diagnose
from .errors import ManifestError, OnError, ShardError
from .fetching import Fetcher
from .gzipped import GunzipRange, is_compressed
from .shardformat import (
    BLOCK,
    END_OF_ARCHIVE,
    MAX_TAIL,
    decode_index,
    parse_sample,
    strict_samples,
)
from .skiplog import Region

log = logging.getLogger("shardkit")

RECENT_INDEXES = 32  # index files a process keeps (8 bytes per sample each)
PARKED_STREAMS = 4  # compressed shards' decompressors a process keeps open for their next span


class BadSample:
    """Stands in the read stream for a sample that could not be read (``on_error="skip"``)."""

    __slots__ = ("error", "shard")

    def __init__(self, error: Exception, shard: int | None = None):
        self.error, self.shard = error, shard


class ShardReader:
    """Reads spans of a manifest's shards (see the module docstring), or of several manifests'
    (the sources of a mixture: shard numbers run on from one source's to the next, and each
    sample says its source under ``"__source__"``).

    ``views``: image and array fields stay memoryviews of the read buffer (the batch fast path).
    ``cache_dir`` / ``cache_limit``: the shared shard cache for remote stores."""

    def __init__(self, manifest, *, on_error: OnError | str = OnError.RAISE, views: bool = False,
                 cache_dir: str | None = None, cache_limit: int | None = None):
        self.manifests = list(manifest) if isinstance(manifest, (list, tuple)) else [manifest]
        self.stores = [m.shard_store() for m in self.manifests]
        self.first = np.cumsum([0] + [len(m.shards) for m in self.manifests]).tolist()
        self.mixed = len(self.manifests) > 1
        self.on_error, self.views = OnError.of(on_error), views
        self.cache_dir, self.cache_limit = cache_dir, cache_limit
        self.fetcher = Fetcher(cache_dir, cache_limit)  # the store or the shard cache; ahead
        self.memory: dict[int, torch.Tensor] | None = None  # preloaded shards (shared memory)
        self._unloaded: dict[int, str] = {}  # why a shard could not be preloaded
        self._offsets_cache: dict[int, np.ndarray] = {}  # every index, with ``memory``
        self._per_process()

    def _per_process(self) -> None:
        self._faults: dict[int, ShardFault] = {}  # shard faults found in this iteration
        self._healthy: set[int] = set()  # shards diagnosed whole in this iteration
        self._recent: dict[int, np.ndarray] = {}  # LRU of indexes read by this process
        self._parked: dict[int, GunzipRange] = {}  # LRU of compressed shards' open streams
        self._parked_pid = os.getpid()  # (a forked DataLoader worker never uses its parent's)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_recent", "_faults", "_healthy", "_parked"):
            del state[name]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._per_process()

    # ----------------------------------------------------------------- whole dataset
    def preload(self, limit: int) -> None:
        """Load every shard into shared memory; later reads open no files."""
        if self.memory is None:
            total = sum(m.num_bytes for m in self.manifests)
            if total > limit:
                where = ", ".join(m.base_url or "the listed shards" for m in self.manifests)
                raise MemoryError(f"{where}: {total} bytes, over the in-memory limit of {limit} "
                                  "bytes (memory_limit=...); use in_memory=False")
            memory: dict = {}
            for s, (store, m) in enumerate(zip(self.stores, self.manifests)):
                first = self.first[s]
                mem, offsets, unloaded = preload(store, m, limit, self.on_error)
                memory.update({first + i: v for i, v in mem.items()})
                self._offsets_cache.update({first + i: v for i, v in offsets.items()})
                self._unloaded.update({first + i: v for i, v in unloaded.items()})
            self.memory = memory

    # ----------------------------------------------------------------- shards
    def source_of(self, shard_no: int) -> int:
        """The source (manifest) that shard number ``shard_no`` belongs to."""
        if not self.mixed:
            return 0
        return bisect.bisect_right(self.first, shard_no) - 1

    def shard(self, shard_no: int):
        """``(store, ShardInfo)`` of shard number ``shard_no``."""
        s = self.source_of(shard_no)
        return self.stores[s], self.manifests[s].shards[shard_no - self.first[s]]

    def url(self, shard_no: int) -> str:
        """The shard's URL as messages show it (credentials redacted)."""
        store, shard = self.shard(shard_no)
        return store.url(shard.url)

    def num_shards(self) -> int:
        return self.first[-1]

    # ----------------------------------------------------------------- spans
    def begin(self) -> None:
        """A new iteration: shard faults are looked at again (a file may have come back)."""
        self._faults.clear()
        self._healthy.clear()
        self.fetcher.begin()
        self.close_parked()

    def close_parked(self) -> None:
        """Close the decompressors kept for compressed shards' next spans."""
        parked, self._parked = self._parked, {}
        if self._parked_pid != os.getpid():  # a forked worker: the parent's to close
            self._parked_pid = os.getpid()
            return
        for stream in parked.values():
            stream.close()

    def read(self, spans, start: int, skips: Region,
             report: Callable[[int, ShardFault], None] | None = None) -> Iterator[tuple[int, object]]:
        """Yield ``(stream position, raw sample dict or BadSample)`` from position ``start`` on.

        A failure costs only what it makes unreadable. A bad sample costs itself: reading
        restarts at the next sample's byte offset from the index. A fault of the whole shard
        (missing, empty, truncated, not a tar, an unusable index, a store that gave up) is
        diagnosed once (:meth:`_diagnose`): the samples the index proves intact are still read,
        the others come as ``BadSample`` without touching the store again. Under
        ``on_error="raise"`` the first failure raises (the shard's fault when there is one).
        ``report(shard, fault)`` is told of each shard fault once per iteration.
        """
        pos = 0
        # What the next spans need is started at each span; at the first span read here only
        # once its own index and first sample are in: started before, the next spans' downloads
        # would share the bandwidth with them (a cold cache's first batch waited ~0.3 s more).
        first_span, later = True, None
        for k, span in enumerate(spans):
            n = span.stop - span.start
            if pos + n <= start:
                pos += n
                continue
            if self.memory is None:
                ahead = (spans, k, span.start + max(0, start - pos), self.shard, self.offsets,
                         self._recent, self._faults)
                if first_span:
                    later = ahead
                else:
                    self.fetcher.ahead(*ahead)
            first_span = False
            j = span.start + max(0, start - pos)
            offsets = self._offsets_or_fault(span.shard, report)
            source = self.source_of(span.shard) if self.mixed else None
            while j < span.stop:
                fault = self._faults.get(span.shard)
                if fault is not None and j >= fault.first_lost:
                    yield pos + j - span.start, BadSample(fault.error, span.shard)
                    j += 1
                    continue
                stop = span.stop if fault is None else min(span.stop, fault.first_lost)
                # offsets is None only with a fault from sample 0: every sample went to BadSample
                assert offsets is not None
                try:
                    for sample in self._samples(span.shard, offsets, j, stop, tail=fault is None):
                        if later is not None:  # (never raises: only a head start)
                            self.fetcher.ahead(*later)
                            later = None
                        if source is not None:
                            sample["__source__"] = source
                        yield pos + j - span.start, sample
                        j += 1
                except GeneratorExit:  # closed (matched first: at interpreter exit the module
                    raise  # globals the next clause names may be gone already)
                except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                    if not isinstance(exc, ShardError):
                        exc = ShardError(self.url(span.shard), f"corrupt tar data at sample {j}: {exc}")
                    if fault is not None and exc.gave_up:  # the store gave up again, earlier in
                        # the shard: nothing from here on is tried again (no request per sample)
                        self._faults[span.shard] = ShardFault(j, fault.error)
                        continue
                    if fault is None and span.shard not in self._healthy:
                        fault = self._diagnose(span.shard, offsets, j, exc)
                        if fault is not None:
                            self._fault(span.shard, fault, report)
                            continue  # the intact samples from j on, then BadSamples
                        self._healthy.add(span.shard)  # only samples are bad: not asked again
                    if self.on_error.raises:
                        raise exc from None
                    if j < span.stop:
                        yield pos + j - span.start, BadSample(exc, span.shard)
                    else:  # extra data after the shard's last sample: no slot to fill
                        skips.sample(span.shard)
                        log.warning("shardkit: %s", exc)
                    j += 1
            if later is not None:  # no sample read whole: the next spans' needs now
                self.fetcher.ahead(*later)
                later = None
            pos += n

    def _fault(self, shard_no: int, fault: ShardFault, report) -> None:
        """Record a shard fault for this iteration (raised at once under ``on_error="raise"``)."""
        if self.on_error.raises:
            raise fault.error from None
        self._faults[shard_no] = fault
        if report is not None:
            report(shard_no, fault)

    def _offsets_or_fault(self, shard_no: int, report) -> np.ndarray | None:
        """The shard's sample offsets, or None when its index is unusable (a fault from sample 0:
        an index that cannot be trusted proves no sample intact)."""
        if shard_no in self._faults and self._faults[shard_no].first_lost == 0:
            return None
        try:
            return self.offsets(shard_no)
        except ShardError as exc:
            self._fault(shard_no, ShardFault(0, exc), report)
            return None

    def _diagnose(self, shard_no: int, offsets: np.ndarray, j: int,
                  exc: ShardError) -> ShardFault | None:
        """Whether the failure at sample ``j`` is the whole shard's (:func:`diagnose`)."""
        store, shard = self.shard(shard_no)

        def size() -> int | None:
            if self.memory is not None:
                data = self.memory[shard_no]
                return None if data is None else len(data)
            return store.size(shard.url)

        return diagnose(shard, store.url(shard.url), offsets, j, exc, size,
                        partial(self._block, shard_no), self._unloaded.get(shard_no))

    def _block(self, shard_no: int, at: int) -> bytes | None:
        """The 512 bytes of a shard at ``at`` (of a compressed one: of its uncompressed stream),
        or None when they cannot be read."""
        try:
            store, shard = self.shard(shard_no)
            if is_compressed(shard.url):
                stream = self._gunzip(shard_no, at, at + BLOCK)
            elif self.memory is not None:
                return bytes(self.memory[shard_no][at:at + BLOCK].numpy())  # not None: size > 0
            else:
                stream = store.open_range(shard.url, at, at + BLOCK)
            try:
                head = read_upto(stream, BLOCK)
                return bytes(head) if len(head) == BLOCK else b""
            finally:
                stream.close()
        except (OSError, ShardError):
            return None

    def offsets(self, shard_no: int) -> np.ndarray:
        """The sample offsets of shard ``shard_no`` (its index file, checked)."""
        if shard_no in self._offsets_cache:
            return self._offsets_cache[shard_no]
        # A worker's plan visits a shard in several 64-sample spans: keep the last few indexes
        # instead of fetching the .idx again for each span.
        recent = self._recent
        if shard_no in recent:
            recent[shard_no] = recent.pop(shard_no)  # most recent last
            return recent[shard_no]
        store, shard = self.shard(shard_no)
        read = None
        if self.fetcher.cached(store, shard.index_url):  # once per machine, not per worker
            read = partial(self.fetcher.index_bytes, store, shard)
        offsets = load_index(store, shard, read)
        recent[shard_no] = offsets
        while len(recent) > RECENT_INDEXES:
            del recent[next(iter(recent))]
        return offsets

    # ----------------------------------------------------------------- samples
    def _range(self, shard_no: int, offsets: np.ndarray, first: int, stop: int, tail: bool = True):
        """``(lo, hi, ends, stream)``: the bytes of samples ``first .. stop-1`` (to the archive's
        end when ``stop`` is the last and ``tail``), the samples' ends relative to ``lo``, and a
        stream of them."""
        store, shard = self.shard(shard_no)
        lo = int(offsets[first])
        compressed = is_compressed(shard.url)
        # a compressed shard's end: its two zero blocks (the padding after them is not read)
        end = int(offsets[-1]) + len(END_OF_ARCHIVE) if compressed else shard.num_bytes
        hi = end if tail and stop == len(offsets) - 1 else int(offsets[stop])
        ends = (offsets[first + 1:stop + 1] - lo).tolist()
        stream: io.RawIOBase | BinaryIO
        if compressed:  # the whole file read: its CRC checked after the last sample
            stream = self._gunzip(shard_no, lo, hi, to_end=tail and stop == len(offsets) - 1)
        elif self.memory is not None:
            data = self.memory[shard_no]
            if data is None:
                raise ShardError(store.url(shard.url), "could not be preloaded: "
                                 + self._unloaded.get(shard_no, "unreadable"))
            # numpy's stubs give ndarray its buffer protocol (__buffer__) only for Python 3.12+
            stream = io.BytesIO(memoryview(data.numpy())[lo:hi])  # type: ignore[arg-type]  # numpy stubs
        else:
            stream = self.fetcher.open(store, shard, lo, hi)
        return lo, hi, ends, stream

    def samples(self, shard_no: int, first: int, stop: int) -> Iterator[dict]:
        """Raw samples ``first .. stop-1`` of shard ``shard_no``, in one read (random access,
        a look at a dataset); errors raise, naming the shard and key."""
        return self._samples(shard_no, self.offsets(shard_no), first, stop, tail=False)

    def _samples(self, shard_no: int, offsets: np.ndarray, first: int, stop: int,
                 tail: bool = True) -> Iterator[dict]:
        """Samples ``first .. stop-1`` of a shard, each exactly the bytes the index gives it.

        The fast path reads each sample's bytes in one call and parses its plain USTAR headers
        directly (what shardkit writes). Anything else — a checksum that does not match, a pax or
        GNU header, a member crossing the boundary, a short read, a non-zero archive end — hands
        over to the strict ``tarfile``-based path at that sample, which decides and names the
        error; so both paths accept and refuse exactly the same shards.
        """
        store, shard = self.shard(shard_no)
        url, index_url = store.url(shard.url), store.url(shard.index_url)
        views = self.views
        lo, hi, ends, stream = self._range(shard_no, offsets, first, stop, tail)
        k, prev, sample_key = 0, 0, None
        done = False  # the span read whole by the fast path: a compressed shard's stream is kept
        try:
            read: list = []  # the bytes read since sample k's start: the strict path gets them
            for k, end in enumerate(ends):  # noqa: B007 - k is where the strict path takes over
                buf = read_upto(stream, end - prev)
                read = [buf]
                sample = parse_sample(buf, url, views) if len(buf) == end - prev else None
                if sample is None:
                    break
                if k == len(ends) - 1 and hi - lo > end:  # the archive's end: zero blocks only
                    if hi - lo - end > MAX_TAIL:  # not what a writer leaves: the strict path
                        break                     # streams it (no buffer of a claimed size)
                    end_blocks = read_upto(stream, hi - lo - end)
                    # and the stream's end, where a streamed download is checked (its hash)
                    after = stream.read(1)
                    read += [end_blocks, after]
                    if len(end_blocks) != hi - lo - end or after \
                            or bytes(end_blocks).count(0) != len(end_blocks):
                        break
                prev, sample_key = end, sample["__key__"]
                yield sample
            else:
                done = True
                return
            # The strict path goes on from sample k over the same stream (one request per span,
            # each byte read once), starting with the bytes the fast path has read of it.
            rest = cast(BinaryIO, Replay(read, stream))  # a RawIOBase: all tarfile's stream mode needs
            yield from strict_samples(rest, url, [e - prev for e in ends[k:]], first + k,
                                      len(offsets) - 1, hi - lo - prev, prev_key=sample_key,
                                      index_url=index_url)
        finally:
            if done and isinstance(stream, GunzipRange) and stop < len(offsets) - 1:
                self._park(shard_no, stream)
            else:
                stream.close()

    def _park(self, shard_no: int, stream: GunzipRange) -> None:
        """Keep a compressed shard's stream for the shard's next span (the last
        ``PARKED_STREAMS``): a worker that reads several spans of a shard in order decompresses
        it once, not once per span."""
        self._parked[shard_no] = stream
        while len(self._parked) > PARKED_STREAMS:
            self._parked.pop(next(iter(self._parked))).close()

    def _gunzip(self, shard_no: int, lo: int, hi: int, to_end: bool = False) -> GunzipRange:
        """Bytes ``[lo, hi)`` of a compressed shard's uncompressed stream: the file as stored
        (from the store, the cache, or memory) decompressed from its start, in bounded pieces,
        what comes before ``lo`` discarded; or the stream an earlier span of the shard left
        (:meth:`_park`) when it has not gone past ``lo``."""
        if self._parked_pid != os.getpid():
            self._parked, self._parked_pid = {}, os.getpid()
        parked = self._parked.pop(shard_no, None)
        if parked is not None:  # the end of an earlier span: on from there when it lies before
            if parked.pos <= lo:
                try:
                    parked.move(lo, hi, to_end)
                except BaseException:
                    parked.close()
                    raise
                return parked
            parked.close()
        store, shard = self.shard(shard_no)
        if self.memory is not None:
            data = self.memory[shard_no]
            if data is None:
                raise ShardError(store.url(shard.url), "could not be preloaded: "
                                 + self._unloaded.get(shard_no, "unreadable"))
            raw = MemoryReader(memoryview(data.numpy()))  # type: ignore[arg-type]  # numpy stubs
        else:
            raw = self.fetcher.open(store, shard, 0, shard.num_bytes)
        return GunzipRange(raw, store.url(shard.url), lo, hi, to_end)

def load_index(store, shard, read: Callable[[], bytes] | None = None) -> np.ndarray:
    """A shard's offsets from its index file (``read()``: its bytes from elsewhere, such as the
    shard cache), checked against the manifest; a ShardError naming the shard and its index
    otherwise."""
    url, index_url = store.url(shard.url), store.url(shard.index_url)
    try:
        data = store.read_bytes(shard.index_url) if read is None else read()
    except ShardError as exc:
        raise ShardError(url, f"its index {index_url} cannot be read ({exc.reason})") from None
    if hashlib.sha256(data).hexdigest() != shard.index_sha256:
        raise ShardError(url, f"its index {index_url} is not the one the manifest lists "
                              "(sha256 differs)")
    try:
        return decode_index(data, shard.num_samples, shard.num_bytes, index_url,
                            compressed=is_compressed(shard.url))
    except ManifestError as exc:
        reason = str(exc).removeprefix(f"{index_url}: ")
        raise ShardError(url, f"its index {index_url} does not match the manifest: {reason}") \
            from None


def preload(store, manifest, limit: int, on_error: OnError
            ) -> tuple[dict, dict[int, np.ndarray], dict[int, str]]:
    """Every shard of ``manifest`` in shared memory (None for one that could not be read under
    ``on_error="skip"``), its offsets, and why each unread shard could not be read."""
    m = manifest
    if m.num_bytes > limit:
        raise MemoryError(f"{m.base_url or 'the listed shards'}: dataset is {m.num_bytes} "
                          f"bytes, over the in-memory limit of {limit} bytes "
                          "(memory_limit=...); use in_memory=False")
    memory: dict = {}
    offsets: dict[int, np.ndarray] = {}
    unloaded: dict[int, str] = {}
    for i, shard in enumerate(m.shards):
        url = store.url(shard.url)
        try:
            data = store.read_bytes(shard.url)
        except ShardError as exc:  # skip mode: its samples will come as bad ones
            if on_error.raises:
                raise ShardError(url, f"missing or unreadable: {exc.reason}") from None
            data, unloaded[i] = None, exc.reason
        if data is not None and len(data) != shard.num_bytes and on_error.raises:
            raise ShardError(url, f"{len(data):,} bytes, the manifest says {shard.num_bytes:,}"
                                  + (" (truncated)" if len(data) < shard.num_bytes else ""))
        memory[i] = None if data is None else torch.frombuffer(
            bytearray(data) or bytearray(1), dtype=torch.uint8)[:len(data)].share_memory_()
        try:
            offsets[i] = load_index(store, shard)
        except ShardError:
            if on_error.raises:
                raise
    return memory, offsets, unloaded


def read_upto(stream, n: int) -> memoryview:
    """``n`` bytes from ``stream``, fewer only when it ends first.

    ``readinto`` a buffer of our own: ``RawIOBase.read`` would read into a temporary buffer and
    copy it into a new ``bytes`` (an extra copy of every image, ~15 % slower measured). The
    buffer is not zeroed first (``bytearray(n)`` would write every byte once more)."""
    # numpy's stubs give ndarray its buffer protocol (__buffer__) only for Python 3.12+
    view, got = memoryview(np.empty(n, dtype=np.uint8)), 0  # type: ignore[arg-type]  # numpy stubs (py3.11)
    while got < n:
        r = stream.readinto(view[got:])
        if not r:
            return view[:got]
        got += r
    return view


class MemoryReader(io.RawIOBase):
    """A stream of a buffer in memory, without copying it first (``io.BytesIO`` would)."""

    def __init__(self, view: memoryview):
        super().__init__()
        self._view, self._pos = view.cast("B"), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), len(self._view) - self._pos)
        memoryview(b).cast("B")[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n


class Replay(io.RawIOBase):
    """A stream that gives ``pieces`` (bytes already read from ``stream``) again, then the rest
    of ``stream``: the strict parser takes over where the fast one stopped without a second
    request for the same bytes."""

    def __init__(self, pieces, stream):
        super().__init__()
        self._pieces = [memoryview(p) for p in pieces if len(p)]
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._pieces:
            piece = self._pieces[0]
            n = min(len(b), len(piece))
            memoryview(b).cast("B")[:n] = piece[:n]
            if n == len(piece):
                self._pieces.pop(0)
            else:
                self._pieces[0] = piece[n:]
            return n
        return self._stream.readinto(b)

def default_memory_limit() -> int:
    """Half the machine's memory: the default ``memory_limit`` of ``in_memory=True``."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 8 * 10**9


_WORKER_TUNED_PID = None


def tune_worker() -> None:
    """Once per DataLoader worker process, at its first iteration: its heaps
    (:func:`_freeze_inherited_objects`, :func:`_keep_freed_buffers`). Once only: freezing again
    later would also keep the worker's own garbage cycles from ever being collected."""
    global _WORKER_TUNED_PID
    if _WORKER_TUNED_PID == os.getpid():
        return
    _WORKER_TUNED_PID = os.getpid()
    _freeze_inherited_objects()
    _keep_freed_buffers()


def _freeze_inherited_objects() -> None:
    """Leave the objects a forked worker inherited out of its garbage collections.

    A worker starts with a copy of the parent's heap (torch, the manifests, an S3 client: 10⁵-10⁶
    objects), all in the collector's oldest generation. The worker's first full collection walks
    every one of them: 0.19-0.29 s measured, once per worker and epoch where a worker allocates
    many long-lived objects (building an S3 client in each new worker set it off during the
    client's creation, before the worker's first GET), and each object it touches is a page
    copied out of the parent's. ``gc.freeze()`` moves them to the permanent generation, which
    collections skip (the recipe of the ``gc`` docs for fork without exec); objects the worker
    makes are collected as before.
    """
    gc.freeze()


def _keep_freed_buffers() -> None:
    """Keep a worker's freed sample buffers for the next samples (glibc only).

    Each sample's bytes get a buffer of their own (100-200 KB), and a batch's worth (~40 MB) is
    freed at once. glibc serves such sizes with a fresh mmap, or from a heap whose free top it
    gives back past 128 KB-64 MB: either way buffers keep arriving as new pages, a page fault
    per 4 KiB — in a worker the costliest line of the read path (2 workers, 224 tensor shards:
    12,100 samples/s with a 64 MB trim threshold, 18,600 with 256 MB). Raising the mmap and trim
    thresholds to 32 / 256 MB lets freed buffers be reused.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: its allocator decides
