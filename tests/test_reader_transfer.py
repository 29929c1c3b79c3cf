"""One epoch reads each byte of a dataset once: requests and bytes counted at the source.

Packed shards (shardkit's own) and indexed ones (``webdataset.ShardWriter``: every member has a
pax header, so the reader's strict path takes over from its fast one), read locally (bytes the
process read, ``rchar``), over HTTP and as S3 (both from the counting test server), with and
without ``fields=`` and ``cache_dir``. An epoch may transfer the shards' bytes once (at most 2 %
more), plus index files and the manifest, in at most one request per block.
"""

from __future__ import annotations

import io
from urllib.parse import urlsplit

import numpy as np
import pytest

import shardkit
from shardkit import StreamingDataset

from _helpers_read import image_folder, pack
from _helpers_remote import BUCKET, Data, serve

wds = pytest.importorskip("webdataset")

BLOCK = 8
SLACK = 1.02


def _indexed(root):
    folder = root / "indexed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=12, verbose=0) as sink:
        for i in range(40):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
            sink.write({"__key__": f"s{i:05d}", "jpg": buf.getvalue(), "cls": i % 3,
                        "txt": f"caption {i}"})
    shardkit.index_shards(folder, progress=False)
    return folder


def _packed(root):
    src = image_folder(root / "src", classes=3, per_class=14, size=(48, 40))
    pack(src, root / "packed", max_samples=12)
    return root / "packed"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    return {"packed": (Data(None, _packed(root), {}), "json"),
            "indexed": (Data(None, _indexed(root), {}), "txt")}


def _budget(data: Data) -> tuple[int, int, int]:
    """(bytes of the shards, bytes of everything else, blocks of the epoch)."""
    m = data.manifest
    shard_bytes = sum(s.num_bytes for s in m.shards)
    other = sum(len(b) for name, b in data.files.items() if not name.endswith(".tar"))
    blocks = sum(-(-s.num_samples // BLOCK) for s in m.shards)
    return shard_bytes, other, blocks


def _epoch(source, fields, **kw) -> list[str]:
    ds = StreamingDataset(source, decode="raw", with_keys=True, block_size=BLOCK, seed=5,
                          fields=fields, **kw)
    keys = [item[-1] for item in ds]
    assert len(keys) == len(set(keys)) == ds.manifest.num_samples
    return keys


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.parametrize("kind", ["packed", "indexed"])
@pytest.mark.parametrize("with_fields", [False, True])
def test_a_local_epoch_reads_each_byte_once(datasets, kind, with_fields):
    data, field = datasets[kind]
    fields = (field,) if with_fields else None
    shard_bytes, other, _ = _budget(data)
    ds = StreamingDataset(data.local, decode="raw", with_keys=True, block_size=BLOCK, seed=5,
                          fields=fields)
    assert len(list(ds)) == data.manifest.num_samples  # imports and first-use files read here
    ds.set_epoch(1)
    before = _rchar()
    keys = [item[-1] for item in ds]
    read = _rchar() - before
    assert len(set(keys)) == len(keys) == data.manifest.num_samples
    assert read <= SLACK * shard_bytes + other, (read, shard_bytes, other)


@pytest.mark.parametrize("proto", ["http", "s3"])
@pytest.mark.parametrize("kind", ["packed", "indexed"])
@pytest.mark.parametrize("with_fields", [False, True])
@pytest.mark.parametrize("cached", [False, True])
def test_a_remote_epoch_transfers_each_byte_once(datasets, tmp_path, proto, kind, with_fields,
                                                 cached):
    data, field = datasets[kind]
    fields = (field,) if with_fields else None
    shard_bytes, other, blocks = _budget(data)
    with serve(tmp_path, data) as srv:
        if proto == "http":
            source, options = f"{srv.url}{BUCKET}/ds/", None
        else:
            source, options = f"s3://{BUCKET}/ds", {
                "key": "testing", "secret": "testing",
                "client_kwargs": {"endpoint_url": srv.url.rstrip("/"), "region_name": "us-east-1"}}
        cache = dict(cache_dir=str(tmp_path / "cache")) if cached else {}
        _epoch(source, fields, storage_options=options, **cache)
        shard_gets = [(path, rng) for method, path, rng in srv.requests
                      if method == "GET" and urlsplit(path).path.endswith(".tar")]
        sent = srv.bytes_sent
    assert len(shard_gets) == len(set(shard_gets)), "a byte range was requested twice"
    assert len(shard_gets) <= (len(data.manifest.shards) if cached else blocks), shard_gets
    assert sent <= SLACK * shard_bytes + other, (sent, shard_bytes, other)
