"""What every store is: names below one folder or prefix, read whole or by byte range."""

from __future__ import annotations

import re


def redact(url: str) -> str:
    """A URL without ``user:password@`` and without query-string secrets."""
    url = re.sub(r"(://)[^/@]*@", r"\1", url)
    return re.sub(r"\?.*$", "", url)


class Store:
    """Files below one folder or prefix, by plain relative name. Subclasses: ``local``,
    ``remote`` (one per protocol), ``listed`` (a caller's own list of URLs)."""

    def url(self, name: str) -> str: ...

    def read_bytes(self, name: str) -> bytes: ...

    def open_range(self, name: str, start: int, stop: int): ...

    def is_local(self, name: str) -> bool:
        """Whether ``name`` is a local file (read in place, never through the shard cache)."""
        return False

    def stamp(self, name: str) -> str | None:
        """What changes when ``name`` is rewritten (a local file's mtime, an object's ETag); None
        when the store cannot say."""
        return None

    def list(self, suffix: str = "") -> list[str]:
        """The names of the files directly in this folder or prefix that end with ``suffix``,
        sorted (``shardkit index`` on a folder)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its files")

    def size(self, name: str) -> int | None:
        """The size of ``name`` in bytes; None when it does not exist, -1 when the store does not
        know (a ShardError when it cannot say: unreachable, stalled)."""
        raise NotImplementedError

    def iter_bytes(self, name: str, start: int, stop: int, chunk: int = 1 << 20):
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
