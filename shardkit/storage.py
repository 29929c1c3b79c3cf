"""Where a dataset lives and how its bytes are read.

A *source* is a dataset folder, a ``manifest.json`` path, or (later) an object-store URL. It resolves
to a base location plus the manifest; shard and index URLs in the manifest are relative names
resolved inside that base, never elsewhere.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from .errors import ShardError
from .manifest import MANIFEST_NAME, Manifest


def load_manifest(source, storage_options: dict | None = None) -> Manifest:
    if isinstance(source, Manifest):
        return source
    text = str(source)
    if "://" in text and not text.startswith("file://"):
        raise NotImplementedError(f"{text}: remote sources (s3://, http://) are not supported yet")
    if text.startswith("file://"):
        text = text[len("file://"):]
    return Manifest.load(text, storage_options=storage_options)


class LocalStore:
    """Reads shard and index files below a local folder."""

    def __init__(self, base: str):
        self.base = Path(base)

    def url(self, name: str) -> str:
        return str(self.base / name)

    def read_bytes(self, name: str) -> bytes:
        try:
            return (self.base / name).read_bytes()
        except OSError as exc:
            raise ShardError(self.url(name), f"cannot read: {exc.strerror or exc}") from exc

    def open_range(self, name: str, start: int, stop: int):
        """A file object positioned at ``start`` that ends at ``stop`` (exclusive)."""
        try:
            f = open(self.base / name, "rb", buffering=0)
            f.seek(start)
        except OSError as exc:
            raise ShardError(self.url(name), f"cannot open: {exc.strerror or exc}") from exc
        return RangeReader(f, stop - start)


class RangeReader(io.RawIOBase):
    """At most ``length`` bytes of an underlying file object; tracks how many were read."""

    def __init__(self, raw, length: int):
        self.raw, self.remaining, self.consumed = raw, length, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.remaining <= 0:
            return 0
        view = memoryview(buf)[: self.remaining]
        n = self.raw.readinto(view) or 0
        self.remaining -= n
        self.consumed += n
        return n

    def close(self) -> None:
        try:
            self.raw.close()
        finally:
            super().close()


def store_for(manifest: Manifest):
    base = manifest.base_url or os.getcwd()
    return LocalStore(base)


__all__ = ["LocalStore", "RangeReader", "load_manifest", "store_for", "MANIFEST_NAME"]
