"""What a failing read says about its whole shard: missing, empty, truncated, not a tar, or
a store that gave up, or only the sample is bad.

The reader asks once per shard and iteration, at the first failure (:func:`diagnose`); the
answer is a :class:`ShardFault` (the first sample that cannot be read, and the error naming the
shard) or None. The samples before ``first_lost`` that the index proves intact are still read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from .errors import ShardError
from .gzipped import GZIP_MAGIC, gzip_named_tar, is_compressed
from .shardformat import BLOCK, header_checksum_ok


@dataclass(frozen=True)
class ShardFault:
    """A fault of a whole shard: its samples from ``first_lost`` on cannot be read (``error``
    says why, naming the shard)."""

    first_lost: int
    error: ShardError


def diagnose(shard: Any, url: str, offsets: np.ndarray, j: int, exc: ShardError,
             size: Callable[[], Optional[int]], block: Callable[[int], Optional[bytes]],
             unloaded: Optional[str] = None) -> Optional[ShardFault]:
    """Whether the failure ``exc`` at sample ``j`` of ``shard`` (a manifest entry, at ``url``)
    is the whole shard's: the file is missing or empty, shorter than the manifest says, not a
    tar archive, or the store gave up on it. None when the file is as the manifest says (then
    only the sample is bad).

    ``size()`` is the file's size (None: it does not exist; a ShardError when that cannot be
    told), ``block(at)`` its 512 bytes at ``at`` (None when unreadable), ``unloaded`` why a
    preloaded shard could not be loaded.

    A compressed shard (``.tar.gz``): ``size()`` is the file's as stored, ``block(at)`` reads its
    uncompressed stream; its corrupt or cut gzip data is a fault from ``j`` on (``gave_up``)."""
    if exc.gave_up:  # the store gave up on the file (retries, a timeout, a wrong download)
        if type(exc) is not ShardError:  # a subclass says more (CacheIntegrityError): as it is
            return ShardFault(j, exc)
        return ShardFault(j, ShardError(url, f"unreadable from sample {j} on: {exc.reason}"))
    try:
        got = size()
    except ShardError as err:  # cannot even say how large it is
        return ShardFault(j, ShardError(url, f"unreadable from sample {j} on: {err.reason}"))
    expected, count = shard.num_bytes, len(offsets) - 1
    if got is None and unloaded is not None:  # preloaded: the reason it was not
        return ShardFault(0, ShardError(url, "missing or unreadable when preloaded: " + unloaded))
    if got is None or got == 0:
        what = "the file does not exist" if got is None else "the file has 0 bytes"
        return ShardFault(0, ShardError(url, f"missing or empty: {what}"))
    compressed = is_compressed(url)
    if compressed and got < expected:  # where the cut falls in the samples cannot be told
        return ShardFault(j, ShardError(
            url, f"truncated: the manifest says {expected:,} bytes, the file has {got:,} "
                 f"(gzip-compressed: samples from {j} of {count} on unreadable)", key=exc.key))
    tar, head = looks_like_a_tar(None if compressed else got, offsets, block)
    if not tar:
        if head.startswith(GZIP_MAGIC):
            return ShardFault(0, ShardError(url, gzip_named_tar(url)))
        return ShardFault(0, ShardError(url, f"not a tar archive{kind_of(head)}"))
    if got < expected:
        intact = int(np.searchsorted(offsets[1:], got, side="right"))
        return ShardFault(intact, ShardError(
            url, f"truncated: the index expects {expected:,} bytes, the file has {got:,} "
                 f"({intact} of {count} samples intact)", key=exc.key))
    return None


def looks_like_a_tar(size: Optional[int], offsets: np.ndarray,
                     block: Callable[[int], Optional[bytes]]) -> tuple[bool, bytes]:
    """Whether a tar header stands where the index puts the first, second or middle sample
    (one damaged header does not make a shard "not a tar"), and the first bytes looked at.
    ``size`` None: not known (a compressed shard's uncompressed stream)."""
    big = 2**63 if size is None else size
    where = sorted({int(offsets[i]) for i in (0, 1, (len(offsets) - 1) // 2)
                    if i < len(offsets) - 1 and int(offsets[i]) + BLOCK <= big})
    first = b""
    for k, at in enumerate(where):
        head = block(at)
        if k == 0:
            first = head or b""  # what the file starts with, for the message
        if head is None or header_checksum_ok(head):
            return True, first  # a header, or it cannot tell: leave it to the samples
    return (not where and big >= BLOCK), first


def kind_of(head: bytes) -> str:
    """What a file that is not a tar seems to be, for messages."""
    for magic, what in ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ", "xz"),
                        (b"(\xb5/\xfd", "zstd"), (b"PK\x03\x04", "zip")):
        if head.startswith(magic):
            return f" ({what}-compressed data; shards are plain, uncompressed tar)"
    return ""
