"""Where a reader's bytes come from, and what it starts ahead of its spans.

:class:`Fetcher` opens a byte range of a shard, or a shard's index file: from its store, or for a
remote store with ``cache_dir`` through the shared on-disk shard cache (:mod:`shardkit.cache`:
downloaded once per machine, checked by sha256 or BLAKE3). At each span it starts what the next
spans will need, so that the reader does not wait for it then:

- remote shards of the next ``PREFETCH_SPANS`` spans: their cache downloads (a worker's shuffle
  buffer fills from blocks all over the dataset; one download at a time left the network idle
  while it decoded);
- remote index files of the next ``PREFETCH_INDEXES`` spans (one round trip each: 9 serial GETs
  came before a worker's first batch of 256 from a 1,000-sample buffer);
- local spans, while reads are cold and wait in the worker's own thread: the current span and the
  next one read into the page cache by the process's helper thread
  (:mod:`shardkit.storage.readahead`). Not once the reads have a thread of their own
  (:class:`~shardkit.background.Background`, a cold disk under a decoding worker): that thread
  reads all along and the kernel's readahead keeps the disk busy with the bytes it reads next;
  the helper's reads of the next span then only took the disk from them (raw JPEG on the
  emulated HDD with whole-shard blocks: 5-6% faster without them, ``bench --hdd``).

Per process (never pickled into DataLoader workers): the cache handle, what was started ahead.
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Container, Sequence

import numpy as np

from . import background
from .errors import ManifestError, ShardError
from .gzipped import is_compressed
from .shardformat import index_size
from .storage import LocalStore, readahead
from .storage.local import cache_misses

if TYPE_CHECKING:
    from .cache import ShardCache

PREFETCH_SPANS = 2  # a remote shard cache downloads the shards of this many spans ahead
PREFETCH_INDEXES = 8  # ... and the index files of this many (small: one GET each)

Shard = Callable[[int], Any]  # shard number -> (store, ShardInfo)


class Fetcher:
    """Opens shard bytes and index files (see the module docstring); ``cache_dir`` /
    ``cache_limit``: the shared shard cache for remote stores (None: read from the store)."""

    def __init__(self, cache_dir: str | None = None, cache_limit: int | None = None) -> None:
        self.cache_dir, self.cache_limit = cache_dir, cache_limit
        self._per_process()

    def _per_process(self) -> None:
        self._cache: ShardCache | None = None
        self._prefetched: set[int] = set()  # shards whose cache download this process started
        self._index_prefetched: set[int] = set()  # ... and index files
        self._misses_seen = -1  # cache_misses() at the last span's start (-1: none yet)
        self._no_index: set[int] = set()  # shards whose index the read-ahead could not load

    def __getstate__(self) -> dict:
        return {"cache_dir": self.cache_dir, "cache_limit": self.cache_limit}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._per_process()

    def begin(self) -> None:
        """A new iteration: its first span's own reads tell whether local reads are cold; an
        index that could not be loaded is tried again."""
        self._misses_seen = -1
        self._no_index.clear()

    # ----------------------------------------------------------------- opening
    def cached(self, store, url: str) -> bool:
        """Whether ``url`` of ``store`` is read through the shard cache."""
        return self.cache_dir is not None and not store.is_local(url)

    def open(self, store, shard, lo: int, hi: int, prefetch: bool = False):
        """Bytes ``[lo, hi)`` of a shard of ``store``: through the shared on-disk cache when there
        is one (``prefetch``: see ``ShardCache.open``)."""
        if not self.cached(store, shard.url):
            return store.open_range(shard.url, lo, hi)
        return self._shard_cache().open(
            _cache_key(store, shard.url), size=shard.num_bytes, sha256=shard.sha256,
            blake3=shard.blake3, fetch=lambda offset: store.iter_bytes(shard.url, offset, shard.num_bytes),
            start=lo, stop=hi, prefetch=prefetch)

    def index_bytes(self, store, shard) -> bytes:
        """A remote shard's index file through the shard cache (checked by its sha256 there):
        every worker and rank of a machine after the first reads it from disk, not the network."""
        stream = self._open_index(store, shard)
        try:
            return stream.read(index_size(shard.num_samples))  # short only at its end
        finally:
            stream.close()

    def _open_index(self, store, shard, prefetch: bool = False):
        size = index_size(shard.num_samples)
        return self._shard_cache().open(
            _cache_key(store, shard.index_url), size=size, sha256=shard.index_sha256,
            fetch=partial(_fetch_index, store, shard.index_url, size), prefetch=prefetch)

    def _shard_cache(self) -> ShardCache:
        if self._cache is None:
            from .cache import ShardCache

            assert self.cache_dir is not None  # only called with a cache
            self._cache = ShardCache(self.cache_dir, self.cache_limit)
        return self._cache

    # ----------------------------------------------------------------- ahead
    def ahead(self, spans: Sequence, k: int, first: int, shard: Shard,
              offsets: Callable[[int], np.ndarray], known: Container[int],
              faulted: Container[int]) -> None:
        """At span ``k`` of ``spans`` (read from its sample ``first``), start what the next spans
        need (see the module docstring). ``shard(n)``: ``(store, ShardInfo)``; ``offsets(n)``: a
        shard's index; ``known``: shards whose index is at hand; ``faulted``: shards not to
        touch again in this iteration."""
        self._prefetch(spans[k + 1:k + 1 + PREFETCH_SPANS], shard)
        self._prefetch_indexes(spans[k + 1:k + 1 + PREFETCH_INDEXES], shard, known)
        self._read_ahead(spans, k, first, shard, offsets, faulted)

    def _prefetch(self, spans, shard: Shard) -> None:
        """Start the cache downloads of the remote shards of ``spans``; nothing when the cache is
        too small to hold the shards in flight."""
        if self.cache_dir is None:
            return
        for span in spans:
            store, info = shard(span.shard)
            if isinstance(store, LocalStore) or not self.cached(store, info.url) \
                    or span.shard in self._prefetched:
                continue
            if self.cache_limit is not None and self.cache_limit < 4 * info.num_bytes:
                return
            self._prefetched.add(span.shard)
            try:
                opened = self.open(store, info, 0, 0, prefetch=True)
            except (OSError, ShardError):  # only a head start: reading it will say what is wrong
                continue
            if opened is not None:
                opened.close()  # the download goes on

    def _prefetch_indexes(self, spans, shard: Shard, known: Container[int]) -> None:
        """Start the cache downloads of the remote index files of ``spans``' shards."""
        if self.cache_dir is None:
            return
        for span in spans:
            if span.shard in known or span.shard in self._index_prefetched:
                continue
            store, info = shard(span.shard)
            if isinstance(store, LocalStore) or not self.cached(store, info.index_url):
                continue
            self._index_prefetched.add(span.shard)
            try:
                opened = self._open_index(store, info, prefetch=True)
            except (OSError, ShardError, ValueError):  # only a head start
                continue
            if opened is not None:
                opened.close()  # the download goes on

    def _read_ahead(self, spans, k: int, first: int, shard: Shard,
                    offsets: Callable[[int], np.ndarray], faulted: Container[int]) -> None:
        """While local reads are cold, have the process's ``ReadAhead`` read span ``k`` (from
        sample ``first``) and the next one into the page cache: whenever this process's reads
        missed the cache since the last span, or the helper's last range was cold. Not at an
        iteration's first span: warm reads then cost nothing extra; not on a reader thread of
        its own."""
        if background.running():
            return  # the reads have a thread of their own (see the module docstring)
        misses = cache_misses()
        helper = readahead.shared()
        seen, self._misses_seen = self._misses_seen, misses
        if seen < 0 or (misses == seen and not helper.found_cold):
            return  # an iteration's first span (its own reads tell), or reads are warm
        ranges = []
        for span, j in ((spans[k], first), *((s, s.start) for s in spans[k + 1:k + 2])):
            store, info = shard(span.shard)
            if not isinstance(store, LocalStore) or is_compressed(info.url) or j >= span.stop \
                    or span.shard in faulted or span.shard in self._no_index:
                continue
            try:
                index = offsets(span.shard)
            except (OSError, ShardError, ManifestError, ValueError):
                self._no_index.add(span.shard)  # not again: reading the span will say why
                continue
            if span.stop < len(index):
                ranges.append((store.base / info.url, int(index[j]), int(index[span.stop])))
        if ranges:
            helper.submit(ranges)


def _cache_key(store, url: str) -> str:
    """The shard cache's name for a remote file: its URL as messages show it (credentials
    redacted), so pre-signed URLs of one path differ by a digest of the query."""
    key = store.url(url)
    if "?" in url:
        key += "#" + hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return key


def _fetch_index(store, url: str, size: int, offset: int):
    """The bytes of an index file from ``offset`` on (a cache download's ``fetch``)."""
    return store.iter_bytes(url, offset, size)
