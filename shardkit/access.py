"""``MapDataset``: one sample by its index or its key, for evaluation, debugging and looking.

A map-style ``torch.utils.data.Dataset`` over a dataset's global sample index (manifest order:
shard after shard, each shard's samples in stored order). ``m[i]`` finds the shard by a binary
search of the shard sizes, the sample's byte range in the shard's index file (the reader's LRU of
index files), and reads exactly those bytes: one ``pread`` on a local shard (an LRU of open
files), one range request on a remote one (or a read of the cached shard with ``cache_dir``).
Items are shaped as the streaming dataset's unbatched items, by the same decoder, so ``m[i]`` is
the very item :class:`~shardkit.StreamingDataset` yields for that sample (same bytes, label,
fields; a random crop the same for the same ``seed`` and epoch).

Keys (:meth:`MapDataset.index_of`) are looked up in a table built on first use: a 64-bit hash of
each key, sorted, with the sample's index (16 bytes per sample, whatever the keys' lengths), a
hit confirmed by reading the sample's key. It is kept as ``.shardkit/keys-<digest>.bin`` beside
a local dataset's manifest when that folder is writable, in ``cache_dir`` for a remote one, else
in memory; the digest covers every shard's and index's hash, so a re-packed dataset never
meets an old table.
"""

from __future__ import annotations

import hashlib
import operator
import os
import tempfile
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, cast

import numpy as np
import torch

from .assembly import SampleDecoder
from .config import Source, StorageConfig
from .decode import CropRecipe
from .errors import ShardError
from .gzipped import is_compressed
from .manifest import Location, Manifest, load_manifest
from .modes import DecodeConfig, DecodeMode, check_fields
from .reader import ShardReader
from .shardformat import (
    BLOCK,
    MAX_PIXELS,
    header_checksum_ok,
    header_name,
    parse_sample,
    split_member,
)
from .storage import LocalStore

OPEN_SHARDS = 16  # open local shard files a process keeps (an LRU)
KEYS_MAGIC = b"SKKEYS\x00\x01"
_KEYS_HEAD = len(KEYS_MAGIC) + 8 + 32  # magic, count, digest


class MapDataset(torch.utils.data.Dataset):
    """Random access to a shardkit dataset: ``len(m)`` samples, ``m[i]`` the ``i``-th in
    manifest order, ``m.index_of(key)`` the index of a key.

    ``source``: anything a single :class:`~shardkit.StreamingDataset` reads (a packed or
    indexed folder or prefix on any store, a manifest path or URL, a
    :class:`~shardkit.Manifest`, a list of shard paths or URLs, one ``.tar`` or a brace
    pattern). The manifest loads here, so a wrong path fails at once.
    ``decode``, ``crop``, ``transform``, ``fields``, ``with_keys``, ``max_pixels``: as for the
    streaming dataset (items ``(image, label, *fields[, key])``). ``seed`` and
    :meth:`set_epoch`: a random crop's box, the one the streaming dataset draws for that sample
    with the same seed and epoch. ``cache_dir`` / ``cache_limit``: remote shards are downloaded
    whole into the shared shard cache on first touch and read from there (good for many reads of
    one shard); without it each sample is one range request. ``storage_options``, ``timeout``,
    ``retries``: as for the streaming dataset.

    Works in a ``DataLoader`` with workers and with ``DistributedSampler`` (each worker opens
    its own files). Errors name the shard URL and key; there is no skip mode (a map-style
    loader asks for one index and must get it)."""

    def __init__(self, source: Location | Source, *, decode: str | DecodeMode = "uint8",
                 crop: CropRecipe | None = None, transform: Callable | None = None,
                 fields: tuple[str, ...] | list[str] | dict[str, str] | None = None,
                 with_keys: bool = False, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None, cache_limit: int | str | None = None,
                 storage_options: dict | None = None, max_pixels: int = MAX_PIXELS,
                 timeout: float = 60.0, retries: int = 6) -> None:
        if isinstance(source, Source):  # one source: its location (and its options)
            storage_options = source.storage_options or storage_options
            source = cast(Location, source.location)
        if isinstance(source, Sequence) and not isinstance(source, (str, bytes)) \
                and any(isinstance(s, Source) for s in source):
            raise TypeError("MapDataset reads one dataset; for several, concatenate them: "
                            "torch.utils.data.ConcatDataset([MapDataset(a), MapDataset(b)])")
        self.decoding = DecodeConfig.of(decode, crop=crop, transform=transform,
                                        with_keys=with_keys, fields=fields, max_pixels=max_pixels)
        if self.decoding.mode.name == "gpu":
            raise ValueError("decode='gpu' decodes whole batches on the GPU (StreamingDataset "
                             "with batch_size); MapDataset items are decoded one by one")
        self.storage = StorageConfig.of(storage_options=storage_options, timeout=timeout,
                                        retries=retries, cache_dir=cache_dir,
                                        cache_limit=cache_limit)
        self.source = source
        self.manifest: Manifest = load_manifest(source, storage_options, timeout=timeout,
                                                retries=retries)
        check_fields(self.decoding.fields, [self.manifest])
        self.seed = seed
        self.epoch = 0
        self._decoder = SampleDecoder(self.decoding)
        self._decoder.configure(self.manifest.labels, self.manifest.classes)
        self._decoder.crop_seed = f"{seed}/0/"
        self.reader = ShardReader(self.manifest, cache_dir=self.storage.cache_dir,
                                  cache_limit=self.storage.cache_limit)
        sizes = self.manifest.shard_sizes()
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._keys: tuple[np.ndarray, np.ndarray] | None = None
        self._per_process()

    def _per_process(self) -> None:
        self._files: OrderedDict[int, list] = OrderedDict()  # shard -> [fd, url, users]
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_files", "_lock"):
            del state[name]
        state["_keys"] = None  # 16 bytes a sample: a worker loads the kept table if it needs it
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._per_process()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit os may be gone already
            pass

    def close(self) -> None:
        """Close the shard files this process holds open (they reopen on the next read)."""
        files, lock = getattr(self, "_files", None), getattr(self, "_lock", None)
        if not files or lock is None:
            return
        with lock:
            while files:
                fd, _, users = files.popitem()[1]
                if users == 0:
                    os.close(fd)  # (one in use closes when its last user is done)

    # ----------------------------------------------------------------- indices
    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes or [])

    def set_epoch(self, epoch: int) -> None:
        """Random crops draw the boxes of this epoch (those the streaming dataset draws)."""
        self.epoch = int(epoch)
        self._decoder.crop_seed = f"{self.seed}/{self.epoch}/"

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard number, sample number in that shard)`` of global sample ``index``."""
        n = len(self)
        if isinstance(index, (bool, np.bool_)):
            raise TypeError("sample index must be an int, got bool")
        try:
            i = operator.index(index)  # ints, numpy ints, 0-d integer tensors
        except TypeError:
            raise TypeError(f"sample index must be an int, got {type(index).__name__}") from None
        i = i + n if i < 0 else i
        if not 0 <= i < n:
            raise IndexError(f"sample index {index} out of range: the dataset holds {n} samples")
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        return shard, i - int(self._starts[shard])

    def where(self, index: int) -> dict[str, Any]:
        """Where sample ``index`` lives: ``{"index", "key", "shard", "url", "sample"}`` (its shard
        number and URL, its number within that shard)."""
        shard, j = self.locate(index)
        return {"index": int(self._starts[shard]) + j, "key": self.key(index), "shard": shard,
                "url": self.reader.url(shard), "sample": j}

    # ----------------------------------------------------------------- samples
    def __getitem__(self, index: int) -> Any:
        return self._decoder(self.sample(index))

    def sample(self, index: int) -> dict:
        """The raw sample dict of ``index`` (``__key__``, ``__url__``, one bytes value per
        member, as a webdataset pipeline sees it)."""
        shard, j = self.locate(index)
        return self._read(shard, j)

    def key(self, index: int) -> str:
        """The key of sample ``index`` (read from its first tar header where it can be)."""
        shard, j = self.locate(index)
        offsets = self.reader.offsets(shard)
        with self._local(shard) as local:
            if local is not None:
                key = _header_key(os.pread(local[0], BLOCK, int(offsets[j])), local[1])
                if key is not None:
                    return key
        return self._read(shard, j)["__key__"]

    def _read(self, shard: int, j: int) -> dict:
        reader = self.reader
        offsets = reader.offsets(shard)
        with self._local(shard) as local:
            if local is not None:
                lo, hi = int(offsets[j]), int(offsets[j + 1])
                buf = os.pread(local[0], hi - lo, lo)
                sample = parse_sample(buf, local[1], False) if len(buf) == hi - lo else None
                if sample is not None:
                    return sample
        # remote shards, and what the fast parser does not take (the strict parser decides)
        return next(iter(reader.samples(shard, j, j + 1)))

    @contextmanager
    def _local(self, shard: int) -> Iterator[tuple[int, str] | None]:
        """``(fd, url)`` of a local shard, open for the ``with`` block (an LRU of
        :data:`OPEN_SHARDS` open files; one evicted while in use closes when its last user is
        done, so no thread ever reads a closed or reused descriptor); None for a shard the
        reader reads (remote, or compressed)."""
        with self._lock:
            entry = self._files.get(shard)
            if entry is not None:
                self._files.move_to_end(shard)
                entry[2] += 1
        if entry is None:
            store, info = self.reader.shard(shard)
            if not isinstance(store, LocalStore) or is_compressed(info.url):
                yield None  # read by the reader (a .tar.gz: decompressed from its start)
                return
            path = store.url(info.url)
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise ShardError(path, f"cannot open: {exc.strerror or exc}") from None
            with self._lock:
                entry = self._files.get(shard)
                if entry is None:
                    entry = self._files[shard] = [fd, path, 1]
                    while len(self._files) > OPEN_SHARDS:
                        old = self._files.popitem(last=False)[1]
                        if old[2] == 0:
                            os.close(old[0])
                else:  # another thread opened it meanwhile
                    os.close(fd)
                    entry[2] += 1
        try:
            yield entry[0], entry[1]
        finally:
            with self._lock:
                entry[2] -= 1
                if entry[2] == 0 and self._files.get(shard) is not entry:
                    os.close(entry[0])  # evicted while in use

    # ----------------------------------------------------------------- keys
    def index_of(self, key: str) -> int:
        """The index of the sample whose key is ``key`` (``KeyError`` naming it when none is).

        The first call builds the key table (every shard's keys: the tar headers at the index's
        offsets for local shards, one streamed read per remote shard) and keeps it (see the
        module docstring); later calls are a binary search and one header read."""
        if not isinstance(key, str):
            raise TypeError(f"a key is a str, got {type(key).__name__}")
        hashes, positions = self._key_table()
        h = _key_hash(key)
        lo = int(np.searchsorted(hashes, h, side="left"))
        hi = int(np.searchsorted(hashes, h, side="right"))
        for p in positions[lo:hi]:
            if self.key(int(p)) == key:
                return int(p)
        where = self.manifest.base_url or "the listed shards"
        raise KeyError(f"{key!r}: no sample of {where} has this key ({len(self)} samples)")

    def _key_table(self) -> tuple[np.ndarray, np.ndarray]:
        if self._keys is None:
            digest = _dataset_digest(self.manifest)
            path = self._keys_path(digest)
            table = _load_keys(path, digest, len(self)) if path is not None else None
            if table is None:
                table = self._build_keys()
                if path is not None:
                    _save_keys(path, digest, *table)
            self._keys = table
        return self._keys

    def _keys_path(self, digest: bytes) -> Path | None:
        """Where the key table is kept: beside a local manifest, or in the cache; None: memory."""
        name = f"keys-{digest.hex()[:16]}.bin"
        store = self.reader.stores[0]
        if isinstance(store, LocalStore) and self.manifest.base_url is not None:
            folder = Path(store.base) / ".shardkit"
            if folder.is_dir() and os.access(folder, os.W_OK):
                return folder / name
        if self.storage.cache_dir is not None and not isinstance(store, LocalStore):
            return Path(self.storage.cache_dir) / "keys" / name
        return None

    def _build_keys(self) -> tuple[np.ndarray, np.ndarray]:
        from tqdm import tqdm

        n = len(self)
        hashes = np.empty(n, dtype=np.uint64)
        at = 0
        shards = range(len(self.manifest.shards))
        for shard in tqdm(shards, desc="key table", unit="shard", delay=1.0, leave=False):
            for key in self._shard_keys(shard):
                hashes[at] = _key_hash(key)
                at += 1
        if at != n:
            raise ShardError(self.manifest.base_url or "the listed shards",
                             f"{at} keys found, the manifest says {n} samples")
        order = np.argsort(hashes, kind="stable")
        return hashes[order], order.astype(np.uint64)

    def _shard_keys(self, shard: int) -> list[str]:
        """The keys of one shard's samples, in order."""
        offsets = self.reader.offsets(shard)
        count = len(offsets) - 1
        with self._local(shard) as local:
            if local is None:  # a remote or compressed shard: one streamed read of it
                return [s["__key__"] for s in self.reader.samples(shard, 0, count)]
            fd, url = local
            keys = []
            for j in range(count):
                key = _header_key(os.pread(fd, BLOCK, int(offsets[j])), url)
                keys.append(key if key is not None else self._read(shard, j)["__key__"])
            return keys

    def __repr__(self) -> str:
        where = self.manifest.base_url or "listed shards"
        return (f"MapDataset({where!r}, {len(self)} samples, {len(self.manifest.shards)} shards, "
                f"decode={self.decoding.mode.name!r})")


def _header_key(header: bytes, url: str) -> str | None:
    """The sample key a plain tar header names; None when the header is not that (a pax or GNU
    long name, a folder, a prefix field of a GNU or older header, a damaged header: the sample
    is read to know, so a key is always the one ``m[i]`` gives)."""
    if len(header) < BLOCK or header[156:157] not in (b"0", b"\0") \
            or not header_checksum_ok(header):
        return None
    if header[345] != 0 and header[257:263] != b"ustar\0":
        return None
    try:
        named = split_member(header_name(header), url)
    except ShardError:
        return None
    return None if named is None else named[0]


def _key_hash(key: str) -> np.uint64:
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def _dataset_digest(m: Manifest) -> bytes:
    """What the keys depend on: every shard's content and index (their digests)."""
    h = hashlib.sha256()
    for s in m.shards:
        content = s.sha256 or ("" if s.blake3 is None else f"blake3:{s.blake3}")
        h.update(f"{s.url}\0{content}\0{s.index_sha256}\n".encode("utf-8", "surrogateescape"))
    return h.digest()


def _load_keys(path: Path, digest: bytes, count: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A kept key table, or None when there is none or it is not this dataset's."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError):
        return None
    head = bytes(data[:_KEYS_HEAD])
    if len(data) != _KEYS_HEAD + 16 * count or head[:8] != KEYS_MAGIC \
            or int.from_bytes(head[8:16], "little") != count or head[16:48] != digest:
        return None
    body = data[_KEYS_HEAD:]
    hashes, positions = body[:8 * count].view("<u8"), body[8 * count:].view("<u8")
    if count and (int(positions.max()) >= count or bool((hashes[1:] < hashes[:-1]).any())):
        return None  # damaged (or not made by shardkit): built again
    return hashes, positions


def _save_keys(path: Path, digest: bytes, hashes: np.ndarray, positions: np.ndarray) -> None:
    """Write the key table atomically; a folder that refuses it keeps the table in memory."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            f.write(KEYS_MAGIC + len(hashes).to_bytes(8, "little") + digest)
            f.write(hashes.astype("<u8").tobytes())
            f.write(positions.astype("<u8").tobytes())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


__all__ = ["MapDataset"]
