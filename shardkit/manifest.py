"""``manifest.json`` and the per-shard index files: the format's contract with readers.

A dataset is a folder (or object-store prefix) holding ``<prefix>-000000.tar`` … , one
``<prefix>-000000.idx`` beside each shard, and ``manifest.json``, written last.

Index file (``.idx``): 8 magic bytes ``SKIDX\\x01\\0\\0``, then ``num_samples + 1`` little-endian
uint64 byte offsets: where each sample's first tar header starts, and finally where the
end-of-archive blocks start. A reader can seek to any sample without reading what precedes it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .errors import ManifestError

FORMAT = "shardkit"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_MAGIC = b"SKIDX\x01\0\0"


def _version() -> str:
    from . import __version__

    return f"shardkit {__version__}"


@dataclass
class ShardInfo:
    url: str  # relative to the dataset's folder or prefix
    num_samples: int
    num_bytes: int
    sha256: str
    index_url: str
    index_sha256: str


@dataclass
class Manifest:
    classes: list[str] | None
    num_samples: int
    shards: list[ShardInfo]
    options: dict[str, Any]
    skipped: list[dict[str, str]] = field(default_factory=list)
    ignored: int = 0
    tensor: dict[str, Any] | None = None  # dtype/layout of tensor-mode samples
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    created_by: str = field(default_factory=_version)
    base_url: str | None = field(default=None, compare=False, repr=False)  # where it was loaded from
    stats: dict | None = field(default=None, compare=False, repr=False)  # set by pack_folder
    store: Any = field(default=None, compare=False, repr=False)  # where shards are read from

    def to_json(self) -> str:
        skip = ("base_url", "stats", "store")
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        data["shards"] = [asdict(s) for s in self.shards]
        return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes for s in self.shards)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> "Manifest":
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a shardkit manifest (missing format: {FORMAT!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(f"{where}: format_version {version!r} is not supported "
                                f"(this shardkit reads version {FORMAT_VERSION})")
        try:
            shards = [ShardInfo(**s) for s in data.pop("shards")]
            manifest = cls(shards=shards, **data)
        except (TypeError, KeyError) as exc:
            raise ManifestError(f"{where}: malformed manifest ({exc})") from exc
        _check(manifest, where)
        return manifest

    @classmethod
    def load(cls, source, storage_options: dict | None = None) -> "Manifest":
        """Load from a dataset folder, a manifest path, or an s3:// / http(s):// URL of either."""
        from .errors import ShardError
        from .storage import LocalStore, make_store

        store, name = make_store(source, storage_options)
        where = store.url(name)
        if isinstance(store, LocalStore) and not (store.base / name).exists():
            hint = ""
            if store.base.is_dir() and any(store.base.glob("*.tar")):
                hint = " (an unfinished pack? re-run pack with --resume)"
            raise ManifestError(f"{where}: no manifest found{hint}")
        try:
            data = store.read_bytes(name)
        except ShardError as exc:
            raise ManifestError(f"{where}: cannot read the manifest ({exc.reason})") from None
        manifest = cls.from_json(data, where)
        manifest.base_url = store.url("").rstrip("/")
        manifest.store = store
        return manifest


def _check(m: Manifest, where: str) -> None:
    ints = [m.num_samples] + [s.num_samples for s in m.shards] + [s.num_bytes for s in m.shards]
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ints):
        raise ManifestError(f"{where}: counts must be non-negative integers")
    if sum(s.num_samples for s in m.shards) != m.num_samples:
        raise ManifestError(f"{where}: shard sample counts do not add up to num_samples")
    for s in m.shards:
        for url in (s.url, s.index_url):
            if not isinstance(url, str) or not url or url.startswith("/") or "\\" in url \
                    or ".." in url.split("/") or "://" in url:
                raise ManifestError(f"{where}: shard URL {url!r} is not a plain relative name "
                                    "inside the dataset")


def encode_index(offsets) -> bytes:
    return INDEX_MAGIC + np.asarray(offsets, dtype="<u8").tobytes()


def decode_index(data: bytes, num_samples: int, num_bytes: int, where: str) -> np.ndarray:
    """Parse and validate an index file against the manifest's counts."""
    expected = len(INDEX_MAGIC) + 8 * (num_samples + 1)
    if not data.startswith(INDEX_MAGIC) or len(data) != expected:
        raise ManifestError(f"{where}: index file is malformed or does not match the manifest "
                            f"({len(data)} bytes, expected {expected})")
    offsets = np.frombuffer(data, dtype="<u8", offset=len(INDEX_MAGIC)).astype(np.int64)
    if offsets[0] != 0 or np.any(np.diff(offsets) < 1024) or offsets[-1] + 1024 > num_bytes:
        raise ManifestError(f"{where}: index offsets are inconsistent with the shard")
    return offsets
