"""``manifest.json``: what a dataset holds, and the one path that loads it from a source.

A dataset is a folder (or object-store prefix) holding ``<prefix>-000000.tar`` … , one index file
beside each shard (:mod:`shardkit.shardformat`), and ``manifest.json``, written last.

Compact encoding (``manifest.msgpack``): the same content as ``manifest.json`` in msgpack, for
manifests with ~100,000 shards, with the shard list stored column-wise: integer columns as packed
little-endian uint64 bytes, sha256 columns as concatenated raw 32-byte digests, URL columns as a
``prefix`` + zero-padded counter + ``suffix`` pattern when every URL follows it
(``shard-000000.tar`` ...), and plain lists otherwise. JSON stays the canonical format that
``pack`` writes; the msgpack file is an optional companion (:func:`write_manifest` writes both) that
:meth:`Manifest.load` reads when the source names it (``.../manifest.msgpack``), or when a dataset
folder or prefix has no ``manifest.json``. A folder holding both is read from its JSON, so a stale
companion can never override the canonical file.

Loading: :func:`load_manifest` (and :meth:`Manifest.load`, :meth:`Manifest.from_urls`) resolve a
source to a store (:mod:`shardkit.storage`) once; the manifest keeps it (``manifest.store``) and
every shard and index file is read through it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from typing import Any, Sequence, Union

import numpy as np

from . import signing
from ._version import __version__
from .columns import (
    COMPACT_SHARDS,
    ColumnsError,
    ShardTable,
    decode_list_column,
    encode_list_column,
    shard_digest,
)
from .columns import encode as encode_columns
from .errors import ManifestError, ShardError
from .gzipped import GZIP_MAGIC, SHARD_SUFFIXES, gzip_named_tar, is_compressed
from .locations import image_folder, image_folder_hint, no_such_path, shard_list
from .manifestcheck import check, is_external
from .shardformat import (
    COLUMNS_NAME,
    COLUMNS_PATH,
    MANIFEST_NAME,
    MANIFEST_PATH,
    META_DIR,
    MSGPACK_NAME,
    MSGPACK_PATH,
    decode_index,
    index_extent,
)
from .storage import ListedStore, LocalStore, MixedStore, Store, make_dest, make_store

FORMAT = "shardkit"
FORMAT_VERSION = 2  # what pack and index write: .shardkit/ beside the shards
READ_VERSIONS = (1, 2)  # 1: manifest.json and <prefix>-000000.idx beside the shards
MSGPACK_ENCODING = "shardkit-columns/1"  # layout of the msgpack file's shard columns


# What a dataset is read from: a folder or manifest (path or URL), a list of shard paths or URLs,
# or a Manifest already loaded.
Location = Union[str, "os.PathLike[str]", Sequence[str], "Manifest"]  # where a dataset is


def _version() -> str:
    return f"shardkit {__version__}"


@dataclass
class ShardInfo:
    url: str  # relative to the dataset's folder or prefix (a full URL: Manifest.from_urls)
    num_samples: int
    num_bytes: int
    sha256: str | None  # None: unknown (Manifest.from_urls), or the shard names its blake3
    index_url: str
    index_sha256: str
    blake3: str | None = None  # the shard's BLAKE3 instead of its sha256 (``shardkit index``)

    @property
    def digest(self) -> tuple[str, str] | None:
        """``(algorithm, hex digest)`` the shard's bytes are checked against (``"blake3"`` or
        ``"sha256"``), or None: not known, only its size is checked (Manifest.from_urls)."""
        if self.blake3 is not None:
            return "blake3", self.blake3
        if self.sha256 is not None:
            return "sha256", self.sha256
        return None

    def as_json(self) -> dict[str, Any]:
        """The shard as the manifest writes it: ``blake3`` only when it has one (a packed
        shard's entry is as it always was)."""
        out = asdict(self)
        if out["blake3"] is None:
            del out["blake3"]
        return out


@dataclass
class Manifest:
    classes: list[str] | None
    num_samples: int
    shards: Sequence[ShardInfo]  # a list, or a ShardTable (manifest.cols, mapped)
    options: dict[str, Any]
    skipped: list[dict[str, str]] = field(default_factory=list)
    ignored: int = 0
    tensor: dict[str, Any] | None = None  # dtype/layout of tensor-mode samples
    # Where labels come from: None (packed shards) = {"field": "cls"}, a number; {"field": F}
    # another member; {"json": KEY} a key of the .json member; "names": true when they are class
    # names (their index in ``classes``); {"field": None}: no labels.
    labels: dict[str, Any] | None = None
    signature: str | None = None  # of a manifest that names shards elsewhere (signing.py)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    created_by: str = field(default_factory=_version)
    base_url: str | None = field(default=None, compare=False, repr=False)  # where it was loaded from
    stats: dict | None = field(default=None, compare=False, repr=False)  # set by pack_folder
    store: Any = field(default=None, compare=False, repr=False)  # where shards are read from

    def to_json(self, columns: bytes | None = None) -> str:
        """The manifest as JSON; with ``columns`` (the bytes of its ``manifest.cols``), the shard
        list is that file's: ``"shards": {"columns", "count", "sha256"}``."""
        skip = ("base_url", "stats", "store")
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        for name in ("labels", "signature"):  # absent unless given: packed manifests as before
            if data[name] is None:
                del data[name]
        if columns is not None:
            import hashlib

            data["shards"] = {"columns": COLUMNS_NAME, "count": len(self.shards),
                              "sha256": hashlib.sha256(columns).hexdigest()}
        else:
            data["shards"] = [s.as_json() for s in self.shards]
        text = json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        # Skipped paths that are not UTF-8 hold lone surrogates: written as JSON \udcXX escapes
        # (valid UTF-8, and json.loads restores the same str), not as an encoding error.
        return text.encode("utf-8", "backslashreplace").decode("utf-8")

    def files(self, compact: bool | None = None) -> list[tuple[str, bytes]]:
        """What a dataset folder holds of this manifest, in the order to write it (the JSON
        last): ``manifest.json``, preceded by ``manifest.cols`` when ``compact`` (default: at
        least :data:`~shardkit.columns.COMPACT_SHARDS` shards, and not signed)."""
        if compact is None:  # (shards naming different hashes stay a JSON list)
            compact = len(self.shards) >= COMPACT_SHARDS and shard_digest(self.shards) is not None
        if not compact:
            return [(MANIFEST_PATH, self.to_json().encode("utf-8"))]
        columns = encode_columns(self.shards)
        return [(COLUMNS_PATH, columns), (MANIFEST_PATH, self.to_json(columns).encode("utf-8"))]

    @property
    def num_bytes(self) -> int:
        if isinstance(self.shards, ShardTable):
            return int(self.shards.num_bytes().sum())
        return sum(s.num_bytes for s in self.shards)

    def shard_store(self) -> Store:
        """Where this manifest's shards and index files are read from: the store it was loaded
        through, or for a manifest made in memory the folder ``base_url`` (else the current one)."""
        if self.store is not None:
            return self.store
        return LocalStore(self.base_url or os.getcwd())

    def shard_sizes(self) -> np.ndarray:
        """Samples per shard as a read-only int64 array (what :mod:`shardkit.plan` takes).

        Cached while ``shards`` is the same list of the same length (build a new manifest, rather
        than editing a ``ShardInfo`` in place, to change counts).
        """
        cached = self.__dict__.get("_shard_sizes")
        if cached is not None and cached[0] is self.shards and cached[1] == len(self.shards):
            return cached[2]
        if isinstance(self.shards, ShardTable):
            return self._cache_sizes(self.shards.sizes())
        sizes = np.fromiter((s.num_samples for s in self.shards), dtype=np.int64,
                            count=len(self.shards))
        return self._cache_sizes(sizes)

    def _cache_sizes(self, sizes: np.ndarray) -> np.ndarray:
        if sizes.flags.writeable:
            sizes.flags.writeable = False
        self.__dict__["_shard_sizes"] = (self.shards, len(self.shards), sizes)
        return sizes

    def to_msgpack(self) -> bytes:
        """The compact encoding (see the module docstring); :meth:`from_msgpack` reads it back."""
        import msgpack

        skip = ("base_url", "stats", "store", "shards")
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        for name in ("labels", "signature"):
            if data[name] is None:
                del data[name]
        columns: dict[str, Any] = {"count": len(self.shards), "encoding": MSGPACK_ENCODING}
        for f in fields(ShardInfo):
            values = [getattr(s, f.name) for s in self.shards]
            if f.name == "blake3" and all(v is None for v in values):
                continue  # no BLAKE3 shard: the file is as it always was
            columns[f.name] = encode_list_column(values)
        data["shards"] = columns
        return msgpack.packb(data, use_bin_type=True)

    @classmethod
    def from_msgpack(cls, data: bytes, where: str = "manifest") -> "Manifest":
        """Parse and validate the compact encoding; anything malformed is a ``ManifestError``."""
        import msgpack

        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ManifestError(f"{where}: not valid msgpack ({exc})") from None
        _check_header(obj, where)
        columns = obj.pop("shards", None)
        names = [f.name for f in fields(ShardInfo)]
        if isinstance(columns, dict) and "blake3" not in columns:
            names.remove("blake3")  # optional: no shard names its BLAKE3
        if not isinstance(columns, dict) or set(columns) != {"count", "encoding", *names} \
                or columns["encoding"] != MSGPACK_ENCODING:
            raise ManifestError(f"{where}: malformed manifest (shard columns must be "
                                f"{['count', 'encoding', *names]} with encoding "
                                f"{MSGPACK_ENCODING!r})")
        count = columns["count"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ManifestError(f"{where}: malformed manifest (shard count {count!r})")
        cols = [decode_list_column(columns[name], count, f"{where}: shard column {name!r}")
                for name in names]
        try:
            _check_keys(obj, where)
            shards = [ShardInfo(*row) for row in zip(*cols)] if count else []
            manifest = cls(shards=shards, **obj)
        except (TypeError, KeyError) as exc:
            raise ManifestError(f"{where}: malformed manifest ({exc})") from exc
        check(manifest, where)
        raw = columns.get("num_samples")
        if isinstance(raw, dict) and "u64" in raw:  # the plan's input, without a pass over shards
            manifest._cache_sizes(np.frombuffer(raw["u64"], dtype="<u8").astype(np.int64))
        return manifest

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest",
                  columns: Any = None) -> "Manifest":
        """Parse and validate ``manifest.json``; ``columns(name)`` gives the bytes (or a
        read-only mapping) of a file beside it, for a manifest whose shard list is in
        ``manifest.cols``."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{where}: not valid JSON ({exc})") from exc
        _check_header(data, where)
        signed = isinstance(data, dict) and data.get("signature") is not None
        if signed:  # shards may live elsewhere: only if this machine's key signed it
            signing.check(data, where)
        if isinstance(data.get("shards"), dict):  # (a signature covers the list's sha256)
            data["shards"] = _table(data["shards"], where, columns)
        try:
            _check_keys(data, where)
            listed = data.pop("shards")
            shards = listed if isinstance(listed, ShardTable) else [ShardInfo(**s) for s in listed]
            manifest = cls(shards=shards, **data)
        except (TypeError, KeyError) as exc:
            raise ManifestError(f"{where}: malformed manifest ({exc})") from exc
        check(manifest, where, external=signed)
        return manifest

    @property
    def shuffled(self) -> bool | None:
        """Whether the samples are in no particular order within and across shards: True for a
        pack shuffled at pack time (the default), False for one packed in folder order or shards
        whose labels the index found clustered (neighbours share a label far more often than a
        shuffled order gives), None when nothing says (shards listed by URL, no labels)."""
        options = self.options if isinstance(self.options, dict) else {}
        if isinstance(options.get("shuffle"), bool):
            return options["shuffle"]
        order = options.get("order")
        if isinstance(order, dict) and order.get("labels"):
            same, iid = order.get("same_label_neighbours"), order.get("if_shuffled")
            if isinstance(same, (int, float)) and isinstance(iid, (int, float)):
                return same <= iid + 0.1
        return None

    @property
    def member_fields(self) -> frozenset[str] | None:
        """The fields (member extensions) the samples may hold: what the index counted for
        indexed shards; for a pack, its members (``cls``, ``json``, the image or ``npy``); None
        when nothing says (shards listed by URL)."""
        options = self.options if isinstance(self.options, dict) else {}
        counted = options.get("fields")
        if isinstance(counted, dict):
            return frozenset(str(f) for f in counted)
        mode = options.get("mode")
        if self.format == FORMAT and isinstance(mode, str):
            image = {"tensor": {"npy"}, "resize": {"jpg"}}.get(mode,
                                                                {"jpg", "png", "webp", "bmp",
                                                                 "gif", "tiff"})  # raw: as stored
            return frozenset({"json", *image, *(("cls",) if self.classes else ())})
        return None

    @property
    def compressed(self) -> bool:
        """Whether some shard is gzip-compressed (``.tar.gz``, ``.tgz``): read from its start."""
        if isinstance(self.shards, ShardTable):
            p = self.shards.pattern("url")
            if p is not None:
                return is_compressed(p["suffix"])
            return any(is_compressed(u) for u in self.shards.texts("url"))
        return any(is_compressed(s.url) for s in self.shards)

    @property
    def external(self) -> bool:
        """Whether shards live outside the manifest's folder (a signed manifest of ``index``)."""
        if isinstance(self.shards, ShardTable):
            return self.shards.external()
        return any(is_external(s.url) for s in self.shards)

    @classmethod
    def load(cls, source: Location, storage_options: dict | None = None, *, timeout: float = 60.0,
             retries: int = 6) -> "Manifest":
        """Load from a dataset folder, a manifest path, or a URL of either (s3://, http(s)://,
        or any other protocol fsspec knows: gs://, az://, hf://, …).

        A folder or prefix is looked at in this order: ``.shardkit/manifest.json`` (format
        version 2), ``manifest.json`` (version 1), then the compact ``manifest.msgpack`` in the
        same two places (a folder holding both is read from its JSON, so a stale companion can
        never override the canonical file). ``timeout`` (seconds without a byte) and ``retries``
        apply to every remote request of the manifest and, through ``manifest.store``, of the
        shards and index files read with it."""
        store, names = _locate(source, storage_options, timeout=timeout, retries=retries)
        name, data = _read_first(store, names)
        where = store.url(name)
        if name.endswith(".msgpack"):
            manifest = cls.from_msgpack(data, where)
        else:
            folder = name.rpartition("/")[0]
            manifest = cls.from_json(data, where, partial(_open_columns, store, folder))
        manifest.base_url = store.url("").rstrip("/")
        manifest.store = store
        if manifest.external:  # each shard read where it lives, the index files from here
            manifest.store = MixedStore(store, storage_options, timeout=timeout, retries=retries)
        return manifest

    @classmethod
    def from_urls(cls, urls: Sequence[str], storage_options: dict | None = None, *, timeout: float = 60.0,
                  retries: int = 6) -> "Manifest":
        """A manifest, in memory, for shards the caller names explicitly.

        ``urls``: a list or tuple of shard paths or URLs (local, ``s3://``, ``http(s)://``, any
        other protocol fsspec knows; any
        hosts and prefixes, in the order given), each with its index file beside it (the same
        name with ``.idx`` instead of ``.tar``; ``x.tar.gz.idx`` for ``x.tar.gz``). Every index
        file is read now (in parallel) and validated; it gives the shard's sample count and size
        (a compressed shard's size as stored is asked of its store). The shards' sha256 are unknown,
        so not checked (``ShardInfo.sha256`` is None); each index file's sha256 is recorded as
        read, so one changed later is an error. ``classes`` is None. ``storage_options`` apply to
        every remote URL, or per protocol when keyed by protocols (``"s3"``, ``"https"``, ``"gs"``, …).

        This is the only way to read shards outside a dataset's own folder or prefix: a manifest
        file's shard URLs stay plain relative names, so a file can never redirect reads by
        itself; only the caller's code can.
        """
        import hashlib
        from concurrent.futures import ThreadPoolExecutor

        store = ListedStore(urls, storage_options, timeout=timeout, retries=retries)

        def shard(names: tuple[str, tuple[str, ...]]) -> ShardInfo:
            url, candidates = names
            for index_url in candidates:  # .shardkit/x.idx, then x.idx (format version 1)
                try:
                    data = store.read_bytes(index_url)
                    break
                except ShardError as exc:
                    if exc.reason != "not found" and "No such file" not in exc.reason:
                        raise ShardError(url, f"cannot read its index file {index_url} "
                                              f"({exc.reason})") from None
            else:
                _refuse_gzip_named_tar(store, url)
                raise ShardError(url, f"no index file: neither {' nor '.join(candidates)} "
                                      "exists (shards without an index: shardkit index)")
            n, num_bytes = index_extent(data, index_url)
            compressed = is_compressed(url)
            try:
                decode_index(data, n, num_bytes, index_url, compressed=compressed)
            except ManifestError as exc:
                raise ShardError(index_url, str(exc).removeprefix(f"{index_url}: ")) from None
            if compressed:  # the file as stored (what the cache checks), not the index's extent
                size = store.size(url)
                if size is None:
                    raise ShardError(url, "not found")
                num_bytes = size
            return ShardInfo(url=url, num_samples=n, num_bytes=num_bytes, sha256=None,
                             index_url=index_url,
                             index_sha256=hashlib.sha256(data).hexdigest())

        with ThreadPoolExecutor(max_workers=min(16, len(store.shards))) as pool:
            shards = list(pool.map(shard, store.shards))
        manifest = cls(classes=None, num_samples=sum(s.num_samples for s in shards),
                       shards=shards, options={})
        manifest.store = store
        return manifest


def _refuse_gzip_named_tar(store: Store, url: str) -> None:
    """A ShardError saying what to do when the listed shard ``url`` (without an index) is gzip
    data named ``.tar``; nothing when it is not, or cannot be read."""
    if is_compressed(url):
        return
    try:
        stream = store.open_range(url, 0, 2)
        try:
            head = stream.read(2)
        finally:
            stream.close()
    except (OSError, ValueError):
        return  # the missing index is the error to report
    if head == GZIP_MAGIC:
        raise ShardError(url, gzip_named_tar(url))


def _check_header(data: object, where: str) -> None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{where}: not a shardkit manifest (missing format: {FORMAT!r})")
    version = data.get("format_version")
    if version not in READ_VERSIONS:
        raise ManifestError(f"{where}: format_version {version!r} is not supported "
                            f"(this shardkit reads versions {', '.join(map(str, READ_VERSIONS))})")


_STORED = {"classes", "num_samples", "shards", "options", "skipped", "ignored", "tensor", "labels",
           "signature", "format",
           "format_version", "created_by"}  # what to_json writes; nothing else is accepted


def _check_keys(data: dict, where: str) -> None:
    unknown = sorted(map(str, set(data) - _STORED))
    if unknown:  # e.g. "base_url" or "store": where shards are read from is never the file's say
        raise ManifestError(f"{where}: malformed manifest (unknown fields {unknown[:5]})")


def _table(ref: dict, where: str, columns: Any) -> ShardTable:
    """The shard list a manifest keeps in ``manifest.cols`` (``ref``: its ``"shards"`` entry)."""

    if set(ref) != {"columns", "count", "sha256"} or ref["columns"] != COLUMNS_NAME \
            or type(ref["count"]) is not int or not isinstance(ref["sha256"], str):
        raise ManifestError(f"{where}: malformed manifest (shards must be a list, or "
                            f"{{'columns': {COLUMNS_NAME!r}, 'count', 'sha256'}})")
    if columns is None:
        raise ManifestError(f"{where}: its shard list is in {COLUMNS_NAME} beside it; load the "
                            "dataset with Manifest.load")
    name, buffer, digest = columns(COLUMNS_NAME)
    if digest != ref["sha256"]:
        raise ManifestError(f"{name}: not the shard list {where} names (sha256 differs: "
                            "written by another pack or index?)")
    try:
        table = ShardTable(buffer, ShardInfo, name)
    except ColumnsError as exc:
        raise ManifestError(str(exc)) from None
    if len(table) != ref["count"]:
        raise ManifestError(f"{name}: {len(table)} shards, {where} says {ref['count']}")
    return table


def _open_columns(store: Store, folder: str, name: str) -> tuple[str, Any, str]:
    """``(url, bytes, sha256)`` of the file ``name`` beside a manifest: for a local file a
    read-only shared mapping (every process of a machine shares its pages; the digest is read
    through a small buffer, so only the pages a reader touches are mapped in), else its bytes."""
    import hashlib

    path = f"{folder}/{name}" if folder else name
    where = store.url(path)
    if isinstance(store, LocalStore):
        import mmap

        try:
            with open(store.base / path, "rb") as f:
                h = hashlib.sha256()
                for piece in iter(lambda: f.read(1 << 20), b""):
                    h.update(piece)
                digest = h.hexdigest()
                return where, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), digest
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{where}: cannot read the shard list ({exc})") from None
    try:
        data = store.read_bytes(path)
    except ShardError as exc:
        raise ManifestError(f"{where}: cannot read the shard list ({exc.reason})") from None
    return where, data, hashlib.sha256(data).hexdigest()


def _locate(source, storage_options, *, timeout: float, retries: int) -> tuple[Store, list[str]]:
    """The store of a source's dataset folder or prefix, and the manifest names to try there.
    A manifest named inside ``.shardkit/`` belongs to the folder above it."""
    try:
        text = os.fspath(source)
    except TypeError:
        text = None
    names = [MANIFEST_PATH, MANIFEST_NAME, MSGPACK_PATH, MSGPACK_NAME]
    if isinstance(text, str) and text.endswith((".json", ".msgpack")) \
            and "/" in text.split("://", 1)[-1]:  # ("s3://name.json" is a bucket)
        folder, _, name = text.rpartition("/")
        if folder == META_DIR or folder.endswith("/" + META_DIR):
            folder, name = folder[:-len(META_DIR)].rstrip("/"), f"{META_DIR}/{name}"
        source, names = (folder + "/" if "://" in folder else folder or "."), [name]
    elif isinstance(text, str) and text.endswith((".json", ".msgpack")) and "://" not in text:
        source, names = ".", [text]
    store, _ = make_store(source, storage_options, retries=retries, timeout=timeout)
    return store, names


def _read_first(store: Store, names: list[str]) -> tuple[str, bytes]:
    """The first of ``names`` that exists in ``store``, and its bytes."""
    if isinstance(store, LocalStore) and store.base.is_file():
        raise ManifestError(f"{store.base}: a file, not a dataset folder (give the folder that "
                            "holds .shardkit/manifest.json, a manifest's path, or shard paths: "
                            "one .tar, a list, or a brace pattern)")
    for name in names:
        where = store.url(name)
        try:
            if isinstance(store, LocalStore) and store.size(name) is None:  # timeout-bounded
                continue
            return name, store.read_bytes(name)
        except ShardError as exc:
            if exc.reason == "not found":  # remote: the next place
                continue
            raise ManifestError(f"{where}: cannot read the manifest ({exc.reason})") from None
    where = store.url(names[0])
    hint = ""
    if isinstance(store, LocalStore):
        base = store.base
        if not base.exists():
            raise no_such_path(base)
        if any(any(base.glob(f"*{suffix}")) for suffix in SHARD_SUFFIXES):
            if any(base.glob(".shardkit-pack*.json")):
                hint = " (an unfinished pack? re-run pack with --resume)"
            else:
                hint = (" (shards without a shardkit manifest? index them: "
                        f"shardkit index {base})")
        elif image_folder(base):
            hint = f" ({image_folder_hint(base)})"
    raise ManifestError(f"{where}: no manifest found{hint}")


def load_manifest(source: Location, storage_options: dict | None = None, *, timeout: float = 60.0,
                  retries: int = 6) -> Manifest:
    """The manifest of a source: a :class:`Manifest` as it is; a list or tuple of shard URLs
    (:meth:`Manifest.from_urls`); a dataset folder, manifest path or URL (:meth:`Manifest.load`)."""
    if isinstance(source, Manifest):
        return source
    if isinstance(source, (list, tuple)):
        return Manifest.from_urls(source, storage_options, timeout=timeout, retries=retries)
    urls = shard_list(source)
    if urls is not None:  # one shard, or a brace pattern of them (as webdataset and index take)
        return Manifest.from_urls(urls, storage_options, timeout=timeout, retries=retries)
    return Manifest.load(source, storage_options=storage_options, timeout=timeout, retries=retries)


def write_manifest(manifest: Manifest, dest, storage_options: dict | None = None, *,
                   json_too: bool = True, compact: bool | None = None) -> None:
    """Write a manifest into a dataset folder: the shard list as ``manifest.cols`` and then
    ``manifest.json`` when ``compact`` (default: above :data:`~shardkit.columns.COMPACT_SHARDS`
    shards); otherwise ``manifest.msgpack`` and then (``json_too``) the full ``manifest.json``."""
    out = make_dest(dest, storage_options)
    if not getattr(out, "remote", False):
        out.prepare()
    files = manifest.files(compact)
    if len(files) > 1:
        for name, data in files:
            out.write_atomic(name, data)
        return
    out.write_atomic(MSGPACK_PATH, manifest.to_msgpack())
    if json_too:
        out.write_atomic(MANIFEST_PATH, files[0][1])


def compact(source, storage_options: dict | None = None, *, expand: bool = False) -> Manifest:
    """Rewrite an existing dataset's manifest with its shard list in ``manifest.cols``
    (``expand``: back into one ``manifest.json``). Shards and index files are not touched."""
    manifest = Manifest.load(source, storage_options)  # (a signed one: this machine's key)
    out = make_dest(manifest.base_url or source, storage_options)
    shards = manifest.shards
    if expand and isinstance(shards, ShardTable):
        manifest = replace(manifest, shards=list(shards))
    files = manifest.files(compact=not expand)
    if manifest.signature is not None:  # shards elsewhere: signed again, over the new JSON
        files[-1] = (files[-1][0], signing.sign(files[-1][1]))
    for name, data in files:
        out.write_atomic(name, data)
    return Manifest.load(source, storage_options)


def write_msgpack_companion(source, storage_options: dict | None = None) -> Manifest:
    """Add ``manifest.msgpack`` beside the ``manifest.json`` of an existing dataset."""
    manifest = Manifest.load(source, storage_options)
    write_manifest(manifest, manifest.base_url, storage_options, json_too=False)
    return manifest
