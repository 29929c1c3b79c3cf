"""A caller's own list of shard URLs, wherever each lives."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator

from ..errors import ShardError
from ..gzipped import is_shard_name
from ..shardformat import index_name
from .base import BaseStore, Store, redact
from .urls import open_store, remote_protocols, split_file_url


class _Routed(BaseStore):
    """A store whose names are routed to the stores of their own folders (``_file``)."""

    def _file(self, name: str) -> tuple[Store, str]:
        raise NotImplementedError

    def url(self, name: str) -> str:
        store, own = self._file(name)
        return store.url(own)

    def is_local(self, name: str) -> bool:
        store, own = self._file(name)
        return store.is_local(own)

    def read_bytes(self, name: str) -> bytes:
        store, own = self._file(name)
        return store.read_bytes(own)

    def size(self, name: str) -> int | None:
        store, own = self._file(name)
        return store.size(own)

    def stamp(self, name: str) -> str | None:
        store, own = self._file(name)
        return store.stamp(own)

    def open_range(self, name: str, start: int, stop: int) -> io.RawIOBase:
        store, own = self._file(name)
        return store.open_range(own, start, stop)

    def iter_bytes(self, name: str, start: int, stop: int,
                   chunk: int = 1 << 20) -> Iterator[bytes]:
        store, own = self._file(name)
        return store.iter_bytes(own, start, stop, chunk)


class ListedStore(_Routed):
    """The shard files a caller listed (``.tar``, ``.tar.gz``, ``.tgz``), each with the index file
    beside it (the same name with ``.idx`` instead of ``.tar``), wherever each lives: local
    paths, ``s3://`` and ``http(s)://`` URLs on any host or prefix, and those of any other
    protocol fsspec knows (``gs://``, …). Each file is read through the store of its own folder
    or prefix.

    Names are the files' display URLs (credentials removed); nothing but the listed files and
    their index files can be read through it. Built by :meth:`shardkit.Manifest.from_urls` only:
    a manifest file never gets one, so only the caller's code decides where reads go.
    ``storage_options`` apply to every remote URL, or per protocol when keyed by protocols
    (``"s3"``, ``"https"``, ``"gs"``, …)."""

    def __init__(self, urls: Iterable[str | os.PathLike[str]], storage_options: dict | None = None,
                 *, timeout: float = 60.0, retries: int = 6) -> None:
        if isinstance(urls, (str, bytes, os.PathLike)):
            raise TypeError("pass a list of shard URLs, not a single one")
        self._files: dict[str, tuple[Store, str]] = {}
        # (shard URL, index URLs to try: .shardkit/x.idx, then x.idx of format version 1)
        self.shards: list[tuple[str, tuple[str, ...]]] = []
        stores: dict[tuple[str, str], Store] = {}
        for url in urls:
            protocol, base, name = split_file_url(url)
            if not is_shard_name(name):
                raise ValueError(f"{redact(os.fspath(url))}: a shard URL must name a .tar file "
                                 "(or .tar.gz, .tgz; its index is .shardkit/<name>.idx beside it)")
            store = stores.get((protocol, base))
            if store is None:
                store = open_store(protocol, base, _options_for(storage_options, protocol),
                                   retries=retries, timeout=timeout)
                stores[(protocol, base)] = store
            shard_url = store.url(name)
            if shard_url in self._files:
                raise ValueError(f"{shard_url}: listed twice")
            self._files[shard_url] = (store, name)
            indexes = []
            for index in (index_name(name), index_name(name, legacy=True)):
                self._files[store.url(index)] = (store, index)
                indexes.append(store.url(index))
            self.shards.append((shard_url, tuple(indexes)))
        if not self.shards:
            raise ValueError("no shard URLs given")

    def _file(self, name: str) -> tuple[Store, str]:
        try:
            return self._files[name]
        except (KeyError, TypeError):
            raise ShardError(str(name), "not one of the listed shard URLs") from None

    def url(self, name: str) -> str:
        return name


def _options_for(storage_options: dict | None, protocol: str) -> dict | None:
    """``storage_options`` for one protocol: the dict itself, or its entry for ``protocol`` when
    it is keyed by protocols."""
    if storage_options and set(storage_options) <= remote_protocols() \
            and all(v is None or isinstance(v, dict) for v in storage_options.values()):
        return storage_options.get(protocol)
    return storage_options



class MixedStore(_Routed):
    """The store of a signed manifest written by ``shardkit index --out`` (see
    :mod:`shardkit.signing`): its index files are plain relative names read from ``home``, the
    manifest's own folder or prefix; its shards may also be full URLs or absolute paths, each
    read through the store of its own folder or prefix (a URL's query string kept: pre-signed
    and hub ``resolve`` URLs). Only :meth:`shardkit.Manifest.load` makes one, and only for a
    manifest whose signature holds."""

    def __init__(self, home: Store, storage_options: dict | None = None, *,
                 timeout: float = 60.0, retries: int = 6) -> None:
        self.home = home
        self._options, self._timeout, self._retries = storage_options, timeout, retries
        self._stores: dict[tuple[str, str], Store] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_stores"] = {}  # made again where used
        return state

    def _file(self, name: str) -> tuple[Store, str]:
        if "://" not in name and not name.startswith("/"):
            return self.home, name
        protocol, base, own = split_file_url(name, query=True)
        store = self._stores.get((protocol, base))
        if store is None:
            store = open_store(protocol, base, _options_for(self._options, protocol),
                               retries=self._retries, timeout=self._timeout)
            self._stores[(protocol, base)] = store
        return store, own

