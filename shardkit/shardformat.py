"""The shard format: file names, tar members, samples, the end of an archive and the index file.

A dataset is a folder (or object-store prefix) holding ``<prefix>-000000.tar`` … and a hidden
folder ``.shardkit/`` with one index file per shard (``.shardkit/<prefix>-000000.idx``) and
``.shardkit/manifest.json`` (see :mod:`shardkit.manifest`), written last. The folder then holds
nothing but tar files for other readers (Hugging Face ``datasets`` opens every file it is not told
to skip as a tar, and skips hidden ones). Datasets of format version 1 keep ``manifest.json`` and
``<prefix>-000000.idx`` beside the shards; they are read as they are.

Shards are plain POSIX (USTAR) tar archives. A sample is a run of adjacent members named
``<key>.<field>``: the key holds no dot (webdataset splits a name at its first dot), the field is
the extension (``jpg``, ``cls``, ``json``, ``npy``, …). shardkit writes reproducible headers
(fixed mtime, uid/gid 0, empty owner names, mode 0644) and ends each archive with exactly
``END_OF_ARCHIVE`` (two zero blocks).

Index file (``.idx``): 8 magic bytes ``SKIDX\\x01\\0\\0``, then ``num_samples + 1`` little-endian
uint64 byte offsets: where each sample's first tar header starts, and finally where the
end-of-archive blocks start. A reader can start at any sample without reading what precedes it.

Two parsers read samples back, and accept and refuse exactly the same bytes:
:func:`parse_sample` is the fast one (one sample's bytes, plain USTAR members, no copy with
``views``); :func:`strict_samples` is :mod:`tarfile` in stream mode, which decides every other
case and names what is wrong.
"""

from __future__ import annotations

import re
import tarfile
from typing import BinaryIO, Iterator

import numpy as np

from .errors import ManifestError, ShardError

MANIFEST_NAME = "manifest.json"
MSGPACK_NAME = "manifest.msgpack"
META_DIR = ".shardkit"  # the hidden folder of a dataset's own files (format version 2)
MANIFEST_PATH = f"{META_DIR}/{MANIFEST_NAME}"
MSGPACK_PATH = f"{META_DIR}/{MSGPACK_NAME}"
INDEX_MAGIC = b"SKIDX\x01\0\0"
BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
MTIME = 946684800  # 2000-01-01T00:00:00Z: a fixed mtime makes shards byte-reproducible
FILE_MODE = 0o644
MAX_PIXELS = 100_000_000  # default pixel limit against decompression bombs (packing and reading)
# Image fields (member extensions) in the order a reader looks for them in a sample.
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_TAIL = 64 << 10  # archive end the fast parser accepts at once (writers leave 1-10 KiB of zeros)

_MEMBER = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_.-]+")
_USTAR_REGULAR = (0x30, 0)  # typeflag '0' or NUL
_ZEROS = bytes(BLOCK)


# --------------------------------------------------------------------------- writing members


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = MTIME
    info.mode = FILE_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


# Python's tarfile builds the reference header once; per member only the name, the size and the
# checksum change (byte-identical to ``_tarfile_header``, about 10x faster; tested).
_TEMPLATE = bytearray(_tarfile_header("", 0))
_TEMPLATE[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
_TEMPLATE_SUM = sum(_TEMPLATE)


def tar_header(name: str, size: int) -> bytes:
    """The reproducible USTAR header of a member ``name`` of ``size`` bytes."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or not raw.isascii() or size >= 8**11:
        return _tarfile_header(name, size)
    header = bytearray(_TEMPLATE)
    header[0:len(raw)] = raw
    header[124:136] = b"%011o\0" % size
    checksum = _TEMPLATE_SUM + sum(raw) + sum(header[124:136]) - sum(_TEMPLATE[124:136])
    header[148:156] = b"%06o\0 " % checksum
    return bytes(header)


def member_parts(name: str, data: bytes) -> list[bytes]:
    """One tar member as buffers: a reproducible USTAR header, the data, zero padding to 512."""
    pad = (-len(data)) % BLOCK
    header = tar_header(name, len(data))
    return [header, data, _ZEROS[:pad]] if pad else [header, data]


def member(name: str, data: bytes) -> bytes:
    """One tar member: a reproducible USTAR header, the data, zero padding to 512 bytes."""
    return b"".join(member_parts(name, data))


# --------------------------------------------------------------------------- member names


def split_member(name: str, url: str) -> tuple[str, str]:
    """``(key, field)`` of a member name ``<key>.<field>`` (field lower-cased); anything else
    (a path, no extension, unsafe characters) is a :class:`ShardError` naming the shard."""
    if not _MEMBER.fullmatch(name):
        key = name.split(".", 1)[0][:64]
        raise ShardError(url, f"member name {name[:80]!r} is not <key>.<field> (unsafe or foreign)",
                         key=key)
    key, field = name.split(".", 1)
    return key, field.lower()


# --------------------------------------------------------------------------- reading samples


def parse_sample(buf, url: str, views: bool) -> dict | None:
    """The members of one sample's bytes when they are plain USTAR members named
    ``<key>.<field>`` with one key, filling ``buf`` exactly; else None (:func:`strict_samples`
    decides). With ``views``, image and array fields are memoryviews of ``buf`` (no copy)."""
    mv = memoryview(buf)
    n, off = len(buf), 0
    sample: dict = {}
    key = None
    while off < n:
        if n - off < BLOCK:
            return None
        h = mv[off:off + BLOCK]
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
        start = off + BLOCK
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
        off = start + ((size + BLOCK - 1) & ~(BLOCK - 1))
    if off != n or key is None:
        return None
    return sample


def strict_samples(stream: BinaryIO, url: str, ends: list[int], first: int, total: int,
                   length: int, prev_key: str | None = None,
                   index_url: str | None = None) -> Iterator[dict]:
    """Samples from ``stream``, a shard's bytes from sample ``first``'s offset on, each checked
    against the index's boundaries ``ends`` (relative to that offset).

    ``total`` is the shard's sample count (for messages), ``length`` the number of bytes the
    stream holds (to the archive's end when the last sample is included, so that extra members
    are noticed). A sample is yielded when a member ends exactly at the next boundary; anything
    else is a :class:`ShardError` naming the shard URL and the key (and ``index_url`` where the
    shard and its index disagree).
    """
    by_index = "its index" if index_url is None else f"its index {index_url}"
    current: dict | None = None
    k, prev = 0, prev_key
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|")
        except tarfile.ReadError as exc:
            if "empty file" not in str(exc):
                raise
            raise ShardError(url, f"ended early at sample {first} of {total} (after {prev!r}): "
                                  "truncated or corrupt tar header") from None
        for info in tar:
            key, field = split_member(info.name, url)
            if k >= len(ends):
                raise ShardError(url, f"holds more samples than {by_index} says ({info.name!r} "
                                      "after the last one)", key=key)
            if not info.isreg() or info.sparse is not None:
                raise ShardError(url, f"member {info.name!r} is not a regular file", key=key)
            # Checked before reading: a header may claim any size (a GNU sparse one, data that is
            # mostly never stored), and tarfile would allocate all of it.
            if not 0 <= info.size <= length - info.offset_data:
                raise ShardError(url, f"member {info.name!r} claims {info.size} bytes, more than "
                                      "the shard holds after it", key=key)
            if current is None:
                current = {"__key__": key, "__url__": url}
            elif key != current["__key__"]:
                raise ShardError(url, f"member {info.name!r} lies inside sample "
                                      f"{current['__key__']!r} by {by_index}", key=key)
            if field in current:
                raise ShardError(url, f"duplicate member {info.name!r}", key=key)
            try:
                current[field] = tar.extractfile(info).read()
            except (tarfile.TarError, EOFError) as exc:
                raise ShardError(url, f"member {info.name!r} is truncated: {exc}",
                                 key=key) from None
            if tar.offset >= ends[k]:
                if tar.offset != ends[k]:
                    raise ShardError(url, f"member {info.name!r} crosses a sample boundary of "
                                          f"{by_index}", key=key)
                yield current
                prev, current, k = key, None, k + 1
        if k < len(ends):
            key = None if current is None else current["__key__"]
            raise ShardError(url, f"ended early at sample {first + k} of {total} (after {prev!r}): "
                                  "truncated or corrupt tar header", key=key)
    except tarfile.TarError as exc:
        raise ShardError(url, f"corrupt tar data at sample {first + k} (after {prev!r}): "
                              f"{exc}") from None


def header_checksum_ok(block: bytes) -> bool:
    """Whether ``block`` is a tar header: 512 bytes whose checksum field holds their sum (the test
    tarfile makes; plain zeros, compressed data or text fail it)."""
    if len(block) < BLOCK:
        return False
    h = block[:BLOCK]
    try:
        checksum = int(bytes(h[148:156]).rstrip(b"\0 ").lstrip(b" ") or b"x", 8)
    except ValueError:
        return False
    return sum(h) - sum(h[148:156]) + 256 == checksum


def iter_keys(fileobj: BinaryIO, url: str) -> Iterator[tuple[str, str]]:
    """``(key, field)`` of every member of a whole shard, in order (``tarfile`` stream mode);
    a damaged archive is a :class:`ShardError` naming ``url``."""
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tf:
            for info in tf:
                key, _, field = info.name.partition(".")
                yield key, field.lower()
    except tarfile.TarError as exc:
        raise ShardError(url, f"not a readable tar: {exc}") from None


# --------------------------------------------------------------------------- index files


def index_name(shard_name: str, legacy: bool = False) -> str:
    """The index file of shard ``shard_name`` (a name or a path with ``/``): ``d/x.tar`` ->
    ``d/.shardkit/x.idx``; ``legacy``: beside it, ``d/x.idx`` (format version 1)."""
    folder, _, name = shard_name.rpartition("/")
    stem = name[:-len(".tar")] if name.endswith(".tar") else name
    if not legacy:
        stem = f"{META_DIR}/{stem}"
    return f"{folder}/{stem}.idx" if folder else f"{stem}.idx"


def encode_index(offsets) -> bytes:
    return INDEX_MAGIC + np.asarray(offsets, dtype="<u8").tobytes()


def index_extent(data: bytes, where: str) -> tuple[int, int]:
    """``(num_samples, num_bytes)`` an index file describes on its own, for shards listed without
    a manifest: shardkit's shards end with exactly ``END_OF_ARCHIVE`` after the last sample."""
    n = (len(data) - len(INDEX_MAGIC)) // 8 - 1
    if n < 0 or (len(data) - len(INDEX_MAGIC)) % 8 or not data.startswith(INDEX_MAGIC):
        raise ShardError(where, f"not a shardkit index file ({len(data)} bytes)")
    end = int.from_bytes(data[-8:], "little")  # where the end-of-archive blocks start
    if end >= 2**63 - len(END_OF_ARCHIVE):
        raise ShardError(where, "index offsets are inconsistent with the shard")
    return n, end + len(END_OF_ARCHIVE)


def decode_index(data: bytes, num_samples: int, num_bytes: int, where: str) -> np.ndarray:
    """Parse and validate an index file against the manifest's counts."""
    expected = len(INDEX_MAGIC) + 8 * (num_samples + 1)
    if not data.startswith(INDEX_MAGIC) or len(data) != expected:
        raise ManifestError(f"{where}: index file is malformed or does not match the manifest "
                            f"({len(data)} bytes, expected {expected})")
    raw = np.frombuffer(data, dtype="<u8", offset=len(INDEX_MAGIC))
    if int(raw.max()) + len(END_OF_ARCHIVE) > num_bytes:  # Python ints: no int64 wrap-around
        raise ManifestError(f"{where}: index offsets are inconsistent with the shard")
    offsets = raw.astype(np.int64)
    if offsets[0] != 0 or np.any(np.diff(offsets) < 2 * BLOCK):
        raise ManifestError(f"{where}: index offsets are inconsistent with the shard")
    return offsets
