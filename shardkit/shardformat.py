"""The shard format: file names, tar members, samples, the end of an archive and the index file.

A dataset is a folder (or object-store prefix) holding ``<prefix>-000000.tar`` … and a hidden
folder ``.shardkit/`` with one index file per shard (``.shardkit/<prefix>-000000.idx``) and
``.shardkit/manifest.json`` (see :mod:`shardkit.manifest`), written last. The folder then holds
nothing but tar files for other readers (Hugging Face ``datasets`` opens every file it is not told
to skip as a tar, and skips hidden ones). Datasets of format version 1 keep ``manifest.json`` and
``<prefix>-000000.idx`` beside the shards; they are read as they are.

Shards are plain POSIX tar archives. A sample is a run of adjacent members named
``<key>.<field>``, split as webdataset splits them: the key is everything up to the first dot
of the name's last path component (so it may hold ``/``: ``n01/n01_0173.cls``), the field the
rest, lower-cased (``jpg``, ``seg.png``, ``cls``). Folder members, and names webdataset skips
(no dot in the last component, or a leading one: ``.DS_Store``) belong to no sample and are
passed over; a leading ``./`` (``tar cf x.tar .``) is not part of the key; a key with an
empty, ``.`` or ``..`` component, a leading ``/``, a backslash or a control character is refused
(keys are data, but others may use them as paths). shardkit's packer writes reproducible USTAR
headers (fixed mtime, uid/gid 0, empty owner names, mode 0644), keys without dots or ``/``, and
ends each archive with exactly ``END_OF_ARCHIVE``.

Index file (``.idx``): 8 magic bytes ``SKIDX\\x01\\0\\0``, then ``num_samples + 1`` little-endian
uint64 byte offsets: where each sample's first tar header starts, and finally where the
end-of-archive blocks start. A reader can start at any sample without reading what precedes it.
Compressed shards (``.tar.gz``, ``.tgz``: :mod:`shardkit.gzipped`) have the same index, its offsets
counted in the uncompressed stream; they are read from their start.

Two parsers read samples back, and accept and refuse exactly the same bytes:
:func:`parse_sample` is the fast one (one sample's bytes, plain USTAR members, no copy with
``views``); :func:`strict_samples` is :mod:`tarfile` in stream mode, which decides every other
case and names what is wrong.
"""

from __future__ import annotations

import re
import tarfile
from typing import BinaryIO, Iterator, cast
from zlib import adler32

import numpy as np

from .errors import ManifestError, ShardError
from .gzipped import GZIP_MAGIC, SAMPLE_LIMIT, GunzipRange, gzip_named_tar, is_compressed

MANIFEST_NAME = "manifest.json"
MSGPACK_NAME = "manifest.msgpack"
META_DIR = ".shardkit"  # the hidden folder of a dataset's own files (format version 2)
MANIFEST_PATH = f"{META_DIR}/{MANIFEST_NAME}"
MSGPACK_PATH = f"{META_DIR}/{MSGPACK_NAME}"
COLUMNS_NAME = "manifest.cols"  # the shard list of a large manifest, column-wise (columns.py)
COLUMNS_PATH = f"{META_DIR}/{COLUMNS_NAME}"
INDEX_MAGIC = b"SKIDX\x01\0\0"
BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
MTIME = 946684800  # 2000-01-01T00:00:00Z: a fixed mtime makes shards byte-reproducible
FILE_MODE = 0o644
MAX_PIXELS = 100_000_000  # default pixel limit against decompression bombs (packing and reading)
# Image fields (member extensions) in the order a reader looks for them in a sample.
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_TAIL = 64 << 10  # archive end the fast parser accepts at once (writers leave 1-10 KiB of zeros)

_FIELD = re.compile(r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*")
_KEY_PART = re.compile(r"[^/\\\x00-\x1f\x7f]+")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")  # what the packer writes: the fast check
_USTAR_REGULAR = (0x30, 0)  # typeflag '0' or NUL
_ZEROS = bytes(BLOCK)
# a size field the quick parse reads as tarfile.nti does: octal digits, then NULs or spaces
_FAST_SIZE = re.compile(rb"([0-7]+)[\0 ]*")


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


def member_key(name: str) -> tuple[str, str] | None:
    """``(key, field)`` of a member name as webdataset splits it (the field lower-cased), or
    None for a name that belongs to no sample (no dot in its last component, or a leading one).
    Raises ValueError for a key that is not safe to hand on (see the module docstring)."""
    while name.startswith("./"):  # GNU tar's names of ``tar cf x.tar .``: the same members
        name = name[2:]
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash or dot == len(name) - 1:
        return None
    key, field = name[:dot], name[dot + 1:]
    if not _FIELD.fullmatch(field):
        raise ValueError(f"member name {name[:80]!r}: its extension {field[:40]!r} is not a "
                         "field name")
    if not _PLAIN_KEY.fullmatch(key):  # the packer's keys are; others are looked at closer
        parts = key.split("/")
        if any(p in ("", ".", "..") or not _KEY_PART.fullmatch(p) for p in parts):
            raise ValueError(f"member name {name[:80]!r} is not a safe <key>.<field> (an "
                             "empty, '.' or '..' path component, a leading '/', a backslash "
                             "or a control character)")
    return key, field.lower()


def split_member(name: str, url: str) -> tuple[str, str] | None:
    """:func:`member_key`, its refusal a :class:`ShardError` naming the shard and member."""
    try:
        return member_key(name)
    except ValueError as exc:
        key = name.rpartition("/")[2].split(".", 1)[0][:64]
        raise ShardError(url, str(exc), key=key) from None


# --------------------------------------------------------------------------- reading samples


def _header_sum(h) -> int:
    """The sum of a 512-byte header's bytes, in C: adler32's low half is 1 + the byte sum modulo
    65521, exact for 256 bytes (at most 65,280)."""
    return (adler32(h[:256]) & 0xFFFF) + (adler32(h[256:512]) & 0xFFFF) - 2


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
        if _header_sum(h) - sum(h[148:156]) + 256 != checksum:
            return None
        dot = name.find(".")  # the packer's names, plain; anything else: the strict path
        if dot < 1 or not _PLAIN_KEY.fullmatch(name, 0, dot) or not _FIELD.fullmatch(name, dot + 1):
            return None
        start = off + BLOCK
        end = start + size
        if end > n:
            return None
        k, field = name[:dot], name[dot + 1:].lower()
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
    key: str | None
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
            named = None if info.isdir() else split_member(info.name, url)
            if named is None:  # a folder, or a name of no sample: passed over, as webdataset does
                if k < len(ends) and tar.offset > ends[k] and current is not None:
                    raise ShardError(url, f"member {info.name!r} crosses a sample boundary of "
                                          f"{by_index}", key=current["__key__"])
                if k < len(ends) and tar.offset == ends[k] and current is not None:
                    yield current
                    prev, current, k = current["__key__"], None, k + 1
                continue
            key, field = named
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
                member = tar.extractfile(info)
                assert member is not None  # a regular file (checked above): never None
                current[field] = member.read()
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


def header_checksum_ok(block: bytes | bytearray | memoryview) -> bool:
    """Whether ``block`` is a tar header: 512 bytes whose checksum field holds their sum (the test
    tarfile makes; plain zeros, compressed data or text fail it)."""
    if len(block) < BLOCK:
        return False
    h = block[:BLOCK]
    stored = bytes(h[148:156])
    try:
        checksum = int(stored.rstrip(b"\0 ").lstrip(b" ") or b"x", 8)
    except ValueError:
        return False
    return _header_sum(h) - sum(stored) + 256 == checksum


def header_name(h) -> str:
    """The member name a tar header holds: its name field, after the ustar prefix where there is
    one; bytes that are not UTF-8 as surrogate escapes (as ``tarfile`` gives them)."""
    name = bytes(h[0:100]).split(b"\0", 1)[0]
    if h[345] and bytes(h[257:262]) == b"ustar":  # (a prefix starts with a non-NUL byte)
        prefix = bytes(h[345:500]).split(b"\0", 1)[0]
        name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def iter_keys(fileobj: BinaryIO, url: str) -> Iterator[tuple[str, str]]:
    """``(key, field)`` of every member of a whole shard, in order (``tarfile`` stream mode; a
    compressed shard's, by its name, decompressed in bounded pieces); a damaged archive is a
    :class:`ShardError` naming ``url``."""
    if is_compressed(url):
        fileobj = cast(BinaryIO, GunzipRange(fileobj, url))
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


def index_size(num_samples: int) -> int:
    """The bytes of a shard's index file: the magic, then one offset per sample and the end."""
    return len(INDEX_MAGIC) + 8 * (num_samples + 1)


def decode_index(data: bytes, num_samples: int, num_bytes: int, where: str,
                 compressed: bool = False) -> np.ndarray:
    """Parse and validate an index file against the manifest's counts. ``compressed``: of a
    ``.tar.gz`` shard, whose offsets count the uncompressed stream (not bounded by ``num_bytes``,
    the file's size as stored)."""
    expected = index_size(num_samples)
    if not data.startswith(INDEX_MAGIC) or len(data) != expected:
        raise ManifestError(f"{where}: index file is malformed or does not match the manifest "
                            f"({len(data)} bytes, expected {expected})")
    raw = np.frombuffer(data, dtype="<u8", offset=len(INDEX_MAGIC))
    bound = 2**63 - 1 if compressed else num_bytes
    if int(raw.max()) + len(END_OF_ARCHIVE) > bound:  # Python ints: no int64 wrap-around
        raise ManifestError(f"{where}: index offsets are inconsistent with the shard")
    offsets = raw.astype(np.int64)
    gaps = np.diff(offsets)
    if offsets[0] != 0 or np.any(gaps < 2 * BLOCK):
        raise ManifestError(f"{where}: index offsets are inconsistent with the shard")
    if compressed and gaps.size and int(gaps.max()) > SAMPLE_LIMIT:
        raise ManifestError(f"{where}: sample {int(gaps.argmax())} holds {int(gaps.max()):,} "
                            f"bytes uncompressed, over the limit of {SAMPLE_LIMIT:,} for a "
                            "compressed shard (a gzip bomb?)")
    return offsets


# --------------------------------------------------------------------------- walking a shard


class Member:
    """A member met by :func:`walk_members`."""

    __slots__ = ("start", "name", "type", "size", "data")

    def __init__(self, start: int, name: str, type: int, size: int, data: bytes | None):
        self.start, self.name, self.type, self.size, self.data = start, name, type, size, data

    @property
    def regular(self) -> bool:
        return self.type in (0x30, 0, 0x37)  # '0', NUL (old tars), '7' (contiguous)

    @property
    def folder(self) -> bool:
        return self.type == 0x35  # '5'


class Walk:
    """What :func:`walk_members` found besides the members: where the end-of-archive blocks
    start (``end``), the file's size and its ``digest`` (hex, by the walk's algorithm)."""

    def __init__(self):
        self.end = self.size = -1
        self.digest = ""


class _TarBytes:
    """The bytes of a tar being walked: ``buf`` from file offset ``base``, read up to ``cur``."""

    buf: bytearray | memoryview
    base = cur = 0

    def take(self, n: int) -> bytes:
        out = bytes(self.buf[self.cur:self.cur + n])
        self.cur += n
        return out

    def stop(self) -> None:
        """The walk is over (done, failed or left): nothing more is read for it."""


class _NoDigest:
    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


class _StreamBytes(_TarBytes):
    """A tar read once from a stream, every byte hashed as it arrives (remote shards; not hashed
    when ``algorithm`` is None)."""

    buf: bytearray

    def __init__(self, stream: BinaryIO, chunk: int, algorithm: str | None = "sha256"):
        from . import digests

        self.stream, self.chunk = stream, chunk
        self.digest = _NoDigest() if algorithm is None else digests.new(algorithm)
        self.buf = bytearray()
        self.base = self.cur = 0  # file offset of buf[0]; read position inside buf
        self.eof = False

    def need(self, n: int) -> bool:
        """Whether ``n`` bytes are there from the read position (reading more if needed)."""
        while len(self.buf) - self.cur < n and not self.eof:
            if self.cur > (1 << 20):  # drop what was consumed
                del self.buf[:self.cur]
                self.base, self.cur = self.base + self.cur, 0
            data = self.stream.read(self.chunk)
            if not data:
                self.eof = True
                break
            self.digest.update(data)
            self.buf += data
        return len(self.buf) - self.cur >= n

    def skip(self, n: int) -> bool:
        have = len(self.buf) - self.cur
        if n <= have:
            self.cur += n
            return True
        n -= have
        self.base, self.buf, self.cur = self.base + len(self.buf), bytearray(), 0
        while n > 0:  # straight through the hash, never buffered
            data = self.stream.read(min(self.chunk, n) if n >= BLOCK else BLOCK)
            if not data:
                self.eof = True
                return False
            self.digest.update(data)
            if len(data) > n:
                self.buf += data[n:]
                self.base += n
                n = 0
            else:
                self.base += len(data)
                n -= len(data)
        return True

    def finish(self) -> tuple[int, str]:
        """The file's size and digest: the rest (padding after the end blocks) read too."""
        total = self.base + len(self.buf)
        while not self.eof:
            data = self.stream.read(self.chunk)
            if not data:
                break
            self.digest.update(data)
            total += len(data)
        return total, self.digest.hexdigest()


class _MappedBytes(_TarBytes):
    """A whole tar in memory (a local file mapped): headers read where they lie, the data
    never copied. The hash runs alongside the walk: a helper thread hashes the mapping front to
    back in :data:`HASH_PIECE` pieces (each ``update`` releases the GIL) while the walk reads the
    headers, so indexing a shard costs the slower of reading it and hashing it, not their sum.
    The walk stays behind the hash (:meth:`need` waits for the piece it reads to be hashed): the
    file is read once, front to back, by the hash's page faults; the walk's headers are then in
    memory (cold, on a disk that seeks, a walk running ahead would read out of order)."""

    buf: memoryview

    def __init__(self, data, algorithm: str = "sha256"):
        import threading

        from . import digests

        self.buf = memoryview(data)
        self.base = self.cur = 0
        self.eof = True
        self._digest = digests.new(algorithm)
        self._stop = False
        self._hashed = 0  # bytes hashed so far (the walk reads below this)
        self._failed: BaseException | None = None
        self._moved = threading.Condition()
        self._thread = threading.Thread(target=self._hash, name="shardkit-index-hash",
                                        daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        buf, n = self.buf, len(self.buf)
        try:
            for at in range(0, n, HASH_PIECE):
                if self._stop:
                    return
                piece = buf[at:at + HASH_PIECE]
                self._digest.update(piece)
                piece.release()
                with self._moved:
                    self._hashed = min(at + HASH_PIECE, n)
                    self._moved.notify()
        except BaseException as exc:  # noqa: BLE001 -- handed to finish(), never a partial hash
            self._failed = exc
        finally:
            with self._moved:
                self._hashed = n  # done, stopped or failed: the walk waits no longer
                self._moved.notify()

    def need(self, n: int) -> bool:
        end = self.cur + n
        if end > self._hashed:
            wanted = min(end, len(self.buf))
            with self._moved:
                while wanted > self._hashed:
                    self._moved.wait()
        return len(self.buf) >= end

    def skip(self, n: int) -> bool:
        if len(self.buf) - self.cur < n:
            return False
        self.cur += n
        return True

    def finish(self) -> tuple[int, str]:
        self._thread.join()
        if self._failed is not None:
            raise self._failed
        return len(self.buf), self._digest.hexdigest()

    def stop(self) -> None:
        """The walk failed: the hash is not needed (the mapping is closed after this)."""
        self._stop = True
        self._thread.join()


HASH_PIECE = 8 << 20  # bytes a mapped shard's hash takes at once


def walk_members(source, url: str, keep, walk: Walk, chunk: int = 4 << 20,
                 digest: str | None = "sha256", keep_limit: int | None = None) -> Iterator[Member]:
    """The members of a whole tar, read once, sequentially: each with the offset of its first
    header (a pax or GNU long-name header before it included), its name, type flag and size; its
    bytes when ``keep(name)`` (small members: labels, metadata; one over ``keep_limit`` bytes is
    an error, as it would be buffered whole).

    ``source``: a stream (read in ``chunk``-byte pieces, every byte hashed as it arrives) or the
    whole file as a buffer (a local file's ``mmap``: only headers are touched while walking; a
    helper thread hashes it alongside).
    ``walk`` gets the end-of-archive offset, the size and the hex digest by ``digest`` (the
    algorithm: ``"sha256"`` or ``"blake3"``; None: not computed, a compressed shard's
    uncompressed stream) once the walk is done. A damaged
    header, a member running past the end of the file or no end-of-archive block is a
    :class:`ShardError` naming ``url`` and the byte offset."""
    src: _MappedBytes | _StreamBytes
    if isinstance(source, (bytes, bytearray, memoryview)) or hasattr(source, "madvise"):
        src = _MappedBytes(source, digest or "sha256")
    else:
        src = _StreamBytes(source, chunk, digest)
    zeros, fast_sizes = _ZEROS, _FAST_SIZE
    try:
        pending_name, pending_size, chain_start = None, None, None
        data: bytes | None
        while True:
            cur = src.cur
            at = src.base + cur
            if not src.need(BLOCK):
                raise ShardError(url, f"ends at byte {at:,} without the end-of-archive blocks "
                                      "(truncated?)")
            h = bytes(src.buf[cur:cur + BLOCK])  # one copy of 512 bytes: slices of it are cheap
            if h == zeros:  # the end of the archive: the rest is padding
                walk.end = at
                break
            if not header_checksum_ok(h):
                if at == 0 and h[:2] == GZIP_MAGIC:
                    raise ShardError(url, gzip_named_tar(url))
                raise ShardError(url, f"corrupt tar header at byte {at:,} (its checksum does not hold)")
            src.cur = cur + BLOCK
            flag = h[156]
            if pending_size is not None:
                size = pending_size
            else:
                octal = fast_sizes.fullmatch(h, 124, 136)
                if octal:  # octal digits, then NULs or spaces: nearly every header
                    size = int(octal[1], 8)
                else:
                    try:
                        size = tarfile.nti(h[124:136])  # type: ignore[attr-defined]  # not in typeshed
                    except (tarfile.HeaderError, ValueError):
                        raise ShardError(url, f"corrupt tar header at byte {at:,} (size)") from None
            if size < 0:
                raise ShardError(url, f"corrupt tar header at byte {at:,} (negative size)")
            if chain_start is None:
                chain_start = at
            padded = (size + BLOCK - 1) & ~(BLOCK - 1)
            if flag in (0x78, 0x67, 0x4C, 0x4B):  # 'x' pax, 'g' global pax, 'L'/'K' GNU long names
                if size > (1 << 20) or not src.need(padded):
                    raise ShardError(url, f"extended tar header at byte {at:,} is too large or cut")
                data = src.take(padded)[:size]
                if flag == 0x78:
                    path, pax_size = _pax_path_size(data, url, at)
                    if path is not None:
                        pending_name = path
                    if pax_size is not None:
                        pending_size = pax_size
                elif flag == 0x4C:
                    pending_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            if pending_name is not None:
                name = pending_name
            else:
                name = header_name(h)
            data = None
            if flag in (0x30, 0, 0x37) and size and keep(name):
                if keep_limit is not None and size > keep_limit:
                    raise ShardError(url, f"member {name!r} at byte {at:,} holds {size:,} bytes: too "
                                          "large for a label or metadata member")
                if not src.need(padded) and len(src.buf) - src.cur < size:
                    raise ShardError(url, f"member {name!r} at byte {at:,} runs past the end of the "
                                          "file (truncated?)")
                data = src.take(padded)[:size]
            elif flag in (0x31, 0x32, 0x33, 0x34, 0x35, 0x36):  # links, devices, folders, FIFOs
                size = 0  # have no data in the archive (as tarfile reads them)
            elif not src.skip(padded):
                raise ShardError(url, f"member {name!r} at byte {at:,} runs past the end of the file "
                                      "(truncated?)")
            yield Member(chain_start, name, flag, size, data)
            pending_name, pending_size, chain_start = None, None, None
        walk.size, walk.digest = src.finish()
    finally:
        src.stop()  # a walk that failed or was left: its hash no longer runs


def _pax_path_size(data: bytes, url: str, at: int) -> tuple[str | None, int | None]:
    """The ``path`` and ``size`` records of a pax extended header (the last of each counts);
    None for those it lacks. Every record's length is checked; the others' contents are not
    decoded (ShardWriter writes an ``mtime`` record before every member)."""
    path = size = None
    pos, n = 0, len(data)
    while pos < n:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ShardError(url, f"corrupt pax header at byte {at:,}") from None
        if length <= 0:
            raise ShardError(url, f"corrupt pax header at byte {at:,}")
        record = data[space + 1:pos + length - 1]
        if record.startswith(b"path="):
            path = record[5:].decode("utf-8", "surrogateescape")
        elif record.startswith(b"size="):
            try:
                size = int(record[5:])
            except ValueError:
                raise ShardError(url, f"corrupt pax header at byte {at:,} (size)") from None
        pos += length
    return path, size
