"""What every store and every destination is: the contracts (``Store``, ``Dest``), the defaults
stores share (``BaseStore``), and ``redact``.

A *store* reads the files below one folder or prefix by plain relative name (the read path, the
cache, ``verify``, ``index``). A *destination* is where packing and indexing write: a local
folder or an object-store prefix, written so that a kill at any moment leaves either the old
state or the new one.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


def redact(url: str) -> str:
    """A URL without ``user:password@`` and without query-string secrets."""
    url = re.sub(r"(://)[^/@]*@", r"\1", url)
    return re.sub(r"\?.*$", "", url)


class Store(Protocol):
    """Files below one folder or prefix, by plain relative name. Implementations: ``local``,
    ``remote`` (one per protocol), ``generic`` (any other fsspec filesystem), ``listed`` (a
    caller's own list of URLs).

    Every method that reads raises :class:`~shardkit.errors.ShardError` naming the file's URL
    when it cannot (missing, unreadable, stalled past the store's timeout, out of retries);
    ``error.gave_up`` is true when trying again soon will not help. Names are data: a store
    never resolves one outside its folder or prefix (a listed store, outside its list).
    """

    def url(self, name: str) -> str:
        """The URL (or local path) of ``name`` for messages and the manifest, credentials
        removed. No I/O."""
        ...

    def read_bytes(self, name: str) -> bytes:
        """The whole file. ShardError when it cannot be read (reason ``"not found"`` for a
        missing remote object)."""
        ...

    def open_range(self, name: str, start: int, stop: int) -> io.RawIOBase:
        """A readable file object of the bytes ``[start, stop)``; the caller closes it. Errors
        (a ShardError) may come at the first read rather than here."""
        ...

    def is_local(self, name: str) -> bool:
        """Whether ``name`` is a local file (read in place, never through the shard cache)."""
        ...

    def stamp(self, name: str) -> str | None:
        """What changes when ``name`` is rewritten (a local file's size and mtime, an object's
        ETag); None when the store cannot say."""
        ...

    def list(self, suffix: str = "") -> list[str]:
        """The names of the files directly in this folder or prefix that end with ``suffix``,
        sorted (``shardkit index`` on a folder). NotImplementedError for a store that cannot
        list (a listed store)."""
        ...

    def size(self, name: str) -> int | None:
        """The size of ``name`` in bytes; None when it does not exist, -1 when the store does not
        know (a ShardError when it cannot say: unreachable, stalled)."""
        ...

    def iter_bytes(self, name: str, start: int, stop: int,
                   chunk: int = 1 << 20) -> Iterator[bytes]:
        """The bytes ``[start, stop)`` as a stream of chunks of at most ``chunk`` bytes (the
        cache's downloads); remote stores resume a dropped stream at the right byte."""
        ...


class BaseStore:
    """The defaults of a :class:`Store` that subclasses rely on: not local, no stamp, cannot
    list, size unknown to the base, ``iter_bytes`` through ``open_range``."""

    def url(self, name: str) -> str:
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def open_range(self, name: str, start: int, stop: int) -> io.RawIOBase:
        raise NotImplementedError

    def is_local(self, name: str) -> bool:
        """Whether ``name`` is a local file (read in place, never through the shard cache)."""
        return False

    def stamp(self, name: str) -> str | None:
        """What changes when ``name`` is rewritten; None: this store cannot say."""
        return None

    def list(self, suffix: str = "") -> list[str]:
        """Not every store can list its files (see :meth:`Store.list`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its files")

    def size(self, name: str) -> int | None:
        """See :meth:`Store.size`."""
        raise NotImplementedError

    def iter_bytes(self, name: str, start: int, stop: int,
                   chunk: int = 1 << 20) -> Iterator[bytes]:
        """The bytes ``[start, stop)`` as a stream of chunks (for the cache's downloads)."""
        reader = self.open_range(name, start, stop)
        try:
            while True:
                data = reader.read(chunk)
                if not data:
                    return
                yield data
        finally:
            reader.close()


class Dest(Protocol):
    """Where packing (and ``index``, and manifest companions) write: a local folder (temporary
    name, fsync, rename) or an object-store prefix (uploads, which are atomic). Names are plain
    relative names, at most one sub-folder deep (``.shardkit/manifest.json``).

    Write errors are ``OSError`` (disk full, read-only) or, remotely, a
    :class:`~shardkit.errors.ShardError` after the store's retries.
    """

    remote: bool  # an object store: no rename, uploads are durable when they return
    staging: Path  # a local folder where shards are written before ``commit``

    def url(self, name: str) -> str:
        """The URL (or local path) of ``name``, credentials removed; ``url("")`` the root."""
        ...

    def prepare(self) -> None:
        """Make the folder if needed; DestinationError when it is not one."""
        ...

    def names(self) -> list[str]:
        """The names in the folder and in its ``.shardkit/`` (as ``.shardkit/x``), any order."""
        ...

    def exists(self, name: str) -> bool:
        """Whether ``name`` exists."""
        ...

    def read_bytes(self, name: str) -> bytes | None:
        """The whole file, or None when it does not exist."""
        ...

    def write_atomic(self, name: str, data: bytes, sync: bool = True) -> None:
        """Write ``name`` whole or not at all; ``sync``: durable when this returns (else see
        :meth:`sync`)."""
        ...

    def sync(self, names: list[str]) -> None:
        """Make files written with ``sync=False`` durable, before a file that refers to them is
        written."""
        ...

    def commit(self, tmp: Path, name: str) -> None:
        """Move the finished local file ``tmp`` (in ``staging``) to ``name``, atomically."""
        ...

    def publish(self, journal: str, name: str, data: bytes) -> None:
        """Write ``data`` as ``name`` and remove ``journal``, in the safest order the storage
        allows (see each implementation)."""
        ...

    def remove(self, name: str) -> None:
        """Remove ``name``; a missing one is no error."""
        ...

    def remove_all(self, names: list[str]) -> None:
        """Remove ``names`` (missing ones ignored), in bulk where the storage can."""
        ...

    def intact(self, name: str, size: int | None, sha256: str | None) -> bool:
        """Whether ``name`` is the finished file recorded with this size (None: not known) and
        sha256; False when missing or unreadable."""
        ...

    def remove_temporaries(self, starting: tuple[str, ...] = (".",)) -> None:
        """Remove temporary files left by killed writers (``.<name>.tmp-<hex>``) whose name
        starts with one of ``starting`` (a part removes only its own)."""
        ...

    def close(self) -> None:
        """Release what the destination holds (a remote one's staging folder)."""
        ...
