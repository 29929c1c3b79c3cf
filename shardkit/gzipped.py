"""Compressed shards: ``.tar.gz`` / ``.tgz`` (as webdataset reads them), and gzip data named ``.tar``.

Which shards are compressed is told by their names alone (:func:`is_compressed`): nothing new in
the manifest, its columns file or the index file, so every manifest written before loads as it
did. A compressed shard is indexed like a plain one, its index file holding the sample offsets in
the *uncompressed* stream; the manifest keeps the file as stored (its size and hash: what the
cache stores and checks, what ``verify`` checks). The uncompressed size is nowhere recorded: the
offsets of a compressed shard's index are checked for order and spacing, not against its size.

A gzip stream cannot be entered in the middle, so a compressed shard is read by streaming it
from its start: :class:`GunzipRange` decompresses and discards up to its span's first sample,
then hands out the span's bytes; every buffer is bounded (a gzip bomb costs time, not memory).

A gzip file named ``.tar`` is refused wherever it is met (``index``, a shard list, the reader)
with :func:`gzip_named_tar`, which says what to do.
"""

from __future__ import annotations

import gzip
import io
import zlib
from typing import BinaryIO, Union, cast

from . import digests
from .errors import ShardError

GZIP_MAGIC = b"\x1f\x8b"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz")
SHARD_SUFFIXES = (".tar", *COMPRESSED_SUFFIXES)
SHARD_KINDS = ".tar, .tar.gz or .tgz"  # for messages
_SKIP_CHUNK = 1 << 20  # uncompressed bytes discarded per call while moving to a span's start
PADDING_LIMIT = 16 << 20  # uncompressed bytes after a tar's end blocks, at most (writers: ~10 KiB)
# Uncompressed bytes of one sample of a compressed shard, at most: a sample is read into memory
# whole, and deflate turns 1 MB into 1 GB (a plain shard's samples are bounded by its file).
SAMPLE_LIMIT = 256 << 20


def _name(url: str) -> str:
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def is_compressed(url: str) -> bool:
    """Whether a shard's name says it is gzip-compressed (``.tar.gz``, ``.tgz``)."""
    return _name(url).endswith(COMPRESSED_SUFFIXES)


def is_shard_name(url: str) -> bool:
    """Whether a name is one of a shard: ``.tar``, ``.tar.gz`` or ``.tgz`` (a name of its own
    before the suffix)."""
    name = _name(url)
    return any(name.endswith(s) and len(name) > len(s) for s in SHARD_SUFFIXES)


def gzip_named_tar(url: str) -> str:
    """What a gzip file met where a plain tar was expected is, and what to do (the reason of a
    :class:`ShardError` naming ``url``)."""
    name = _name(url)
    if is_compressed(url):
        return ("its uncompressed data is gzip-compressed again (compressed twice?): "
                "decompress it once (gunzip) and index the result")
    return (f"not a tar archive (gzip-compressed data named .tar): rename it to {name}.gz and "
            f"index that (read by streaming whole shards), or for range reads make it a plain "
            f"tar (mv {name} {name}.gz && gunzip {name}.gz) and index it again")


class GzipDataError(ShardError):
    """The gzip data of a compressed shard is corrupt or cut short: nothing after that point of
    the file can be read (``gave_up``: the reader does not try its later samples again)."""

    gave_up = True


class GunzipRange(io.RawIOBase):
    """Bytes ``[lo, hi)`` of the uncompressed stream of a gzip file (``hi`` None: to its end).

    ``raw``: the file as stored, from its start (a store's stream, the cache's, or memory); it
    is closed with this object. Decompression goes through :class:`gzip.GzipFile` (multi-member
    files, zero padding, CRC checks) in bounded pieces. :meth:`move` goes on to a later range of
    the same stream without starting again. ``to_end``: ``hi`` is the archive's end, and the
    read that finds the range over first decompresses the rest (the tar's padding, at most
    ``PADDING_LIMIT`` bytes), so that gzip checks its CRC and length (damage deflate itself does
    not notice, inside stored blocks, is found there). Corrupt or truncated gzip data is a
    :class:`GzipDataError` naming ``url`` and the uncompressed byte where it was met."""

    def __init__(self, raw: Union[io.RawIOBase, BinaryIO], url: str, lo: int = 0,
                 hi: int | None = None,
                 to_end: bool = False):
        super().__init__()
        self.url = url
        self._raw = raw
        self._gz = gzip.GzipFile(fileobj=cast(BinaryIO, raw), mode="rb")
        self.pos = 0  # in the uncompressed stream
        self.hi: int | None = None
        self._to_end = False
        try:
            self.move(lo, hi, to_end)
        except BaseException:
            self.close()
            raise

    def readable(self) -> bool:
        return True

    def move(self, lo: int, hi: int | None, to_end: bool = False) -> None:
        """Go on to bytes ``[lo, hi)``; ``lo`` must not be before the current position."""
        if lo < self.pos:
            raise ValueError(f"cannot move back in a gzip stream (at {self.pos}, asked {lo})")
        self.hi = None
        if lo > self.pos:
            scratch = bytearray(min(_SKIP_CHUNK, lo - self.pos))
            view = memoryview(scratch)
            while self.pos < lo:
                got = self._read(view[:min(len(view), lo - self.pos)])
                if not got:
                    raise GzipDataError(self.url, f"its uncompressed data ends at byte "
                                                  f"{self.pos:,}, before byte {lo:,} (truncated?)")
        self.hi, self._to_end = hi, to_end

    def _read(self, view: memoryview) -> int:
        try:
            got = self._gz.readinto(view)
        except (OSError, EOFError, zlib.error) as exc:
            if isinstance(exc, ShardError):  # the store's own (a timeout, a retry gave up)
                raise
            raise GzipDataError(self.url, f"corrupt or truncated gzip data after {self.pos:,} "
                                          f"uncompressed bytes: {exc}") from None
        self.pos += got
        return got

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")
        if self.hi is not None:
            if self.pos >= self.hi:
                if self._to_end:
                    self._to_end = False
                    self._finish()
                return 0
            view = view[:self.hi - self.pos]
        return self._read(view) if len(view) else 0

    def _finish(self) -> None:
        """Decompress the rest (gzip checks its CRC and length at the end), discarding it."""
        stop, view = self.pos + PADDING_LIMIT, memoryview(bytearray(1 << 16))
        while self._read(view):
            if self.pos > stop:
                raise GzipDataError(self.url, f"more than {PADDING_LIMIT:,} uncompressed bytes "
                                              "after the archive's end (not a tar's padding)")

    def close(self) -> None:
        if not self.closed:
            try:
                self._gz.close()
            finally:
                self._raw.close()
        super().close()


__all__ = ["COMPRESSED_SUFFIXES", "GZIP_MAGIC", "PADDING_LIMIT", "GunzipRange", "GzipDataError",
           "SHARD_KINDS", "SHARD_SUFFIXES", "gzip_named_tar", "is_compressed", "is_shard_name"]


# --------------------------------------------------------------------------- indexing


class CountedStream(io.RawIOBase):
    """A compressed shard's bytes as stored, counted and hashed (``algorithm``: sha256 or
    blake3) as the decompressor reads them."""

    def __init__(self, raw, algorithm: str = "sha256"):
        super().__init__()
        self._raw, self.count, self._digest = raw, 0, digests.new(algorithm)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        got = self._raw.readinto(b) or 0
        if got:
            self._digest.update(memoryview(b)[:got])
            self.count += got
        return got

    def result(self) -> tuple[int, str]:
        """Size and digest of the file: what is left after the gzip data read too."""
        while self.read(1 << 20):
            pass
        return self.count, self._digest.hexdigest()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class WalkedUncompressed(io.RawIOBase):
    """A compressed shard's uncompressed stream while it is walked: at most ``PADDING_LIMIT``
    bytes after the archive's end are decompressed (a gzip bomb of zeros after a small tar
    would take hours, not memory). ``walk``: the walk's state (its ``end``, once known)."""

    def __init__(self, gz: GunzipRange, walk, where: str):
        super().__init__()
        self._gz, self._walk, self._where = gz, walk, where

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if 0 <= self._walk.end and self._gz.pos > self._walk.end + PADDING_LIMIT:
            raise ShardError(self._where, f"more than {PADDING_LIMIT:,} uncompressed bytes after "
                                          "the archive's end (not a tar's padding)")
        return self._gz.readinto(b)

    def close(self) -> None:
        if not self.closed:
            self._gz.close()
        super().close()
