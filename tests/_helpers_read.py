"""Shared helpers for the read-path tests (test_dataset.py, test_loader.py).

Datasets are generated here, never stored: small photo-like JPEGs packed into many small shards,
plus tools to read a shard back as samples and to write a hand-crafted (possibly broken) shard
with a matching index and manifest entry.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

import shardkit
from shardkit import StreamingDataset, make_loader
from shardkit.bench.synth import make_image_folder
from shardkit.shardformat import END_OF_ARCHIVE, MANIFEST_PATH, decode_index, encode_index, member


def image_folder(root: Path, *, classes: int = 5, per_class: int = 13, size=(32, 24)) -> Path:
    """A class-sorted folder of ``classes * per_class`` small JPEGs (jitter 0: same size)."""
    return make_image_folder(root, classes=classes, per_class=per_class, size=size, jitter=0.0)


def pack(src: Path, dest: Path, **kw) -> shardkit.Manifest:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return shardkit.pack_folder(src, dest, **kw)


def packed_raw(tmp_path_factory, *, classes: int, per_class: int, max_samples: int,
               size=(32, 24)) -> Path:
    """A raw-mode dataset of a generated class folder, in a fresh temporary folder."""
    src = image_folder(tmp_path_factory.mktemp("src"), classes=classes, per_class=per_class,
                       size=size)
    dest = tmp_path_factory.mktemp("ds")
    pack(src, dest, mode="raw", max_samples=max_samples)
    return dest


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
    manifest_path = Path(dest) / MANIFEST_PATH
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


def same_items(a, b) -> bool:
    """Equal items: tensors by value and shape, tuples and lists element-wise."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_items(x, y) for x, y in zip(a, b))
    return a == b


def offsets_of(src, shard_no=0):
    """The sample offsets of one shard of a dataset folder, from its index file."""
    m = shardkit.Manifest.load(src)
    s = m.shards[shard_no]
    return decode_index((Path(m.base_url) / s.index_url).read_bytes(), s.num_samples, s.num_bytes, "")


# ----------------------------------------------------------------- datasets of test_dataset, test_state

NUM = 65  # 5 classes x 13: leaves a remainder for 2 and 3 ranks
LAYOUTS = {"one": NUM, "nine": 8, "many": 3}  # max_samples -> 1, 9 (= 3 ranks x 3 workers), 22 shards


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("src"), classes=5, per_class=13)


@pytest.fixture(scope="module")
def datasets(folder, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, max_samples in LAYOUTS.items():
        dest = tmp_path_factory.mktemp(f"ds_{name}")
        pack(folder, dest, mode="raw", max_samples=max_samples)
        out[name] = dest
    assert [len(shardkit.Manifest.load(out[n]).shards) for n in LAYOUTS] == [1, 9, 22]
    return out


@pytest.fixture(scope="module")
def keys(datasets) -> list[str]:
    ks = all_keys(datasets["one"])
    assert len(ks) == NUM == len(set(ks))
    return ks


def run(source, num_workers=0, **kw):
    """(dataset, len before iterating, items of one epoch through make_loader)."""
    kw.setdefault("decode", "raw")
    kw.setdefault("with_keys", True)
    ds = StreamingDataset(source, **kw)
    n = len(ds)
    loader = make_loader(ds, num_workers=num_workers)
    return ds, n, list(loader)
