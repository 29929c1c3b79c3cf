"""Shared helpers for the read-path tests (test_dataset.py, test_loader.py).

Datasets are generated here, never stored: small photo-like JPEGs packed into many small shards,
plus tools to read a shard back as samples and to write a hand-crafted (possibly broken) shard
with a matching index and manifest entry.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import shardkit
from shardkit.encode import member
from shardkit.manifest import MANIFEST_NAME, encode_index
from shardkit.synth import make_image_folder
from shardkit.writer import END_OF_ARCHIVE


def image_folder(root: Path, *, classes: int = 5, per_class: int = 13, size=(32, 24)) -> Path:
    """A class-sorted folder of ``classes * per_class`` small JPEGs (jitter 0: same size)."""
    return make_image_folder(root, classes=classes, per_class=per_class, size=size, jitter=0.0)


def pack(src: Path, dest: Path, **kw) -> shardkit.Manifest:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return shardkit.pack_folder(src, dest, **kw)


def all_keys(source) -> list[str]:
    """Every key of a dataset, in storage order (read directly from the shards' tar files)."""
    return [key for key, _ in iter_samples(source)]


def iter_samples(source):
    """``(key, {field: bytes})`` of every sample of every shard, in storage order."""
    m = shardkit.Manifest.load(source)
    for shard in m.shards:
        yield from shard_samples(Path(m.base_url) / shard.url)


def shard_samples(path: Path) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    with tarfile.open(path) as tar:
        for info in tar:
            key, field = info.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][field] = tar.extractfile(info).read()
    return out


def keys_of(items, *, batched: bool) -> list[str]:
    """Keys from items ``(image, label, key)`` or batches ``(images, labels, [keys])``."""
    if batched:
        return [k for item in items for k in item[2]]
    return [item[2] for item in items]


def duplicates(keys) -> dict[str, int]:
    return {k: n for k, n in Counter(keys).items() if n > 1}


def write_shard(dest: Path, shard_no: int, samples: list[list[tuple[str, bytes]]], *,
                extra: bytes = b"", index_samples: int | None = None) -> bytes:
    """Replace shard ``shard_no`` of the dataset in ``dest`` by ``samples`` (lists of members).

    Writes the tar, its index file and the manifest entry (counts, sizes, sha256) so that they
    agree. ``index_samples`` describes only the first that many samples in index and manifest
    (the rest then look like extra data the manifest does not know about). Returns the tar bytes.
    """
    blobs = [b"".join(member(name, data) for name, data in sample) for sample in samples]
    offsets, pos = [], 0
    for blob in blobs:
        offsets.append(pos)
        pos += len(blob)
    offsets.append(pos)
    data = b"".join(blobs) + extra + END_OF_ARCHIVE
    n = len(samples) if index_samples is None else index_samples
    offsets = offsets[:n + 1]
    manifest_path = Path(dest) / MANIFEST_NAME
    doc = json.loads(manifest_path.read_text())
    entry = doc["shards"][shard_no]
    index = encode_index(offsets)
    (Path(dest) / entry["url"]).write_bytes(data)
    (Path(dest) / entry["index_url"]).write_bytes(index)
    doc["num_samples"] += n - entry["num_samples"]
    entry.update(num_samples=n, num_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                 index_sha256=hashlib.sha256(index).hexdigest())
    manifest_path.write_text(json.dumps(doc, indent=1, sort_keys=True))
    return data


def members_of(sample: tuple[str, dict]) -> list[tuple[str, bytes]]:
    """A sample from ``shard_samples`` as the member list ``write_shard`` takes (cls, image, json)."""
    key, fields = sample
    order = sorted(fields, key=lambda f: (f != "cls", f == "json", f))
    return [(f"{key}.{f}", fields[f]) for f in order]


def jpeg_bytes(size=(32, 24), color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()
